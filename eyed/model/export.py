"""Export a Hugging Face image classifier to ONNX, with labels and preprocessing in the file's metadata.

The metadata makes the file self-contained: the ONNX backend reads labels and preprocessing from it and needs
neither torch nor transformers at run time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from eyed.model.checkpoint import (
    TORCH_INSTALL,
    ModelLoadError,
    fingerprint,
    load_weights,
    read_checkpoint,
    resolve_checkpoint,
)
from eyed.model.preprocess import PreprocessSpec
from eyed.outputs import staged

logger = logging.getLogger(__name__)

META_LABELS = "eyed.labels"
META_PREPROCESS = "eyed.preprocess"
META_MODEL_ID = "eyed.model_id"
META_FORMAT = "eyed.format"
# Bumped whenever the exported graph's contract changes (input layout, outputs); part of the cache key.
FORMAT = "3"
# The features graph (eyed finetune) has its own contract, so a change to the classifier's outputs does not
# throw away cached feature extracts.
FEATURES_FORMAT = "2"
INPUT_NAME = "pixels"  # uint8 (N, H, W, 3) RGB, resized and cropped
K_NAME = "k"  # int64 (1,): how many classes TopK returns
OUTPUT_NAME = "logits"
PROBS_NAME = "probs"  # softmax of the logits
TOP_SCORES_NAME = "top_scores"  # (N, k) best probabilities, best first
TOP_IDS_NAME = "top_ids"  # (N, k) their class ids (int64); equal scores rank by class id
FEATURES_NAME = "features"
OPSET = 17


def export_onnx(model_id: str, output: Path, *, features: bool = False, name: str | None = None) -> Path:
    """Export ``model_id`` (hub id or folder) to ``output``; returns the path written.

    With ``features``, the graph ends before the classifier and outputs the pooled backbone features
    (``eyed finetune`` extracts them once and trains a new head on them). ``name`` is the model id to record
    in the file instead of ``model_id`` (a checkpoint written in a temporary folder records its final one).
    """
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(
            f"exporting to ONNX needs the torch extra ({TORCH_INSTALL}); or export on a workstation with "
            "`eyed export` and set model.onnx"
        ) from exc
    folder = resolve_checkpoint(model_id)
    labels, spec = read_checkpoint(folder, model_id)
    model = PixelsToLogits(load_weights(folder, model_id), spec, features)
    output_name = FEATURES_NAME if features else OUTPUT_NAME
    dummy = torch.zeros(1, *spec.crop, 3, dtype=torch.uint8)
    # Written under a temporary name and renamed, so a crash never leaves a half-written file in the cache.
    with staged(output) as tmp:
        logger.info("exporting %s to %s", model_id, output)
        # The TorchScript exporter traces in about a second; the dynamo exporter takes several times longer
        # for the same graph here.
        with warnings.catch_warnings():
            # The tracer warns that tf_padding's shape arithmetic becomes constant: right here, as the input
            # size is fixed by the crop. Other warnings are about the deprecated exporter itself.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[output_name],
                dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        finish_graph(tmp, labels, spec, name or model_id, postprocess=not features)
    return output


def PixelsToLogits(model: Any, spec: PreprocessSpec, features: bool = False) -> Any:
    """Wrap an image classifier so it takes uint8 NHWC pixels and does rescale/normalise itself; with
    ``features`` it returns the pooled backbone output instead of the logits.

    The arithmetic then runs inside onnxruntime, vectorised and on every core, instead of in Python per frame.
    """
    import torch

    scale, shift = spec.affine()

    class _PixelsToLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("scale", torch.from_numpy(scale).reshape(1, 3, 1, 1))
            self.register_buffer("shift", torch.from_numpy(shift).reshape(1, 3, 1, 1))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = pixels.permute(0, 3, 1, 2).to(torch.float32) * self.scale - self.shift  # type: ignore[operator]
            if features:
                return self.model.base_model(pixel_values=x).pooler_output
            return self.model(pixel_values=x).logits

    return _PixelsToLogits().eval()


def finish_graph(path: Path, labels: list[str], spec: PreprocessSpec, model_id: str, *, postprocess: bool) -> None:
    """Store labels, preprocessing and the source model id in the ONNX file's metadata_props and, with
    ``postprocess``, end the graph with softmax and top-k (:func:`append_postprocessing`)."""
    import onnx

    proto = onnx.load(str(path))
    if postprocess:
        append_postprocessing(proto)
    meta = {
        META_LABELS: json.dumps(labels),
        META_PREPROCESS: json.dumps(spec.to_dict()),
        META_MODEL_ID: model_id,
        META_FORMAT: FORMAT,
    }
    kept = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def append_postprocessing(proto: Any) -> None:
    """Add ``probs`` = Softmax(logits) and ``top_scores``/``top_ids`` = TopK(probs, k) to a logits graph.

    Done by onnxruntime in one call with the inference, these cost a few microseconds; the same softmax,
    argpartition and sort in numpy right after ``session.run`` cost 70-190 us per frame on cold caches here,
    the largest part of what the daemon adds to a bare onnxruntime loop. ``k`` is an input, so ``model.topk``
    stays a run-time setting. It has no default: an initializer of the same name would be one, but
    onnxruntime then warns at every session start that it cannot fold it.
    """
    from onnx import TensorProto, helper

    graph = proto.graph
    logits = next(o for o in graph.output if o.name == OUTPUT_NAME)
    classes = logits.type.tensor_type.shape.dim[1].dim_value
    graph.input.append(helper.make_tensor_value_info(K_NAME, TensorProto.INT64, [1]))
    graph.node.extend(
        [
            helper.make_node("Softmax", [OUTPUT_NAME], [PROBS_NAME], name="eyed_softmax", axis=-1),
            helper.make_node(
                "TopK",
                [PROBS_NAME, K_NAME],
                [TOP_SCORES_NAME, TOP_IDS_NAME],
                name="eyed_topk",
                axis=-1,
                largest=1,
                sorted=1,
            ),
        ]
    )
    graph.output.extend(
        [
            helper.make_tensor_value_info(PROBS_NAME, TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info(TOP_SCORES_NAME, TensorProto.FLOAT, ["batch", "k"]),
            helper.make_tensor_value_info(TOP_IDS_NAME, TensorProto.INT64, ["batch", "k"]),
        ]
    )


def check_class_count(session: Any, labels: list[str], path: Path, input_shape: tuple[int, ...]) -> None:
    """ModelLoadError naming ``path`` when its graph's classes and its eyed.labels metadata differ in number:
    the coarse mapping would fail at the first frame, and without one every label would be another class's.

    The class dimension of an exported graph is fixed; where it is not, one black frame finds it.
    """
    dims = {o.name: o.shape for o in session.get_outputs()}
    known = {d[-1] for name in (OUTPUT_NAME, PROBS_NAME) if (d := dims.get(name)) and isinstance(d[-1], int)}
    if not known:
        feeds = {INPUT_NAME: np.zeros((1, *input_shape), dtype=np.uint8), K_NAME: np.array([1], dtype=np.int64)}
        known = {int(session.run([PROBS_NAME], feeds)[0].shape[-1])}
    if known != {len(labels)}:
        raise ModelLoadError(
            f"{path}: the graph has {' / '.join(map(str, sorted(known)))} classes but its eyed.labels metadata "
            f"names {len(labels)}: the file was altered or mislabelled; export it again with `eyed export`"
        )


def _slug(model_id: str) -> str:
    local = Path(model_id).expanduser()
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", local.name if local.is_dir() else model_id)


def cached_export_path(model_id: str, cache_dir: Path) -> Path:
    """Where the daemon keeps its own export of ``model_id``; the name changes when the checkpoint does.

    A folder is known by its files (:func:`fingerprint`); a hub id by the commit its snapshot comes from, so
    a new revision pushed to the hub gets a new export, as the torch backend loads it. Resolving a hub id asks
    the hub (or, offline, takes huggingface_hub's cached snapshot): :class:`ModelLoadError` if neither can,
    or if the checkpoint cannot be read.
    """
    return _cached_export(model_id, cache_dir)[0]


def _cached_export(
    model_id: str, cache_dir: Path, folder: Path | None = None
) -> tuple[Path, list[str], PreprocessSpec]:
    """:func:`cached_export_path`, and the labels and preprocessing an export of the checkpoint now holds;
    ``folder``: the checkpoint's, when resolved already."""
    folder = folder or resolve_checkpoint(model_id)
    labels, spec = read_checkpoint(folder, model_id)
    local = Path(model_id).expanduser()
    # A hub snapshot's folder is named after its commit: the same revision downloaded again is the same model.
    key = fingerprint(folder) if local.is_dir() or folder.parent.name != "snapshots" else folder.name[:12]
    if spec.resize_to is not None:
        # Exports made before eyed read a size of height and width as transformers does cut off the frame's
        # sides (their metadata has no resize_to): such a checkpoint gets a name of its own.
        key = hashlib.sha256(f"{key}:resize_to".encode()).hexdigest()[:12]
    return cache_dir.expanduser() / "onnx" / f"{_slug(model_id)}-{key}-v{FORMAT}.onnx", labels, spec


def ensure_onnx(model_id: str, cache_dir: Path) -> Path:
    """The cached ONNX export of ``model_id``, exporting it on first use.

    A cached export whose labels or preprocessing are not what the checkpoint gives now is made again: the
    checkpoint's files are the same (its name says so), but an older eyed read them otherwise (crop_pct and
    resample were once ignored).

    If a hub id cannot be resolved (no network and no snapshot in huggingface_hub's cache, or an install
    without the hub client), the newest export of that id in the cache is used, with a warning: it may be of
    an older revision.
    """
    try:
        folder = resolve_checkpoint(model_id)
    except ModelLoadError as exc:
        # Exports of this id, by commit (and as named before they were: "hub"), not its INT8 versions.
        name = re.compile(rf"{re.escape(_slug(model_id))}-([0-9a-f]{{12}}|hub)-v{FORMAT}\.onnx")
        folder = cache_dir.expanduser() / "onnx"
        found = folder.iterdir() if folder.is_dir() else iter(())
        earlier = sorted((p for p in found if name.fullmatch(p.name)), key=lambda p: p.stat().st_mtime_ns)
        if Path(model_id).expanduser().is_dir() or not earlier:
            raise
        logger.warning("%s; using the export made before, %s (perhaps of an older revision)", exc, earlier[-1])
        return earlier[-1]
    # Outside the fallback above: a checkpoint that is there but cannot be read, or asks for preprocessing eyed
    # does not reproduce, must not run on an export an older eyed made by ignoring that.
    path, labels, spec = _cached_export(model_id, cache_dir, folder)
    if path.is_file():
        differs = _differs(path, labels, spec)
        if not differs:
            logger.info("using cached export %s", path)
            return path
        if not all(importlib.util.find_spec(name) for name in ("torch", "transformers")):
            # A device without the torch extra runs exports made elsewhere: one that serves beats none.
            logger.warning(
                "cached export %s has other %s than %s gives now, and cannot be made again without the torch "
                "extra: using it as it is; export it again where torch is installed",
                path,
                differs,
                model_id,
            )
            return path
        logger.info("cached export %s has other %s than %s gives now: exporting it again", path, differs, model_id)
    return export_onnx(model_id, path)


def _differs(path: Path, labels: list[str], spec: PreprocessSpec) -> str:
    """What of the labels and preprocessing stored in the export ``path`` differs from ``labels`` and ``spec``
    ("" when nothing does). Specs are compared as read back, so settings added to PreprocessSpec since the
    file was written compare at their defaults."""
    try:
        meta = stored_metadata(path)
        stored_labels = json.loads(meta[META_LABELS])
        stored_spec = PreprocessSpec.from_dict(json.loads(meta[META_PREPROCESS]))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return "metadata (none readable)"
    parts = [("labels", stored_labels == labels), ("preprocessing", stored_spec == spec)]
    return " and ".join(what for what, same in parts if not same)


# ModelProto's metadata_props (repeated StringStringEntryProto, fields key = 1 and value = 2).
_METADATA_FIELD = 14


def stored_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's metadata_props, read by skipping over the other top-level protobuf fields.

    Neither imports onnx nor parses the graph: at each start from the export cache that would cost about
    0.13 s (against a first event 0.3-0.5 s after start) and the parsed graph's memory. ValueError for a file
    that is not a protobuf message.
    """
    meta: dict[str, str] = {}
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        while fh.tell() < size:
            field, wire = divmod(_varint(fh), 8)
            if wire == 0:
                _varint(fh)
            elif wire in (1, 5):
                fh.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            elif wire == 2:
                length = _varint(fh)
                if field == _METADATA_FIELD:
                    entry = io.BytesIO(fh.read(length))
                    strings: dict[int, str] = {}
                    while entry.tell() < length:
                        key_field, key_wire = divmod(_varint(entry), 8)
                        if key_wire != 2:
                            raise ValueError("malformed metadata entry")
                        strings[key_field] = entry.read(_varint(entry)).decode("utf-8")
                    meta[strings.get(1, "")] = strings.get(2, "")
                else:
                    fh.seek(length, os.SEEK_CUR)
            else:
                raise ValueError(f"{path}: not an ONNX file (protobuf wire type {wire})")
        if fh.tell() != size:
            raise ValueError(f"{path}: truncated")
    return meta


def _varint(fh: BinaryIO) -> int:
    value = shift = 0
    while True:
        byte = fh.read(1)
        if not byte:
            raise ValueError("truncated protobuf")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("malformed protobuf varint")
