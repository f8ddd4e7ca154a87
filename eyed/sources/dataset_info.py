"""What a local dataset folder holds for one split: its parquet files and its features, as datasets sees them.

eyed reads local parquet shards itself (``eyed.sources.parquet``, with pyarrow); it needs datasets only to find
a split's files and the features (which column is the image, the class names). Importing datasets also
imports pandas and much else: about 75 MB of resident memory, a third of a replay daemon's. So unless this
process has already imported datasets, a child process asks it and exits, and the daemon never holds it.

    python -m eyed.sources.dataset_info FOLDER SPLIT   # prints the answer as JSON
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# Importing datasets takes 1-3 s on a small board; a child that has not answered in this long is stuck.
CHILD_TIMEOUT_S = 120.0


class DatasetInfoError(Exception):
    """datasets could not read the folder (a ValueError or ImportError in the child is raised as such)."""


RAISED_AS: dict[str, type[Exception]] = {"ValueError": ValueError, "ImportError": ImportError}


@dataclass(frozen=True)
class LocalSplit:
    """A split's parquet files, and its features in ``datasets.Features.to_dict()`` form."""

    files: list[str]
    features: dict[str, Any]


def keep_torch_out() -> None:
    """datasets imports torch for every streaming dataset when it is installed, only to offer torch DataLoader
    integration that eyed never uses: ~300 MB of RSS and seconds of start-up. The flag is read at use."""
    import datasets

    if "torch" not in sys.modules:
        datasets.config.TORCH_AVAILABLE = False


def parquet_files(builder: Any, split: str) -> list[str] | None:
    """The files of ``split`` when ``builder`` is datasets' parquet builder on local files; None otherwise.

    Image folders, csv and the hub stay with datasets' streaming. ValueError for a split the folder lacks.
    """
    try:
        from datasets.packaged_modules.parquet.parquet import ParquetConfig
    except ImportError:  # a datasets that moved it: its own streaming still works
        return None
    if not isinstance(builder.config, ParquetConfig) or not builder.config.data_files:
        return None
    splits = {str(name): files for name, files in builder.config.data_files.items()}
    if split not in splits:
        raise ValueError(f"Bad split: {split}. Available splits: {list(splits)}")
    files = [str(f) for f in splits[split]]
    return files if files and all(Path(f).is_file() for f in files) else None


def scan(folder: str, split: str) -> LocalSplit | None:
    """In this process: ``folder``'s parquet files for ``split`` and their features; None if it is not a
    folder of parquet shards (datasets then streams it)."""
    import pyarrow.parquet as pq
    from datasets import Features, load_dataset_builder

    keep_torch_out()
    builder = load_dataset_builder(folder)
    files = parquet_files(builder, split)
    if files is None:
        return None
    features = builder.info.features or Features.from_arrow_schema(pq.read_schema(files[0]))
    return LocalSplit(files, features.to_dict())


def datasets_imported() -> bool:
    return "datasets" in sys.modules


class SplitQuery:
    """:func:`scan`, started now and answered by :meth:`result`: in a child process unless datasets is already
    imported here (then it costs nothing more), so that the child's seconds overlap the caller's own start-up.

    Errors come back as ValueError (an unknown split, a shard that is not parquet), ImportError (no datasets)
    or DatasetInfoError.
    """

    def __init__(self, folder: str, split: str) -> None:
        self.folder, self.split = folder, split
        self._answer: dict[str, Any] | None = None
        self._child: subprocess.Popen[bytes] | None = None
        if not datasets_imported():
            # Files, not pipes: a long answer (thousands of shards) or a chatty stderr never blocks the child
            # while no one reads yet. They live until the answer is read or the query dropped (_stop).
            self._out = tempfile.TemporaryFile()  # noqa: SIM115
            self._err = tempfile.TemporaryFile()  # noqa: SIM115
            cmd = [sys.executable, "-m", __name__, folder, split]
            self._child = subprocess.Popen(cmd, stdout=self._out, stderr=self._err)
            # A query dropped unanswered (a source never entered: the model failed to load) stops its child.
            self._finalizer = weakref.finalize(self, _stop, self._child, self._out, self._err)

    def result(self) -> LocalSplit | None:
        if self._child is None:
            return scan(self.folder, self.split)
        answer = self._answer = self._answer or self._wait()
        if "error" in answer:
            raise RAISED_AS.get(answer["error"], DatasetInfoError)(answer["message"])
        return LocalSplit(answer["files"], answer["features"]) if answer["files"] is not None else None

    def _wait(self) -> dict[str, Any]:
        """The child's answer; a failure of the child itself becomes an answer too, so it is given every time."""
        assert self._child is not None
        try:
            self._child.wait(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.cancel()
            return {"error": "", "message": f"datasets did not describe {self.folder} within {CHILD_TIMEOUT_S:g} s"}
        out, err = _read(self._out), _read(self._err)
        self.cancel()  # closes the files
        try:
            answer: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError):
            message = (
                f"datasets could not describe {self.folder} (exit {self._child.returncode}): {err.strip()[-1000:]}"
            )
            return {"error": "", "message": message}
        return answer

    def cancel(self) -> None:
        """Stop a child whose answer is no longer wanted (and close its files)."""
        if self._child is not None:
            self._finalizer()


def _stop(child: subprocess.Popen[bytes], *files: IO[bytes]) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()
    for f in files:
        f.close()


def _read(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode("utf-8", errors="replace")


def main(argv: list[str]) -> int:
    folder, split = argv
    try:
        found = scan(folder, split)
    except (ValueError, ImportError) as exc:
        kind = "ValueError" if isinstance(exc, ValueError) else "ImportError"
        answer: dict[str, Any] = {"error": kind, "message": str(exc)}
    except Exception as exc:
        answer = {"error": type(exc).__name__, "message": f"{type(exc).__name__}: {exc}"}
    else:
        answer = {"files": None} if found is None else {"files": found.files, "features": found.features}
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
