"""FlowAdam's everyday preset "E" against the paper's preset "B" (dopri5) and Adam.

Sections (``--sections``, default all):

* ``matrix``: the paper's matrix-completion scenarios small / medium / large, built by
  ``recsys_flowadam.reproduce`` (``matrix_scenarios``: rank r+5 model, init N(0, 0.1^2), test =
  every unobserved cell against the noiseless truth) and trained by its runner: 1000 full-batch
  steps at lr 0.01, every optimizer on the same objective loss + 1e-5 ||theta||^2 (the ``fair``
  objective at the paper's fixed lr; untuned).
* ``minibatch``: the medium scenario again, trained on mini-batches of 2000 of its ~24,000
  observed ratings (12 batches an epoch, 1000 steps, same objective and lr): what batch noise
  does to each preset's trigger.
* ``ml-100k``: ``train --recipe models/ml-100k-biased-mf-flowadam.toml`` (split u1, early stopping,
  refit) with ``--preset E``, ``--preset B``, the recipe's own ``A`` and ``--optimizer adam``.
* ``jester``: ``train --recipe models/jester-4-biased-mf.toml`` likewise.

Synthetic sections run in this process over ``--seeds`` seeds (mean +- std); the recipes run
as ``recsys-flowadam train`` processes with one thread (seed 0). Gradient evaluations are exact.
Two times: wall-clock seconds of the training (synthetic: the optimizer steps; recipes: the
training loop's ``train_seconds``, early stopping and refit included) and CPU seconds (synthetic:
the same runs; recipes: the whole process, about 3 s of it start-up, loading and evaluation).
With one torch thread the CPU time is the steadier figure on a machine other processes share.

    RECSYS_FLOWADAM_DATA=/path/to/datasets python bench/bench_flowadam_presets.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
LR, LAMBDA = 0.01, 1e-5
SECTIONS = ("matrix", "minibatch", "ml-100k", "jester")


def optimizers() -> list[tuple[str, str, dict[str, Any]]]:
    """(label, registry name, options) of the contenders: E, the paper's B with dopri5, Adam."""
    from recsys_flowadam.reproduce.protocols import FLOWADAM_B

    return [("FlowAdam E (everyday)", "flowadam", {"mode": "E"}),
            ("FlowAdam B (dopri5)", "flowadam", dict(FLOWADAM_B)),
            ("Adam", "adam", {})]


