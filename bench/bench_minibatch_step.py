"""Time one mini-batch training step: loss + gradient of a batch, then an Adam step.

Default problem: 62,000 users x 10,000 items (lognormal user activity and item popularity),
biased MF at rank 20, a batch of 100,000 ratings, frequency-weighted L2 (reg 0.05), float32.
Prints, over many steps (each on one of 8 random batches, like training), the median and the
fastest wall time, the median CPU time of the process and the minor page faults per step, side
by side in one run, for:

* the gradient path: the hand-written ``MiniBatchPath`` (both scatter methods) and autograd
  (``AutogradPath``);
* the optimizer: torch's Adam as it defaults on the CPU (a per-tensor loop), ``foreach=True``,
  ``fused=True``, ``adam-train`` (``train``'s Adam on the mini-batch path: torch's class with
  ``fused=True``, whose step on a large CPU model is ``optim.fused_adam``'s compiled two-thread
  pass) and FlowAdam's everyday preset E (``train``'s default optimizer);
* ``--paths laid-out``: the numba kernel on batches grouped by user with the optimizer's step
  offered to it (``recsys_flowadam.row_step``), as ``train`` runs its laid-out batches;
* the torch CPU thread count: ``--threads 1,2`` runs every variant at each count (``train``
  runs the CPU mini-batch path on one thread);
* the compiled kernel's threads: ``--kernel-threads 1,2`` (``kernel_pool.KERNEL_THREADS``; by
  default 2 where there are two cores: the numba kernel splits a batch of 20k+ ratings into two
  halves of the users, so its CPU time can exceed the wall time; lazy-adam's step is one thread);
* ``--paths row-sparse``: lazy-adam's step, its gradient and its update of the touched rows in one
  compiled pass (``models.row_sparse``; the batches laid out user by user as ``train`` does);
* the heap: glibc's default thresholds, then ``retained_heap()`` (``--heap default,retained``;
  in this order, as the setting lasts for the process): ``train`` keeps freed memory on the
  CPU mini-batch path, so a step takes no fresh pages from the system.

The load average is printed before and after: the machine is shared, and under load the CPU
time tells the work, the wall time also the waiting; compare variants within one run. Target:
<= 10 ms for one step on the 2-core CPU.

    python bench/bench_minibatch_step.py [--users 62000 --items 10000 --batch 100000 --rank 20
        --model biased-mf --device cpu --repeats 60 --threads 1,2
        --paths minibatch,minibatch-index_add,autograd --optimizers adam,adam-foreach,adam-fused,flowadam
        --heap default,retained --kernel-threads 1,2]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import resource
import statistics
import time
from typing import Callable

import torch

from recsys_flowadam import kernel_pool
from recsys_flowadam.models import AutogradPath, Coords, ModelSpec, Objective, init_params
from recsys_flowadam.models.minibatch import MiniBatchPath, retained_heap
from recsys_flowadam.optim import make_optimizer

OPTIMIZERS: dict[str, Callable] = {  # name -> (params, lr) -> optimizer
    "adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr),
    "adam-foreach": lambda ps, lr: torch.optim.Adam(ps, lr=lr, foreach=True),
    "adam-fused": lambda ps, lr: torch.optim.Adam(ps, lr=lr, fused=True),
    # train's Adam: torch's class, its step the compiled two-thread pass on a large CPU model (optim.fused_adam)
    "adam-train": lambda ps, lr: make_optimizer("adam", ps, lr, fused=True),
    "flowadam": lambda ps, lr: make_optimizer("flowadam", ps, lr),  # preset E, train's default
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ratings(args: argparse.Namespace, n: int, gen: torch.Generator) -> Coords:
    """``n`` ratings with lognormal user activity and item popularity, values in [0.5, 5]."""
    users = torch.multinomial(torch.exp(torch.randn(args.users, generator=gen)), n, True, generator=gen)
    items = torch.multinomial(torch.exp(1.5 * torch.randn(args.items, generator=gen)), n, True, generator=gen)
    values = torch.randint(1, 11, (n,), generator=gen).float() / 2
    contexts = torch.randint(0, args.contexts, (n,), generator=gen) if args.model == "cp" else None
    return Coords(users, items, values, contexts)


def _to(coords: Coords, device: torch.device) -> Coords:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Coords(move(coords.users), move(coords.items), move(coords.values), move(coords.contexts))


def time_steps(path, spec: ModelSpec, batches: list[Coords], device: torch.device, repeats: int,
               make_opt: Callable, laid_out: bool = False) -> tuple[float, float, float, float]:
    """Milliseconds of one step (gradient of a batch into ``.grad``, then the optimizer's step):
    ``(median wall, fastest wall, median process CPU time, minor page faults per step)``. On a
    busy machine the CPU time (all threads of this process) tells the work done when the wall
    clock also counts waiting; page faults tell memory taken afresh from the system each step."""
    params = init_params(spec, generator=torch.Generator().manual_seed(0), device=device)
    opt = make_opt(list(params.values()), 0.01)
    names = list(params)
    if laid_out:  # as train runs laid-out batches: grouped by user, the optimizer's step offered to the kernel
        batches = [b.select(torch.argsort(b.users, stable=True)) for b in batches]
        if hasattr(opt, "fuse_row_steps"):
            opt.fuse_row_steps = True
    times, cpu, faults = [], [], 0
    for k in range(repeats + 5):
        batch = batches[k % len(batches)]
        _sync(device)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0, c0 = time.perf_counter(), time.process_time()

        def closure() -> torch.Tensor:
            loss, grads = path.loss_and_grad(params, batch)
            for name in names:  # (none for a parameter whose offered step the kernel took)
                params[name].grad = grads.get(name)
            return loss

        opt.step(closure)
        _sync(device)
        if k >= 5:  # warm-up steps are not timed
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return statistics.median(times) * 1e3, min(times) * 1e3, statistics.median(cpu) * 1e3, faults / repeats


def time_lazy_steps(spec: ModelSpec, batches: list[Coords], objective: Objective,
                    repeats: int) -> tuple[float, float, float, float]:
    """As :func:`time_steps` for lazy-adam, whose step is the gradient and the update in one compiled
    pass (``models.row_sparse``): the same batches, laid out as ``train`` lays them out (grouped by
    user), one step per batch."""
    from recsys_flowadam.models.row_sparse import LazyAdamStep, SlottedRatings
    from recsys_flowadam.optim.lazy_adam import LazyAdam
    from recsys_flowadam.train.batches import Batch

    every = Coords(*(torch.cat([getattr(b, k) for b in batches]) for k in ("users", "items", "values")))
    size = len(batches[0])
    slotted = SlottedRatings(every, size, torch.arange(len(every)), (spec.n_users, spec.n_items), torch.float32)
    params = init_params(spec, generator=torch.Generator().manual_seed(0))
    opt = LazyAdam(list(params.values()), lr=0.01)
    step = LazyAdamStep(slotted, params, objective, opt, every)
    times, cpu, faults = [], [], 0
    for k in range(repeats + 5):
        step.batch = Batch(None, 1.0, k % slotted.n_batches)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0, c0 = time.perf_counter(), time.process_time()
        opt.step(step)
        if k >= 5:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return statistics.median(times) * 1e3, min(times) * 1e3, statistics.median(cpu) * 1e3, faults / repeats


def report(label: str, timing: tuple[float, float, float, float]) -> None:
    med, best, cpu, faults = timing
    print(f"  {label} median {med:7.2f} ms/step  fastest {best:7.2f} ms  CPU {cpu:7.2f} ms  "
          f"page faults {faults:6.0f}/step", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=62_000)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--contexts", type=int, default=8, help="contexts of the cp model")
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--rank", type=int, default=20)
    ap.add_argument("--model", default="biased-mf", choices=["mf", "biased-mf", "cp"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch CPU thread counts (0: torch's default)")
    ap.add_argument("--paths", default="minibatch-fused,minibatch,minibatch-index_add,autograd",
                    help="minibatch-fused: the numba kernel (the CPU default for mf and biased-mf); laid-out: "
                         "the same on batches grouped by user with the optimizer's step offered to the kernel, "
                         "as train runs them (row_step); minibatch: "
                         "the torch path with sorted segment sums; row-sparse: lazy-adam's fused gradient and "
                         "update (CPU, mf/biased-mf; the optimizers list does not apply to it)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"of {', '.join(OPTIMIZERS)}")
    ap.add_argument("--heap", default="default,retained", help="default, retained or both (in this order)")
    ap.add_argument("--kernel-threads", default=str(kernel_pool.KERNEL_THREADS),
                    help="comma-separated thread counts of the numba kernel (kernel_pool.KERNEL_THREADS)")
    args = ap.parse_args()
    device = torch.device(args.device)
    default_threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    batches = [_to(_ratings(args, args.batch, gen), device) for _ in range(8)]
    spec = ModelSpec(args.model, args.users, args.items, args.rank, args.contexts if args.model == "cp" else 0)
    weights = {"user": torch.full((args.users,), 1 / args.users, device=device),
               "item": torch.full((args.items,), 1 / args.items, device=device),
               "context": torch.full((args.contexts,), 1 / args.contexts, device=device)}
    objective = Objective(reg=0.05, bias_reg=0.05, offset=3.0, weights=weights)
    print(f"problem: {args.users:,} users x {args.items:,} items, batch {args.batch:,}, rank {args.rank}, "
          f"{args.model}, float32, device {device}, torch's default threads {default_threads}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    builders = {"minibatch-fused": lambda: MiniBatchPath(batches[0], objective, scatter="fused"),
                "laid-out": lambda: MiniBatchPath(batches[0], objective, scatter="fused"),
                "minibatch": lambda: MiniBatchPath(batches[0], objective, scatter="segment"),
                "minibatch-index_add": lambda: MiniBatchPath(batches[0], objective, scatter="index_add"),
                "autograd": lambda: AutogradPath(batches[0], objective)}
    heaps = [h for h in ("default", "retained") if h in args.heap.split(",")]  # retained lasts: it goes last
    for heap in heaps:
        with retained_heap() if heap == "retained" else contextlib.nullcontext():
            for threads, kernel in itertools.product([int(t) or default_threads for t in args.threads.split(",")],
                                                     [int(k) for k in args.kernel_threads.split(",")]):
                torch.set_num_threads(threads)
                kernel_pool.KERNEL_THREADS = kernel
                where = f"{heap} heap, {threads} thread{'s' if threads > 1 else ' '}, kernel {kernel}"
                for name in args.paths.split(","):
                    if name == "row-sparse":  # lazy-adam: its own fused step, no other optimizer
                        report(f"{where} {name:19s} + {'lazy-adam':12s}",
                               time_lazy_steps(spec, batches, objective, args.repeats))
                        continue
                    path = builders[name]()
                    for label in args.optimizers.split(","):
                        report(f"{where} {name:19s} + {label:12s}",
                               time_steps(path, spec, batches, device, args.repeats, OPTIMIZERS[label],
                                          laid_out=name == "laid-out"))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
