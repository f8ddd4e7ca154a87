"""Image preprocessing with OpenCV and numpy: the only place that knows sizes, mean and std.

It follows a Hugging Face ``preprocessor_config.json`` (resize the shortest edge, centre crop, rescale,
normalise) so that the ONNX backend needs neither transformers nor PIL at run time. A test checks the result
against ``AutoImageProcessor`` on the real checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize so the shortest edge is ``shortest_edge``, centre crop to ``crop``, then (x * rescale - mean) / std."""

    shortest_edge: int
    crop: tuple[int, int]  # (height, width)
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> PreprocessSpec:
        """Read a Hugging Face image processor config (``preprocessor_config.json``)."""
        size = cfg.get("size", {"shortest_edge": 256})
        if isinstance(size, int):
            shortest = size
        elif "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        else:  # {"height": h, "width": w}: treat as a square resize target
            shortest = int(min(size["height"], size["width"]))
        crop_cfg = cfg.get("crop_size", {"height": shortest, "width": shortest})
        if isinstance(crop_cfg, int):
            crop = (crop_cfg, crop_cfg)
        else:
            crop = (int(crop_cfg["height"]), int(crop_cfg["width"]))
        if not cfg.get("do_center_crop", True):
            crop = (shortest, shortest)
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        if cfg.get("do_normalize", True):
            mean = tuple(float(v) for v in cfg.get("image_mean", (0.5, 0.5, 0.5)))
            std = tuple(float(v) for v in cfg.get("image_std", (0.5, 0.5, 0.5)))
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(shortest, crop, rescale, mean, std)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        return cls(
            shortest_edge=int(data["shortest_edge"]),
            crop=(int(data["crop"][0]), int(data["crop"][1])),
            rescale=float(data["rescale"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
        )


class Preprocessor:
    """Turns an RGB uint8 (H, W, 3) image into a float32 (3, crop_h, crop_w) tensor."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        # Fold rescale and normalise into one multiply-add per pixel: (x * r - m) / s = x * (r / s) - m / s.
        std = np.asarray(spec.std, dtype=np.float32)
        self._scale = (np.float32(spec.rescale) / std).reshape(3, 1, 1)
        self._shift = (np.asarray(spec.mean, dtype=np.float32) / std).reshape(3, 1, 1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, *self.spec.crop)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the shortest-edge resize, rounded like transformers does."""
        short, long = (height, width) if height <= width else (width, height)
        new_long = int(self.spec.shortest_edge * long / short)
        if height <= width:
            return self.spec.shortest_edge, new_long
        return new_long, self.spec.shortest_edge

    def __call__(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Preprocess one image; write into ``out`` (shape :attr:`shape`) when given."""
        h, w = image.shape[:2]
        new_h, new_w = self.resized_size(h, w)
        # INTER_AREA averages when shrinking (like PIL's antialiased bilinear); INTER_LINEAR matches PIL when growing.
        interp = cv2.INTER_AREA if new_h * new_w < h * w else cv2.INTER_LINEAR
        resized = cv2.resize(image, (new_w, new_h), interpolation=interp)
        ch, cw = self.spec.crop
        top, left = max((new_h - ch) // 2, 0), max((new_w - cw) // 2, 0)
        crop = resized[top : top + ch, left : left + cw]
        if out is None:
            out = np.empty(self.shape, dtype=np.float32)
        # HWC uint8 -> CHW float32 in one pass, then the folded affine in place.
        np.copyto(out, crop.transpose(2, 0, 1), casting="unsafe")
        out *= self._scale
        out -= self._shift
        return out
