"""Large numpy arrays on 4 KB pages where the kernel's transparent huge pages stall on first touch.

numpy asks Linux for transparent huge pages (``madvise``) on its large arrays. Where the kernel's
THP defrag mode is ``always`` or ``madvise``, the first touch of each 2 MB page may wait while
the kernel compacts memory. On the 2-core machine of the benchmarks a fresh 200 MB array took
0.69 s to fill on 2 MB pages against 0.13 s on 4 KB pages, and the 10M-rating fit's joining of
the validation ratings (``pipeline.fold_validation``, 200 MB of new arrays) 0.70 s against
0.27 s. Reused huge pages are faster, but a training run mostly makes fresh arrays once.

:func:`small_pages` turns numpy's request off while a block runs, only where huge pages stall
that way, and restores it after: numpy's setting is process-wide, so it is never left changed.
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["huge_pages_stall", "small_pages"]

DEFRAG = Path("/sys/kernel/mm/transparent_hugepage/defrag")
_LOCK = threading.Lock()
_DEPTH = 0
_BEFORE: bool | None = None


def huge_pages_stall(defrag: Path = DEFRAG) -> bool:
    """Whether a madvised huge page's first touch may compact memory synchronously (the selected
    THP defrag mode is ``always`` or ``madvise``); False where the file does not exist."""
    try:
        text = defrag.read_text()
    except OSError:
        return False
    mode = re.search(r"\[([^\]]+)\]", text)
    return mode is not None and mode.group(1) in ("always", "madvise")


def _numpy_setter() -> Callable[[bool], bool] | None:
    """numpy's ``_set_madvise_hugepage`` (returns the previous setting), or None where it lacks it."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return getattr(multiarray, "_set_madvise_hugepage", None)


@contextmanager
def small_pages() -> Iterator[None]:
    """Run the block with numpy's huge-page request off where huge pages stall (see the module
    doc); nested and concurrent blocks restore numpy's setting once the last one ends."""
    global _DEPTH, _BEFORE
    setter = _numpy_setter() if huge_pages_stall() else None
    if setter is None:
        yield
        return
    with _LOCK:
        if _DEPTH == 0:
            _BEFORE = setter(False)
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                setter(bool(_BEFORE))
