"""Classifier backends on the tiny generated checkpoint: ONNX metadata, torch parity, errors, export cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

from eyed.config import ConfigError, ModelConfig
from eyed.model import ModelLoadError, load_classifier
from eyed.model.checkpoint import fingerprint, labels_of
from eyed.model.export import FORMAT, META_FORMAT, cached_export_path, ensure_onnx
from eyed.model.postprocess import Postprocessor, softmax
from eyed.types import Classifier
from tests.conftest import CIFAR10, imagenet_like_labels, synthetic_images

Backend = Literal["onnx", "torch"]


@pytest.fixture(scope="module")
def onnx_classifier(tiny_checkpoint: Path, tiny_onnx: Path) -> Classifier:
    return load_classifier(ModelConfig(id=str(tiny_checkpoint), onnx=tiny_onnx, topk=5))


@pytest.fixture(scope="module")
def torch_classifier(tiny_checkpoint: Path) -> Classifier:
    return load_classifier(ModelConfig(id=str(tiny_checkpoint), backend="torch", topk=5))


def batch_of(classifier: Classifier, images: list[np.ndarray]) -> np.ndarray:
    return np.stack([classifier.prepare(img) for img in images])


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never touch the network or the user's hub cache.

    huggingface_hub reads HF_HUB_OFFLINE once, at import; once something imported it (the tiny checkpoint
    fixture does), setting the variable is not enough, so its constants are set too.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


# The ONNX backend


def test_onnx_reads_labels_and_preprocessing_from_metadata(tiny_checkpoint: Path, tiny_onnx: Path) -> None:
    # model.id points nowhere: everything must come from the file itself.
    clf = load_classifier(ModelConfig(id="./not-used", onnx=tiny_onnx))
    assert clf.backend == "onnx"
    assert clf.post.labels == imagenet_like_labels()  # type: ignore[attr-defined]
    assert clf.prepare.spec.shortest_edge == 40  # type: ignore[attr-defined]
    assert clf.prepare.spec.crop == (32, 32)  # type: ignore[attr-defined]
    assert clf.input_shape == (32, 32, 3)
    assert clf.prepare(synthetic_images(1, size=64)[0]).shape == clf.input_shape
    assert clf.name == str(tiny_checkpoint)  # the model id recorded at export


def test_an_onnx_file_from_another_checkpoint_than_a_given_model_id_is_warned_about(
    tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file that sets model.onnx and `--set model.id=DIR`: model.onnx runs, which must not go unsaid."""
    other = shutil.copytree(tiny_checkpoint, tmp_path / "other")
    warning = f"model.onnx {tiny_onnx} was exported from {tiny_checkpoint}, not from model.id {other}"
    for model_id, warned in ((str(other), True), (str(tiny_checkpoint), False), (None, False)):
        caplog.clear()
        given = {"id": model_id} if model_id is not None else {}
        load_classifier(ModelConfig(**given, onnx=tiny_onnx)).close()
        assert (warning in caplog.text) == warned, (model_id, caplog.text)
    # The same folder written another way is the same checkpoint.
    caplog.clear()
    relative = os.path.relpath(tiny_checkpoint)
    load_classifier(ModelConfig(id=relative, onnx=tiny_onnx)).close()
    assert "was exported from" not in caplog.text


