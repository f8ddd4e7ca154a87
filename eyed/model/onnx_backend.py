"""The ONNX Runtime backend: needs onnxruntime and numpy/OpenCV only."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from eyed.config import ConfigError, ModelConfig
from eyed.model.checkpoint import ModelLoadError, same_checkpoint
from eyed.model.export import (
    FORMAT,
    INPUT_NAME,
    K_NAME,
    META_FORMAT,
    META_LABELS,
    META_MODEL_ID,
    META_PREPROCESS,
    OUTPUT_NAME,
    PROBS_NAME,
    TOP_IDS_NAME,
    TOP_SCORES_NAME,
    check_class_count,
    ensure_onnx,
)
from eyed.model.labels import build_mapper
from eyed.model.postprocess import Postprocessor
from eyed.model.preprocess import Preprocessor, PreprocessSpec
from eyed.types import Prediction

logger = logging.getLogger(__name__)


GRAPH_OPTIMIZATION = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC"}


def session_options(cfg: ModelConfig) -> Any:
    """ONNX Runtime session options shared by the daemon and the benchmark's bare loop.

    Spinning ("auto" means on here; the daemon decides it per source with ``Settings.runtime_model``): at
    15 fps on 640x480 frames, spinning threads cost 49 ms of CPU per frame here (73% of a core), not
    spinning 9 ms (14%), for about 1 ms more latency. At full speed spinning is worth 15% more frames/s.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    level = GRAPH_OPTIMIZATION.get(cfg.graph_optimization, "ORT_DISABLE_ALL")
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.enable_cpu_mem_arena = cfg.cpu_arena
    so.add_session_config_entry("session.intra_op.allow_spinning", "0" if cfg.spinning == "off" else "1")
    if cfg.threads:
        so.intra_op_num_threads = cfg.threads
    return so


def check_providers(providers: list[str]) -> None:
    """ConfigError unless this onnxruntime build has every one of ``providers`` (``eyed check-config`` asks
    too); needs onnxruntime importable."""
    import onnxruntime as ort

    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        # A configuration problem, not a passing one: a restart would not install the provider.
        raise ConfigError(
            f"model.providers: {', '.join(missing)} not available in this onnxruntime build "
            f"(available: {', '.join(ort.get_available_providers())})"
        )


def open_session(path: Path, cfg: ModelConfig) -> Any:
    """An InferenceSession for ``path`` with ``cfg``'s options and providers; ModelLoadError on failure."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelLoadError("the onnx backend needs onnxruntime (pip install 'eyed[onnx]')") from exc
    check_providers(cfg.providers)
    try:
        return ort.InferenceSession(str(path), session_options(cfg), providers=cfg.providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise ModelLoadError(f"cannot load ONNX model {path}: {exc}") from exc


class OnnxClassifier:
    """Runs an ONNX file exported by ``eyed export`` (labels and preprocessing in its metadata)."""

    backend = "onnx"

    def __init__(self, cfg: ModelConfig) -> None:
        path = cfg.onnx if cfg.onnx is not None else ensure_onnx(cfg.id, cfg.cache_dir)
        if not Path(path).is_file():
            raise ModelLoadError(f"model.onnx {path}: no such file")
        self.path = Path(path)
        self.session = open_session(self.path, cfg)
        meta = self.session.get_modelmeta().custom_metadata_map
        if META_LABELS not in meta or META_PREPROCESS not in meta:
            raise ModelLoadError(f"{path} has no eyed metadata (labels, preprocessing): export it with `eyed export`")
        if meta.get(META_FORMAT) != FORMAT:
            raise ModelLoadError(
                f"{path} was exported by an older eyed (format {meta.get(META_FORMAT, '1')}, need {FORMAT}): "
                "export it again with `eyed export`"
            )
        # eyed finetune's features graph carries the same metadata, but ends before the classifier.
        names = {o.name for o in self.session.get_outputs()} | {i.name for i in self.session.get_inputs()}
        if not {INPUT_NAME, K_NAME, PROBS_NAME, TOP_SCORES_NAME, TOP_IDS_NAME} <= names:
            raise ModelLoadError(
                f"{path} is not a classifier made by `eyed export` (no class probabilities and top-k); eyed "
                "finetune's features graph is not one either: use the model.onnx it wrote beside the checkpoint"
            )
        labels = json.loads(meta[META_LABELS])
        self.name = meta.get(META_MODEL_ID, self.path.stem)
        if cfg.onnx is not None and "id" in cfg.model_fields_set and not same_checkpoint(self.name, cfg.id):
            # A file that sets model.onnx and a --set model.id=DIR: model.id alone would look like it took effect.
            logger.warning(
                "model.onnx %s was exported from %s, not from model.id %s: running model.onnx (an empty "
                "model.onnx, --set model.onnx=, runs model.id instead)",
                path,
                self.name,
                cfg.id,
            )
        self.prepare = Preprocessor(PreprocessSpec.from_dict(json.loads(meta[META_PREPROCESS])), cfg.small_input)
        self.input_shape = self.prepare.shape
        check_class_count(self.session, labels, self.path, self.input_shape)
        self.post = Postprocessor(labels, cfg.topk, build_mapper(labels, cfg.coarse, cfg.coarse_priors))
        self._input = INPUT_NAME
        # Fed with every run (onnxruntime reads numpy inputs in place): how many classes TopK returns.
        self._k = np.array([self.post.topk], dtype=np.int64)
        self._outputs = [PROBS_NAME, TOP_SCORES_NAME, TOP_IDS_NAME]

    def _run(self, outputs: list[str], batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(outputs, {self._input: batch, K_NAME: self._k})

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self._run([OUTPUT_NAME], batch)[0]

    def predict(self, batch: np.ndarray) -> list[Prediction]:
        # Softmax and top-k ran in the graph (eyed.model.export.append_postprocessing).
        return self.post.from_topk(*self._run(self._outputs, batch))

    def close(self) -> None:
        # InferenceSession has no close(); dropping the reference frees its arena.
        self.session = None
