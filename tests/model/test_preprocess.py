"""Preprocessing: HF configs, shapes, a plain numpy reference, and transformers on the real checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from eyed.model import preprocess as preprocess_module
from eyed.model.preprocess import Preprocessor, PreprocessSpec, UnsupportedPreprocessing
from tests.conftest import synthetic_images

# The real MobileNetV2 checkpoint's preprocessor_config.json.
HF_CONFIG: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "MobileNetV2ImageProcessor",
    "resample": 2,
}
# Unequal mean and std per channel, so a channel mix-up shows.
SPEC = PreprocessSpec(256, (224, 224), 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB uint8 image of any shape (photo-like, so interpolation kernels agree closely)."""
    square = synthetic_images(1, seed=seed, size=max(height, width))[0]
    return cv2.resize(square, (width, height), interpolation=cv2.INTER_CUBIC)


def tensor(pre: Preprocessor, image: np.ndarray) -> np.ndarray:
    """The model input for one image: the geometric half, then the arithmetic half."""
    return pre.normalise(pre(image)[None])[0]


def reference(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize the shortest edge with OpenCV, centre crop, then (x / 255 - mean) / std, in float64."""
    h, w = image.shape[:2]
    s = spec.shortest_edge
    new_h, new_w = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    shrinking = new_h * new_w < h * w
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interp).astype(np.float64)
    ch, cw = spec.crop
    top, left = (new_h - ch) // 2, (new_w - cw) // 2
    crop = resized[top : top + ch, left : left + cw]
    out = (crop * spec.rescale - np.array(spec.mean)) / np.array(spec.std)
    return out.transpose(2, 0, 1)


# PreprocessSpec.from_hf


def test_from_hf_shortest_edge() -> None:
    spec = PreprocessSpec.from_hf(HF_CONFIG)
    assert spec.shortest_edge == 256
    assert spec.crop == (224, 224)
    assert spec.rescale == pytest.approx(1 / 255)
    assert spec.mean == (0.5, 0.5, 0.5)
    assert spec.std == (0.5, 0.5, 0.5)


def test_from_hf_int_size_and_int_crop() -> None:
    spec = PreprocessSpec.from_hf({**HF_CONFIG, "size": 300, "crop_size": 288})
    assert spec.shortest_edge == 300
    assert spec.crop == (288, 288)


def test_from_hf_height_width_size() -> None:
    spec = PreprocessSpec.from_hf({**HF_CONFIG, "size": {"height": 240, "width": 320}})
    assert spec.resize_to == (240, 320)
    assert spec.crop == (224, 224)
    assert PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("size", [(480, 640), (640, 480), (100, 100)])
def test_a_fixed_size_processor_resizes_the_whole_frame_like_transformers(size: tuple[int, int]) -> None:
    """ViT-style processors (``size`` of height and width, no crop) squash the whole frame to that size: a
    shortest-edge resize and centre crop would cut off a 4:3 frame's sides."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    cfg = {
        "do_resize": True,
        "size": {"height": 48, "width": 48},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    image = smooth_image(*size, seed=size[1])
    image[:, : size[1] // 8] = 255  # a white band at the left edge, which a centre crop would cut off
    expected = transformers.ViTImageProcessor(**cfg)(Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    spec = PreprocessSpec.from_hf(cfg)
    out = tensor(Preprocessor(spec, "checkpoint"), image)
    assert out.shape == expected.shape == (3, 48, 48)
    levels = np.abs(out - expected) * 127.5
    assert levels.mean() < 1.5, levels.mean()


def test_from_hf_non_square_crop() -> None:
    spec = PreprocessSpec.from_hf({**HF_CONFIG, "crop_size": {"height": 192, "width": 256}})
    assert spec.crop == (192, 256)
    pre = Preprocessor(spec)
    assert pre(smooth_image(480, 640)).shape == pre.shape == (192, 256, 3)


def test_from_hf_without_centre_crop() -> None:
    spec = PreprocessSpec.from_hf({**HF_CONFIG, "do_center_crop": False})
    assert spec.crop == (256, 256)


def test_from_hf_without_rescale_or_normalise() -> None:
    spec = PreprocessSpec.from_hf({**HF_CONFIG, "do_rescale": False, "do_normalize": False})
    assert spec.rescale == 1.0
    assert spec.mean == (0.0, 0.0, 0.0)
    assert spec.std == (1.0, 1.0, 1.0)
    image = smooth_image(256, 256)
    # Identity arithmetic on the centre 224x224: raw pixel values come through.
    assert np.array_equal(tensor(Preprocessor(spec), image), image[16:240, 16:240].transpose(2, 0, 1))


def test_spec_survives_json_metadata_round_trip() -> None:
    """The spec is stored as JSON in the ONNX metadata; it must come back equal."""
    assert PreprocessSpec.from_dict(json.loads(json.dumps(SPEC.to_dict()))) == SPEC


def test_affine_is_rescale_then_normalise() -> None:
    scale, shift = SPEC.affine()
    x = np.array([0.0, 1.0, 128.0, 255.0])[:, None]
    expected = (x * SPEC.rescale - np.array(SPEC.mean)) / np.array(SPEC.std)
    assert np.allclose(x * scale - shift, expected, atol=1e-5)


# Preprocessor


@pytest.mark.parametrize("size", [(32, 32), (480, 640), (640, 480), (200, 300), (300, 200), (100, 1000)])
@pytest.mark.parametrize("small_input", ["checkpoint", "fit"])
def test_shape_and_dtype(size: tuple[int, int], small_input: str) -> None:
    pre = Preprocessor(SPEC, small_input)
    pixels = pre(smooth_image(*size))
    assert pixels.shape == pre.shape == (224, 224, 3)
    assert pixels.dtype == np.uint8
    batch = pre.normalise(np.stack([pixels, pixels]))
    assert batch.shape == (2, 3, 224, 224)
    assert batch.dtype == np.float32


def test_normalise_is_exact() -> None:
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    out = Preprocessor(SPEC).normalise(batch)
    expected = (batch.astype(np.float64) / 255 - np.array(SPEC.mean)) / np.array(SPEC.std)
    assert np.allclose(out, expected.transpose(0, 3, 1, 2), atol=1e-5)


@pytest.mark.parametrize(
    "size",
    [
        (32, 32),  # upscale path
        (480, 640),  # downscale path
        (640, 480),
        (200, 300),  # upscale, non-square
        (300, 200),
        (1000, 333),  # downscale, very non-square
        (256, 256),  # no resize at all
    ],
)
def test_matches_numpy_reference(size: tuple[int, int]) -> None:
    image = smooth_image(*size, seed=sum(size))
    out = tensor(Preprocessor(SPEC, "checkpoint"), image)
    assert np.abs(out - reference(image, SPEC)).max() < 0.02


def test_centre_crop_is_centred() -> None:
    """A bright vertical band in the middle of a wide image stays in the middle of the crop."""
    image = np.zeros((256, 512, 3), dtype=np.uint8)
    image[:, 248:264] = 255
    pixels = Preprocessor(SPEC)(image)
    columns = np.flatnonzero(pixels[0, :, 0] > 127)
    assert columns.min() == 104
    assert columns.max() == 119


@pytest.mark.parametrize("size", [(720, 1280), (1080, 1920), (1920, 1080), (2000, 600), (480, 640)])
def test_large_frames_match_resizing_the_whole_frame(size: tuple[int, int]) -> None:
    """Camera frames are resized only where the crop lands, and big ones first by a whole factor: the result
    stays within 2 grey levels of resizing the whole frame with INTER_AREA and cropping."""
    image = smooth_image(*size, seed=size[1])
    pre = Preprocessor(SPEC, "checkpoint")
    new_h, new_w = pre.resized_size(*size)
    whole = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    top, left = (new_h - 224) // 2, (new_w - 224) // 2
    expected = whole[top : top + 224, left : left + 224].astype(int)
    diff = np.abs(pre(image).astype(int) - expected)
    assert diff.max() <= 2 and diff.mean() < 0.3


@pytest.mark.parametrize(("height", "width"), [(1080, 1920), (1920, 1080)])
def test_large_frame_crop_is_centred(height: int, width: int) -> None:
    """A bright band across the middle of a 1080p frame lands in the middle of the crop, to half a pixel."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    if width > height:
        image[:, width // 2 - 40 : width // 2 + 40] = 255
        profile = Preprocessor(SPEC)(image)[100, :, 0]
    else:
        image[height // 2 - 40 : height // 2 + 40] = 255
        profile = Preprocessor(SPEC)(image)[:, 100, 0]
    bright = np.flatnonzero(profile > 127)
    assert abs((bright.min() + bright.max()) / 2 - 111.5) <= 0.5


def test_channels_stay_in_rgb_order() -> None:
    """A pure red image gives the maximum in channel 0 only."""
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[..., 0] = 255
    out = tensor(Preprocessor(SPEC), image)
    expected = (np.array([1.0, 0.0, 0.0]) - np.array(SPEC.mean)) / np.array(SPEC.std)
    assert np.allclose(out, expected[:, None, None], atol=1e-4)


def test_fit_scales_small_images_whole_onto_the_crop() -> None:
    image = smooth_image(32, 32, seed=3)
    pixels = Preprocessor(SPEC, "fit")(image)
    whole = cv2.resize(image, (224, 224), interpolation=cv2.INTER_CUBIC)
    # Unlike the checkpoint path, nothing is cut away: it is the bicubic resize of the whole image.
    assert np.abs(pixels.astype(int) - whole).max() <= 1
    assert np.abs(pixels.astype(int) - Preprocessor(SPEC, "checkpoint")(image)).max() > 10


def test_fit_small_non_square_keeps_aspect_and_crops() -> None:
    image = smooth_image(16, 24, seed=4)
    pixels = Preprocessor(SPEC, "fit")(image)
    scaled = cv2.resize(image, (336, 224), interpolation=cv2.INTER_CUBIC)[:, 56:280]
    assert np.abs(pixels.astype(int) - scaled).max() <= 1


@pytest.mark.parametrize("size", [(480, 640), (224, 300), (224, 224)])
def test_fit_leaves_larger_images_alone(size: tuple[int, int]) -> None:
    image = smooth_image(*size, seed=5)
    assert np.array_equal(Preprocessor(SPEC, "fit")(image), Preprocessor(SPEC, "checkpoint")(image))


@pytest.mark.parametrize(("size", "small_input"), [((32, 32), "checkpoint"), ((32, 32), "fit"), ((480, 640), "fit")])
def test_out_is_filled_in_place(size: tuple[int, int], small_input: str) -> None:
    pre = Preprocessor(SPEC, small_input)
    image = smooth_image(*size, seed=6)
    buffer = np.full((3, *pre.shape), 7, dtype=np.uint8)
    result = pre(image, out=buffer[1])
    assert np.shares_memory(result, buffer[1])
    assert np.array_equal(buffer[1], pre(image))
    assert (buffer[0] == 7).all()  # the neighbouring slots are untouched
    assert (buffer[2] == 7).all()


def test_non_contiguous_input() -> None:
    image = smooth_image(480, 640, seed=7)
    bgr_view = image[..., ::-1]
    pre = Preprocessor(SPEC)
    assert np.array_equal(pre(bgr_view), pre(np.ascontiguousarray(bgr_view)))


# Against transformers on the real checkpoint


@pytest.fixture(scope="module")
def hf_processor(real_model: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoImageProcessor.from_pretrained(real_model)


@pytest.mark.assets
@pytest.mark.parametrize("size", [(32, 32), (300, 200), (200, 300), (480, 640), (640, 480), (224, 224), (1080, 1920)])
def test_matches_transformers_on_real_checkpoint(real_model: Path, hf_processor: Any, size: tuple[int, int]) -> None:
    from PIL import Image

    spec = PreprocessSpec.from_hf(json.loads((real_model / "preprocessor_config.json").read_text()))
    image = smooth_image(*size, seed=size[0] * 7 + size[1])
    expected = hf_processor(Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    out = tensor(Preprocessor(spec, "checkpoint"), image)
    assert out.shape == expected.shape
    diff = np.abs(out - expected)
    assert diff.max() < 0.05
    assert diff.mean() < 0.01


@pytest.mark.assets
@pytest.mark.parametrize("size", [(333, 500), (600, 800), (1080, 1920)])
def test_textured_frames_are_close_to_transformers(real_model: Path, hf_processor: Any, size: tuple[int, int]) -> None:
    """Fine texture shows where OpenCV's INTER_AREA departs from PIL's antialiased bilinear: a mean of 1.4-2.9
    grey levels here, single pixels up to 18. A crop one output pixel off gives a mean of 6.7-8.4."""
    from PIL import Image

    spec = PreprocessSpec.from_hf(json.loads((real_model / "preprocessor_config.json").read_text()))
    rng = np.random.default_rng(size[0])
    image = cv2.GaussianBlur(rng.integers(0, 256, (*size, 3), dtype=np.uint8), (5, 5), 0)
    expected = hf_processor(Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    levels = np.abs(tensor(Preprocessor(spec, "checkpoint"), image) - expected) * 127.5  # [-1, 1] back to 0-255
    assert levels.mean() < 4.5
    assert levels.max() < 40


# Other image processors' settings: crop_pct, resample, do_resize (transformers' PIL processors as reference)

# What the three share: ImageNet's mean and std, bicubic resizing of the shortest edge to 224.
IMAGENET_BICUBIC: dict[str, Any] = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 224},
}
CONVNEXT: dict[str, Any] = {**IMAGENET_BICUBIC, "image_processor_type": "ConvNextImageProcessor", "crop_pct": 0.875}
CENTRE_CROP: dict[str, Any] = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True}
POOLFORMER: dict[str, Any] = {
    **IMAGENET_BICUBIC,
    **CENTRE_CROP,
    "image_processor_type": "PoolFormerImageProcessor",
    "crop_pct": 0.9,
}
LEVIT: dict[str, Any] = {**IMAGENET_BICUBIC, **CENTRE_CROP, "image_processor_type": "LevitImageProcessor"}


def transformers_pixels(processor: str, cfg: dict[str, Any], image: np.ndarray) -> np.ndarray:
    """What transformers' image processor (its PIL version, as without torchvision) makes of ``image``."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    cls = getattr(transformers, f"{processor}Pil", None) or getattr(transformers, processor)
    settings = {k: v for k, v in cfg.items() if k != "image_processor_type"}
    return cls(**settings)(Image.fromarray(image), return_tensors="np")["pixel_values"][0]


def grey_levels(out: np.ndarray, expected: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Per-pixel differences of two normalised tensors, back in 0-255 grey levels."""
    return np.abs(out - expected) * np.asarray(spec.std)[:, None, None] / spec.rescale


@pytest.mark.parametrize(
    ("processor", "cfg"),
    [
        ("ConvNextImageProcessor", CONVNEXT),  # below 384: shortest edge to 224 / 0.875 = 256, centre 224 square
        ("ConvNextImageProcessor", {**CONVNEXT, "size": {"shortest_edge": 384}}),  # from 384 on: warped to 384
        ("PoolFormerImageProcessor", POOLFORMER),  # shortest edge to 224 / 0.9 = 248, then the crop
        ("LevitImageProcessor", LEVIT),  # shortest edge to 224 * 256 / 224
        ("MobileNetV2ImageProcessor", {**HF_CONFIG, "resample": 3}),  # bicubic
        ("MobileNetV2ImageProcessor", {**HF_CONFIG, "resample": 0}),  # nearest
    ],
)
@pytest.mark.parametrize("size", [(480, 640), (1000, 333), (32, 32), (120, 90)])
def test_other_processors_match_transformers(processor: str, cfg: dict[str, Any], size: tuple[int, int]) -> None:
    """crop_pct and resample were ignored: a ConvNeXt-style crop_pct of 0.875 put the input a mean of 107 grey
    levels from what transformers makes of the same frame."""
    image = smooth_image(*size, seed=size[0] + size[1])
    expected = transformers_pixels(processor, cfg, image)
    spec = PreprocessSpec.from_hf(cfg)
    out = tensor(Preprocessor(spec, "checkpoint"), image)
    assert out.shape == expected.shape
    levels = grey_levels(out, expected, spec)
    # Nearest picks the very pixels PIL picks; bicubic's kernels differ a little (OpenCV's a = -0.75, PIL's
    # -0.5), and shrinking averages with INTER_AREA where PIL filters.
    assert levels.mean() < (0.01 if cfg["resample"] == 0 else 0.8), levels.mean()


@pytest.mark.parametrize("size", [(32, 32), (100, 150)])
def test_bicubic_enlarges_with_a_bicubic_kernel(size: tuple[int, int]) -> None:
    """On smooth pictures bilinear and bicubic hardly differ; on texture, enlarged, they do. OpenCV's bicubic
    kernel (a = -0.75) is not PIL's (-0.5), so some difference remains, but far less than bilinear's."""
    image = np.random.default_rng(size[0]).integers(0, 256, (*size, 3), dtype=np.uint8)
    cfg = {**HF_CONFIG, "resample": 3}
    expected = transformers_pixels("MobileNetV2ImageProcessor", cfg, image)
    spec = PreprocessSpec.from_hf(cfg)
    assert spec.resample == "bicubic"
    levels = grey_levels(tensor(Preprocessor(spec, "checkpoint"), image), expected, spec).mean()
    bilinear = PreprocessSpec.from_hf(HF_CONFIG)
    as_bilinear = grey_levels(tensor(Preprocessor(bilinear, "checkpoint"), image), expected, bilinear).mean()
    assert levels < 5 and as_bilinear > 2 * levels, (levels, as_bilinear)


def test_convnext_crop_pct_is_a_resize_and_a_square_crop() -> None:
    spec = PreprocessSpec.from_hf(CONVNEXT)
    assert (spec.shortest_edge, spec.crop, spec.resize_to, spec.resample) == (256, (224, 224), None, "bicubic")
    warped = PreprocessSpec.from_hf({**CONVNEXT, "size": {"shortest_edge": 384}})
    assert (warped.resize_to, warped.crop) == ((384, 384), (384, 384))
    # An older config: no image_processor_type, a feature_extractor_type and an int size; or neither type, and
    # config.json's model_type (as AutoImageProcessor picks the processor).
    old = {k: v for k, v in CONVNEXT.items() if k != "image_processor_type"}
    assert PreprocessSpec.from_hf({**old, "feature_extractor_type": "ConvNextFeatureExtractor", "size": 224}) == spec
    assert PreprocessSpec.from_hf(old, "resnet") == spec


@pytest.mark.parametrize("size", [(480, 640), (100, 150), (224, 224), (300, 200)])
def test_without_resize_the_frame_is_centre_cropped_as_it_is(size: tuple[int, int]) -> None:
    """do_resize = false: the frame's own pixels, centre-cropped, and padded with black where it is smaller than
    the crop, as transformers does (it used to be resized all the same)."""
    cfg = {**HF_CONFIG, "do_resize": False}
    image = smooth_image(*size, seed=size[0])
    expected = transformers_pixels("MobileNetV2ImageProcessor", cfg, image)
    spec = PreprocessSpec.from_hf(cfg)
    assert not spec.resize
    out = tensor(Preprocessor(spec, "checkpoint"), image)
    assert out.shape == expected.shape == (3, 224, 224)
    assert grey_levels(out, expected, spec).max() < 0.01


@pytest.mark.parametrize(
    ("cfg", "setting"),
    [
        ({**HF_CONFIG, "resample": 1}, "resample = 1 (LANCZOS)"),
        ({**HF_CONFIG, "resample": 5}, "resample = 5 (HAMMING)"),
        ({**HF_CONFIG, "crop_pct": 0.9}, "crop_pct = 0.9"),  # MobileNetV2's processor has no crop_pct
        ({**CONVNEXT, "image_processor_type": None}, "crop_pct = 0.875"),  # whose meaning is not known
        ({**HF_CONFIG, "do_resize": False, "do_center_crop": False}, "do_resize = false"),
        ({**HF_CONFIG, "do_flip_channel_order": True}, "do_flip_channel_order"),
        ({**HF_CONFIG, "size": {"shortest_edge": 256, "longest_edge": 512}}, "size.longest_edge"),
        ({**CONVNEXT, "do_center_crop": True, "crop_size": {"height": 200, "width": 200}}, "do_center_crop"),
    ],
)
def test_settings_eyed_cannot_reproduce_are_refused(cfg: dict[str, Any], setting: str) -> None:
    with pytest.raises(UnsupportedPreprocessing, match=re.escape(setting)):
        PreprocessSpec.from_hf(cfg)


def test_the_shipped_checkpoints_spec_is_stored_as_before() -> None:
    """Settings at their defaults stay out of the stored spec: exports' metadata and drift profiles made before
    resample and do_resize were read compare equal to today's."""
    spec = PreprocessSpec.from_hf(HF_CONFIG)
    assert spec.to_dict() == {
        "shortest_edge": 256,
        "crop": (224, 224),
        "rescale": HF_CONFIG["rescale_factor"],
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "resize_to": None,
    }
    other = PreprocessSpec.from_hf({**HF_CONFIG, "resample": 0, "do_resize": False})
    assert other.to_dict()["resample"] == "nearest" and other.to_dict()["resize"] is False
    assert PreprocessSpec.from_dict(json.loads(json.dumps(other.to_dict()))) == other


# Frames of extreme proportions


@pytest.mark.parametrize("resample", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("shape", [(40, 300), (150, 90), (1, 4000), (3, 700), (4000, 2), (255, 2000)])
def test_an_enlargement_computed_for_the_crop_alone_matches_the_whole_one(
    resample: str, shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a frame of extreme proportions gets (below) is what any frame would: nearest picks the same pixels,
    bilinear and bicubic within a grey level."""
    rng = np.random.default_rng(0)
    pre = Preprocessor(PreprocessSpec(256, (224, 224), 1 / 255, (0.5,) * 3, (0.5,) * 3, resample=resample))
    for image in (smooth_image(*shape), rng.integers(0, 256, (*shape, 3), dtype=np.uint8)):
        whole = pre(image).astype(int)
        monkeypatch.setattr(preprocess_module, "MAX_RESIZED_PIXELS", 0)
        sampled = pre(image).astype(int)
        monkeypatch.undo()
        assert np.abs(whole - sampled).max() <= (0 if resample == "nearest" else 1)


@pytest.mark.parametrize("shape", [(1, 20_000), (20_000, 2)])
def test_a_strip_of_pixels_is_not_enlarged_whole(shape: tuple[int, int]) -> None:
    """A 1 x 20,000 strip in a dataset: its shortest edge enlarged to 256 would take 3.9 GB, a small board's
    whole memory, before the crop kept 224 x 224 of it."""
    import tracemalloc

    image = np.full((*shape, 3), 90, dtype=np.uint8)
    tracemalloc.start()
    try:
        out = Preprocessor(SPEC)(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (224, 224, 3) and (out == 90).all()
    assert peak < 64 * 2**20, peak
