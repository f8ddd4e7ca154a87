"""The reference profile: what it holds, its JSON round trip, errors on bad files, and its use as priors."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eyed.config import DriftConfig
from eyed.drift.reference import (
    FIELDS,
    NUMERIC_STATS,
    RESERVOIR,
    SCHEMA,
    ProfileBuilder,
    Reference,
    check_preprocess_spec,
    check_small_input,
    load_reference,
    preprocess_record,
    profile_blocks,
    sample_blocks,
)
from eyed.drift.stats import StatsExtractor
from eyed.model.labels import build_mapper, load_priors
from eyed.model.postprocess import Postprocessor, softmax
from eyed.model.preprocess import PreprocessSpec
from tests.conftest import imagenet_like_labels
from tests.drift import COARSE, synthetic_stats


def built(n: int = 3000, **kwargs: object) -> Reference:
    builder = ProfileBuilder(COARSE, top_classes=20, model="m", source="synthetic", **kwargs)  # type: ignore[arg-type]
    for s in synthetic_stats(n):
        builder.add(s)
    return builder.build(created=1.0)


def test_profile_holds_histograms_class_distributions_and_a_reservoir() -> None:
    ref = built(3000, reservoir=1000)
    assert ref.frames == 3000 and ref.reservoir.shape == (1000, len(FIELDS))
    assert set(ref.histograms) == set(NUMERIC_STATS)
    for h in ref.histograms.values():
        assert h.counts.sum() in (3000, 2999)  # motion has no value for the first frame
        assert len(h.counts) <= 12  # 10 quantile bins, and one below and one above the values seen
    assert ref.coarse_counts.sum() == 3000 and len(ref.coarse_counts) == len(COARSE)
    assert len(ref.fine_ids) == 20 and ref.fine_counts.sum() == 3000
    # The most frequent classes, most frequent first; everything else is "other".
    top1 = np.array([s.top1 for s in synthetic_stats(3000)])
    counts = np.bincount(top1)
    assert [int(counts[i]) for i in ref.fine_ids] == list(ref.fine_counts[:-1])
    assert list(ref.fine_counts[:-1]) == sorted(ref.fine_counts[:-1], reverse=True)
    assert ref.fine_counts[-1] == 3000 - counts[list(ref.fine_ids)].sum()


def test_reservoir_is_a_seeded_sample_of_the_whole_stream() -> None:
    a, b, c = built(2000, reservoir=500), built(2000, reservoir=500), built(2000, reservoir=500, seed=1)
    assert np.array_equal(a.reservoir, b.reservoir, equal_nan=True)
    assert not np.array_equal(a.reservoir, c.reservoir, equal_nan=True)
    # Over the whole stream: the sample's mean brightness is the stream's.
    col = FIELDS.index("brightness")
    assert abs(a.reservoir[:, col].mean() - np.mean([s.brightness for s in synthetic_stats(2000)])) < 3


def test_fewer_frames_than_the_reservoir_keeps_them_all() -> None:
    ref = built(300, reservoir=5000)
    assert ref.reservoir.shape[0] == 300 and ref.blocks == ((0, 300),)


def test_a_long_stream_keeps_blocks_of_consecutive_frames_spread_over_it() -> None:
    """Blocks at least a window long, so calibration windows hold consecutive frames as live ones do; one in
    each quarter of the stream here, so together they cover all of it."""
    ref = built(20_000, reservoir=1000, block=250)
    assert ref.blocks is not None and ref.reservoir.shape[0] == 1000
    assert sum(length for _, length in ref.blocks) == 1000
    frames = [f for start, length in ref.blocks for f in range(start, start + length)]
    assert frames == sorted(frames) and len(set(frames)) == 1000
    assert sorted({f // 5000 for f in frames}) == [0, 1, 2, 3]
    assert all(length % 250 == 0 for _, length in ref.blocks)  # adjacent blocks may merge into one run
    stream = np.asarray(synthetic_stats(20_000), dtype=np.float64)
    assert np.array_equal(ref.reservoir, stream[frames], equal_nan=True)


@pytest.mark.parametrize("seed", range(5))
def test_sampled_blocks_that_touch_are_one_run(seed: int) -> None:
    """A stream just longer than the reservoir leaves each block little room, so neighbouring blocks often
    touch: they are one run of consecutive frames (calibration windows may cross where they meet). The test
    above holds either way (``length % 250 == 0``), so not merging them went unseen."""
    blocks = sample_blocks(5010, 5000, 250, np.random.default_rng(seed))
    assert sum(length for _, length in blocks) == 5000
    assert len(blocks) < 20  # 20 blocks of 250 in 5010 frames cannot all be apart
    for (start, length), (following, _) in itertools.pairwise(blocks):
        assert following > start + length, f"runs {blocks} touch without being merged"


def test_a_block_longer_than_the_reservoir_is_cut_to_it() -> None:
    ref = built(3000, reservoir=200, block=250)
    assert ref.blocks is not None and len(ref.blocks) == 1 and ref.blocks[0][1] == 200


@pytest.mark.parametrize(
    ("cfg", "frames", "seconds", "expected"),
    [
        (DriftConfig(), 100_000, 3600.0, (250, RESERVOIR)),  # windows of 250 frames: blocks of 250
        (DriftConfig(window=2000), 100_000, 3600.0, (2000, 8000)),  # four blocks at least
        # 10-s windows on a 15 fps camera hold 151 frames; its profile's blocks must hold as many.
        (DriftConfig(window_s=10), 54_001, 3600.0, (151, RESERVOIR)),
        # A profile made at fps 0 runs faster than the camera will: longer blocks, capped.
        (DriftConfig(window_s=60), 50_000, 150.0, (RESERVOIR, 4 * RESERVOIR)),
        (DriftConfig(window_s=1), 1, 0.0, (RESERVOIR, 4 * RESERVOIR)),  # no times: as long as they can be
    ],
)
def test_profile_blocks_hold_a_window(cfg: DriftConfig, frames: int, seconds: float, expected: object) -> None:
    assert profile_blocks(cfg, frames, seconds) == expected


def test_json_round_trip(tmp_path: Path) -> None:
    ref = built(1500)
    path = ref.write(tmp_path / "ref.json")
    back = load_reference(path)
    assert (back.frames, back.model, back.source, back.created) == (1500, "m", "synthetic", 1.0)
    assert back.coarse_classes == COARSE and back.fine_ids == ref.fine_ids
    assert np.array_equal(back.coarse_counts, ref.coarse_counts)
    assert np.array_equal(back.fine_counts, ref.fine_counts)
    for name, h in ref.histograms.items():
        assert np.allclose(back.histograms[name].edges, h.edges)
        assert np.array_equal(back.histograms[name].counts, h.counts)
    assert np.allclose(back.reservoir, ref.reservoir, rtol=1e-5, equal_nan=True)
    assert back.blocks == ref.blocks
    assert np.isnan(back.reservoir[:, FIELDS.index("motion")]).sum() <= 1
    assert path.stat().st_size < 400_000


def test_empty_stream_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        ProfileBuilder(COARSE).build()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema=99), "unsupported schema 99"),
        (lambda d: d.update(kind="something"), "not a drift reference"),
        (lambda d: d.pop("fine"), "missing key 'fine'"),
        (lambda d: d["coarse"].update(counts=[1, 2]), "coarse: counts and classes"),
        (lambda d: d["histograms"].update(nonsense={"edges": [], "counts": [0]}), "unknown statistic"),
        (lambda d: d.update(priors={"cat": -1}), "priors must be positive"),
        (lambda d: d.update(frames=3), "frames is smaller"),
        (lambda d: d["histograms"]["brightness"].update(edges=[3.0, 1.0]), "histograms.brightness"),
        (lambda d: d["reservoir"]["columns"].pop("sharpness"), "missing columns sharpness"),
        (lambda d: d["reservoir"]["columns"].update(top1=[1, 2]), "reservoir: empty, or columns of different"),
        (lambda d: d["fine"].update(ids="abc"), "fine: ids must be a list of class ids"),
        (lambda d: d["reservoir"].pop("blocks"), "reservoir.blocks: missing key 'blocks'"),
        (lambda d: d["reservoir"].update(blocks=[[0, 100], [50, 150]]), "reservoir.blocks: needs non-empty"),
        (lambda d: d["reservoir"].update(blocks=[[0, 100], [300, 0]]), "reservoir.blocks: needs non-empty"),
        (lambda d: d["reservoir"].update(blocks=[[0, 100], [200, 100]]), "reservoir.blocks: the block lengths"),
        (lambda d: d["reservoir"].update(blocks=[[0, 100], [450, 100]]), "reservoir.blocks: a block ends after"),
    ],
)
def test_malformed_files_say_what_is_wrong(tmp_path: Path, mutate: object, message: str) -> None:
    data = built(500).to_dict()
    mutate(data)  # type: ignore[operator]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as err:
        load_reference(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(("frames", "blocks"), [(200, ((0, 200),)), (3000, None)])
def test_a_schema_1_profile_still_loads(tmp_path: Path, frames: int, blocks: object) -> None:
    """Schema 1 stored no blocks: a short stream's rows are all its frames, one block; a long stream's were
    drawn one by one, so which rows are consecutive frames is unknown (the monitor warns)."""
    ref = built(frames, reservoir=200)
    data = ref.to_dict()
    data["schema"] = 1
    del data["reservoir"]["blocks"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    back = load_reference(path)
    assert back.blocks == blocks and back.frames == frames
    assert np.allclose(back.reservoir, ref.reservoir, rtol=1e-5, equal_nan=True)
    # Written back as it was read: schema 1, without blocks.
    again = back.to_dict()
    assert again["schema"] == (SCHEMA if blocks else 1) and ("blocks" in again["reservoir"]) == bool(blocks)


def test_not_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_reference(bad)
    with pytest.raises(ValueError, match="cannot read"):
        load_reference(tmp_path / "missing.json")
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        load_reference(bad)
    bad.write_bytes(b"\x94\x00safetensors")  # drift.reference pointed at a model file
    with pytest.raises(ValueError, match=re.escape(f"drift.reference {bad}: not a drift reference (not UTF-8")):
        load_reference(bad)


def test_profile_is_a_priors_file(tmp_path: Path) -> None:
    """With the model's mapper, the profile re-estimates coarse priors; load_priors reads the file as is."""
    mapper = build_mapper(imagenet_like_labels(), "cifar10", "none")
    assert mapper is not None
    rng = np.random.default_rng(0)
    k = mapper.membership.shape[0]
    builder = ProfileBuilder(mapper=mapper, top_classes=5)
    stats = synthetic_stats(400)
    probs = rng.dirichlet(np.full(k, 0.05), size=len(stats)).astype(np.float32)
    builder.add_many(stats[:100], probs[:100])
    for s, p in zip(stats[100:], probs[100:], strict=True):
        builder.add(s, p)
    ref = builder.build()
    assert ref.coarse_classes == mapper.classes
    path = ref.write(tmp_path / "profile.json")
    priors = load_priors(str(path), "cifar10", mapper.classes)
    assert priors is not None and priors.shape == (10,) and np.all(priors > 0)
    assert priors.sum() == pytest.approx(1.0, abs=1e-5)
    # Same numbers as estimate_priors on the probabilities themselves.
    from eyed.model.labels import estimate_priors

    assert np.allclose(priors, estimate_priors(mapper, [probs]), rtol=1e-4)
    assert load_reference(path).priors is not None


