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
    """Resize so the shortest edge is ``shortest_edge`` (or, with ``resize_to``, to exactly that size, aspect
    ratio and all, as transformers does for a ``size`` of height and width), centre crop to ``crop``, then
    (x * rescale - mean) / std."""

    shortest_edge: int
    crop: tuple[int, int]  # (height, width)
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_to: tuple[int, int] | None = None  # (height, width)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> PreprocessSpec:
        """Read a Hugging Face image processor config (``preprocessor_config.json``)."""
        size = cfg.get("size", {"shortest_edge": 256})
        resize_to = None
        if isinstance(size, int):
            shortest = size
        elif "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        else:  # {"height": h, "width": w}: the whole frame goes to that size (ViT-style processors)
            resize_to = (int(size["height"]), int(size["width"]))
            shortest = min(resize_to)
        whole = resize_to or (shortest, shortest)
        crop_cfg = cfg.get("crop_size", {"height": whole[0], "width": whole[1]})
        if isinstance(crop_cfg, int):
            crop = (crop_cfg, crop_cfg)
        else:
            crop = (int(crop_cfg["height"]), int(crop_cfg["width"]))
        if not cfg.get("do_center_crop", True):
            crop = whole
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        if cfg.get("do_normalize", True):
            mean = tuple(float(v) for v in cfg.get("image_mean", (0.5, 0.5, 0.5)))
            std = tuple(float(v) for v in cfg.get("image_std", (0.5, 0.5, 0.5)))
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(shortest, crop, rescale, mean, std, resize_to)  # type: ignore[arg-type]

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (scale, shift) with (x * rescale - mean) / std == x * scale - shift."""
        std = np.asarray(self.std, dtype=np.float32)
        scale = np.float32(self.rescale) / std
        shift = np.asarray(self.mean, dtype=np.float32) / std
        return scale, shift

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
            resize_to=(int(data["resize_to"][0]), int(data["resize_to"][1])) if data.get("resize_to") else None,
        )


class Preprocessor:
    """The geometric half of preprocessing on the CPU: RGB uint8 (H, W, 3) -> uint8 (crop_h, crop_w, 3).

    The arithmetic half (rescale, normalise, HWC -> CHW) is :meth:`normalise`; the exported ONNX graph does
    the same arithmetic as its first nodes, so the daemon hands onnxruntime uint8 pixels and never runs a
    per-pixel float loop in Python. Measured: a float CHW tensor built in numpy cost 60-180 us per frame,
    about as much as everything else the daemon does per frame together.

    ``small_input="fit"`` changes one thing for images smaller than the crop (CIFAR's 32x32): they are scaled
    whole to cover the crop with bicubic interpolation instead of being blown up past it with bilinear and then
    cut. Such an image is already framed on its subject, and the centre crop throws away an eighth of it. On
    held-out CIFAR-10 this is worth several points of coarse accuracy (README, "From ImageNet to CIFAR-10").
    ``"checkpoint"`` follows ``preprocessor_config.json`` to the letter. Larger images are treated the same
    either way.
    """

    def __init__(self, spec: PreprocessSpec, small_input: str = "checkpoint") -> None:
        self.spec = spec
        self.fit_small = small_input == "fit"
        scale, shift = spec.affine()
        self._scale = scale.reshape(1, 3, 1, 1)
        self._shift = shift.reshape(1, 3, 1, 1)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one prepared frame: (crop_h, crop_w, 3) uint8."""
        return (*self.spec.crop, 3)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize: ``resize_to``, or the shortest-edge resize, rounded like
        transformers does."""
        if self.spec.resize_to is not None:
            return self.spec.resize_to
        short, long = (height, width) if height <= width else (width, height)
        new_long = int(self.spec.shortest_edge * long / short)
        if height <= width:
            return self.spec.shortest_edge, new_long
        return new_long, self.spec.shortest_edge

    def __call__(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Resize and centre-crop one image; write into ``out`` (shape :attr:`shape`, uint8) when given."""
        h, w = image.shape[:2]
        ch, cw = self.spec.crop
        # "Smaller than the crop": a frame of exactly the crop's size is not, and goes the checkpoint's way.
        if self.fit_small and h <= ch and w <= cw and (h, w) != (ch, cw):
            scale = max(ch / h, cw / w)
            new_h, new_w = max(ch, round(h * scale)), max(cw, round(w * scale))
            interp = cv2.INTER_CUBIC
        else:
            new_h, new_w = self.resized_size(h, w)
            if new_h * new_w < h * w:
                return self._shrink(image, new_h, new_w, out)
            interp = cv2.INTER_LINEAR  # matches PIL's bilinear when growing
        if out is None:
            out = np.empty(self.shape, dtype=np.uint8)
        if (new_h, new_w) == (ch, cw):
            return cv2.resize(image, (cw, ch), dst=out, interpolation=interp)
        resized = cv2.resize(image, (new_w, new_h), interpolation=interp)
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
        out[...] = resized[top : top + ch, left : left + cw]
        return out

    def _shrink(self, image: np.ndarray, new_h: int, new_w: int, out: np.ndarray | None) -> np.ndarray:
        """Shortest-edge downscale to (new_h, new_w) and centre crop, resizing only what the crop keeps.

        INTER_AREA averages, like PIL's antialiased bilinear. Only the part of the frame that the centre crop
        keeps is resized (under half of a 16:9 frame), and a frame several times the crop is first reduced
        by a whole factor, for which OpenCV has a fast path. A 1080p camera frame: 4.6 ms -> about 1 ms here.
        On smooth test pictures of common camera sizes the result is within 2 grey levels of resizing the whole
        frame and then cropping (mean 0.1-0.4; tests/model/test_preprocess.py). Trimming to a multiple of the
        factor changes the scale by up to half an output pixel, so sharp detail can differ by a few levels more.
        """
        h, w = image.shape[:2]
        ch, cw = self.spec.crop
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
        y0, y1 = round(top * h / new_h), round((top + ch) * h / new_h)
        x0, x1 = round(left * w / new_w), round((left + cw) * w / new_w)
        factor = min((y1 - y0) // ch, (x1 - x0) // cw)
        if factor >= 2:
            # Trim to a multiple of the factor, evenly on both sides, so the crop stays centred.
            dy, dx = (y1 - y0) % factor, (x1 - x0) % factor
            y0, x0 = y0 + dy // 2, x0 + dx // 2
            y1, x1 = y1 - (dy - dy // 2), x1 - (dx - dx // 2)
            size = ((x1 - x0) // factor, (y1 - y0) // factor)
            image = cv2.resize(image[y0:y1, x0:x1], size, interpolation=cv2.INTER_AREA)
            y0, y1, x0, x1 = 0, size[1], 0, size[0]
        if out is None:
            out = np.empty(self.shape, dtype=np.uint8)
        return cv2.resize(image[y0:y1, x0:x1], (cw, ch), dst=out, interpolation=cv2.INTER_AREA)

    def normalise(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, 3, H, W): rescale and normalise, as the ONNX graph does."""
        x = batch.transpose(0, 3, 1, 2).astype(np.float32)
        x *= self._scale
        x -= self._shift
        return x
