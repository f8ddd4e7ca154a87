"""Progress bars for the long one-off commands (export --int8, eval, finetune, profile); never in the daemon."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "frame") -> Iterator[T]:
    """``items`` with a tqdm bar on stderr when it is a terminal (silent in CI logs and under systemd)."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the replay/torch extras; a bare install just shows no bar
        yield from items
        return
    bar: Any = tqdm(items, desc=desc, total=total or None, unit=unit, disable=None, leave=False, dynamic_ncols=True)
    try:
        yield from bar
    finally:
        bar.close()