def test_a_builder_with_a_mapper_needs_probabilities() -> None:
    mapper = build_mapper(imagenet_like_labels(), "cifar10", "none")
    assert mapper is not None
    with pytest.raises(ValueError, match="probabilities"):
        ProfileBuilder(mapper=mapper).add(synthetic_stats(1)[0])


def _column(name: str, change: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        d["reservoir"]["columns"][name] = [change(v) for v in d["reservoir"]["columns"][name]]

    return mutate


def _set(*path: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        # Python's json reads NaN and Infinity: edges the quantile bins cannot use (PSI thresholds of 11 and 28).
        (
            _set("histograms", "brightness", "edges", 0, value=math.nan),
            "histograms.brightness: edges must be a list of finite",
        ),
        (_set("histograms", "brightness", "edges", -1, value=math.inf), "histograms.brightness: edges must be"),
        (_set("histograms", "brightness", "edges", 0, value=None), "histograms.brightness: edges must be"),
        (
            _set("histograms", "brightness", "counts", 0, value=-(10**9)),
            "histograms.brightness: counts must not be negative",
        ),
        (_set("histograms", "contrast", "counts", 1, value=2.5), "histograms.contrast: counts must be a list of whole"),
        (
            _set("histograms", "contrast", "counts", 1, value=True),
            "histograms.contrast: counts must be a list of whole",
        ),
        (
            lambda d: d["histograms"]["motion"].update(counts=[0] * len(d["histograms"]["motion"]["counts"])),
            "histograms.motion: counts add up to 0",
        ),
        # A negative coarse count silently removed the coarse metrics.
        (lambda d: d.update(histograms=None), "histograms: not an object"),
        (lambda d: d.update(histograms=[1]), "histograms: not an object"),
        (_set("coarse", "counts", 0, value=-5000), "coarse: counts must not be negative"),
        (_set("coarse", "counts", 0, value=10**30), "coarse: "),
        (lambda d: d["fine"].update(counts=[0] * len(d["fine"]["counts"])), "fine: counts add up to 0"),
        (lambda d: d["fine"]["ids"].__setitem__(1, d["fine"]["ids"][0]), r"fine: ids must be distinct, \[\d+\] repeat"),
        (_set("fine", "ids", 0, value=-1), "fine: ids must be a list of class ids"),
        (_set("fine", "ids", 0, value=1.5), "fine: ids must be a list of class ids"),
        # A null top1 column made js_fine thresholds 0.82 / 1.64.
        (_column("top1", lambda v: None), "reservoir: column top1: row 0 is null, needs a whole number of 0 or more"),
        (_column("top1", lambda v: v + 0.5), "reservoir: column top1: row 0 is .*, needs a whole number"),
        (_column("coarse", lambda v: 99), "reservoir: column coarse: row 0 is 99, needs a whole number from -1 to 9"),
        (_column("coarse", lambda v: -2), "reservoir: column coarse: row 0 is -2"),
        (_set("priors", value=dict.fromkeys(COARSE, math.nan)), "priors: priors must be positive finite numbers"),
        (_set("priors", value=dict.fromkeys(COARSE, math.inf)), "priors: priors must be positive finite numbers"),
        (_set("priors", value=dict.fromkeys(COARSE, "0.1")), "priors: priors must be positive finite numbers"),
        (_set("frames", value=1500.5), "metadata: frames must be a whole number"),
        (_set("preprocess", value="fit"), "preprocess: needs an object"),
    ],
)
def test_numbers_a_metric_reads_are_checked(tmp_path: Path, mutate: Any, message: str) -> None:
    """Each of these loaded before and left a metric unable to fire (or NaN); now the file is refused, naming
    the field, so the daemon and check-config exit 78."""
    data = built(1500).to_dict()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_reference(path)


