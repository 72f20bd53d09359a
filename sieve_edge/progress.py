"""Progress bars on stderr (tqdm), silenced when asked or when stderr is not a terminal in CI."""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress_bar(it: Iterable[T], desc: str = "", enabled: bool = True, total: int | None = None) -> Iterable[T]:
    if not enabled or os.environ.get("SIEVE_EDGE_NO_PROGRESS"):
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True, leave=False)


def log(msg: str) -> None:
    """One line of progress on stderr."""
    print(msg, file=sys.stderr, flush=True)