def test_a_relative_model_id_recorded_elsewhere_is_the_checkpoint_it_names(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files an older eyed wrote recorded a folder as typed (eyed finetune --output ft1): read from another
    working directory (a service's), it named nothing, and every start warned of another checkpoint."""
    from eyed.model.checkpoint import names_recorded, recorded_id, same_checkpoint

    models = tmp_path / "models"
    ft1 = shutil.copytree(tiny_checkpoint, models / "ft1")
    monkeypatch.chdir(models)
    hub = "google/mobilenet_v2_1.0_224"
    assert recorded_id("ft1") == str(ft1) and recorded_id(hub) == hub
    assert same_checkpoint("ft1", str(ft1)) and same_checkpoint(str(ft1), "ft1")
    monkeypatch.chdir(tmp_path)  # "ft1" names nothing here: it was written from elsewhere
    assert same_checkpoint("ft1", str(ft1)) and same_checkpoint("models/ft1", str(ft1))
    assert not same_checkpoint("other/ft1", str(ft1)) and not same_checkpoint("../ft1", str(ft1))
    assert not same_checkpoint(str(tmp_path / "ft1"), str(ft1))  # absolute: compared as it is
    assert not same_checkpoint(hub, str(ft1))
    assert names_recorded("ft1/config.json", ft1 / "config.json")


def test_loading_weights_draws_no_progress_bar_into_a_log(tiny_checkpoint: Path) -> None:
    """Under systemd stderr is the journal: transformers' "Loading weights" bar would be a line of carriage
    returns at each first-start export."""
    from transformers.utils import logging as hf_logging

    from eyed.model.checkpoint import load_weights

    hf_logging.enable_progress_bar()
    load_weights(tiny_checkpoint, str(tiny_checkpoint))  # pytest's stderr is no terminal
    assert not hf_logging.is_progress_bar_enabled()


def test_onnx_predict(onnx_classifier: Classifier) -> None:
    images = synthetic_images(4, seed=1, size=48)
    preds = onnx_classifier.predict(batch_of(onnx_classifier, images))
    assert len(preds) == 4
    labels = imagenet_like_labels()
    for pred in preds:
        scores = [s.score for s in pred.topk]
        assert len(pred.topk) == 5
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert all(labels[s.class_id] == s.label for s in pred.topk)
        assert pred.top.score == pytest.approx(float(pred.probs.max()))
        assert pred.probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert pred.coarse is not None
        assert pred.coarse.label in CIFAR10
        assert 0.0 <= pred.coarse.score <= 1.0


@pytest.mark.parametrize("k", [1, 3, 100])
def test_onnx_graph_postprocessing_matches_numpy(tiny_onnx: Path, k: int) -> None:
    """Softmax and top-k in the exported graph give what the numpy postprocessor gives on its logits."""
    clf = load_classifier(ModelConfig(onnx=tiny_onnx, topk=k))
    batch = batch_of(clf, synthetic_images(6, seed=5, size=40))
    in_graph = clf.predict(batch)
    in_numpy = clf.post(clf.logits(batch))  # type: ignore[attr-defined]
    assert len(in_graph) == len(in_numpy) == 6
    for a, b in zip(in_graph, in_numpy, strict=True):
        assert len(a.topk) == k
        assert [s.class_id for s in a.topk] == [s.class_id for s in b.topk]
        assert [s.score for s in a.topk] == pytest.approx([s.score for s in b.topk], abs=1e-6)
        assert np.allclose(a.probs, b.probs, atol=1e-6)
        assert a.coarse == b.coarse or (a.coarse and b.coarse and a.coarse.label == b.coarse.label)


@pytest.mark.parametrize(
    ("tuning", "spin", "level", "arena"),
    [
        ({}, "1", "ORT_ENABLE_ALL", True),
        ({"spinning": "off", "graph_optimization": "basic", "cpu_arena": False}, "0", "ORT_ENABLE_BASIC", False),
        ({"spinning": "on", "graph_optimization": "disabled"}, "1", "ORT_DISABLE_ALL", True),
    ],
)
def test_session_tuning_reaches_onnxruntime(
    tiny_onnx: Path, tuning: dict[str, Any], spin: str, level: str, arena: bool
) -> None:
    import onnxruntime as ort

    clf = load_classifier(ModelConfig(onnx=tiny_onnx, **tuning))
    so = clf.session.get_session_options()  # type: ignore[attr-defined]
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == spin
    assert so.graph_optimization_level == getattr(ort.GraphOptimizationLevel, level)
    assert so.enable_cpu_mem_arena is arena
    assert len(clf.predict(batch_of(clf, synthetic_images(1, seed=4)))) == 1


@pytest.mark.parametrize("threads", [1, 3])
def test_model_threads_reaches_onnxruntime(tiny_onnx: Path, threads: int) -> None:
    """model.threads (resolved by the daemon from the cores it may use) is what each call runs on: left unset,
    onnxruntime takes every core of the host, an affinity mask or a CPU quota notwithstanding. Without this,
    only a bench test (test_bench.py) noticed the setting being dropped."""
    clf = load_classifier(ModelConfig(onnx=tiny_onnx, threads=threads))
    so = clf.session.get_session_options()  # type: ignore[attr-defined]
    assert so.intra_op_num_threads == threads


def test_session_start_is_quiet(tiny_onnx: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """onnxruntime says nothing when the daemon opens an exported file (it warns, for instance, about an
    initializer that is also a graph input), so the journal holds only what eyed means to say."""
    capfd.readouterr()
    clf = load_classifier(ModelConfig(onnx=tiny_onnx))
    clf.predict(batch_of(clf, synthetic_images(1, seed=3)))
    assert capfd.readouterr().err == ""


def test_graph_topk_ranks_ties_by_class_id_like_numpy(tmp_path: Path) -> None:
    """Equal scores rank by class id in both postprocessing paths, so both backends list ties alike."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from eyed.model.export import K_NAME, OUTPUT_NAME, TOP_IDS_NAME, TOP_SCORES_NAME, append_postprocessing

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], [OUTPUT_NAME])],
        "ties",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 6])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    append_postprocessing(proto)
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = np.array([[0.0, 2.0, 1.0, 2.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]], dtype=np.float32)
    scores, ids = session.run([TOP_SCORES_NAME, TOP_IDS_NAME], {"x": logits, K_NAME: np.array([4], dtype=np.int64)})
    assert ids.tolist() == [[1, 3, 4, 2], [0, 1, 2, 3]]
    post = Postprocessor([f"l{i}" for i in range(6)], topk=4, mapper=None)
    assert [[s.class_id for s in p.topk] for p in post(logits)] == ids.tolist()
    assert [[s.class_id for s in p.topk] for p in post.from_topk(softmax(logits), scores, ids)] == ids.tolist()


def test_torch_and_onnx_agree(onnx_classifier: Classifier, torch_classifier: Classifier) -> None:
    images = synthetic_images(5, seed=2, size=40)
    batch = batch_of(onnx_classifier, images)
    assert np.array_equal(batch, batch_of(torch_classifier, images))
    a = onnx_classifier.logits(batch)
    b = torch_classifier.logits(batch)
    assert a.shape == b.shape == (5, len(imagenet_like_labels()))
    assert np.abs(a - b).max() < 1e-3
    top_a = [p.top.class_id for p in onnx_classifier.predict(batch)]
    top_b = [p.top.class_id for p in torch_classifier.predict(batch)]
    assert top_a == top_b


def test_onnx_without_eyed_metadata(tiny_onnx: Path, tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(tiny_onnx))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ModelLoadError, match="eyed export"):
        load_classifier(ModelConfig(id="x", onnx=bare))


def test_an_export_of_an_older_format_is_refused(tiny_onnx: Path, tmp_path: Path) -> None:
    """A file whose graph contract is older than this eyed's (no k input, no top-k outputs, another input
    layout) is refused at load with the command that makes a new one, not run into a failure per frame.
    Without this, dropping the format check went unseen."""
    import onnx

    proto = onnx.load(str(tiny_onnx))
    for prop in proto.metadata_props:
        if prop.key == META_FORMAT:
            prop.value = "2"
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    with pytest.raises(ModelLoadError, match=rf"older eyed \(format 2, need {FORMAT}\).*eyed export"):
        load_classifier(ModelConfig(id="x", onnx=old))


def test_the_features_graph_is_not_taken_for_a_classifier(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """eyed finetune's features graph has the classifier's metadata; run as one, it failed at the first frame."""
    from eyed.model.export import export_onnx

    features = export_onnx(str(tiny_checkpoint), tmp_path / "features.onnx", features=True)
    with pytest.raises(ModelLoadError, match="not a classifier made by `eyed export`"):
        load_classifier(ModelConfig(onnx=features))


def test_onnx_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_classifier(ModelConfig(id="x", onnx=tmp_path / "missing.onnx"))


def test_onnx_file_not_a_model(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelLoadError):
        load_classifier(ModelConfig(id="x", onnx=junk))


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_missing_local_model(backend: Backend, tmp_path: Path) -> None:
    cfg = ModelConfig(id="./no-such-model", backend=backend, cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_classifier(cfg)


def test_folder_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=re.escape("config.json")):
        load_classifier(ModelConfig(id=str(tmp_path / "empty"), backend="torch"))


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_hub_id_offline(backend: Backend, tmp_path: Path) -> None:
    cfg = ModelConfig(id="google/mobilenet_v2_1.0_224", backend=backend, cache_dir=tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_classifier(cfg)
    assert "cannot reach the hub" in str(info.value)
    assert "local checkpoint" in str(info.value)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_a_relative_folder_that_is_not_there_is_said_offline(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's own models/cifar10-head, run where it was not made (a service's other working folder): the
    advice to "set model.id to a local checkpoint folder" alone is what the user did."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_classifier(ModelConfig(id="models/cifar10-head", backend=backend, cache_dir=tmp_path / "cache"))
    message = str(info.value)
    assert message.startswith("cannot reach the hub for models/cifar10-head (")
    folder = tmp_path.resolve() / "models" / "cifar10-head"
    assert message.endswith(f", and there is no folder {folder}: set model.id to a local checkpoint folder")


@pytest.mark.parametrize("model_id", ["models/mobilenet_v2/", "shared/models/mobilenet_v2"])
def test_a_missing_folder_that_is_no_hub_id_either(model_id: str) -> None:
    """Ids the hub client refuses outright (a trailing slash, two slashes) were meant as folders: not "cannot
    reach the hub"."""
    with pytest.raises(ModelLoadError, match=f"model.id {model_id}: no such folder \\(and not a valid hub id\\)"):
        load_classifier(ModelConfig(id=model_id, backend="torch"))


def _broken_copy(checkpoint: Path, folder: Path, damage: str) -> Path:
    ckpt = shutil.copytree(checkpoint, folder)
    weights = ckpt / "model.safetensors"
    processor = ckpt / "preprocessor_config.json"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "no weights":
        weights.unlink()
    elif damage == "no preprocessor_config.json":
        processor.unlink()
    elif damage == "preprocessor_config.json not JSON":
        processor.write_text('{"size": ')
    elif damage == "config.json not JSON":
        (ckpt / "config.json").write_text("")
    return ckpt


@pytest.mark.parametrize("backend", ["onnx", "torch"])
@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncated weights", ""),  # safetensors' own words
        ("no weights", "no file named model.safetensors"),
        ("no preprocessor_config.json", "no preprocessor_config.json in "),
        ("preprocessor_config.json not JSON", "Expecting value"),
        ("config.json not JSON", "Expecting value"),
    ],
)
def test_a_broken_checkpoint_is_a_model_load_error(
    tiny_checkpoint: Path, tmp_path: Path, backend: Backend, damage: str, reason: str
) -> None:
    """The export (the default onnx path) read the checkpoint unguarded: a traceback and exit 1 instead of a
    message and 69; the torch backend guarded only the weights."""
    ckpt = _broken_copy(tiny_checkpoint, tmp_path / "ckpt", damage)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError) as info:
        load_classifier(ModelConfig(id=str(ckpt), backend=backend, cache_dir=cache))
    message = str(info.value)
    assert message.startswith(f"cannot load {ckpt}: ") and reason in message
    assert "\n" not in message
    assert not list(cache.glob("onnx/*"))  # no export, not even part of one


