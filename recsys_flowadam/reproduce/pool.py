"""Run several experiments at once, one per worker process (``reproduce all --jobs N``).

Experiments are independent and every run inside one is single-threaded and seeded, so a
worker process per experiment uses the machine's cores without changing any number in the
reports. Workers are *spawned* (not forked): forking a process whose torch thread pools
already run can deadlock. The longest experiments start first (longest-processing-time
order), so the last one to finish is not a long one started late.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

# Minutes per experiment in `reproduce all --seeds 5` on the 2-core development machine (one
# process, one thread; README "Does FlowAdam help?"). Only their order matters here.
MEASURED_MINUTES = {"jester": 20.9, "movielens": 8.3, "tensor-completion": 6.8, "ablation": 5.3,
                    "matrix-completion": 5.2, "gamma": 4.2, "robust-factorization": 1.1}

_slot: int | None = None  # this worker's progress-bar row


def _init_worker(counter: Any, threads: int) -> None:
    global _slot
    import torch

    from recsys_flowadam import kernel_pool

    torch.set_num_threads(threads)
    kernel_pool.KERNEL_THREADS = min(kernel_pool.KERNEL_THREADS, threads)  # the compiled kernels too
    with counter.get_lock():
        _slot = counter.value
        counter.value += 1


def _run_in_worker(run_one: Callable[..., tuple[dict[str, Any], dict[str, Path]]], name: str, opts: Any,
                   out_dir: str | Path) -> tuple[dict[str, Any], dict[str, Path]]:
    return run_one(name, replace(opts, progress_position=_slot), out_dir)


def longest_first(names: list[str]) -> list[str]:
    """``names`` ordered by measured run time, longest first (unknown names last, in their order)."""
    return sorted(names, key=lambda n: -MEASURED_MINUTES.get(n, 0.0))


def run_parallel(names: list[str], opts: Any, out_dir: str | Path, jobs: int, threads: int,
                 run_one: Callable[..., tuple[dict[str, Any], dict[str, Path]]],
                 done: Callable[[str, dict[str, Any]], None]) -> dict[str, dict[str, Path]]:
    """``run_one(name, opts, out_dir)`` for every name in ``jobs`` worker processes; returns paths by name.

    ``run_one`` must be importable by the workers (a module-level function). ``done`` is called in
    this process as each experiment finishes. On the first failure the experiments not yet started
    are cancelled, the running ones finish (their reports are written) and the error is raised.
    """
    ctx = mp.get_context("spawn")
    counter = ctx.Value("i", 0)
    written: dict[str, dict[str, Path]] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(counter, threads)) as pool:
        futures: dict[Future, str] = {pool.submit(_run_in_worker, run_one, n, opts, out_dir): n
                                      for n in longest_first(names)}
        pending = set(futures)
        error: BaseException | None = None
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                if fut.cancelled():
                    continue
                exc = fut.exception()
                if exc is not None:
                    if error is None:
                        error = exc
                        for other in pending:
                            other.cancel()
                    continue
                result, paths = fut.result()
                written[futures[fut]] = paths
                done(futures[fut], result)
        if error is not None:
            print(f"reproduce: {len(written)} of {len(names)} experiments finished before the error; their "
                  "reports are written", file=sys.stderr)
            raise error
    return {n: written[n] for n in names if n in written}
