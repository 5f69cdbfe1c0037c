"""Time one mini-batch training step: loss + gradient of a batch, then an Adam step.

Default problem: 62,000 users x 10,000 items (lognormal user activity and item popularity),
biased MF at rank 20, a batch of 100,000 ratings, frequency-weighted L2 (reg 0.05), float32.
Prints, over many steps (each on one of 8 random batches, like training), the median and the
fastest wall time and the median CPU time of the process, for the hand-written path
(``MiniBatchPath``, both scatter methods) and for autograd (``AutogradPath``), with torch's
default Adam and with ``fused=True``, and the load average (the machine is shared: under load
the CPU time tells the work, the wall time also the waiting). Target: <= 10 ms on the 2-core CPU.

    python bench/bench_minibatch_step.py [--users 62000 --items 10000 --batch 100000 --rank 20
                                          --model biased-mf --device cpu --repeats 60 --threads 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from recsys_flowadam.models import AutogradPath, Coords, ModelSpec, Objective, init_params
from recsys_flowadam.models.minibatch import MiniBatchPath


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
               adam_kwargs: dict) -> tuple[float, float, float]:
    """Milliseconds of one step (gradient of a batch into ``.grad``, then ``Adam.step``):
    ``(median wall, fastest wall, median process CPU time)``. On a busy machine the CPU time
    (all threads of this process) tells the work done when the wall clock also counts waiting."""
    params = init_params(spec, generator=torch.Generator().manual_seed(0), device=device)
    opt = torch.optim.Adam(params.values(), lr=0.01, **adam_kwargs)
    names = list(params)
    times, cpu = [], []
    for k in range(repeats + 5):
        batch = batches[k % len(batches)]
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()

        def closure() -> torch.Tensor:
            loss, grads = path.loss_and_grad(params, batch)
            for name in names:
                params[name].grad = grads[name]
            return loss

        opt.step(closure)
        _sync(device)
        if k >= 5:  # warm-up steps are not timed
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return statistics.median(times) * 1e3, min(times) * 1e3, statistics.median(cpu) * 1e3


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
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--paths", default="minibatch,minibatch-index_add,autograd")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    batches = [_to(_ratings(args, args.batch, gen), device) for _ in range(8)]
    spec = ModelSpec(args.model, args.users, args.items, args.rank, args.contexts if args.model == "cp" else 0)
    weights = {"user": torch.full((args.users,), 1 / args.users, device=device),
               "item": torch.full((args.items,), 1 / args.items, device=device),
               "context": torch.full((args.contexts,), 1 / args.contexts, device=device)}
    objective = Objective(reg=0.05, bias_reg=0.05, offset=3.0, weights=weights)
    print(f"problem: {args.users:,} users x {args.items:,} items, batch {args.batch:,}, rank {args.rank}, "
          f"{args.model}, float32, device {device}, torch threads {torch.get_num_threads()}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    builders = {"minibatch": lambda: MiniBatchPath(batches[0], objective, scatter="segment"),
                "minibatch-index_add": lambda: MiniBatchPath(batches[0], objective, scatter="index_add"),
                "autograd": lambda: AutogradPath(batches[0], objective)}
    for name in args.paths.split(","):
        path = builders[name]()
        for label, kwargs in (("Adam", {}), ("Adam fused", {"fused": True})):
            med, best, cpu = time_steps(path, spec, batches, device, args.repeats, kwargs)
            print(f"  {name:20s} + {label:10s}  median {med:7.2f} ms/step   fastest {best:7.2f} ms   "
                  f"CPU time {cpu:7.2f} ms")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