def _relabelled(onnx_file: Path, path: Path, labels: list[str], symbolic: bool) -> Path:
    """A copy of ``onnx_file`` whose eyed.labels metadata is ``labels``; with ``symbolic``, the class dimension
    of its outputs is not fixed in the graph."""
    import onnx

    from eyed.model.export import META_LABELS, OUTPUT_NAME, PROBS_NAME

    proto = onnx.load(str(onnx_file))
    for prop in proto.metadata_props:
        if prop.key == META_LABELS:
            prop.value = json.dumps(labels)
    if symbolic:
        for out in proto.graph.output:
            if out.name in (OUTPUT_NAME, PROBS_NAME):
                out.type.tensor_type.shape.dim[1].dim_param = "classes"
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("coarse", ["cifar10", "none"])
@pytest.mark.parametrize("symbolic", [False, True])
def test_labels_that_do_not_match_the_graph_are_refused_at_load(
    tiny_onnx: Path, tmp_path: Path, coarse: str, symbolic: bool
) -> None:
    """One label short: with the coarse mapping it failed at the first frame (exit 1), without one every event
    named the class before the one the model meant."""
    labels = imagenet_like_labels()
    path = _relabelled(tiny_onnx, tmp_path / "shifted.onnx", labels[1:], symbolic)
    expected = f"{path}: the graph has {len(labels)} classes but its eyed.labels metadata names {len(labels) - 1}"
    with pytest.raises(ModelLoadError, match=re.escape(expected)):
        load_classifier(ModelConfig(onnx=path, coarse=coarse))
    # The same file with its own labels loads, fixed dimension or not.
    same = _relabelled(tiny_onnx, tmp_path / "same.onnx", labels, symbolic)
    clf = load_classifier(ModelConfig(onnx=same, coarse=coarse))
    assert len(clf.predict(batch_of(clf, synthetic_images(1)))[0].probs) == len(labels)


