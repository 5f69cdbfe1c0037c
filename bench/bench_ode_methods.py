"""What FlowAdam's ODE solver costs and buys: dopri5 vs fixed-step euler / heun / rk4.

The paper's medium matrix-completion scenario: a 300 x 400 matrix of true rank 15, density 0.2,
noise 0.1 (``recsys_flowadam.data.synthetic.make_low_rank_matrix``), a rank-20 model U V^T with
U, V ~ N(0, 0.1^2), 1000 full-batch steps at lr 0.01 with preset "B", objective = masked MSE
(mean over the observed entries) + 1e-5 (||U||^2 + ||V||^2), no other regularisation, no tuning.
Test RMSE = every unobserved entry vs the noiseless truth. Plain Adam (same lr, same objective)
is printed for reference. Gradient evaluations are exact; wall times are noisy on a shared box.
The paper reports 0.111 +- 0.001 for dopri5 and about 8 gradient evaluations per trigger.

Usage: python bench/bench_ode_methods.py [--seeds 0 1 2] [--steps 1000] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from recsys_flowadam.data.synthetic import make_low_rank_matrix
from recsys_flowadam.optim import FlowAdam

# (label, FlowAdam kwargs); None = plain torch.optim.Adam.
METHODS: list[tuple[str, dict | None]] = [
    ("adam (reference)", None),
    ("dopri5 tol 1e-4", dict(ode_method="dopri5")),
    ("euler x1", dict(ode_method="euler", ode_steps=1)),
    ("euler x2", dict(ode_method="euler", ode_steps=2)),
    ("euler x4", dict(ode_method="euler", ode_steps=4)),
    ("heun x1", dict(ode_method="heun", ode_steps=1)),
    ("heun x2", dict(ode_method="heun", ode_steps=2)),
    ("rk4 x1", dict(ode_method="rk4", ode_steps=1)),
]


def run(seed: int, flow_kwargs: dict | None, steps: int, lr: float, dtype: torch.dtype) -> dict:
    prob = make_low_rank_matrix(300, 400, rank=15, density=0.2, noise=0.1, seed=seed)
    r = prob.ratings
    observed = torch.zeros(prob.truth.shape, dtype=dtype)
    observed[torch.as_tensor(r.users), torch.as_tensor(r.items)] = torch.as_tensor(r.values, dtype=dtype)
    mask = torch.as_tensor(prob.mask)
    mask_f = mask.to(dtype)
    n_obs = float(mask.sum())
    truth = torch.as_tensor(prob.truth, dtype=dtype)
    gen = torch.Generator().manual_seed(1000 + seed)
    u = (0.1 * torch.randn(300, 20, generator=gen, dtype=dtype)).requires_grad_(True)
    v = (0.1 * torch.randn(400, 20, generator=gen, dtype=dtype)).requires_grad_(True)
    if flow_kwargs is None:
        opt = torch.optim.Adam([u, v], lr=lr)
    else:
        opt = FlowAdam([u, v], lr=lr, mode="B", **flow_kwargs)
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        resid = (u @ v.T - observed) * mask_f
        loss = resid.pow(2).sum() / n_obs + 1e-5 * (u.pow(2).sum() + v.pow(2).sum())
        loss.backward()
        return loss

    t0 = time.perf_counter()
    for _ in range(steps):
        loss = opt.step(closure)
    wall = time.perf_counter() - t0
    with torch.no_grad():
        err = (u @ v.T - truth)[~mask]
        rmse = float(err.pow(2).mean().sqrt())
    out = dict(rmse=rmse, train_loss=float(loss.detach()), grad_evals=calls[0], wall=wall)
    if isinstance(opt, FlowAdam):
        d = opt.diagnostics()
        assert d["grad_evals"] == calls[0]
        out.update(triggers=d["ode_triggers"], plateau=d["plateau_triggers"], stiff=d["stiff_triggers"],
                   fallbacks=d["fallbacks"])
    return out


def _mean_sd(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} +- {statistics.stdev(xs):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--methods", nargs="*", help="labels to run (default: all)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    methods = [m for m in METHODS if not args.methods or m[0] in args.methods or m[0].split()[0] in args.methods]
    print(f"matrix completion 300x400, true rank 15, density 0.2, noise 0.1; model rank 20, init N(0, 0.1^2); "
          f"{args.steps} full-batch steps, lr {args.lr}, preset B, {args.dtype}; loss = masked MSE + 1e-5 (|U|^2 + |V|^2); "
          f"seeds {args.seeds}; torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    header = (f"{'method':<18} {'test RMSE':>17} {'grad evals':>10} {'triggers':>8} {'plateau':>7} {'stiff':>6} "
              f"{'fallbk':>6} {'evals/trig':>10} {'wall s':>7}")
    print(header)
    summary = {}
    for label, kw in methods:
        runs = [run(seed, kw, args.steps, args.lr, dtype) for seed in args.seeds]
        rmse = [r["rmse"] for r in runs]
        evals = statistics.mean(r["grad_evals"] for r in runs)
        wall = statistics.mean(r["wall"] for r in runs)
        trig = statistics.mean(r.get("triggers", 0) for r in runs)
        plateau = statistics.mean(r.get("plateau", 0) for r in runs)
        stiff = statistics.mean(r.get("stiff", 0) for r in runs)
        fb = statistics.mean(r.get("fallbacks", 0) for r in runs)
        # Gradient evaluations of a trigger step: the t=0 gradient plus the ODE's own.
        per_trig = (evals - (args.steps - trig)) / trig if trig else float("nan")
        summary[label] = (statistics.mean(rmse), evals)
        print(f"{label:<18} {_mean_sd(rmse):>17} {evals:10.0f} {trig:8.0f} {plateau:7.0f} {stiff:6.0f} "
              f"{fb:6.0f} {per_trig:10.2f} {wall:7.1f}", flush=True)
    ref = next((k for k in summary if k.startswith("dopri5")), None)
    if ref is None:
        return
    ref_rmse = summary[ref][0]
    within = [(ev, k) for k, (rm, ev) in summary.items() if k != "adam (reference)" and rm <= 1.01 * ref_rmse]
    cheapest = min(within)[1]
    print(f"dopri5 RMSE {ref_rmse:.4f}; cheapest ODE method within 1% of it (by gradient evaluations): "
          f"{cheapest} ({summary[cheapest][1]:.0f} grad evals vs {summary[ref][1]:.0f}, RMSE {summary[cheapest][0]:.4f})")


if __name__ == "__main__":
    main()
