"""The PyTorch/transformers backend: eager inference on the checkpoint, same preprocessing as ONNX."""

from __future__ import annotations

import logging

import numpy as np

from eyed.config import ModelConfig
from eyed.model.checkpoint import TORCH_INSTALL, ModelLoadError, load_weights, read_checkpoint, resolve_checkpoint
from eyed.model.labels import build_mapper
from eyed.model.postprocess import Postprocessor
from eyed.model.preprocess import Preprocessor
from eyed.types import Prediction

logger = logging.getLogger(__name__)


class TorchClassifier:
    """``AutoModelForImageClassification`` in eval mode under ``torch.inference_mode``."""

    backend = "torch"

    def __init__(self, cfg: ModelConfig) -> None:
        folder = resolve_checkpoint(cfg.id)
        try:
            import torch
            import transformers  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError(f"the torch backend needs the torch extra ({TORCH_INSTALL})") from exc
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._torch = torch
        # The small files first: a missing preprocessor_config.json is said before the weights load.
        labels, spec = read_checkpoint(folder, cfg.id)
        self.model = load_weights(folder, cfg.id)
        self.name = cfg.id
        self.prepare = Preprocessor(spec, cfg.small_input)
        self.input_shape = self.prepare.shape
        self.post = Postprocessor(labels, cfg.topk, build_mapper(labels, cfg.coarse, cfg.coarse_priors))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        pixel_values = self._torch.from_numpy(self.prepare.normalise(batch))
        with self._torch.inference_mode():
            out = self.model(pixel_values=pixel_values).logits
        return out.numpy()

    def predict(self, batch: np.ndarray) -> list[Prediction]:
        return self.post(self.logits(batch))

    def close(self) -> None:
        self.model = None
