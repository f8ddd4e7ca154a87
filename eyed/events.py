"""Predictions and pipeline counters -> event payloads. Pure: no sockets, no clocks of its own.

Every payload is JSON-ready and carries ``schema`` and ``type``. No payload ever holds pixels: the builders
take only labels, scores and counters (``tests/test_privacy.py`` checks the whole event stream for that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eyed.types import Frame, Prediction

SCHEMA = 1


def label_topic(source_id: str) -> str:
    return f"label.{source_id}"


def health_topic(source_id: str) -> str:
    return f"health.{source_id}"


def drift_topic(source_id: str) -> str:
    return f"drift.{source_id}"


@dataclass(frozen=True)
class EventContext:
    """What every event of one run shares."""

    source: str
    model: str
    backend: str


def label_event(ctx: EventContext, seq: int, frame: Frame, pred: Prediction, latency_ms: float) -> dict[str, Any]:
    """The payload of ``label.<source>`` for one classified frame."""
    top = pred.top
    return {
        "schema": SCHEMA,
        "type": "label",
        "source": ctx.source,
        "seq": seq,
        "ts": round(frame.ts, 6),
        "frame": frame.index,
        "label": top.label,
        "class_id": top.class_id,
        "score": round(top.score, 6),
        "topk": [{"label": s.label, "class_id": s.class_id, "score": round(s.score, 6)} for s in pred.topk],
        "coarse": (
            {"label": pred.coarse.label, "score": round(pred.coarse.score, 6)} if pred.coarse is not None else None
        ),
        "truth": frame.truth,
        "latency_ms": round(latency_ms, 3),
        "model": ctx.model,
        "backend": ctx.backend,
    }


@dataclass(frozen=True)
class Health:
    """A snapshot of the pipeline's counters."""

    state: str  # live | finished | stopped | failed; cameras: connecting | live | stalled | offline
    frames: int
    fps: float
    dropped: int
    errors: int
    skipped: int
    uptime_s: float
    reconnects: int = 0
    reconnect_attempts: int = 0
    last_frame_age_s: float | None = None


def health_event(ctx: EventContext, seq: int, ts: float, health: Health) -> dict[str, Any]:
    """The payload of ``health.<source>``: a heartbeat or a state change."""
    return {
        "schema": SCHEMA,
        "type": "health",
        "source": ctx.source,
        "seq": seq,
        "ts": round(ts, 6),
        "state": health.state,
        "frames": health.frames,
        "fps": round(health.fps, 2),
        "dropped": health.dropped,
        "errors": health.errors,
        "skipped": health.skipped,
        "uptime_s": round(health.uptime_s, 3),
        "reconnects": health.reconnects,
        "reconnect_attempts": health.reconnect_attempts,
        "last_frame_age_s": None if health.last_frame_age_s is None else round(health.last_frame_age_s, 3),
        "model": ctx.model,
        "backend": ctx.backend,
    }
