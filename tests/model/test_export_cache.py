"""The export cache for a hub id, against a local stand-in for the hub: a new revision gets a new export, and
offline the cached snapshot (or, failing that, the last export) serves.

Each load from the stand-in hub runs in its own process, as a daemon start does: huggingface_hub reads its
endpoint and offline switch from the environment once, at import.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eyed.model import export
from eyed.model.checkpoint import ModelLoadError
from eyed.model.export import FORMAT, ensure_onnx
from tests.fake_hub import FakeHub

pytest.importorskip("torch")

REPO = "acme/tiny-classifier"

LOAD = """
import json, logging, sys
from pathlib import Path
import onnxruntime as ort
from eyed.model.export import META_LABELS, ensure_onnx
logging.basicConfig(level=logging.WARNING)
path = ensure_onnx(sys.argv[1], Path(sys.argv[2]))
labels = json.loads(ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map[META_LABELS])
print(json.dumps({"path": str(path), "mtime": path.stat().st_mtime_ns, "label0": labels[0]}))
"""


def load(cache: Path, hf_home: Path, hub: FakeHub | None, repo: str = REPO) -> tuple[dict[str, object], str]:
    """ensure_onnx(repo) in a fresh process: what it returned, and its stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "EYED_"))}
    env["HF_HOME"] = str(hf_home)
    if hub is None:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0")
    out = subprocess.run([sys.executable, "-c", LOAD, repo, str(cache)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(out.stderr)
    return json.loads(out.stdout.splitlines()[-1]), out.stderr


def rename_background(repo: Path, label: str) -> None:
    config = json.loads((repo / "config.json").read_text())
    config["id2label"]["0"] = label
    (repo / "config.json").write_text(json.dumps(config))


def test_a_new_hub_revision_gets_a_new_export(tiny_checkpoint: Path, tmp_path: Path) -> None:
    repo = shutil.copytree(tiny_checkpoint, tmp_path / "repo")
    cache, hf_home = tmp_path / "eyed-cache", tmp_path / "hf"
    with FakeHub({("model", REPO): repo}) as hub:
        first, _ = load(cache, hf_home, hub)
        again, _ = load(cache, hf_home, hub)
        assert again == first  # the same revision: the export is reused, not made again
        rename_background(repo, "background, revision 2")
        hub.push("model", REPO)
        second, _ = load(cache, hf_home, hub)
    assert second["path"] != first["path"]
    assert (first["label0"], second["label0"]) == ("background", "background, revision 2")
    # Offline, huggingface_hub's cached snapshot says which revision is current: its export, not the first.
    offline, err = load(cache, hf_home, None)
    assert offline == second, err


def test_offline_without_a_snapshot_the_last_export_serves_with_a_warning(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    repo = shutil.copytree(tiny_checkpoint, tmp_path / "repo")
    cache = tmp_path / "eyed-cache"
    with FakeHub({("model", REPO): repo}) as hub:
        made, _ = load(cache, tmp_path / "hf", hub)
    # Another machine's hub cache (none): the export copied along with the eyed cache is what there is.
    used, err = load(cache, tmp_path / "empty-hf", None)
    assert used == made
    assert "cannot reach the hub for acme/tiny-classifier" in err and "using the export made before" in err
    # With no export either, the hub's error reaches the user.
    shutil.rmtree(cache)
    with pytest.raises(AssertionError, match="cannot reach the hub for acme/tiny-classifier"):
        load(cache, tmp_path / "empty-hf", None)


def unreachable(model_id: str) -> Path:
    """A resolve_checkpoint for a machine that cannot reach the hub (and has no snapshot of ``model_id``)."""
    raise ModelLoadError(f"cannot reach the hub for {model_id} (ConnectError)")


def test_offline_the_newest_of_several_exports_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two revisions exported while online: offline, with no snapshot to say which is current, the one made
    last serves (the other is the older revision), whatever their names' order. The test above only ever has
    one export cached, so serving the oldest went unseen."""
    monkeypatch.setattr(export, "resolve_checkpoint", unreachable)
    onnx = tmp_path / "cache" / "onnx"
    onnx.mkdir(parents=True)
    older = onnx / f"acme_tiny-classifier-ffffffffffff-v{FORMAT}.onnx"
    newer = onnx / f"acme_tiny-classifier-000000000000-v{FORMAT}.onnx"
    for i, path in enumerate((older, newer)):
        path.write_bytes(b"stand-in")
        os.utime(path, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    assert ensure_onnx(REPO, tmp_path / "cache") == newer


def test_a_local_folder_that_cannot_be_read_does_not_fall_back_to_an_old_export(tmp_path: Path) -> None:
    """The last export stands in for a hub id the hub cannot be asked about; a folder named by the user that
    cannot be read (a half-copied checkpoint) is an error to see, not one to run an old copy through. Without
    this, falling back for a folder too went unseen."""
    folder = tmp_path / "tiny-classifier"
    folder.mkdir()  # no config.json: not a checkpoint
    onnx = tmp_path / "cache" / "onnx"
    onnx.mkdir(parents=True)
    (onnx / f"tiny-classifier-0123456789ab-v{FORMAT}.onnx").write_bytes(b"stand-in")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        ensure_onnx(str(folder), tmp_path / "cache")


def test_an_id_that_is_neither_a_folder_nor_on_the_hub_says_both(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A mistyped relative folder looks like a hub id: the hub answering "no such repository" is not a
    network problem, and the message says there is no such folder either."""
    expected = "models/mobilenet: no such folder here, and no such model on the hub"
    with FakeHub({("model", REPO): tiny_checkpoint}) as hub, pytest.raises(AssertionError, match=expected):
        load(tmp_path / "cache", tmp_path / "hf", hub, repo="models/mobilenet")


def test_a_checkpoint_it_cannot_reproduce_is_refused_though_an_earlier_export_is_cached(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """The fallback to the last export is for an id that cannot be resolved: a revision that resolves but asks
    for preprocessing eyed does not reproduce ran on the export an older eyed made by ignoring that."""
    repo = shutil.copytree(tiny_checkpoint, tmp_path / "repo")
    cache, hf_home = tmp_path / "eyed-cache", tmp_path / "hf"
    with FakeHub({("model", REPO): repo}) as hub:
        load(cache, hf_home, hub)
        processor = json.loads((repo / "preprocessor_config.json").read_text())
        (repo / "preprocessor_config.json").write_text(json.dumps({**processor, "resample": 1}))  # LANCZOS
        hub.push("model", REPO)
        refused = re.escape("cannot load acme/tiny-classifier: preprocessor_config.json")
        with pytest.raises(AssertionError, match=refused):
            load(cache, hf_home, hub)
