"""The compiled kernels' two threads: how many (``KERNEL_THREADS``), how work is split (``in_two``),
and work that fills the second core while the caller goes on (``in_background``).

Why a module of its own: the models' gradient kernels (``models.fused_cpu``, ``models.row_sparse``)
and the optimizers' compiled Adam pass (``optim.fused_adam``) share one worker thread and one
setting, and neither layer should import the other for it.

Cornac's SGD, for one, uses every core; numba kernels that release the GIL can too. A half whose
core is taken just runs after the other: the threads wait on a future, they do not spin, unlike
torch's CPU threads, which are why the mini-batch loop keeps torch on one thread. Callers keep
their numbers independent of the setting: they split their work in two halves whatever
``KERNEL_THREADS`` is, and only whether the halves run at once depends on it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

__all__ = ["KERNEL_THREADS", "THREADS_VARIABLE", "in_background", "in_two", "kernel_threads"]

T, U = TypeVar("T"), TypeVar("U")
THREADS_VARIABLE = "RECSYS_FLOWADAM_KERNEL_THREADS"
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _default_threads() -> int:
    """2 where this process may use two cores or more, else 1; ``RECSYS_FLOWADAM_KERNEL_THREADS=1``
    keeps the kernels on one (or 2 asks for two)."""
    given = os.environ.get(THREADS_VARIABLE, "").strip()
    if given:
        if given not in ("1", "2"):
            raise ValueError(f"{THREADS_VARIABLE} must be 1 or 2, got {given!r}")
        return int(given)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(2, cores)


KERNEL_THREADS = _default_threads()


def _forget_pool() -> None:
    """In a forked child the worker thread does not exist: the next call makes a new pool."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


@contextmanager
def kernel_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``KERNEL_THREADS = n`` (None: as it is), then restore it."""
    global KERNEL_THREADS
    before = KERNEL_THREADS
    if n is not None:
        KERNEL_THREADS = n
    try:
        yield
    finally:
        KERNEL_THREADS = before


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recsys-kernels")
        return _POOL


def in_two(first: Callable[[], T], second: Callable[[], U]) -> tuple[T, U]:
    """``(first(), second())``, the second on the worker thread while the first runs here when
    ``KERNEL_THREADS`` allows (for compiled kernels that release the GIL), else one after the other."""
    if KERNEL_THREADS < 2:
        return first(), second()
    later = _pool().submit(second)
    return first(), later.result()


def in_background(work: Callable[[], T]) -> Future:
    """A future of ``work()``, run on the worker thread while the caller goes on when
    ``KERNEL_THREADS`` allows, else here and now (its error then waits in the future too). For work
    needed later that can fill the second core while the caller runs on one (a compiled kernel that
    releases the GIL); an ``in_two`` submitted meanwhile waits for it."""
    if KERNEL_THREADS >= 2:
        return _pool().submit(work)
    done: Future = Future()
    try:
        done.set_result(work())
    except Exception as error:  # (as the pool's future would hold it)
        done.set_exception(error)
    return done