def test_a_profile_without_coarse_labels_still_loads(tmp_path: Path) -> None:
    """Coarse counts of 0 (no frame had a coarse label) are not an error: the monitor leaves those metrics out."""
    builder = ProfileBuilder(COARSE)
    builder.add_many([s._replace(coarse=-1) for s in synthetic_stats(300)])
    back = load_reference(builder.build().write(tmp_path / "ref.json"))
    assert back.coarse_counts.sum() == 0


@pytest.mark.parametrize("schema", [1, 2])
def test_an_older_profile_with_prior_corrected_coarse_counts_is_refused(tmp_path: Path, schema: int) -> None:
    """A profile with priors was made with an ImageNet model's mapping, and before schema 3 its coarse counts
    were labels after the prior correction then in force: compared with group sums they would report drift on
    in-domain frames. Without priors (no mapping, or a model trained on the coarse classes) they were group
    sums already, and the file still loads."""
    data = built(500).to_dict()
    data["schema"] = schema
    if schema == 1:
        del data["reservoir"]["blocks"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**data, "priors": dict.fromkeys(COARSE, 0.1)}))
    with pytest.raises(ValueError, match=f"schema {schema} profile .*model.coarse_priors.*run `eyed profile` again"):
        load_reference(path)
    path.write_text(json.dumps(data))
    assert load_reference(path).frames == 500


