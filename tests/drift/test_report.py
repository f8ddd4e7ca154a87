"""eyed drift-report's core: read what ``eyed subscribe --json`` recorded, chart it as a PNG."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from eyed.config import DriftConfig
from eyed.drift import report
from eyed.drift.monitor import DriftMonitor, window_payload
from eyed.drift.reference import ProfileBuilder, Reference
from eyed.drift.report import draw_report, read_drift_events, report_title, run_positions, split_runs
from tests.drift import COARSE, synthetic_stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_reference(frames: int) -> Reference:
    builder = ProfileBuilder(COARSE)
    for s in synthetic_stats(frames, seed=1):
        builder.add(s)
    return builder.build()


def payloads(source: str, learn: bool) -> list[dict[str, Any]]:
    """A run with learning windows (no reference) or against a reference, then a darkening shift."""
    cfg = DriftConfig(window=100, learn_windows=2)
    reference = None if learn else synthetic_reference(2000)
    monitor = DriftMonitor(cfg, reference, coarse_classes=COARSE)
    stream = [*synthetic_stats(600, seed=2), *synthetic_stats(400, seed=3, brightness=40)]
    reports = [r for r in map(monitor.update, stream) if r is not None]
    return [window_payload(r, source, seq, 1700000000.0 + seq) for seq, r in enumerate(reports)]


def record(path: Path, events: list[dict[str, Any]]) -> Path:
    """The file ``eyed subscribe --json --topic drift.`` writes (plus noise a wider subscription records)."""
    lines = ['{"topic": "label.cam", "type": "label", "label": "cat"}', ""]
    lines += [json.dumps({"topic": f"drift.{e['source']}", **e}) for e in events]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_drift_events_from_subscribe_output(tmp_path: Path) -> None:
    events = payloads("cam", learn=True)
    back = read_drift_events(record(tmp_path / "d.jsonl", events))
    assert [{k: v for k, v in e.items() if k != "topic"} for e in back] == events
    # Bare payloads (no topic) are accepted as well.
    (tmp_path / "bare.jsonl").write_text("\n".join(json.dumps(e) for e in events))
    assert len(read_drift_events(tmp_path / "bare.jsonl")) == len(events)


def test_a_broken_line_names_its_number(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"type": "drift", "window": 0}\n{oops\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2"):
        read_drift_events(path)


@pytest.mark.parametrize("learn", [True, False])
def test_draws_a_png(tmp_path: Path, learn: bool) -> None:
    reference = None if learn else synthetic_reference(500)
    events = read_drift_events(record(tmp_path / "d.jsonl", payloads("cam", learn)))
    out = draw_report(events, tmp_path / "drift.png", reference)
    assert out == tmp_path / "drift.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_several_sources_need_a_choice(tmp_path: Path) -> None:
    events = payloads("a", learn=True) + payloads("b", learn=True)
    with pytest.raises(ValueError, match="several sources"):
        draw_report(events, tmp_path / "x.png")
    assert draw_report(events, tmp_path / "b.png", source="b").is_file()
    with pytest.raises(ValueError, match="no drift events"):
        draw_report(events, tmp_path / "c.png", source="c")


def test_title_gives_the_range_of_window_sizes() -> None:
    events = payloads("cam", learn=False)
    assert "10 windows of 100 frames, reference file; ok " in report_title(events, None)
    timed = [{**e, "n": n} for e, n in zip(events, [95, 101, 98] * 4, strict=False)]
    assert "windows of 95-101 frames" in report_title(timed, None)


def two_runs() -> list[dict[str, Any]]:
    """What `eyed subscribe --json` records across a daemon restart: window numbers (and seq) start again at 0;
    the second run sees the scene darken."""
    first = [e for e in payloads("cam", learn=False) if e["window"] < 6]
    second = payloads("cam", learn=False)
    return first + second


def drawn_figure(events: list[dict[str, Any]], path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """draw_report(events, path), and the matplotlib figure it saved there."""
    figures: list[Any] = []
    real_save = report.save_figure

    def keep_figure(fig: Any, path: Path, **kwargs: Any) -> Path:
        figures.append(fig)
        return real_save(fig, path, **kwargs)

    monkeypatch.setattr(report, "save_figure", keep_figure)
    draw_report(events, path)
    (fig,) = figures
    return fig


def test_runs_after_a_restart_are_charted_one_after_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not sorted by window number, which lays the runs over one another (zig-zag lines, overlapping bands)."""
    events = read_drift_events(record(tmp_path / "d.jsonl", two_runs()))
    runs = split_runs(events)
    assert [len(r) for r in runs] == [6, 10] and [e for r in runs for e in r] == events
    xs = run_positions(runs)
    assert xs[0] == list(range(6)) and xs[1] == list(range(7, 17))  # a gap of one between runs

    with caplog.at_level("INFO", logger="eyed.drift.report"):
        fig = drawn_figure(events, tmp_path / "d.png", monkeypatch)
    assert "16 windows in 2 runs" in caplog.text
    ax = fig.axes[0]
    assert "in 2 runs" in fig._suptitle.get_text()
    for line in ax.get_lines():
        line_xs = list(line.get_xdata())
        if len(set(line_xs)) > 1:  # not the dotted vertical line between runs
            assert line_xs == sorted(set(line_xs)), line_xs  # left to right, one point per window
    # Status bands of one run never cover another's windows: each x is in one band at most.
    spans = [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches]
    for x in [x for run in xs for x in run]:
        assert sum(lo < x < hi for lo, hi in spans) <= 1


