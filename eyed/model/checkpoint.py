"""Find a model checkpoint: a local folder, or a Hugging Face hub id fetched into the hub cache."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# What a MobileNetV2-style image classifier checkpoint needs; nothing else is downloaded.
CHECKPOINT_FILES = ["config.json", "preprocessor_config.json", "*.safetensors"]


class ModelLoadError(Exception):
    """The model cannot be loaded; the message tells the user what to do."""


# How to get the torch extra without pip pulling several GB of CUDA libraries (PyPI's torch on x86-64 Linux).
TORCH_INSTALL = (
    "pip install 'eyed[torch]', after the CPU-only torch on a machine without an NVIDIA GPU: "
    "pip install torch --index-url https://download.pytorch.org/whl/cpu"
)


def resolve_checkpoint(model_id: str) -> Path:
    """A local folder holding the checkpoint: ``model_id`` itself, or the hub snapshot of that id."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"model.id {model_id}: folder has no config.json (not a checkpoint)")
        return local.resolve()
    if local.suffix == ".onnx" or model_id.startswith((".", "/", "~")):
        raise ModelLoadError(f"model.id {model_id}: no such folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelLoadError(
            f"model.id {model_id}: no such folder here; as a hub id it needs the torch extra ({TORCH_INSTALL}), "
            "or run an ONNX file exported elsewhere (model.onnx)"
        ) from exc
    try:
        return Path(snapshot_download(model_id, allow_patterns=CHECKPOINT_FILES))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
        kind = type(exc).__name__
        # The hub client refuses some ids outright (a trailing slash, two slashes): only a folder was meant.
        if kind == "HFValidationError":
            raise ModelLoadError(f"model.id {model_id}: no such folder (and not a valid hub id)") from exc
        if kind == "RepositoryNotFoundError":
            raise ModelLoadError(f"model.id {model_id}: no such folder here, and no such model on the hub") from exc
        raise ModelLoadError(
            f"cannot reach the hub for {model_id} ({kind}): set model.id to a local checkpoint folder"
        ) from exc


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def labels_of(config: dict[str, Any]) -> list[str]:
    """The model's labels in index order, from ``id2label``."""
    id2label = config.get("id2label") or {}
    if not id2label:
        raise ModelLoadError("checkpoint config.json has no id2label")
    n = max(int(k) for k in id2label) + 1
    return [str(id2label.get(str(i), id2label.get(i, f"class_{i}"))) for i in range(n)]


def files_fingerprint(root: Path, files: Iterable[Path], length: int = 12) -> str:
    """A short hash of the files' names (relative to ``root``), sizes and modification times: it changes when
    one of them is rewritten, without reading any."""
    h = hashlib.sha256()
    for path in sorted(files):
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:length]


def fingerprint(folder: Path) -> str:
    """A short hash that changes when the checkpoint's config or weights change."""
    files = (p for p in folder.iterdir() if p.is_file() and p.suffix in {".json", ".safetensors", ".bin"})
    return files_fingerprint(folder, files)
