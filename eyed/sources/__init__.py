"""Frame sources, chosen through a table of import strings so only the chosen one is imported."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from eyed.sources.base import SourceError

if TYPE_CHECKING:
    from eyed.config import SourceConfig
    from eyed.types import Source

SOURCES = {
    "replay": "eyed.sources.replay:ReplaySource",
}


def open_source(cfg: SourceConfig) -> Source:
    """The configured source, not yet entered (use it as a context manager)."""
    module_name, _, cls_name = SOURCES[cfg.kind].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(cfg)


__all__ = ["SOURCES", "SourceError", "open_source"]