def test_a_restart_right_after_the_first_window_is_a_run_of_its_own() -> None:
    """A daemon restarted after publishing only window 0 sends window 0 again: that is a new run, charted after
    the first one, not the same window twice at one place. Without this, the test above (restarts after window
    5) did not see a new run taken to start only below the last window, not at it."""
    events = [{"window": w, "source": "cam", "status": "ok"} for w in (0, 0, 1, 2)]
    runs = split_runs(events)
    assert [[e["window"] for e in run] for run in runs] == [[0], [0, 1, 2]]
    assert run_positions(runs) == [[0], [2, 3, 4]]


def test_a_status_band_does_not_cover_windows_the_recording_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows 3 and 4 never reached the subscriber: the drift band of windows 0-2 and that of window 5 are two
    bands, with nothing drawn over the windows no one saw. Without this, one band over every window of a status
    went unseen."""
    metrics = {"psi_brightness": 0.5}
    events = [{"window": w, "source": "cam", "status": "drift", "n": 250, "metrics": metrics} for w in (0, 1, 2, 5)]
    fig = drawn_figure(events, tmp_path / "d.png", monkeypatch)
    spans = [(p.get_x(), p.get_x() + p.get_width()) for p in fig.axes[0].patches]
    assert spans, "no status band drawn"
    for missed in (3, 4):
        assert not any(lo < missed < hi for lo, hi in spans), spans


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ({"source": "cam", "status": "ok"}, "a drift event without a window number"),
        ({"window": "3", "status": "ok"}, "window '3' is not a number"),
        ({"window": -1}, "window -1 is not a number"),
        ({"window": 0, "n": 2.5}, "n 2.5 is not a whole number"),
        ({"window": 0, "metrics": {"psi_x": "0.3"}}, "metrics.psi_x is '0.3', not a number"),
        ({"window": 0, "metrics": [1]}, "metrics is not an object"),
        ({"window": 0, "thresholds": {"psi_x": 0.1}}, "thresholds.psi_x is 0.1, not a number pair"),
    ],
)
def test_a_drift_event_the_chart_cannot_read_names_its_line(
    tmp_path: Path, event: dict[str, Any], message: str
) -> None:
    """Not a KeyError traceback from deep in the chart: the file and line, as for a line that is not JSON."""
    good = payloads("cam", learn=True)[0]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"topic": "drift.cam", **good}) + "\n" + json.dumps({"topic": "drift.cam", **event}))
    with pytest.raises(ValueError, match=f"d.jsonl:2: {re.escape(message)}"):
        read_drift_events(path)


def test_a_file_that_is_not_text_is_said_to_be_none(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x94\x00\xff binary")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not UTF-8 text")):
        read_drift_events(path)
