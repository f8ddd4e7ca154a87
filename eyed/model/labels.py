"""Label spaces: the model's own (``id2label``) and a coarse space (CIFAR-10) derived from it.

The coarse label of a frame is computed from the probability mass of each group of fine classes, not from the
top-1 class alone. Plain group sums are biased towards groups with many members (118 dog breeds against 5
cats), so each group's mass is divided by its prior: the mean mass the model gives that group on a reference
stream, estimated without labels (:func:`estimate_priors`). The shipped priors come from CIFAR-10 train images
that are not in the held-out part used for the accuracy figures; ``eyed priors`` re-estimates them from a
user's own unlabelled stream.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from eyed.config import ConfigError
from eyed.outputs import staged
from eyed.types import Coarse

logger = logging.getLogger(__name__)

BUILTIN_MAPS = {"cifar10": "imagenet_to_cifar10.json"}
BUILTIN_PRIORS = {"cifar10": "cifar10_priors.json"}
# A model whose labels cover less than this share of the map's fine classes is not an ImageNet model.
MIN_COVERAGE = 0.9


def _read_package_json(name: str) -> dict[str, Any]:
    with resources.files("eyed.data").joinpath(name).open("r", encoding="utf-8") as fh:
        return json.load(fh)


def load_group_map(name: str) -> tuple[list[str], dict[str, list[str]]]:
    """The coarse classes and, for each, the fine label strings that belong to it."""
    data = _read_package_json(BUILTIN_MAPS[name])
    classes = list(data["classes"])
    return classes, {c: list(data["groups"][c]) for c in classes}


@dataclass(frozen=True)
class CoarseMapper:
    """Maps a fine probability vector to a coarse label through a (fine, coarse) membership matrix."""

    classes: tuple[str, ...]
    membership: np.ndarray  # (n_fine, n_coarse) float32 of 0/1
    priors: np.ndarray | None  # (n_coarse,) mean group mass on a reference stream; None = plain sums

    def masses(self, probs: np.ndarray) -> np.ndarray:
        """Probability mass of each group, (n_coarse,) or (N, n_coarse) for a batch."""
        return probs @ self.membership

    def scores(self, probs: np.ndarray, *, corrected: bool = True) -> np.ndarray:
        """Group scores that sum to 1: masses divided by the priors (when set and ``corrected``)."""
        m = self.masses(probs)
        if corrected and self.priors is not None:
            m = m / self.priors
        total = m.sum(axis=-1, keepdims=True)
        return m / np.where(total > 0, total, 1.0)

    def coarse(self, probs: np.ndarray) -> Coarse:
        """The prior-corrected coarse label of one probability vector (the per-frame path: few numpy calls)."""
        m = self.masses(probs)
        if self.priors is not None:
            m = m / self.priors
        values = m.tolist()
        i = max(range(len(values)), key=values.__getitem__)
        total = sum(values)
        return Coarse(self.classes[i], values[i] / total if total > 0 else 0.0)

    @property
    def native(self) -> bool:
        """A model trained on the coarse classes themselves: one label per class, no priors to apply."""
        return self.membership.shape[0] == self.membership.shape[1]

    def with_priors(self, priors: np.ndarray | None) -> CoarseMapper:
        return CoarseMapper(self.classes, self.membership, priors)


def build_mapper(labels: list[str], space: str = "cifar10", priors: str = "builtin") -> CoarseMapper | None:
    """A mapper from ``labels`` (the model's id2label in index order) to ``space``; None if they don't match.

    ``priors`` is ``builtin``, ``none`` or the path of a JSON file written by :func:`save_priors`.
    """
    if space == "none":
        return None
    classes, groups = load_group_map(space)
    index = {label: i for i, label in enumerate(labels)}
    if set(labels) == set(classes):
        # A model trained on the coarse classes themselves (eyed finetune): coarse is the model's own label,
        # and no prior correction applies.
        native = np.zeros((len(labels), len(classes)), dtype=np.float32)
        for j, cls in enumerate(classes):
            native[index[cls], j] = 1.0
        return CoarseMapper(tuple(classes), native, None)
    membership = np.zeros((len(labels), len(classes)), dtype=np.float32)
    wanted = found = 0
    for j, cls in enumerate(classes):
        for fine in groups[cls]:
            wanted += 1
            if fine in index:
                found += 1
                membership[index[fine], j] = 1.0
    if found < MIN_COVERAGE * wanted:
        logger.info("model labels cover %d of %d %s group members: no coarse mapping", found, wanted, space)
        return None
    try:
        prior_values = load_priors(priors, space, tuple(classes))
    except (OSError, ValueError, KeyError) as exc:  # a missing or malformed file named in the config
        raise ConfigError(f"model.coarse_priors {priors}: {exc}") from exc
    return CoarseMapper(tuple(classes), membership, prior_values)


def load_priors(priors: str, space: str, classes: tuple[str, ...]) -> np.ndarray | None:
    """Read priors (``builtin``, ``none`` or a file path) as an array in ``classes`` order."""
    if priors == "none":
        return None
    if priors == "builtin":
        data = _read_package_json(BUILTIN_PRIORS[space])
    else:
        data = json.loads(Path(priors).read_text(encoding="utf-8"))
    values = data.get("priors") if isinstance(data, dict) else None
    if not isinstance(values, dict):
        raise ValueError('no "priors" object of class: value in it (eyed priors writes one)')
    missing = [c for c in classes if c not in values]
    if missing:
        raise ValueError(f"no prior for {', '.join(missing)}")
    numbers = [values[c] for c in classes]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        raise ValueError("priors must be numbers")
    arr = np.array(numbers, dtype=np.float32)
    if not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError("priors must be positive numbers")
    return arr


def estimate_priors(mapper: CoarseMapper, probs: Iterable[np.ndarray], *, balance: bool = True) -> np.ndarray:
    """Group priors from a stream of probability vectors, without labels.

    First the mean mass of each group. With ``balance``, the priors are then refined so that, on this stream,
    each coarse class wins the argmax equally often: dividing by mean mass evens out the average scores, but
    the decisions depend on the tails too (dog's 120 breeds still win more than their share). Both steps assume
    the reference stream shows the coarse classes about equally often, as CIFAR-10 does.
    """
    chunks = [mapper.masses(np.atleast_2d(p)) for p in probs]
    if not chunks:
        raise ValueError("cannot estimate priors from an empty stream")
    masses = np.concatenate(chunks).astype(np.float64)
    priors = masses.mean(axis=0)
    if balance:
        priors = priors / balance_weights(masses / priors)
    return (priors / priors.sum()).astype(np.float32)


def balance_weights(scores: np.ndarray, iterations: int = 300, rate: float = 0.5) -> np.ndarray:
    """Per-class weights w such that argmax(scores * w) picks every class about equally often."""
    n, k = scores.shape
    w = np.ones(k)
    target = 1.0 / k
    eps = 1e-4  # keeps a class that never wins from blowing up its weight in one step
    for _ in range(iterations):
        share = np.bincount((scores * w).argmax(axis=1), minlength=k) / n
        w *= ((target + eps) / (share + eps)) ** rate
        w /= w.sum()
    return w


def save_priors(path: Path, classes: Iterable[str], priors: np.ndarray, meta: Mapping[str, Any]) -> None:
    """Write priors as JSON: ``{"priors": {class: value}, ...meta}``."""
    data = {"schema": 1, **meta, "priors": {c: float(v) for c, v in zip(classes, priors, strict=True)}}
    with staged(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
