"""Classifier backends, chosen through a table of import strings so only the chosen one is imported."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from eyed.model.checkpoint import ModelLoadError

if TYPE_CHECKING:
    from eyed.config import ModelConfig
    from eyed.types import Classifier

BACKENDS = {
    "onnx": "eyed.model.onnx_backend:OnnxClassifier",
    "torch": "eyed.model.torch_backend:TorchClassifier",
}


def load_classifier(cfg: ModelConfig) -> Classifier:
    """Build the configured backend; raises ModelLoadError with a message for the user."""
    module_name, _, cls_name = BACKENDS[cfg.backend].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(cfg)


__all__ = ["BACKENDS", "ModelLoadError", "load_classifier"]
