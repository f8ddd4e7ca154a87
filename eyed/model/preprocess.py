"""Image preprocessing with OpenCV and numpy: the only place that knows sizes, mean and std.

It follows a Hugging Face ``preprocessor_config.json`` (resize the shortest edge, centre crop, rescale,
normalise) so that the ONNX backend needs neither transformers nor PIL at run time. A test checks the result
against ``AutoImageProcessor`` on the real checkpoint, others against transformers' processors for the settings
that the reference checkpoint leaves at their defaults (``resample``, ``do_resize``, ``crop_pct``). Settings it
does not reproduce are refused (:class:`UnsupportedPreprocessing`), not ignored.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from eyed.model.checkpoint import ModelLoadError


class UnsupportedPreprocessing(ModelLoadError, ValueError):
    """A ``preprocessor_config.json`` setting that eyed cannot reproduce; the message names it. A
    ModelLoadError, so that a caller that reads the config itself still ends with a message, not a traceback."""


# PIL's resampling filters as transformers' image processors store them (``resample``), and the OpenCV flag
# that does the same when enlarging. Shrinking with bilinear or bicubic averages with INTER_AREA instead, as
# PIL's antialiased filters do (:meth:`Preprocessor._shrink`). INTER_NEAREST_EXACT picks the pixel PIL's
# NEAREST picks (plain INTER_NEAREST is off by half a pixel).
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
INTERPOLATION = {"nearest": cv2.INTER_NEAREST_EXACT, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
PIL_FILTERS = {1: "LANCZOS", 4: "BOX", 5: "HAMMING"}
# An enlargement bigger than this (24 MB) is computed for the crop's pixels only (Preprocessor._sample_crop):
# only a frame of extreme proportions gets there (a 200 x 4000 one is enlarged to 1.3 megapixels).
MAX_RESIZED_PIXELS = 1 << 23
# Image processors whose defaults differ from MobileNetV2's where a config leaves a setting out (configs written
# by save_pretrained hold every setting, hand-written ones may not): ConvNeXt's (also ResNet's, RegNet's) and
# PoolFormer's resize with bicubic and take crop_pct; ConvNeXt's does not centre crop after its own crop.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "ConvNext": {"resample": 3, "crop_pct": 224 / 256, "do_center_crop": False},
    "PoolFormer": {"resample": 3, "crop_pct": 0.9},
    "Levit": {"resample": 3},
}
# Settings of other processors that change the pixels in ways eyed does not reproduce: refused, not ignored.
UNSUPPORTED_FLAGS = ("do_flip_channel_order", "rescale_offset", "include_top", "do_color_quantize")


# The processor transformers' AutoImageProcessor picks from config.json's model_type when
# preprocessor_config.json names none, for the models whose processor eyed treats apart.
MODEL_TYPE_KINDS = {
    "convnext": "ConvNext",
    "convnextv2": "ConvNext",
    "resnet": "ConvNext",
    "regnet": "ConvNext",
    "van": "ConvNext",
    "poolformer": "PoolFormer",
    "levit": "Levit",
}


def processor_kind(cfg: dict[str, Any], model_type: str | None = None) -> str:
    """The image processor's family, e.g. "ConvNext" for ConvNextImageProcessor(Fast) or the older
    ConvNextFeatureExtractor; else the one ``model_type`` (config.json's) implies; "" when neither says."""
    name = str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "")
    if not name:
        return MODEL_TYPE_KINDS.get(str(model_type or ""), "")
    return re.sub(r"(ImageProcessor|FeatureExtractor)(Fast|Pil)?$", "", name)


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize so the shortest edge is ``shortest_edge`` (or, with ``resize_to``, to exactly that size, aspect
    ratio and all, as transformers does for a ``size`` of height and width) with ``resample``, or not at all
    without ``resize``, centre crop to ``crop`` (padding with black where the image is smaller, as transformers
    does), then (x * rescale - mean) / std."""

    shortest_edge: int
    crop: tuple[int, int]  # (height, width)
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_to: tuple[int, int] | None = None  # (height, width)
    resample: str = "bilinear"  # a value of RESAMPLE
    resize: bool = True  # the processor's do_resize

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], model_type: str | None = None) -> PreprocessSpec:
        """Read a Hugging Face image processor config (``preprocessor_config.json``) as transformers' image
        processor for it would apply it (``model_type``, config.json's, says which when the config does not);
        :class:`UnsupportedPreprocessing` (naming the setting) for what eyed does not reproduce, ValueError,
        KeyError or TypeError for a malformed config."""
        kind = processor_kind(cfg, model_type)
        defaults = KIND_DEFAULTS.get(kind, {})

        def setting(key: str, default: Any) -> Any:
            value = cfg.get(key)
            return value if value is not None else defaults.get(key, default)

        for flag in UNSUPPORTED_FLAGS:
            if cfg.get(flag):
                raise UnsupportedPreprocessing(f"{flag} = true is not supported")
        resample_code = setting("resample", 2)
        if resample_code not in RESAMPLE:
            filt = PIL_FILTERS.get(resample_code, "unknown")
            raise UnsupportedPreprocessing(
                f"resample = {resample_code!r} ({filt}) is not supported: eyed resizes with 0 (nearest), "
                "2 (bilinear) or 3 (bicubic)"
            )
        resample = RESAMPLE[resample_code]
        resize = bool(setting("do_resize", True))
        center_crop = bool(setting("do_center_crop", True))
        crop_pct = setting("crop_pct", None)
        size = setting("size", {"shortest_edge": 256})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if not isinstance(size, dict) or not ({"shortest_edge"} <= size.keys() or {"height", "width"} <= size.keys()):
            raise UnsupportedPreprocessing(
                f"size = {size!r} is not supported: eyed reads shortest_edge, or height and width"
            )
        if "longest_edge" in size:
            raise UnsupportedPreprocessing("size.longest_edge is not supported")
        resize_to = None
        if "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        else:  # {"height": h, "width": w}: the whole frame goes to that size (ViT-style processors)
            resize_to = (int(size["height"]), int(size["width"]))
            shortest = min(resize_to)
        whole = resize_to or (shortest, shortest)
        crop_cfg = setting("crop_size", {"height": whole[0], "width": whole[1]})
        if isinstance(crop_cfg, int):
            crop = (crop_cfg, crop_cfg)
        else:
            crop = (int(crop_cfg["height"]), int(crop_cfg["width"]))
        if crop_pct is not None and kind not in ("ConvNext", "PoolFormer"):
            raise UnsupportedPreprocessing(
                f"crop_pct = {crop_pct} is not supported with image processor {kind or '(not named)'}: eyed knows "
                "its meaning for ConvNext (also ResNet, RegNet) and PoolFormer image processors only"
            )
        if resize and kind == "ConvNext":
            # ConvNextImageProcessor.resize: below 384 pixels, resize the shortest edge to size / crop_pct and
            # cut the central size x size square; from 384 on, warp the whole frame to size x size.
            if resize_to is not None:
                raise UnsupportedPreprocessing(
                    "size of height and width: a ConvNext image processor needs shortest_edge"
                )
            square = (shortest, shortest)
            if shortest < 384:
                if center_crop and crop != square:
                    # A second centre crop after the first: rounding could put it a pixel off.
                    raise UnsupportedPreprocessing(
                        "do_center_crop = true after a ConvNext image processor's own crop is not supported"
                    )
                shortest, crop = int(shortest / float(crop_pct)), square
            else:
                resize_to = square
                crop = crop if center_crop else square
        elif resize and kind == "PoolFormer" and crop_pct is not None:
            # PoolFormerImageProcessor.resize: the size divided by crop_pct; a square size is a shortest edge.
            pct = float(crop_pct)
            if resize_to is None or resize_to[0] == resize_to[1]:
                shortest, resize_to = int(shortest / pct), None
            else:
                resize_to = (int(resize_to[0] / pct), int(resize_to[1] / pct))
                shortest = min(resize_to)
            crop = crop if center_crop else (resize_to or (shortest, shortest))
        elif resize and kind == "Levit" and resize_to is None:
            shortest = int(256 / 224 * shortest)  # LevitImageProcessor.resize
            crop = crop if center_crop else whole
        elif not center_crop:
            crop = whole
        if not resize and not center_crop:
            raise UnsupportedPreprocessing(
                "do_resize = false with do_center_crop = false is not supported: the model input would be each "
                "frame's own size"
            )
        rescale = float(setting("rescale_factor", 1 / 255)) if setting("do_rescale", True) else 1.0
        if setting("do_normalize", True):
            mean = tuple(float(v) for v in setting("image_mean", (0.5, 0.5, 0.5)))
            std = tuple(float(v) for v in setting("image_std", (0.5, 0.5, 0.5)))
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(shortest, crop, rescale, mean, std, resize_to, resample, resize)  # type: ignore[arg-type]

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (scale, shift) with (x * rescale - mean) / std == x * scale - shift."""
        std = np.asarray(self.std, dtype=np.float32)
        scale = np.float32(self.rescale) / std
        shift = np.asarray(self.mean, dtype=np.float32) / std
        return scale, shift

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Left out at their defaults, so that the ONNX metadata and drift profiles of the checkpoints eyed read
        # before these settings (bilinear, resizing) stay what they were, and compare equal.
        for key, default in (("resample", "bilinear"), ("resize", True)):
            if data[key] == default:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        return cls(
            shortest_edge=int(data["shortest_edge"]),
            crop=(int(data["crop"][0]), int(data["crop"][1])),
            rescale=float(data["rescale"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            resize_to=(int(data["resize_to"][0]), int(data["resize_to"][1])) if data.get("resize_to") else None,
            resample=str(data.get("resample", "bilinear")),
            resize=bool(data.get("resize", True)),
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
        elif not self.spec.resize:  # do_resize = false: the frame's own pixels, centre-cropped
            return centre_crop(image, self.spec.crop, out)
        else:
            new_h, new_w = self.resized_size(h, w)
            shrinking = new_h * new_w < h * w
            # Nearest picks pixels whatever the scale; the others average when shrinking (INTER_AREA).
            if shrinking and self.spec.resample != "nearest":
                if new_h >= ch and new_w >= cw:
                    return self._shrink(image, new_h, new_w, out)
                interp = cv2.INTER_AREA
            else:
                interp = INTERPOLATION[self.spec.resample]  # bilinear: matches PIL's when growing
        if out is None:
            out = np.empty(self.shape, dtype=np.uint8)
        if (new_h, new_w) == (ch, cw):
            return cv2.resize(image, (cw, ch), dst=out, interpolation=interp)
        if new_h * new_w > MAX_RESIZED_PIXELS and new_h >= ch and new_w >= cw and interp != cv2.INTER_AREA:
            return self._sample_crop(image, new_h, new_w, interp, out)
        return centre_crop(cv2.resize(image, (new_w, new_h), interpolation=interp), self.spec.crop, out)

    def _sample_crop(self, image: np.ndarray, new_h: int, new_w: int, interp: int, out: np.ndarray) -> np.ndarray:
        """The centre crop of ``image`` enlarged to (new_h, new_w), computed for the crop's pixels only.

        A frame far wider than tall (a 1 x 4000 strip in a dataset) would otherwise be enlarged whole first, to
        256 x 1,024,000 pixels (786 MB). Each output pixel samples the frame where ``cv2.resize`` would
        (pixel centres aligned, edges repeated): nearest exactly the same pixel, bilinear and bicubic within a
        grey level or two (warpAffine places samples to 1/32 of a pixel).
        """
        h, w = image.shape[:2]
        ch, cw = self.spec.crop
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
        sy, sx = h / new_h, w / new_w
        if interp == cv2.INTER_NEAREST_EXACT:
            out[...] = image[_nearest(h, new_h, top, ch)[:, None], _nearest(w, new_w, left, cw)[None, :]]
            return out
        to_source = np.array([[sx, 0.0, (left + 0.5) * sx - 0.5], [0.0, sy, (top + 0.5) * sy - 0.5]])
        flags = interp | cv2.WARP_INVERSE_MAP
        return cv2.warpAffine(image, to_source, (cw, ch), dst=out, flags=flags, borderMode=cv2.BORDER_REPLICATE)

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


def _nearest(size: int, new_size: int, start: int, count: int) -> np.ndarray:
    """The source indices INTER_NEAREST_EXACT takes for outputs ``start`` to ``start + count`` when resizing
    ``size`` pixels to ``new_size``: a ramp of indices resized by OpenCV itself, whose rounding differs between
    its versions (a row of ``new_size`` integers, not a frame of them)."""
    ramp = np.arange(size, dtype=np.int32).reshape(1, size)
    return cv2.resize(ramp, (new_size, 1), interpolation=cv2.INTER_NEAREST_EXACT)[0, start : start + count]


def centre_crop(image: np.ndarray, crop: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """The central ``crop`` (height, width) of ``image``; where the image is smaller, it sits in black, placed
    as transformers' ``center_crop`` places it (the extra row or column of an odd margin before it)."""
    h, w = image.shape[:2]
    ch, cw = crop
    if out is None:
        out = np.empty((ch, cw, 3), dtype=np.uint8)
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        out[...] = image[top : top + ch, left : left + cw]
        return out
    out[...] = 0
    pad_top, pad_left = max(0, -(-(ch - h) // 2)), max(0, -(-(cw - w) // 2))
    rows, cols = min(h, ch), min(w, cw)
    top, left = max(0, top), max(0, left)
    out[pad_top : pad_top + rows, pad_left : pad_left + cols] = image[top : top + rows, left : left + cols]
    return out
