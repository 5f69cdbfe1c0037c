"""Time one full-batch loss+gradient per path on a Jester-1-sized synthetic problem.

Default: 25,000 users x 100 items, 72% observed, rank 20, float32 (target: dense <= 10 ms
on the 2-core dev box). Prints median milliseconds per path; ``--device cuda`` for a GPU.

    python bench/bench_gradients.py [--users 25000 --items 100 --density 0.72 --rank 20
                                     --device cpu --repeats 20 --paths dense,sparse,autograd]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from recsys_flowadam.models import AutogradPath, Coords, DensePath, ModelSpec, Objective, SparsePath, init_params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=25_000)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--density", type=float, default=0.72)
    ap.add_argument("--rank", type=int, default=20)
    ap.add_argument("--model", default="mf", choices=["mf", "biased-mf"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--paths", default="dense,sparse,autograd")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    cells = args.users * args.items
    if cells <= 50_000_000:  # exact Bernoulli mask
        users, items = (torch.rand(args.users, args.items, generator=gen) < args.density).nonzero(as_tuple=True)
    else:  # large grids: sample cells without building the mask (duplicates dropped)
        lin = torch.unique(torch.randint(cells, (int(cells * args.density),), generator=gen))
        users, items = lin // args.items, lin % args.items
    values = torch.randn(users.shape[0], generator=gen)
    coords = Coords(users.to(device), items.to(device), values.to(device))
    spec = ModelSpec(args.model, args.users, args.items, args.rank)
    objective = Objective(reg=1e-5, bias_reg=1e-5)
    params = init_params(spec, generator=gen, device=device)
    print(f"problem: {args.users} x {args.items}, {len(coords):,} ratings ({len(coords) / cells:.2%}), "
          f"rank {args.rank}, {args.model}, float32, device {device}, torch threads {torch.get_num_threads()}")
    builders = {"dense": lambda: DensePath(spec, coords, objective),
                "sparse": lambda: SparsePath(spec, coords, objective),
                "autograd": lambda: AutogradPath(coords, objective)}
    for name in args.paths.split(","):
        try:
            path = builders[name]()
        except (RuntimeError, MemoryError) as exc:  # e.g. a dense grid too large for the device
            print(f"{name:9s} skipped: {str(exc).splitlines()[0]}")
            continue
        for _ in range(3):  # warm-up
            path.loss_and_grad(params)
        times = []
        for _ in range(args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            loss, grads = path.loss_and_grad(params)
            _sync(device)
            times.append(time.perf_counter() - t0)
        print(f"{name:9s} median {statistics.median(times) * 1e3:8.2f} ms   min {min(times) * 1e3:8.2f} ms"
              f"   (loss {float(loss):.6f}, {args.repeats} repeats)")


if __name__ == "__main__":
    main()
