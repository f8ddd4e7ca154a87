"""Input drift monitoring without labels and without keeping images.

``stats`` turns each (frame, prediction) into a row of numbers, ``reference`` summarises an in-domain stream
into a profile, ``monitor`` compares windows of rows with that profile, ``report`` charts recorded verdicts.
"""

from eyed.drift.monitor import DriftMonitor, WindowReport, format_window, window_payload
from eyed.drift.reference import ProfileBuilder, Reference, load_reference
from eyed.drift.stats import FrameStats, StatsExtractor

__all__ = [
    "DriftMonitor",
    "FrameStats",
    "ProfileBuilder",
    "Reference",
    "StatsExtractor",
    "WindowReport",
    "format_window",
    "load_reference",
    "window_payload",
]
