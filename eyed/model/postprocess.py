"""Logits -> Prediction: softmax, top-k and the coarse label. Shared by every backend."""

from __future__ import annotations

import numpy as np

from eyed.model.labels import CoarseMapper
from eyed.types import Prediction, Scored


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits, in float32."""
    z = logits.astype(np.float32, copy=True)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


class Postprocessor:
    """Turns a batch of logits into predictions with the model's labels."""

    def __init__(self, labels: list[str], topk: int, mapper: CoarseMapper | None) -> None:
        self.labels = labels
        self.topk = min(topk, len(labels))
        self.mapper = mapper

    def __call__(self, logits: np.ndarray) -> list[Prediction]:
        # Few, whole-row numpy calls: right after an inference each call runs on cold caches (measured ~5-10 us
        # apiece instead of 1-2), so their number, not their arithmetic, is what this costs per frame.
        probs = softmax(np.atleast_2d(logits))
        k = self.topk
        out = []
        for row in probs:
            # argpartition finds the k best in O(C); only those k are then sorted.
            # Sorted ids first, so equal scores rank by class id, as np.argmax (and the coarse label) does.
            best = np.sort(np.argpartition(row, -k)[-k:]) if k < row.shape[0] else np.arange(row.shape[0])
            scores = row[best]
            order = np.argsort(-scores, kind="stable")
            topk = tuple(
                Scored(self.labels[i], i, p) for i, p in zip(best[order].tolist(), scores[order].tolist(), strict=True)
            )
            coarse = self.mapper.coarse(row) if self.mapper is not None else None
            out.append(Prediction(topk=topk, coarse=coarse, probs=row))
        return out
