"""``eyed drift-report``: chart recorded drift verdicts (one PNG), from ``eyed subscribe --json`` output."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from eyed.drift.reference import Reference
from eyed.outputs import pyplot, save_figure

logger = logging.getLogger(__name__)

STATUS_COLOURS = {"ok": None, "warn": "#f6d55c", "drift": "#ed553b", "learning": "#d0d0d0"}
COLUMNS = 4


def read_drift_events(path: Path) -> list[dict[str, Any]]:
    """The drift payloads in a JSON-lines file, in file order.

    Accepts what ``eyed subscribe --json`` prints (``{"topic": "drift.cam", ...payload}`` a line) and bare
    payloads; other events (labels, health) and blank lines are skipped, a line that is not JSON is a ValueError.
    """
    events = []
    with Path(path).open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
            if isinstance(event, dict) and _is_drift(event):
                events.append(event)
    return events


def _is_drift(event: dict[str, Any]) -> bool:
    topic = event.get("topic")
    if isinstance(topic, str):
        return topic.startswith("drift.")
    return event.get("type") == "drift"


def draw_report(
    events: Sequence[dict[str, Any]],
    output_png: Path,
    reference: Reference | None = None,
    *,
    source: str | None = None,
) -> Path:
    """One chart per metric over window index, thresholds as lines, status as background bands; returns the path.

    ``source`` picks one source when the events come from several (a ValueError lists them otherwise).
    """
    plt = pyplot()
    events = _one_source(events, source)
    if not events:
        raise ValueError("no drift events to chart")
    events = sorted(events, key=lambda e: int(e["window"]))
    windows = [int(e["window"]) for e in events]
    metrics = _ordered(name for e in events for name in e.get("metrics", {}))
    summaries = _ordered(name for e in events for name in e.get("summary", {}))
    ref_means = reference.summary() if reference is not None else {}
    panels = [("metric", name) for name in metrics] + [("summary", name) for name in summaries]
    rows = max(1, -(-len(panels) // COLUMNS))
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(4.2 * COLUMNS, 2.6 * rows + 0.8), squeeze=False, sharex=True)
    bands = _bands(events)
    for ax, (kind, name) in zip(axes.flat, panels, strict=False):
        for start, end, status in bands:
            colour = STATUS_COLOURS.get(status)
            if colour is not None:
                ax.axvspan(start - 0.5, end + 0.5, color=colour, alpha=0.35, linewidth=0)
        if kind == "metric":
            ys = [_value(e.get("metrics", {}), name) for e in events]
            ax.plot(windows, ys, marker=".", color="#20639b", linewidth=1)
            warn = [_value(e.get("thresholds", {}), name, 0) for e in events]
            drift = [_value(e.get("thresholds", {}), name, 1) for e in events]
            ax.step(windows, warn, where="mid", color="#b8860b", linestyle="--", linewidth=1, label="warn")
            ax.step(windows, drift, where="mid", color="#c0392b", linestyle="--", linewidth=1, label="drift")
            ax.set_title(name, fontsize=9)
        else:
            ys = [_value(e.get("summary", {}), name) for e in events]
            ax.plot(windows, ys, marker=".", color="#3caea3", linewidth=1)
            if name in ref_means:
                ax.axhline(ref_means[name], color="grey", linestyle=":", linewidth=1, label="reference mean")
            ax.set_title(f"mean {name}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("window", fontsize=8)
    fig.suptitle(
        report_title(events, reference)
        + "\ndashed: warn (ochre) and drift (red) thresholds; background: yellow warn, red drift, grey learning",
        fontsize=10,
    )
    fig.tight_layout()
    output_png = save_figure(fig, Path(output_png), dpi=90)
    logger.info("drift report of %d windows written to %s", len(events), output_png)
    return output_png


def report_title(events: Sequence[dict[str, Any]], reference: Reference | None) -> str:
    """What the chart shows, for its title: source, windows (a range of sizes for windows in seconds), statuses."""
    first = events[0]
    counts = {s: sum(1 for e in events if e.get("status") == s) for s in ("ok", "warn", "drift")}
    sizes = sorted({int(e["n"]) for e in events if "n" in e})
    size = "?" if not sizes else str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    title = (
        f"drift: source {first.get('source', '?')}, {len(events)} windows of {size} frames, "
        f"reference {first.get('reference', '?')}; ok {counts['ok']}, warn {counts['warn']}, drift {counts['drift']}"
    )
    if reference is not None:
        title += f"\nreference profile: {reference.frames} frames of {reference.source or '?'} ({reference.model})"
    return title


def _one_source(events: Sequence[dict[str, Any]], source: str | None) -> list[dict[str, Any]]:
    if source is not None:
        return [e for e in events if e.get("source") == source]
    sources = sorted({str(e.get("source")) for e in events})
    if len(sources) > 1:
        raise ValueError(f"drift events from several sources ({', '.join(sources)}): choose one")
    return list(events)


def _ordered(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _value(mapping: dict[str, Any], name: str, index: int | None = None) -> float:
    value = mapping.get(name)
    if index is not None:
        value = value[index] if isinstance(value, list) and len(value) > index else None
    return float("nan") if value is None else float(value)


def _bands(events: Sequence[dict[str, Any]]) -> list[tuple[int, int, str]]:
    """Runs of consecutive windows with the same status, as (first window, last window, status)."""
    runs: list[tuple[int, int, str]] = []
    for e in events:
        w = int(e["window"])
        status = "learning" if e.get("learning") else str(e.get("status"))
        if runs and runs[-1][2] == status and runs[-1][1] == w - 1:
            runs[-1] = (runs[-1][0], w, status)
        else:
            runs.append((w, w, status))
    return runs