def test_the_coarse_column_is_the_same_under_any_priors() -> None:
    """The prediction's own coarse label changes with model.coarse_priors; the drift column (the group with
    the most mass) does not, so one profile serves as reference under any priors, its own included."""
    labels = imagenet_like_labels()
    plain = build_mapper(labels, "cifar10", "none")
    shipped = build_mapper(labels, "cifar10", "builtin")
    assert plain is not None and shipped is not None
    skewed = shipped.with_priors(np.linspace(0.01, 0.3, len(COARSE), dtype=np.float32))
    logits = np.random.default_rng(0).normal(0.0, 3.0, size=(300, len(labels))).astype(np.float32)
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    columns, own_labels = [], []
    for mapper in (plain, shipped, skewed):
        preds = Postprocessor(labels, 5, mapper)(logits)
        extractor = StatsExtractor(mapper=mapper)
        columns.append([extractor(image, p).coarse for p in preds])
        own_labels.append([p.coarse.label if p.coarse else None for p in preds])
    assert columns[0] == columns[1] == columns[2] == plain.masses(softmax(logits)).argmax(axis=1).tolist()
    assert own_labels[0] != own_labels[2]  # what the column counted before: it moved with the priors


def test_the_profile_records_its_preprocessing_and_the_checks_refuse_other(tmp_path: Path) -> None:
    spec = PreprocessSpec.from_hf({}).to_dict()  # tuples; JSON gives lists back
    ref = built(500, preprocess=preprocess_record("fit", spec))
    back = load_reference(ref.write(tmp_path / "ref.json"))
    assert back.preprocess == {"small_input": "fit", "spec": json.loads(json.dumps(spec))}
    check_small_input(back, "fit")
    check_preprocess_spec(back, spec, "m")
    with pytest.raises(ValueError, match=r"model\.small_input = 'fit', this configuration has 'checkpoint'"):
        check_small_input(back, "checkpoint")
    with pytest.raises(ValueError, match=r"while other\.onnx .* run `eyed profile` again with this model"):
        check_preprocess_spec(back, {**spec, "crop": (160, 160)}, "other.onnx")
    # A reference that does not say (learned from the stream, or a profile from before schema 3) passes.
    check_small_input(built(100), "checkpoint")
    check_preprocess_spec(built(100), spec, "m")
