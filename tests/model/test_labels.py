"""The shipped ImageNet -> CIFAR-10 map, CoarseMapper and the priors that correct it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from eyed.config import ConfigError
from eyed.model.labels import (
    CoarseMapper,
    build_mapper,
    estimate_priors,
    load_group_map,
    load_priors,
    save_priors,
)
from tests.conftest import CIFAR10, imagenet_like_labels

# The shipped map


@pytest.fixture(scope="module")
def group_map() -> tuple[list[str], dict[str, list[str]]]:
    return load_group_map("cifar10")


def test_map_has_the_ten_cifar10_classes_in_order(group_map: tuple[list[str], dict[str, list[str]]]) -> None:
    classes, groups = group_map
    assert classes == CIFAR10
    assert list(groups) == CIFAR10


def test_map_groups_are_non_empty_and_disjoint(group_map: tuple[list[str], dict[str, list[str]]]) -> None:
    _, groups = group_map
    assert all(groups[c] for c in CIFAR10)
    counts = Counter(label for members in groups.values() for label in members)
    assert [label for label, n in counts.items() if n > 1] == []


@pytest.mark.parametrize(
    ("label", "coarse"),
    [
        ("tabby, tabby cat", "cat"),
        ("airliner", "airplane"),
        ("container ship, containership, container vessel", "ship"),
        ("golden retriever", "dog"),
        ("goldfish, Carassius auratus", None),
    ],
)
def test_map_spot_checks(group_map: tuple[list[str], dict[str, list[str]]], label: str, coarse: str | None) -> None:
    _, groups = group_map
    found = [c for c, members in groups.items() if label in members]
    assert found == ([coarse] if coarse else [])


@pytest.mark.assets
def test_every_mapped_label_is_an_exact_checkpoint_label(
    real_model: Path, group_map: tuple[list[str], dict[str, list[str]]]
) -> None:
    id2label = json.loads((real_model / "config.json").read_text())["id2label"]
    counts = Counter(id2label.values())
    _, groups = group_map
    mapped = [label for members in groups.values() for label in members]
    assert [label for label in mapped if label not in counts] == []
    # build_mapper indexes labels by string: a duplicated one (ImageNet has two 'crane's) would be ambiguous.
    assert [label for label in mapped if counts[label] != 1] == []


@pytest.mark.assets
def test_real_checkpoint_gets_a_full_mapper(real_model: Path) -> None:
    from eyed.model.checkpoint import labels_of

    labels = labels_of(json.loads((real_model / "config.json").read_text()))
    mapper = build_mapper(labels)
    assert mapper is not None
    _, groups = load_group_map("cifar10")
    assert mapper.membership.sum() == sum(len(m) for m in groups.values())


# CoarseMapper on hand-made vectors

# Four fine classes: three in group "many", one in group "one".
TOY = CoarseMapper(
    ("many", "one"),
    np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32),
    None,
)


def test_masses_are_group_sums() -> None:
    probs = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)
    assert np.allclose(TOY.masses(probs), [0.6, 0.4])
    batch = np.array([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 1.0]], dtype=np.float32)
    assert np.allclose(TOY.masses(batch), [[0.6, 0.4], [0.0, 1.0]])


def test_scores_sum_to_one() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=20).astype(np.float32)
    for mapper in (TOY, TOY.with_priors(np.array([0.7, 0.3], dtype=np.float32))):
        assert np.allclose(mapper.scores(probs).sum(axis=-1), 1.0, atol=1e-6)


def test_scores_of_a_vector_outside_every_group_do_not_divide_by_zero() -> None:
    mapper = CoarseMapper(("a",), np.array([[1], [0]], dtype=np.float32), None)
    scores = mapper.scores(np.array([0.0, 1.0], dtype=np.float32))
    assert np.all(np.isfinite(scores))


def test_prior_correction_changes_the_argmax() -> None:
    """Many-member groups collect mass by sheer numbers; dividing by the prior undoes that."""
    probs = np.array([0.2, 0.2, 0.2, 0.4], dtype=np.float32)
    assert TOY.coarse(probs).label == "many"
    corrected = TOY.with_priors(np.array([0.75, 0.25], dtype=np.float32))
    coarse = corrected.coarse(probs)
    assert coarse.label == "one"
    # 0.6 / 0.75 = 0.8 against 0.4 / 0.25 = 1.6: "one" gets 2/3.
    assert coarse.score == pytest.approx(2 / 3, abs=1e-6)
    # corrected=False ignores the priors.
    assert corrected.classes[int(np.argmax(corrected.scores(probs, corrected=False)))] == "many"
    # The per-frame path and the batch path agree.
    assert corrected.classes[int(np.argmax(corrected.scores(probs)))] == coarse.label


# build_mapper


def test_build_mapper_on_an_imagenet_like_label_space() -> None:
    labels = imagenet_like_labels()
    mapper = build_mapper(labels, "cifar10", "none")
    assert mapper is not None
    assert mapper.classes == tuple(CIFAR10)
    assert mapper.priors is None
    assert mapper.membership.shape == (len(labels), 10)
    # Each fine label belongs to at most one group; background and fillers to none.
    assert mapper.membership.sum(axis=1).max() == 1
    assert mapper.membership[0].sum() == 0
    tabby = labels.index("tabby, tabby cat")
    assert mapper.membership[tabby, CIFAR10.index("cat")] == 1
    probs = np.zeros(len(labels), dtype=np.float32)
    probs[tabby] = 1.0
    assert mapper.coarse(probs).label == "cat"


def test_build_mapper_with_builtin_priors() -> None:
    mapper = build_mapper(imagenet_like_labels())
    assert mapper is not None
    assert mapper.priors is not None
    assert mapper.priors.shape == (10,)


def test_build_mapper_none_for_other_label_spaces() -> None:
    assert build_mapper([f"class {i}" for i in range(1000)]) is None


def test_a_model_with_the_coarse_labels_maps_to_itself() -> None:
    """A fine-tuned CIFAR-10 model: coarse equals label, whatever order its id2label has."""
    labels = list(reversed(CIFAR10))
    mapper = build_mapper(labels)
    assert mapper is not None and mapper.priors is None
    probs = np.full(10, 0.05, dtype=np.float32)
    probs[labels.index("frog")] = 0.55
    coarse = mapper.coarse(probs)
    assert coarse.label == "frog" and coarse.score == pytest.approx(0.55)


def test_build_mapper_none_for_space_none() -> None:
    assert build_mapper(imagenet_like_labels(), "none") is None


# Priors


def test_load_priors_none_and_builtin() -> None:
    classes = tuple(CIFAR10)
    assert load_priors("none", "cifar10", classes) is None
    builtin = load_priors("builtin", "cifar10", classes)
    assert builtin is not None
    assert builtin.shape == (10,)
    assert np.all(builtin > 0)
    # In the requested order, whatever order the file has.
    reversed_ = load_priors("builtin", "cifar10", classes[::-1])
    assert reversed_ is not None
    assert np.array_equal(reversed_, builtin[::-1])


def write_priors(path: Path, values: dict[str, float]) -> Path:
    path.write_text(json.dumps({"schema": 1, "priors": values}), encoding="utf-8")
    return path


def test_load_priors_from_a_file(tmp_path: Path) -> None:
    values = {c: float(i + 1) for i, c in enumerate(CIFAR10)}
    priors = load_priors(str(write_priors(tmp_path / "p.json", values)), "cifar10", tuple(CIFAR10))
    assert priors is not None
    assert np.allclose(priors, np.arange(1, 11))


def test_load_priors_file_missing_a_class(tmp_path: Path) -> None:
    values = {c: 0.1 for c in CIFAR10 if c != "frog"}
    with pytest.raises(ValueError, match="frog"):
        load_priors(str(write_priors(tmp_path / "p.json", values)), "cifar10", tuple(CIFAR10))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([1, 2], '"priors" object'),
        ({"priors": None}, '"priors" object'),
        ({"priors": [0.1] * 10}, '"priors" object'),
        ({"priors": dict.fromkeys(CIFAR10, "0.1")}, "numbers"),
        ({"priors": dict.fromkeys(CIFAR10, None)}, "numbers"),
    ],
)
def test_a_priors_file_of_another_shape_is_a_config_error(tmp_path: Path, content: object, message: str) -> None:
    """Not a TypeError traceback (exit 1): run and check-config exit 78 naming model.coarse_priors."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=f"model.coarse_priors {path}: .*{message}"):
        build_mapper(imagenet_like_labels(), "cifar10", str(path))


