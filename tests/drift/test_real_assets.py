"""Acceptance on the real model and CIFAR-10 (skipped without $EYED_SHARED): no false drift on clean held-out
images, every synthetic shift detected within two windows, by the statistics a person would expect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.drift_cifar10 import EXPECTED, SHIFTS, run_experiment, summarise
from eyed.config import DriftConfig
from eyed.drift.reference import load_reference
from eyed.model.labels import load_priors

pytestmark = [pytest.mark.assets, pytest.mark.slow]


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export of the real checkpoint for the whole session (~20 s)."""
    return tmp_path_factory.mktemp("drift-onnx-cache")


def test_clean_replay_is_quiet_and_every_shift_is_drift(
    real_model: Path, real_cifar: Path, onnx_cache: Path, tmp_path: Path
) -> None:
    cfg = DriftConfig()
    profile = tmp_path / "reference.json"
    result = run_experiment(
        real_model,
        real_cifar,
        onnx_cache,
        ref_frames=5000,
        clean_frames=5000,
        shift_frames=750,
        lead_windows=1,
        cfg=cfg,
        reference_out=profile,
    )
    summary = summarise(result, cfg)
    print(summary)  # the numbers, with -s
    clean = summary["clean"]
    assert clean["frames"] == 5000
    assert clean["drift_windows"] == 0, clean
    assert clean["warn_windows"] <= 4, clean  # ~5% of windows expected: 12 metrics at mean + 3 std each

    assert set(summary["shifts"]) == set(SHIFTS)
    for name, shift in summary["shifts"].items():
        assert shift["lead_in_alarms"] == 0, (name, shift)
        assert shift["delay_windows"] is not None and shift["delay_windows"] <= 1, (name, shift)
        fired = set(shift["fired_first_drift"])
        assert fired & EXPECTED[name], (name, fired)
    # Darker frames also differ less from each other: motion may fire first, now that values below the
    # reference's minimum have a bin of their own.
    assert "psi_brightness" in summary["shifts"]["darken x0.35"]["fired_first_drift"]
    assert "psi_sharpness" in summary["shifts"]["blur 5x5 s1.5"]["fired_first_drift"]
    assert "psi_contrast" in summary["shifts"]["contrast x0.4"]["fired_first_drift"]

    # Without a reference file: the first 4 windows become the reference, with the same outcome.
    own = summary["self"]
    assert own["clean_windows"] == 20 - cfg.learn_windows and own["clean_drift_windows"] == 0, own
    for name, shift in own["shifts"].items():
        assert shift["lead_in_alarms"] == 0 and shift["delay_windows"] is not None, (name, shift)
        assert shift["delay_windows"] <= 1 and set(shift["fired_first_drift"]) & EXPECTED[name], (name, shift)

    # The statistics are a small fraction of an inference.
    timing = summary["timing"]
    assert timing["stats_us"] + timing["monitor_us"] < 0.1 * 1000 * timing["infer_batch1_ms"], timing

    # The written profile loads, and is a priors file for this model's coarse space.
    ref = load_reference(profile)
    assert ref.frames == 5000 and ref.model
    priors = load_priors(str(profile), "cifar10", ref.coarse_classes)
    assert priors is not None and np.all(priors > 0)


def test_a_profile_serves_as_reference_and_priors_on_held_out_frames(
    real_model: Path, real_cifar: Path, onnx_cache: Path, tmp_path: Path
) -> None:
    """The README's workflow on the real model: `eyed profile` with the correction off, then held-out frames
    with the same file as drift.reference and model.coarse_priors. The drift coarse column (group sums) is the
    same under any priors; when it was the prior-corrected label, every window of this run was drift on
    js_coarse / psi_coarse."""
    from eyed.config import load_settings
    from eyed.evaluate import run_drift, run_profile

    profile = tmp_path / "reference.json"
    base = [f"source.dataset={real_cifar}", "source.split=train", f"model.id={real_model}"]
    base += [f"model.cache_dir={onnx_cache}"]
    run_profile(load_settings(None, [*base, "source.limit=2000", "model.coarse_priors=none"]), profile)
    held_out = [*base, "source.skip=10000", "source.limit=1000", f"drift.reference={profile}"]
    for priors in (str(profile), "none"):
        windows = run_drift(load_settings(None, [*held_out, f"model.coarse_priors={priors}"]))
        assert len(windows) == 4
        statuses = [w["status"] for w in windows]
        fired = {name for w in windows for name in w["fired"]}
        assert "drift" not in statuses and not fired & {"js_coarse", "psi_coarse"}, (priors, statuses, fired)