def _row(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean (and std over seeds) of a contender's runs."""
    rmse = [r["rmse"] for r in runs]
    return {"label": label, "rmse": statistics.mean(rmse), "sd": statistics.stdev(rmse) if len(rmse) > 1 else 0.0,
            "evals": statistics.mean(r["evals"] for r in runs), "seconds": statistics.mean(r["seconds"] for r in runs),
            "cpu": statistics.mean(r["cpu"] for r in runs),
            "triggers": statistics.mean(r.get("triggers", 0) for r in runs),
            "steps": statistics.mean(r["steps"] for r in runs)}


# ------------------------------------------------------------------------- synthetic, full batch


def matrix_section(seeds: list[int], steps: int) -> dict[str, list[dict[str, Any]]]:
    """Full-batch runs of the three contenders on each matrix-completion scenario."""
    from recsys_flowadam.reproduce.experiments import ExperimentOptions, matrix_scenarios
    from recsys_flowadam.reproduce.runner import RunSpec, run_one

    out = {}
    for scenario in matrix_scenarios(ExperimentOptions(device="cpu", progress=False)):
        tasks = {seed: scenario.build(seed, False) for seed in seeds}
        for _, name, kwargs in optimizers():  # untimed: first calls (lazy imports, allocations) for every contender
            run_one(tasks[seeds[0]], RunSpec(name, LR, LAMBDA, kwargs, steps=30), seeds[0], eval_every=30)
        rows = []
        for label, name, kwargs in optimizers():
            runs = []
            for seed in seeds:
                cpu = time.process_time()
                res = run_one(tasks[seed], RunSpec(name, LR, LAMBDA, kwargs, steps=steps), seed, eval_every=steps)
                runs.append({"rmse": res.scores["test"], "evals": res.grad_evals, "seconds": res.seconds,
                             "cpu": time.process_time() - cpu, "steps": res.steps,
                             "triggers": res.diagnostics.get("ode_triggers", 0)})
            rows.append(_row(label, runs))
        out[f"matrix {scenario.key} ({scenario.label})"] = rows
    return out


# ---------------------------------------------------------------------- synthetic, mini-batch


def _minibatch_run(task: Any, name: str, kwargs: dict[str, Any], seed: int, steps: int, batch: int) -> dict:
    """One mini-batch run on a reproduce task: autograd on the batch's gathered rows."""
    from recsys_flowadam.models import init_params
    from recsys_flowadam.optim import count_closure, make_optimizer

    coords = task.train
    params = init_params(task.spec, init_std=task.init_std, generator=torch.Generator().manual_seed(seed),
                         device="cpu", dtype=torch.float32)
    u, v = params["user_factors"].requires_grad_(True), params["item_factors"].requires_grad_(True)
    opt = make_optimizer(name, [u, v], LR, **kwargs)
    index = [torch.arange(0)]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        i = index[0]
        pred = (u[coords.users[i]] * v[coords.items[i]]).sum(1)
        loss = (pred - coords.values[i]).pow(2).mean() + LAMBDA * (u.pow(2).sum() + v.pow(2).sum())
        loss.backward()
        return loss

    counted, gen, done = count_closure(closure), torch.Generator().manual_seed(10_000 + seed), 0
    t0, cpu = time.perf_counter(), time.process_time()
    while done < steps:
        perm = torch.randperm(len(coords.values), generator=gen)
        for start in range(0, len(perm) - batch + 1, batch):
            index[0] = perm[start : start + batch]
            opt.step(counted)
            done += 1
            if done == steps:
                break
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu
    diag = getattr(opt, "diagnostics", dict)()
    return {"rmse": task.score_test({"user_factors": u, "item_factors": v})["test"], "evals": counted.calls,
            "seconds": seconds, "cpu": cpu, "steps": done, "triggers": diag.get("ode_triggers", 0)}


def minibatch_section(seeds: list[int], steps: int, batch: int) -> dict[str, list[dict[str, Any]]]:
    """Mini-batch runs of the three contenders on the medium scenario."""
    from recsys_flowadam.reproduce.experiments import ExperimentOptions, matrix_scenarios

    (scenario,) = matrix_scenarios(ExperimentOptions(device="cpu", progress=False), ("medium",))
    tasks = {seed: scenario.build(seed, False) for seed in seeds}
    for _, name, kw in optimizers():  # untimed warm-up, as in matrix_section
        _minibatch_run(tasks[seeds[0]], name, kw, seeds[0], 30, batch)
    rows = [_row(label, [_minibatch_run(tasks[s], name, kw, s, steps, batch) for s in seeds])
            for label, name, kw in optimizers()]
    return {f"matrix medium, mini-batches of {batch} ({scenario.label})": rows}


# ------------------------------------------------------------------------------ real recipes


def recipe_section(title: str, recipe: Path, data_dir: str | None) -> dict[str, list[dict[str, Any]]]:
    """``train --recipe`` with each contender (and the recipe's own preset), one process each."""
    variants = [("FlowAdam E (everyday)", ["--preset", "E"]), ("FlowAdam B (dopri5)", ["--preset", "B"]),
                ("FlowAdam A (the recipe's)", []), ("Adam", ["--optimizer", "adam"])]
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (label, flags) in enumerate(variants):
            cmd = [sys.executable, "-m", "recsys_flowadam", "train", "--recipe", str(recipe), *flags, "--threads", "1",
                   "--device", "cpu", "--out", f"{tmp}/run{k}", "--json"]
            if data_dir:
                cmd += ["--data-dir", data_dir]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            if proc.returncode != 0:
                print(f"{title}: {label} failed: {proc.stderr.strip()[-400:]}", file=sys.stderr)
                continue
            s = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(_row(label, [{"rmse": s["test_rmse"], "evals": s["grad_evals"], "seconds": s["train_seconds"],
                                      "cpu": cpu, "steps": s["steps"], "triggers": s.get("ode_triggers", 0)}]))
    return {title: rows}


# ------------------------------------------------------------------------------------ output


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    """One markdown table: test RMSE, gradient evaluations, times, ODE triggers, steps."""
    print(f"\n**{title}**\n")
    print("| optimizer | test RMSE | grad evals | wall s | CPU s | ODE triggers | steps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rmse = f"{r['rmse']:.4f}" + (f" ± {r['sd']:.4f}" if r["sd"] else "")
        print(f"| {r['label']} | {rmse} | {r['evals']:.0f} | {r['seconds']:.1f} | {r['cpu']:.1f} | {r['triggers']:.0f} "
              f"| {r['steps']:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the synthetic sections (0..N-1)")
    ap.add_argument("--steps", type=int, default=1000, help="steps of the synthetic sections")
    ap.add_argument("--batch", type=int, default=2000, help="mini-batch size of the minibatch section")
    ap.add_argument("--data-dir", default=os.environ.get("RECSYS_FLOWADAM_DATA"))
    ap.add_argument("--json", help="also write every row to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    print(f"torch {torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.1f}; seeds {seeds}; "
          f"lr {LR}, objective loss + {LAMBDA} ||theta||^2 (synthetic)", flush=True)
    t0, tables = time.perf_counter(), {}
    for section in args.sections:
        if section == "matrix":
            part = matrix_section(seeds, args.steps)
        elif section == "minibatch":
            part = minibatch_section(seeds, args.steps, args.batch)
        else:
            name = "ml-100k-biased-mf-flowadam.toml" if section == "ml-100k" else "jester-4-biased-mf.toml"
            title = "ML-100K u1" if section == "ml-100k" else "Jester-4"
            part = recipe_section(f"{title}, models/{name}", ROOT / "models" / name, args.data_dir)
        for title, rows in part.items():
            print_table(title, rows)
        tables.update(part)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(tables, indent=1))


if __name__ == "__main__":
    main()