@pytest.mark.parametrize("bad", [0.0, -0.1, float("inf")])
def test_load_priors_non_positive(tmp_path: Path, bad: float) -> None:
    values = {c: 0.1 for c in CIFAR10} | {"deer": bad}
    with pytest.raises(ValueError, match="positive"):
        load_priors(str(write_priors(tmp_path / "p.json", values)), "cifar10", tuple(CIFAR10))


def test_estimate_priors_without_balance_is_the_normalised_mean_mass() -> None:
    rng = np.random.default_rng(3)
    stream = [rng.dirichlet(np.ones(4)).astype(np.float32) for _ in range(50)]
    priors = estimate_priors(TOY, stream, balance=False)
    mean_mass = np.mean([TOY.masses(p) for p in stream], axis=0)
    assert np.allclose(priors, mean_mass / mean_mass.sum(), atol=1e-6)
    assert priors.dtype == np.float32


def test_estimate_priors_accepts_batches() -> None:
    rng = np.random.default_rng(4)
    batch = rng.dirichlet(np.ones(4), size=30).astype(np.float32)
    one_by_one = estimate_priors(TOY, list(batch), balance=False)
    assert np.allclose(estimate_priors(TOY, [batch[:10], batch[10:]], balance=False), one_by_one, atol=1e-6)


