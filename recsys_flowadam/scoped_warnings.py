"""``scoped_filter``: a warning filter for one block, safe to use from several threads at once.

Why: ``warnings.catch_warnings`` saves and restores the process's one filter list, so two threads
inside such blocks at once (``cv``'s folds run on threads) can restore each other's list: a filter
meant to turn a warning into an error could then be gone while the other thread parses a file.
The blocks here hold a process-wide lock, so they run one at a time (a file's parse or a tensor's
construction: milliseconds).
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

__all__ = ["scoped_filter"]

_LOCK = threading.RLock()


@contextmanager
def scoped_filter(action: str, category: type[Warning] = Warning, message: str = "") -> Iterator[None]:
    """Run the block with ``warnings.filterwarnings(action, message, category)`` in force, then
    restore the filters, one such block in the process at a time."""
    with _LOCK, warnings.catch_warnings():
        warnings.filterwarnings(action, message=message, category=category)
        yield
