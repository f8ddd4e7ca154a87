"""eyed.outputs: what the offline commands write appears whole or not at all, and an unwritable path fails first."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from eyed.outputs import OutputError, check_writable, staged, staged_folder


def test_a_staged_file_replaces_the_old_one_only_when_the_block_ends_well(tmp_path: Path) -> None:
    out = tmp_path / "chart.png"
    out.write_text("old")
    with pytest.raises(RuntimeError), staged(out) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp != out  # writers that go by the suffix
        tmp.write_text("half")
        raise RuntimeError("the run failed")
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["chart.png"]
    with staged(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and os.listdir(tmp_path) == ["chart.png"]


def test_a_staged_file_has_the_umask_s_mode(tmp_path: Path) -> None:
    """Not mkstemp's 0600: a copy in /etc/eyed must stay readable by the service's own user."""
    old = os.umask(0o022)
    try:
        with staged(tmp_path / "sub" / "m.onnx") as tmp:
            tmp.write_bytes(b"model")
    finally:
        os.umask(old)
    assert (tmp_path / "sub" / "m.onnx").stat().st_mode & 0o777 == 0o644


def test_a_staged_folder_s_files_get_the_umask_s_mode(tmp_path: Path) -> None:
    """safetensors writes its file 0600 and a copy keeps a read-only source's 0444: a fine-tuned checkpoint must
    be as readable by the service's user as any other output."""
    old = os.umask(0o022)
    try:
        with staged_folder(tmp_path / "head", last="report.json") as tmp:
            for name, mode in (
                ("model.safetensors", 0o600),
                ("preprocessor_config.json", 0o444),
                ("report.json", 0o640),
            ):
                (tmp / name).write_text(name)
                (tmp / name).chmod(mode)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "head").iterdir()}
    assert modes == {"model.safetensors": 0o644, "preprocessor_config.json": 0o644, "report.json": 0o644}


def test_a_full_disk_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"cannot write .*out\.json: No space left"), staged(tmp_path / "out.json"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path) == []
    # An error reading something else in the block stays what it is.
    with pytest.raises(FileNotFoundError), staged(tmp_path / "out.json"):
        (tmp_path / "input.parquet").read_bytes()


def test_check_writable_makes_folders_and_refuses_what_cannot_be_written(tmp_path: Path) -> None:
    assert check_writable(tmp_path / "a" / "b" / "p.json") == tmp_path / "a" / "b" / "p.json"
    assert check_writable(tmp_path / "head", folder=True).is_dir()
    assert os.listdir(tmp_path / "a" / "b") == [] and os.listdir(tmp_path / "head") == []  # no probe left
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="file is not a folder"):
        check_writable(tmp_path / "file" / "p.json")
    with pytest.raises(OutputError, match="it is a folder"):
        check_writable(tmp_path / "head")


def test_a_staged_file_follows_a_symlink_and_keeps_an_existing_mode(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    target = store / "ref-2026.json"
    target.write_text("old")
    target.chmod(0o640)
    link = tmp_path / "ref.json"
    link.symlink_to(target)
    with staged(link) as tmp:
        tmp.write_text("new")
    assert link.is_symlink() and target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(store)) == ["ref-2026.json"]


def test_a_staged_folder_moves_in_whole_with_its_last_file_last(tmp_path: Path) -> None:
    out = tmp_path / "ft"
    out.mkdir()
    for name, text in (("model.onnx", "old"), ("done.json", "old"), ("notes.txt", "the user's")):
        (out / name).write_text(text)
    with pytest.raises(RuntimeError), staged_folder(out, last="done.json") as tmp:
        assert tmp.parent == out  # inside: a rename within the folder works on any mount
        (tmp / "model.onnx").write_text("half")
        raise RuntimeError("the export failed")
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "model.onnx": "old",
        "done.json": "old",
        "notes.txt": "the user's",
    }
    assert os.listdir(tmp_path) == ["ft"] and len(os.listdir(out)) == 3  # no temporary folder left
    moved: list[str] = []
    real_replace = Path.replace

    def replace(self: Path, target: Path) -> Path:
        moved.append(self.name)
        # While the others move in, the old run's last file is already gone.
        assert self.name == "done.json" or not (out / "done.json").exists()
        return real_replace(self, target)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "replace", replace)
        with staged_folder(out, last="done.json") as tmp:
            for name in ("done.json", "model.onnx", "config.json"):
                (tmp / name).write_text("new")
    assert moved == ["config.json", "model.onnx", "done.json"]
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "model.onnx": "new",
        "config.json": "new",
        "done.json": "new",
        "notes.txt": "the user's",
    }
    assert sorted(os.listdir(tmp_path)) == ["ft"]


def test_a_staged_folder_can_be_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--output . names a folder with no name of its own: staging beside it failed after the whole run."""
    (tmp_path / "done.json").write_text("old")
    monkeypatch.chdir(tmp_path)
    with staged_folder(Path("."), last="done.json") as tmp:
        (tmp / "done.json").write_text("new")
        (tmp / "model.onnx").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["done.json", "model.onnx"]
    assert (tmp_path / "done.json").read_text() == "new"