def test_balanced_priors_make_each_class_win_equally_often() -> None:
    # Every frame puts 0.5-0.7 on "many": plain argmax always picks it; balanced priors split the wins.
    rng = np.random.default_rng(5)
    many = rng.uniform(0.5, 0.7, 400)
    stream = [np.array([m / 3, m / 3, m / 3, 1 - m], dtype=np.float32) for m in many]
    assert all(TOY.coarse(p).label == "many" for p in stream)
    priors = estimate_priors(TOY, stream)
    assert priors.sum() == pytest.approx(1.0, abs=1e-6)
    wins = Counter(TOY.with_priors(priors).coarse(p).label for p in stream)
    assert abs(wins["many"] - wins["one"]) <= 40


def test_estimate_priors_empty_stream() -> None:
    with pytest.raises(ValueError, match="empty"):
        estimate_priors(TOY, [])


def test_save_and_load_priors_round_trip(tmp_path: Path) -> None:
    priors = np.linspace(0.01, 0.5, 10).astype(np.float32)
    path = tmp_path / "priors.json"
    save_priors(path, CIFAR10, priors, {"frames": 123, "model": "tiny"})
    data = json.loads(path.read_text())
    assert data["frames"] == 123
    assert data["model"] == "tiny"
    back = load_priors(str(path), "cifar10", tuple(CIFAR10))
    assert back is not None
    assert np.allclose(back, priors)
    mapper = build_mapper(imagenet_like_labels(), "cifar10", str(path))
    assert mapper is not None
    assert mapper.priors is not None
    assert np.allclose(mapper.priors, priors)


# A model covering half of the map's classes gets no coarse mapping (MIN_COVERAGE).
def test_a_label_space_covering_half_the_map_gets_no_mapper() -> None:
    _, groups = load_group_map("cifar10")
    members = [label for group in groups.values() for label in group]
    assert build_mapper(members[: len(members) // 2]) is None
