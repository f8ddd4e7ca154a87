"""eyed drift-report's core: read what ``eyed subscribe --json`` recorded, chart it as a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from eyed.config import DriftConfig
from eyed.drift.monitor import DriftMonitor, window_payload
from eyed.drift.reference import ProfileBuilder, Reference
from eyed.drift.report import draw_report, read_drift_events, report_title
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
    path.write_text('{"type": "drift"}\n{oops\n')
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
