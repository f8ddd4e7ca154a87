"""Where the benchmarks find the real assets: $EYED_SHARED (default: ``shared`` beside the checkout), and the
settings that point configs/replay.toml at them.

configs/replay.toml names the model and the data by paths relative to the folder eyed starts from (the
checkout for `make run`); the overrides here are absolute, so a benchmark runs the same from any folder and
follows $EYED_SHARED.
"""

from __future__ import annotations

import os
from pathlib import Path

from eyed.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
REPLAY_CONFIG = ROOT / "configs" / "replay.toml"
MODEL = "mobilenet_v2_1.0_224"


def shared_folder() -> Path:
    """$EYED_SHARED, default ``shared`` beside the checkout."""
    return Path(os.environ.get("EYED_SHARED", ROOT.parent / "shared")).resolve()


def replay_overrides(shared: Path | None = None) -> dict[str, str]:
    """``section.field`` -> value: CIFAR-10 and the real MobileNetV2 from ``shared`` (default
    :func:`shared_folder`), and the checkout's ONNX cache."""
    shared = shared or shared_folder()
    return {
        "source.dataset": str(shared / "data" / "cifar10"),
        "model.id": str(shared / "models" / MODEL),
        "model.cache_dir": str(ROOT / ".cache" / "eyed"),
    }


def set_args(overrides: dict[str, str]) -> list[str]:
    """The overrides as `eyed` command-line arguments: ``--set section.field=value`` each."""
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def replay_settings(config: Path | None = None) -> Settings:
    """configs/replay.toml pointed at the shared assets; a ``config`` given by the user is read as it is."""
    if config is not None:
        return load_settings(config)
    return load_settings(REPLAY_CONFIG, [f"{key}={value}" for key, value in replay_overrides().items()])


def cached_fp32() -> Path:
    """The real MobileNetV2's ONNX export in the checkout's cache, made if missing."""
    from eyed.model.export import ensure_onnx

    overrides = replay_overrides()
    return ensure_onnx(overrides["model.id"], Path(overrides["model.cache_dir"]))


def cached_model() -> tuple[Path, dict[str, str]]:
    """$EYED_SHARED, and the settings (as EYED_ variables) that run the real MobileNetV2 from it with its ONNX
    export cached.

    Exported once beforehand: the figures are for a device that already has its model file.
    """
    cached_fp32()
    overrides = replay_overrides()
    return shared_folder(), {
        "EYED_MODEL__ID": overrides["model.id"],
        "EYED_MODEL__CACHE_DIR": overrides["model.cache_dir"],
    }
