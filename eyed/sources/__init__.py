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


def open_recorded(cfg: SourceConfig) -> Source:
    """A source that delivers every frame in order (replay or file), for eval, priors and bench."""
    source = open_source(cfg)
    if source.live:
        raise SourceError(f"source.kind {cfg.kind} is a live camera: this command needs replay or file")
    return cast("Source", source)


__all__ = ["SOURCES", "SourceError", "open_recorded", "open_source"]
