"""The comparisons behind benchmarks/arm64_qemu.py's figures (the run itself needs root, QEMU and half an hour)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.arm64_qemu import compare, compare_probes


def event(class_id: int, score: float, coarse: str | None, truth: str | None) -> dict[str, Any]:
    return {"class_id": class_id, "score": score, "coarse": coarse and {"label": coarse}, "truth": truth}


def test_label_events_are_compared_frame_by_frame() -> None:
    x86 = {0: event(1, 0.5, "cat", "cat"), 1: event(2, 0.6, "dog", "cat"), 2: event(3, 0.7, "car", "car")}
    arm = {0: event(1, 0.51, "cat", "cat"), 1: event(4, 0.3, "cat", "cat"), 2: event(3, 0.7, "car", "car")}
    arm[5] = event(9, 0.9, "ship", "ship")  # a frame only one side has is left out
    got = compare(arm, x86)
    assert got["frames"] == 3
    assert got["top1_agreement"] == pytest.approx(2 / 3)
    assert got["coarse_agreement"] == pytest.approx(2 / 3)
    assert got["max_top1_score_diff"] == pytest.approx(0.01)  # frame 1: another class, another score
    assert got["coarse_accuracy"] == {"arm64": 1.0, "x86_64": pytest.approx(2 / 3)}


def test_probes_tell_resizing_from_kernels() -> None:
    x86 = {"digests": ["a", "b", "c", "d"], "logits": {"x86/fp32.onnx": [[0.0, 1.0], [2.0, 1.0]]}}
    arm = {"digests": ["a", "x", "c", "y"], "logits": {"/mnt/fp32.onnx": [[0.0, 1.25], [0.5, 1.0]]}}
    got = compare_probes(arm, x86, ["fp32"])
    assert got["resized_frames_identical"] == 0.5
    assert got["same_input"] == {"fp32": {"top1_agreement": 0.5, "max_logit_diff": 1.5}}
