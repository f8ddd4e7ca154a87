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
        """Softmax and top-k in numpy: the torch backend's way (the ONNX graph does both itself)."""
        probs = softmax(np.atleast_2d(logits))
        # A stable sort of the whole row, so equal scores rank by class id, as np.argmax, the coarse label and
        # ONNX TopK do (argpartition would pick among ties at the k-th place arbitrarily).
        best = np.argsort(-probs, axis=1, kind="stable")[:, : self.topk]
        return self.from_topk(probs, np.take_along_axis(probs, best, axis=1), best)

    def from_topk(self, probs: np.ndarray, top_scores: np.ndarray, top_ids: np.ndarray) -> list[Prediction]:
        """Predictions from probabilities and their top-k (N, >= k), best first."""
        # Plain Python on small lists from here on: right after an inference every numpy call runs on cold
        # caches (measured 5-10 us apiece instead of 1-2), so their number is what this costs per frame.
        k = self.topk
        out = []
        for row, ids, scores in zip(probs, top_ids[:, :k].tolist(), top_scores[:, :k].tolist(), strict=True):
            topk = tuple(Scored(self.labels[i], i, p) for i, p in zip(ids, scores, strict=True))
            coarse = self.mapper.coarse(row) if self.mapper is not None else None
            out.append(Prediction(topk=topk, coarse=coarse, probs=row))
        return out
