"""``eyed drift-report``: chart recorded drift verdicts (one PNG), from ``eyed subscribe --json`` output."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from eyed.drift.reference import Reference, is_int, is_number
from eyed.outputs import pyplot, save_figure

logger = logging.getLogger(__name__)

STATUS_COLOURS = {"ok": None, "warn": "#f6d55c", "drift": "#ed553b", "learning": "#d0d0d0"}
COLUMNS = 4


def read_drift_events(path: Path) -> list[dict[str, Any]]:
    """The drift payloads in a JSON-lines file, in file order.

    Accepts what ``eyed subscribe --json`` prints (``{"topic": "drift.cam", ...payload}`` a line) and bare
    payloads; other events (labels, health) and blank lines are skipped. A line that is not JSON, or a drift
    event the chart cannot read (no window number, say), is a ValueError naming the file and line: a recording
    that is not what it seems should not be charted as if it were.
    """
    try:
        return _drift_events(path)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (not a recording of `eyed subscribe --json`)") from None


def _drift_events(path: Path) -> list[dict[str, Any]]:
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
                problem = drift_event_problem(event)
                if problem is not None:
                    raise ValueError(f"{path}:{number}: {problem}")
                events.append(event)
    return events


def drift_event_problem(event: dict[str, Any]) -> str | None:
    """What the chart cannot read in one drift event (None when nothing): its window number, sizes, and the
    numbers under metrics, summary and thresholds."""
    window = event.get("window")
    if not is_int(window) or window < 0:
        return "a drift event without a window number" if window is None else f"window {window!r} is not a number"
    for key in ("n", "seq"):
        if event.get(key) is not None and not is_int(event[key]):
            return f"{key} {event[key]!r} is not a whole number"
    for key in ("metrics", "summary", "thresholds"):
        values = event.get(key, {})
        if not isinstance(values, dict):
            return f"{key} is not an object"
        for name, value in values.items():
            if key == "thresholds":
                readable = isinstance(value, list) and all(map(_is_number, value))
            else:
                readable = _is_number(value)
            if not readable:
                return f"{key}.{name} is {value!r}, not a number" + (" pair" if key == "thresholds" else "")
    return None


def _is_number(value: Any) -> bool:
    """A number, or null (what a payload holds for a value that is not finite)."""
    return value is None or is_number(value)


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
    """One chart per metric over the windows, thresholds as lines, status as background bands; returns the path.

    ``source`` picks one source when the events come from several (a ValueError lists them otherwise). The
    events are charted in file order; where the window number does not go up, the daemon was restarted while
    the recording went on, and a new run starts (:func:`split_runs`): runs are charted one after another,
    separated by a gap and a dotted line, not laid over one another.
    """
    plt = pyplot()
    events = _one_source(events, source)
    if not events:
        raise ValueError("no drift events to chart")
    runs = split_runs(events)
    xs = run_positions(runs)
    metrics = _ordered(name for e in events for name in e.get("metrics", {}))
    summaries = _ordered(name for e in events for name in e.get("summary", {}))
    ref_means = reference.summary() if reference is not None else {}
    panels = [("metric", name) for name in metrics] + [("summary", name) for name in summaries]
    rows = max(1, -(-len(panels) // COLUMNS))
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(4.2 * COLUMNS, 2.6 * rows + 0.8), squeeze=False, sharex=True)
    bands = _bands([e for run in runs for e in run], [x for run_xs in xs for x in run_xs])
    for ax, (kind, name) in zip(axes.flat, panels, strict=False):
        for start, end, status in bands:
            colour = STATUS_COLOURS.get(status)
            if colour is not None:
                ax.axvspan(start - 0.5, end + 0.5, color=colour, alpha=0.35, linewidth=0)
        for run_xs in xs[1:]:
            ax.axvline(run_xs[0] - 1, color="grey", linestyle=":", linewidth=1)
        for run, run_xs in zip(runs, xs, strict=True):
            _plot_run(ax, kind, name, run, run_xs)
        if kind == "metric":
            ax.set_title(name, fontsize=9)
        else:
            if name in ref_means:
                ax.axhline(ref_means[name], color="grey", linestyle=":", linewidth=1, label="reference mean")
            ax.set_title(f"mean {name}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("window" if len(runs) == 1 else "window, runs one after another", fontsize=8)
    restarts = "" if len(runs) == 1 else "; dotted line: the daemon restarted (window numbers start again)"
    fig.suptitle(
        report_title(events, reference, runs=len(runs))
        + "\ndashed: warn (ochre) and drift (red) thresholds; background: yellow warn, red drift, grey learning"
        + restarts,
        fontsize=10,
    )
    fig.tight_layout()
    output_png = save_figure(fig, Path(output_png), dpi=90)
    if len(runs) > 1:
        logger.info(
            "drift report of %d windows in %d runs (window numbers start again where the daemon restarted), "
            "charted one after another, written to %s",
            len(events),
            len(runs),
            output_png,
        )
    else:
        logger.info("drift report of %d windows written to %s", len(events), output_png)
    return output_png


def _plot_run(ax: Any, kind: str, name: str, run: Sequence[dict[str, Any]], xs: Sequence[int]) -> None:
    """One run's line (and, for a metric, its thresholds) on one panel: lines never join two runs."""
    if kind == "metric":
        ys = [_value(e.get("metrics", {}), name) for e in run]
        ax.plot(xs, ys, marker=".", color="#20639b", linewidth=1)
        warn = [_value(e.get("thresholds", {}), name, 0) for e in run]
        drift = [_value(e.get("thresholds", {}), name, 1) for e in run]
        ax.step(xs, warn, where="mid", color="#b8860b", linestyle="--", linewidth=1, label="warn")
        ax.step(xs, drift, where="mid", color="#c0392b", linestyle="--", linewidth=1, label="drift")
    else:
        ys = [_value(e.get("summary", {}), name) for e in run]
        ax.plot(xs, ys, marker=".", color="#3caea3", linewidth=1)


