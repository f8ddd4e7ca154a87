"""The Raspberry Pi install: `pip install eyed[onnx]` runs the daemon with an ONNX file exported elsewhere,
without torch, transformers or datasets anywhere in its environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, synthetic_images
from tests.daemon_helpers import collect, finish
from tests.sources.test_capture import write_video

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def onnx_only_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("edge") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, f"{ROOT}[onnx]"], check=True, timeout=900)
    return venv


def test_onnx_only_install_has_no_torch_transformers_or_datasets(onnx_only_venv: Path) -> None:
    python = str(onnx_only_venv / "bin" / "python")
    for module in ("torch", "transformers", "datasets"):
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
        assert probe.returncode != 0, f"{module} is installed in the onnx-only venv"
    assert subprocess.run([python, "-c", "import onnxruntime, cv2, zmq"]).returncode == 0


def test_onnx_only_daemon_classifies_a_video_file(
    onnx_only_venv: Path, tiny_onnx: Path, endpoint: str, tmp_path: Path
) -> None:
    video = write_video(tmp_path / "pi.avi", synthetic_images(10, seed=9, size=80))
    proc = subprocess.Popen(
        [
            str(onnx_only_venv / "bin" / "eyed"),
            "run",
            "--set",
            "source.kind=file",
            "--set",
            f"source.url={video}",
            "--set",
            f"model.onnx={tiny_onnx}",
            "--set",
            f"publish.endpoint={endpoint}",
            "--set",
            "publish.wait_subscribers=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    events = collect(endpoint, timeout_s=60)
    code, err = finish(proc)
    assert code == 0, err
    labels = [p for _, p in events if p["type"] == "label"]
    assert [p["seq"] for p in labels] == list(range(10))
    assert all(p["backend"] == "onnx" and p["coarse"] is not None for p in labels)


def test_onnx_only_install_says_what_to_do_for_a_hub_model(onnx_only_venv: Path, tmp_path: Path) -> None:
    """No model.onnx and no torch: exporting is impossible here, and the message says how to get a file."""
    result = subprocess.run(
        [str(onnx_only_venv / "bin" / "eyed"), "run", "--set", "source.kind=file",
         "--set", f"source.url={tmp_path}/x.avi", "--set", f"model.cache_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 69, result.stderr
    assert "eyed export" in result.stderr or "torch extra" in result.stderr


def test_onnx_only_install_names_the_extra_a_command_needs(
    onnx_only_venv: Path, tiny_onnx: Path, tmp_path: Path
) -> None:
    """Not a ModuleNotFoundError traceback (exit 1): which extra to install, with the documented exit codes."""
    video = write_video(tmp_path / "pi.avi", synthetic_images(4, seed=9, size=80))
    source = ["--set", "source.kind=file", "--set", f"source.url={video}", "--set", f"model.onnx={tiny_onnx}"]
    events = tmp_path / "drift.jsonl"
    events.write_text('{"type": "drift", "source": "pi", "window": 0, "status": "ok", "metrics": {"psi": 0.1}}\n')
    for command, code, extra in (
        (["export", "--int8", *source, "--output", str(tmp_path / "m8.onnx")], 69, "eyed[int8]"),
        (["bench", *source, "--frames", "2"], 69, "eyed[int8]"),
        (["drift-report", "--events", str(events), "--output", str(tmp_path / "d.png")], 69, "eyed[report]"),
        (["finetune", "--output", str(tmp_path / "head")], 69, "download.pytorch.org/whl/cpu"),
    ):
        result = subprocess.run(
            [str(onnx_only_venv / "bin" / "eyed"), *command],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        )
        assert result.returncode == code and extra in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr, command


def test_install_script_lays_out_venv_config_and_unit(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PREFIX": str(tmp_path / "opt"),
        "ETC": str(tmp_path / "etc"),
        "UNIT_DIR": str(tmp_path / "units"),
        "PYTHON": sys.executable,
    }
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr
    unit = (tmp_path / "units" / "eyed.service").read_text()
    assert f"ExecStart={tmp_path}/opt/venv/bin/eyed run --config {tmp_path}/etc/eyed.toml" in unit
    assert (tmp_path / "etc" / "eyed.toml").is_file()
    assert "not enabled" in result.stdout
    # Running it again changes nothing and keeps the user's config.
    (tmp_path / "etc" / "eyed.toml").write_text((tmp_path / "etc" / "eyed.toml").read_text() + "\n# mine\n")
    again = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr
    assert "# mine" in (tmp_path / "etc" / "eyed.toml").read_text()
