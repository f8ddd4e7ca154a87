"""Files the offline commands write (exports, priors, profiles, charts, fine-tuned checkpoints).

Checked before the run, so an unwritable path fails in a moment rather than after minutes of work, and written
whole or not at all, so an interrupted or failed run leaves the file that was there before (or none), never a
part of one that would load.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class OutputError(Exception):
    """An output file or folder cannot be written (exit 73)."""


class MissingExtra(Exception):
    """An optional dependency a command needs is not installed (exit 69, as for the model's extras)."""


# Errors of writing itself, as opposed to those of what the block reads while it works (a dataset, a model).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


def _failed(path: Path, exc: OSError) -> OutputError:
    if isinstance(exc, FileExistsError) and exc.filename and not Path(exc.filename).is_dir():
        # mkdir met a file where a folder of the path should be
        return OutputError(f"cannot write {path}: {exc.filename} is not a folder")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")


# The folders check_writable made, deepest first, by the output they were made for: a run refused before it
# wrote anything removes them again (made_folders_removed_on_failure), so that it leaves nothing behind.
_made: dict[Path, list[Path]] = {}


def check_writable(path: Path, *, folder: bool = False) -> Path:
    """Fail now if ``path`` (a file, or with ``folder`` a folder to write files in) cannot be written: makes
    the missing folders and creates and removes a file where the output will go."""
    where = path if folder else path.parent
    if not folder and path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    missing = _missing_folders(where)
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe = where / f".eyed-probe-{secrets.token_hex(6)}"
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        _remove_empty(missing)
        raise _failed(path, exc) from exc
    if missing:
        _made[path.absolute()] = missing
    return path


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing: list[Path] = []
    for candidate in [folder.absolute(), *folder.absolute().parents]:
        if candidate.exists() or candidate.is_symlink():
            break
        missing.append(candidate)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty; one that is not stops it, keeping its parents."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


@contextmanager
def made_folders_removed_on_failure(path: Path) -> Iterator[None]:
    """Run the block; if it fails, remove the folders :func:`check_writable` made for ``path`` that are still
    empty (a run refused or failed before it wrote anything there). A folder that was there before is never
    touched."""
    try:
        yield
    except BaseException:  # Ctrl-C too: it leaves nothing behind either
        _remove_empty(_made.pop(path.absolute(), []))
        raise
    _made.pop(path.absolute(), None)


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file or folder, however written (relative, through a symlink, a hard
    link); False when either does not exist, as then writing one cannot replace the other."""
    try:
        return os.path.samefile(a.expanduser(), b.expanduser())
    except OSError:
        return False


def refuse_overwriting(output: Path, source: Path, what: str) -> None:
    """OutputError when ``output`` is ``source`` (:func:`same_file`): writing it would replace ``what`` (the
    command's own input) with its result, and the input would be gone."""
    if same_file(output, source):
        raise OutputError(
            f"cannot write {output}: it is {source}, {what}, which the output would replace: choose another --output"
        )


@contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; it replaces ``path`` only when the block ends without an
    error, and is removed otherwise.

    It keeps ``path``'s suffix, for writers that choose the format by it (matplotlib, numpy). A symlink is
    followed (its target is what gets replaced), and a file that exists keeps its mode. Not mkstemp: its 0600
    would follow a new file when copied to /etc/eyed, where the service's own user could not read it; touch
    honours the umask.
    """
    path = path.resolve() if path.is_symlink() else path
    tmp = path.with_name(f"{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch(exist_ok=False)
        if path.is_file():
            shutil.copymode(path, tmp)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _failed(path, exc) from exc
    try:
        try:
            yield tmp
            tmp.replace(path)
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS or exc.filename in (str(tmp), str(path)):
                raise _failed(path, exc) from exc
            raise
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_folder(folder: Path, last: str) -> Iterator[Path]:
    """A temporary folder inside ``folder`` to write a set of files in; when the block ends without an error
    they move into ``folder``, ``last`` after all others, and the temporary folder is removed either way.

    Inside, not beside: ``folder`` may be a mount point or sit in a folder eyed cannot write to (a volume, a
    USB stick, /var/lib/eyed/models), where only ``folder`` itself is known to be writable
    (:func:`check_writable`) and only a rename within it is sure to work. ``last`` names the file that says
    the set is complete: it is removed from ``folder`` before the others move in, so a crash while they move
    (renames, a few milliseconds) leaves a folder without it, never a complete-looking mix of two runs. Other
    files already in ``folder`` are left alone: it may be a folder the user keeps other things in.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".eyed-staging-{secrets.token_hex(6)}"
        tmp.mkdir()
    except OSError as exc:
        raise _failed(folder, exc) from exc
    try:
        try:
            yield tmp
            _readable_by_umask(tmp)
            names = sorted(p.name for p in tmp.iterdir() if p.name != last)
            (folder / last).unlink(missing_ok=True)
            for name in [*names, last] if (tmp / last).exists() else names:
                (tmp / name).replace(folder / name)
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:
                raise _failed(folder, exc) from exc
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _readable_by_umask(folder: Path) -> None:
    """Give the files in ``folder`` the mode a new file gets: some writers (safetensors) make theirs 0600 and a
    copy keeps a read-only source's mode, and a checkpoint copied where the service runs must be readable by its
    user, as any other output is."""
    probe = folder / f".eyed-mode-{secrets.token_hex(6)}"
    probe.touch()  # as staged() does: the umask, read without os.umask's process-wide change
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def pyplot() -> Any:
    """matplotlib's pyplot, drawing without a display (the report extra; imported only for a chart)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingExtra("PNG charts need matplotlib (pip install 'eyed[report]')") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_format(path: Path) -> str:
    """The format matplotlib writes ``path`` in: PNG unless its suffix names another one it knows; OutputError
    for one it does not (said before a run, not after it: ``cm.txt``)."""
    pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = path.suffix[1:].lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise OutputError(f"cannot write {path}: a chart is written as {', '.join(sorted(known))}, not {fmt!r}")
    return fmt


def save_figure(fig: Any, path: Path, dpi: int) -> Path:
    """Write a matplotlib figure to ``path`` (PNG unless its suffix names another format) and close it."""
    plt = pyplot()
    try:
        with staged(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=figure_format(path))
    finally:
        plt.close(fig)
    return path