def split_runs(events: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The events of each run of the daemon, in file order: a window number that does not go up starts a new
    run (a restarted daemon counts its windows from 0 again, while ``eyed subscribe --json`` kept recording)."""
    runs: list[list[dict[str, Any]]] = []
    for e in events:
        if runs and int(e["window"]) > int(runs[-1][-1]["window"]):
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def run_positions(runs: Sequence[Sequence[dict[str, Any]]]) -> list[list[int]]:
    """Where each window goes on the x axis: its window number in the first run; later runs follow after a gap
    of one, their windows as far apart as their numbers (a window a subscriber missed leaves its place)."""
    positions: list[list[int]] = []
    for run in runs:
        offset = positions[-1][-1] + 2 - int(run[0]["window"]) if positions else 0
        positions.append([int(e["window"]) + offset for e in run])
    return positions


def report_title(events: Sequence[dict[str, Any]], reference: Reference | None, *, runs: int = 1) -> str:
    """What the chart shows, for its title: source, windows (a range of sizes for windows in seconds), runs of
    the daemon when there are several, statuses."""
    first = events[0]
    counts = {s: sum(1 for e in events if e.get("status") == s) for s in ("ok", "warn", "drift")}
    sizes = sorted({int(e["n"]) for e in events if e.get("n") is not None})
    size = "?" if not sizes else str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    in_runs = f" in {runs} runs" if runs > 1 else ""
    title = (
        f"drift: source {first.get('source', '?')}, {len(events)} windows of {size} frames{in_runs}, "
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


def _bands(events: Sequence[dict[str, Any]], xs: Sequence[int]) -> list[tuple[int, int, str]]:
    """Runs of windows next to one another on the x axis with the same status, as (first x, last x, status)."""
    bands: list[tuple[int, int, str]] = []
    for e, x in zip(events, xs, strict=True):
        status = "learning" if e.get("learning") else str(e.get("status"))
        if bands and bands[-1][2] == status and bands[-1][1] == x - 1:
            bands[-1] = (bands[-1][0], x, status)
        else:
            bands.append((x, x, status))
    return bands
