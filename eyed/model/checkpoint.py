"""Find a model checkpoint: a local folder, or a Hugging Face hub id fetched into the hub cache."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eyed.outputs import same_file

if TYPE_CHECKING:
    from eyed.model.preprocess import PreprocessSpec

logger = logging.getLogger(__name__)

# What a MobileNetV2-style image classifier checkpoint needs; nothing else is downloaded.
CHECKPOINT_FILES = ["config.json", "preprocessor_config.json", "*.safetensors"]


def same_checkpoint(a: str, b: str) -> bool:
    """Whether two model ids name the same checkpoint: one folder, however its path is written, or one hub id.
    ``a`` may be one recorded in a file (an export's ``eyed.model_id``): see :func:`names_recorded`."""
    if a == b:
        return True
    local_b = Path(b).expanduser()
    return local_b.is_dir() and names_recorded(a, local_b)


def recorded_id(model_id: str) -> str:
    """``model_id`` as a file records it: a local folder as its absolute path (a relative one names another
    folder from another working directory, such as a service's), a hub id as it is."""
    local = Path(model_id).expanduser()
    return str(local.resolve()) if local.is_dir() else model_id


def names_recorded(recorded: str, path: Path) -> bool:
    """Whether a path recorded in a file's metadata names ``path`` (a file or folder that exists).

    eyed records absolute paths; an older eyed recorded them as typed. Such a relative one that names nothing
    from here was written from another working directory, so it cannot be resolved: it counts as ``path``
    when it names ``path``'s last folders (``ft1`` for /srv/models/ft1), rather than warning that every file
    written that way came from another model.
    """
    local = Path(recorded).expanduser()
    if local.is_absolute() or local.exists():
        return same_file(local, path)
    tail = local.parts
    return bool(tail) and ".." not in tail and path.resolve().parts[-len(tail) :] == tail


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
        # An id with a slash may be a relative folder that is not there (a typo, or a service whose working
        # folder is not the one the path was written for): say so, or the advice below is what the user did.
        missing = f", and there is no folder {local.resolve()}" if "/" in model_id else ""
        raise ModelLoadError(
            f"cannot reach the hub for {model_id} ({kind}){missing}: set model.id to a local checkpoint folder"
        ) from exc


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def read_checkpoint(folder: Path, model_id: str) -> tuple[list[str], PreprocessSpec]:
    """The labels (config.json's id2label) and preprocessing (preprocessor_config.json) of the checkpoint in
    ``folder``; ModelLoadError "cannot load ``model_id``: ..." when a file is missing, unreadable or malformed,
    or asks for preprocessing eyed does not reproduce."""
    # Here, not at the top: eyed.model.preprocess imports ModelLoadError from this module.
    from eyed.model.preprocess import PreprocessSpec, UnsupportedPreprocessing

    try:
        config = read_json(folder / "config.json")
        labels = labels_of(config)
        processor = folder / "preprocessor_config.json"
        if not processor.is_file():
            raise ModelLoadError(f"no preprocessor_config.json in {folder}")
        spec = PreprocessSpec.from_hf(read_json(processor), config.get("model_type"))
    except UnsupportedPreprocessing as exc:
        raise ModelLoadError(f"cannot load {model_id}: preprocessor_config.json: {exc}") from exc
    except ModelLoadError as exc:
        raise ModelLoadError(f"cannot load {model_id}: {exc}") from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # Unreadable or not JSON, or JSON of another shape than transformers writes.
        raise ModelLoadError(f"cannot load {model_id}: {_reason(exc)}") from exc
    return labels, spec


def load_weights(folder: Path, model_id: str) -> Any:
    """``AutoModelForImageClassification`` from ``folder`` in eval mode; ModelLoadError "cannot load
    ``model_id``: ..." when transformers cannot (no weights file, a truncated one, an unknown model type)."""
    import sys

    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # its "Loading weights" bar would be a line of carriage returns in the journal
        hf_logging.disable_progress_bar()
    try:
        return AutoModelForImageClassification.from_pretrained(folder).eval()
    except Exception as exc:  # safetensors, OSError, ValueError...: all mean this folder cannot be run
        raise ModelLoadError(f"cannot load {model_id}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message (transformers' run to paragraphs), or its kind."""
    lines = str(exc).strip().splitlines()
    if isinstance(exc, KeyError) or not lines:
        return f"{type(exc).__name__}: {exc}"
    return lines[0]


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
