"""Frame sources, chosen through a table of import strings so only the chosen one is imported."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

from eyed.sources.base import SourceError

if TYPE_CHECKING:
    from eyed.config import SourceConfig
    from eyed.types import LiveSource, Source, StartUp

SOURCES = {
    "replay": "eyed.sources.replay:ReplaySource",
    "webcam": "eyed.sources.capture:CaptureSource",
    "rtsp": "eyed.sources.capture:CaptureSource",
    "file": "eyed.sources.capture:CaptureSource",
}


def open_source(cfg: SourceConfig, startup: StartUp | None = None) -> Source | LiveSource:
    """The configured source, not yet entered (use it as a context manager). ``startup`` serves a replay's
    entering, which may wait minutes for datasets to walk a large folder; the others enter in moments."""
    module_name, _, cls_name = SOURCES[cfg.kind].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(cfg, startup=startup) if cfg.kind == "replay" else cls(cfg)


def open_recorded(cfg: SourceConfig, *, paced: bool = False) -> Source:
    """A source that delivers every frame in order (replay or file), once, for the offline commands.

    ``source.loop`` is ignored: a looping replay with no limit would never end, and one with a limit would
    count its records more than once. So is ``source.fps``, unless ``paced`` (the drift commands, whose
    windows are measured in seconds of the stream).
    """
    source = open_source(cfg.model_copy(update={"loop": False} if paced else {"loop": False, "fps": 0.0}))
    if source.live:
        raise SourceError(f"source.kind {cfg.kind} is a live camera: this command needs replay or file")
    return cast("Source", source)


def describe(cfg: SourceConfig) -> str:
    """What a recorded source reads, for messages: a URL without its password or secret items."""
    from eyed.config import redact_url

    return f"{cfg.dataset}:{cfg.split}" if cfg.kind == "replay" else redact_url(str(cfg.url))


def no_frames(cfg: SourceConfig, detail: str = "") -> SourceError:
    """The error of an offline command whose source gave it nothing to work on."""
    start = f" from record {cfg.skip} on" if cfg.skip else ""
    return SourceError(f"no frames from {describe(cfg)}{start}{detail}")


__all__ = ["SOURCES", "SourceError", "describe", "no_frames", "open_recorded", "open_source"]
