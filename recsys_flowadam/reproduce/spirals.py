"""The paper's two-spirals classifier ablation: FlowAdam's injection variants on a small MLP.

Two interleaved spirals (one per class) in the plane, a tanh MLP trained full batch with a
closure (binary cross-entropy from torch), accuracy on a separate test draw. The data layout
(1.5 turns, Gaussian jitter) and the network (2-64-64-1) are our choices; the paper gives
only the task and its accuracies (soft 100%, hard 82.5%).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from recsys_flowadam.optim import count_closure, make_optimizer

PAPER = {"FlowAdam (soft)": "100%", "FlowAdam (hard)": "82.5%"}
ROWS = [("Adam", "adam", {}), ("FlowAdam (soft)", "flowadam", {"mode": "A", "injection": "soft"}),
        ("FlowAdam (hard)", "flowadam", {"mode": "A", "injection": "hard"}),
        ("FlowAdam (none)", "flowadam", {"mode": "A", "injection": "none"})]


def make_two_spirals(n_per_class: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points (2n, 2) scaled to the unit disc and labels (2n,) in {0, 1}; class 1 is class 0 turned by pi."""
    rng = np.random.default_rng(seed)
    theta = np.sqrt(rng.random(n_per_class)) * 3.0 * math.pi  # 1.5 turns, uniform along the arc
    arm = np.stack([theta * np.cos(theta), theta * np.sin(theta)], axis=1) / (3.0 * math.pi)
    x = np.concatenate([arm, -arm]) + noise * rng.standard_normal((2 * n_per_class, 2))
    y = np.concatenate([np.zeros(n_per_class), np.ones(n_per_class)])
    return x.astype(np.float32), y.astype(np.float32)


def _mlp(seed: int, hidden: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                               torch.nn.Tanh(), torch.nn.Linear(hidden, 1))


def train_spirals(optimizer: str, kwargs: dict[str, Any], seed: int, steps: int, lr: float = 0.01,
                  n_per_class: int = 200, noise: float = 0.02) -> dict[str, Any]:
    """Train the MLP full batch for ``steps``; return test accuracy, gradient evaluations and seconds."""
    x, y = (torch.from_numpy(a) for a in make_two_spirals(n_per_class, noise, seed))
    xt, yt = (torch.from_numpy(a) for a in make_two_spirals(n_per_class, noise, seed + 10_000))
    net = _mlp(seed)
    opt = make_optimizer(optimizer, net.parameters(), lr, **kwargs)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).squeeze(1), y)
        loss.backward()
        return loss.detach()

    counted = count_closure(closure)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step(counted)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = float(((net(xt).squeeze(1) > 0).float() == yt).float().mean())
    return {"seed": seed, "accuracy": acc, "grad_evals": counted.calls, "seconds": round(seconds, 4)}


def spirals_section(opts) -> dict[str, Any]:
    """All rows over the experiment's seeds (steps: 2000, quick 300, or the ``--steps`` override)."""
    steps = opts.n_steps(2000, 300)
    rows = {}
    for label, name, kw in ROWS:
        runs = [train_spirals(name, kw, seed, steps) for seed in opts.seed_list]
        accs = np.array([r["accuracy"] for r in runs])
        std = float(accs.std(ddof=1)) if len(accs) > 1 else 0.0
        rows[label] = {"runs": runs, "mean": float(accs.mean()), "std": std,
                       "grad_evals": float(np.mean([r["grad_evals"] for r in runs])),
                       "seconds": float(np.mean([r["seconds"] for r in runs])), "paper": PAPER.get(label, ""),
                       "optimizer": name, "kwargs": kw}
    return {"steps": steps, "lr": 0.01, "task": "two spirals, 200 points per class, jitter 0.02, 1.5 turns; "
            "MLP 2-64-64-1 tanh, BCE loss, full batch; FlowAdam preset A (stochastic/network preset); "
            "accuracy on a separate test draw", "rows": rows}