@pytest.mark.parametrize("content", [None, '{"priors": {"cat": 1.0}}'])
def test_bad_priors_file_is_a_user_facing_error(
    tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path, content: str | None
) -> None:
    priors = tmp_path / "priors.json"
    if content is not None:
        priors.write_text(content)
    with pytest.raises(ConfigError, match=r"model\.coarse_priors"):
        load_classifier(ModelConfig(id=str(tiny_checkpoint), onnx=tiny_onnx, coarse_priors=str(priors)))


# The export cache


def test_ensure_onnx_exports_once(tiny_checkpoint: Path, tmp_path: Path) -> None:
    first = ensure_onnx(str(tiny_checkpoint), tmp_path)
    assert first.is_file()
    assert first == cached_export_path(str(tiny_checkpoint), tmp_path)
    assert first.is_relative_to(tmp_path)
    mtime = first.stat().st_mtime_ns
    second = ensure_onnx(str(tiny_checkpoint), tmp_path)
    assert second == first
    assert second.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary files left behind
    # The cached file is a working model.
    clf = load_classifier(ModelConfig(id=str(tiny_checkpoint), cache_dir=tmp_path))
    assert clf.path == first  # type: ignore[attr-defined]


def test_export_is_readable_as_the_umask_allows(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """An export copied to /etc/eyed keeps its mode: the service's own user must be able to read it."""
    old = os.umask(0o022)
    try:
        path = ensure_onnx(str(tiny_checkpoint), tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_cached_export_path_follows_the_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    cache = tmp_path / "cache"
    before = cached_export_path(str(ckpt), cache)
    assert cached_export_path(str(ckpt), cache) == before
    config = json.loads((ckpt / "config.json").read_text())
    config["id2label"]["0"] = "background, renamed"
    (ckpt / "config.json").write_text(json.dumps(config))
    after = cached_export_path(str(ckpt), cache)
    assert after != before
    assert after.parent == before.parent == cache / "onnx"


def test_weights_rewritten_at_the_same_size_get_a_new_export(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Retrained weights (eyed finetune again into the same folder) have the same size as before: the export
    cache must still see a new checkpoint, not serve the old weights' export. Without this, a fingerprint of
    the files' sizes alone (no modification time) went unseen."""
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    cache = tmp_path / "cache"
    before = cached_export_path(str(ckpt), cache)
    weights = next(ckpt.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # other weights, same size
    mtime = weights.stat().st_mtime_ns
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(mtime + 10**9, mtime + 10**9))  # written a second later
    assert cached_export_path(str(ckpt), cache) != before


def test_labels_missing_from_id2label_keep_their_place() -> None:
    """A config whose id2label skips an id: the labels still line up with the graph's class indices. Counting
    the entries instead lost the last labels, and the model was refused at load."""
    assert labels_of({"id2label": {"0": "cat", "2": "dog"}}) == ["cat", "class_1", "dog"]


@pytest.mark.parametrize("stale", ["preprocessing", "labels"])
def test_a_cached_export_that_the_checkpoint_no_longer_gives_is_made_again(
    tiny_checkpoint: Path, tmp_path: Path, stale: str
) -> None:
    """An export cached by an eyed that ignored crop_pct and resample has the name today's would have (the
    checkpoint's files are the same), but not its preprocessing: it is made again, not reused."""
    import onnx

    from eyed.model.export import META_LABELS, META_PREPROCESS
    from eyed.model.preprocess import PreprocessSpec

    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    processor = json.loads((ckpt / "preprocessor_config.json").read_text())
    convnext = {"image_processor_type": "ConvNextImageProcessor", "crop_pct": 0.875, "resample": 3}
    processor.update(convnext, size={"shortest_edge": 32}, do_center_crop=False)
    (ckpt / "preprocessor_config.json").write_text(json.dumps(processor))
    cache = tmp_path / "cache"
    path = ensure_onnx(str(ckpt), cache)
    spec = load_classifier(ModelConfig(onnx=path)).prepare.spec  # type: ignore[attr-defined]
    assert (spec.shortest_edge, spec.crop, spec.resample) == (36, (32, 32), "bicubic")
    # What the eyed before wrote into the same file: resized to 32, bilinear (or, say, other labels).
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == META_PREPROCESS and stale == "preprocessing":
            prop.value = json.dumps(PreprocessSpec(32, (32, 32), 1 / 255, (0.5,) * 3, (0.5,) * 3).to_dict())
        if prop.key == META_LABELS and stale == "labels":
            prop.value = json.dumps([f"old {label}" for label in imagenet_like_labels()])
    onnx.save(proto, str(path))
    os.utime(path, ns=(1, 1))
    assert ensure_onnx(str(ckpt), cache) == path and path.stat().st_mtime_ns != 1
    again = load_classifier(ModelConfig(onnx=path))
    assert again.prepare.spec == spec and again.post.labels == imagenet_like_labels()  # type: ignore[attr-defined]
    # Now current: reused as it is.
    made = path.stat().st_mtime_ns
    assert ensure_onnx(str(ckpt), cache) == path and path.stat().st_mtime_ns == made
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_stale_cached_export_serves_where_it_cannot_be_made_again(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A device without the torch extra runs the export made elsewhere, stale or not, with a warning."""
    import importlib.util

    import onnx

    from eyed.model.export import META_LABELS

    cache = tmp_path / "cache"
    path = ensure_onnx(str(tiny_checkpoint), cache)
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == META_LABELS:
            prop.value = json.dumps([f"old {label}" for label in imagenet_like_labels()])
    onnx.save(proto, str(path))
    made = path.stat().st_mtime_ns
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    assert ensure_onnx(str(tiny_checkpoint), cache) == path and path.stat().st_mtime_ns == made
    assert "cannot be made again without the torch extra" in caplog.text


def test_stored_metadata_reads_what_onnx_reads(tiny_onnx: Path, tmp_path: Path) -> None:
    import onnx

    from eyed.model.export import stored_metadata

    assert stored_metadata(tiny_onnx) == {p.key: p.value for p in onnx.load(str(tiny_onnx)).metadata_props}
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(ValueError):
        stored_metadata(junk)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(tiny_onnx.read_bytes()[:-10])
    with pytest.raises(ValueError):
        stored_metadata(cut)


def test_a_fixed_size_processor_gets_an_export_of_its_own(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """An export made before a processor's height and width were read as transformers reads them crops the
    frame: a checkpoint with such a processor must not reuse it."""
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    processor = json.loads((ckpt / "preprocessor_config.json").read_text())
    assert cached_export_path(str(ckpt), tmp_path).name == f"ckpt-{fingerprint(ckpt)}-v{FORMAT}.onnx"
    processor["size"] = {"height": 32, "width": 32}
    (ckpt / "preprocessor_config.json").write_text(json.dumps(processor))
    old_name = f"ckpt-{fingerprint(ckpt)}-v{FORMAT}.onnx"
    assert cached_export_path(str(ckpt), tmp_path).name != old_name


# Postprocessor


def test_softmax_rows_sum_to_one() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, -1000.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    probs = softmax(logits)
    assert probs.dtype == np.float32
    assert np.all(np.isfinite(probs))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert np.allclose(probs[1], [0.5, 0.5, 0.0])
    assert np.allclose(probs[2], 1 / 3)
    assert np.array_equal(np.argsort(probs[0]), [0, 1, 2])
    assert np.array_equal(logits[0], [1.0, 2.0, 3.0])  # input left alone


def test_topk_larger_than_labels_is_clamped() -> None:
    post = Postprocessor(["a", "b", "c"], topk=10, mapper=None)
    (pred,) = post(np.array([0.5, 2.0, -1.0], dtype=np.float32))
    assert [s.label for s in pred.topk] == ["b", "a", "c"]
    assert pred.coarse is None


def test_topk_is_the_k_best_in_order() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    labels = [f"l{i}" for i in range(50)]
    for row, pred in zip(logits, Postprocessor(labels, topk=4, mapper=None)(logits), strict=True):
        assert [s.class_id for s in pred.topk] == list(np.argsort(-row)[:4])
        assert [s.label for s in pred.topk] == [labels[i] for i in np.argsort(-row)[:4]]


def test_unavailable_provider_is_a_clear_error(tiny_onnx: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.providers: CUDAExecutionProvider not available"):
        load_classifier(ModelConfig(onnx=tiny_onnx, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]))


# The torch backend's top-k ranks ties by class id, as ONNX TopK does.
def test_numpy_topk_ranks_ties_by_class_id() -> None:
    logits = np.zeros((1, 1001), np.float32)
    logits[0, [10, 500, 900]] = 50.0
    pred = Postprocessor([f"c{i}" for i in range(1001)], 3, None)(logits)[0]
    assert [s.class_id for s in pred.topk] == [10, 500, 900]
