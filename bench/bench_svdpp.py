"""SVD++ on ML-100K: the shipped recipe on the canonical folds, and FlowAdam's place for SVD++.
``--recipe models/ml-100k-time-svdpp.toml`` does the same for time-svdpp (SVD++ with time-mf's
moving biases).

Part ``cv``: ``cross_validate`` (what ``recsys-flowadam cv`` runs) with ``--recipe`` (default
``models/ml-100k-svdpp.toml``) and with ``models/ml-100k-biased-mf-flowadam.toml`` on the same folds: test
RMSE per fold and the mean (target for the best ML-100K recipe: <= 0.905), seconds per fold, and
the recipe's time over biased MF's.

Part ``optimizers``: on u1 with the SVD++ recipe's objective, FlowAdam preset E (the default),
preset B (the paper's, dopri5) and Adam. Each one's learning rate is chosen on u1's validation
part (seed 0, the first run's validation RMSE; never the test part) over a small grid, which is
extended while the best rate sits at its edge; then ``--seeds`` seeds at that rate, run as the
recipe says (refit included): test RMSE mean +- std, gradient evaluations and seconds per run.

    RECSYS_FLOWADAM_DATA=/work/shared/datasets python bench/bench_svdpp.py \\
        [--parts cv,optimizers] [--folds u1..u5] [--seeds 5] [--only LABEL ...] [--threads 1] [--json FILE]

On the 2-core box the cv part takes 1-2.5 minutes, FlowAdam E and Adam about 4 minutes together
(5 seeds), preset B about 25 minutes with 3 seeds (24k gradient evaluations per run): the README
table came from ``--only "FlowAdam E" Adam --seeds 5`` and ``--only "FlowAdam B" --seeds 3``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RMSE_TARGET = 0.905
OPTIMIZERS = {  # label -> (settings over the recipe's, starting learning-rate grid)
    "FlowAdam E": ({"optimizer": "flowadam", "preset": "E"}, [0.005, 0.01, 0.02]),
    "FlowAdam B": ({"optimizer": "flowadam", "preset": "B"}, [0.005, 0.01, 0.02]),
    "Adam": ({"optimizer": "adam", "optimizer_kwargs": {}}, [0.005, 0.01, 0.02]),  # the recipe's FlowAdam mode dropped
}


def run_cv(recipe: Path, folds: list[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """``cv``'s report for ``recipe`` with ``overrides`` on ``folds`` (in this process)."""
    from recsys_flowadam.train.config import split_settings
    from recsys_flowadam.train.crossval import cross_validate
    from recsys_flowadam.train.recipes import load_recipe

    config, data = split_settings({**load_recipe(recipe), "device": "cpu", **overrides})
    return cross_validate(data, config, folds)


def expand_folds(spec: str) -> list[str]:
    """``u1..u5`` -> [u1, ..., u5]; ``u1,u3`` -> [u1, u3]."""
    if ".." in spec:
        a, b = spec.split("..")
        return [f"u{k}" for k in range(int(a[1:]), int(b[1:]) + 1)]
    return spec.split(",")


def part_cv(args: argparse.Namespace) -> dict[str, Any]:
    folds = expand_folds(args.folds)
    out = {}
    from recsys_flowadam.train.recipes import load_recipe

    model = load_recipe(args.recipe)["model"]
    for name, recipe in ((model, args.recipe), ("biased-mf", args.baseline)):
        report = run_cv(recipe, folds, {})
        rows = report["per_fold"]
        out[name] = {"per_fold": [{k: r[k] for k in ("fold", "test_rmse", "test_mae", "val_rmse", "grad_evals",
                                                     "best_step", "seconds")} for r in rows],
                     "mean_test_rmse": statistics.fmean(r["test_rmse"] for r in rows),
                     "mean_seconds": statistics.fmean(r["seconds"] for r in rows)}
        line = " / ".join(f"{r['test_rmse']:.4f}" for r in rows)
        print(f"{name:9s} ({recipe.name}): test RMSE {line}, mean {out[name]['mean_test_rmse']:.4f}; "
              f"{out[name]['mean_seconds']:.1f} s per fold", flush=True)
    svd, bmf = out[model], out["biased-mf"]
    out["time_ratio"] = svd["mean_seconds"] / bmf["mean_seconds"]
    verdict = "met" if svd["mean_test_rmse"] <= RMSE_TARGET else "NOT met"
    print(f"{model} mean {svd['mean_test_rmse']:.4f} (target <= {RMSE_TARGET}: {verdict}) against biased MF "
          f"{bmf['mean_test_rmse']:.4f}; time per fold {out['time_ratio']:.1f}x biased MF's", flush=True)
    return out


def tune_lr(label: str, settings: dict[str, Any], grid: list[float], recipe: Path) -> tuple[float, list[dict]]:
    """The rate with the lowest u1 validation RMSE (seed 0, no refit: the validation figure is the
    first run's either way), the grid widened by a factor 2 while the best sits at an edge (3 times at most)."""
    grid, tried = sorted(grid), {}
    for _ in range(4):
        for lr in grid:
            if lr not in tried:
                row = run_cv(recipe, ["u1"], {**settings, "lr": lr, "seed": 0, "refit": False})["per_fold"][0]
                tried[lr] = {"lr": lr, "val_rmse": row["val_rmse"], "grad_evals": row["grad_evals"],
                             "seconds": row["seconds"]}
                print(f"  {label} lr {lr:g}: val RMSE {row['val_rmse']:.4f}, {row['grad_evals']} grad evals, "
                      f"{row['seconds']:.1f} s", flush=True)
        best = min(tried, key=lambda lr: tried[lr]["val_rmse"])
        if best == grid[0]:
            grid = [best / 2, *grid]
        elif best == grid[-1]:
            grid = [*grid, best * 2]
        else:
            break
    return best, [tried[lr] for lr in sorted(tried)]


def part_optimizers(args: argparse.Namespace) -> dict[str, Any]:
    table = {}
    for label, (settings, grid) in OPTIMIZERS.items():
        if args.only and label not in args.only:
            continue
        lr, tuning = tune_lr(label, settings, grid, args.recipe)
        runs = []
        for seed in range(args.seeds):
            row = run_cv(args.recipe, ["u1"], {**settings, "lr": lr, "seed": seed})["per_fold"][0]
            runs.append({"seed": seed, "test_rmse": row["test_rmse"], "val_rmse": row["val_rmse"],
                         "best_step": row["best_step"], "grad_evals": row["grad_evals"],
                         "ode_triggers": row["ode_triggers"], "seconds": row["seconds"],
                         "refit_restored": row.get("refit_restored")})
            print(f"    seed {seed}: test RMSE {row['test_rmse']:.4f} (val {row['val_rmse']:.4f}, best step "
                  f"{row['best_step']}), {row['grad_evals']} grad evals, {row['seconds']:.1f} s", flush=True)
        rmse = [r["test_rmse"] for r in runs]
        table[label] = {"lr": lr, "tuning": tuning, "runs": runs, "test_rmse_mean": statistics.fmean(rmse),
                        "test_rmse_std": statistics.stdev(rmse) if len(rmse) > 1 else 0.0,
                        "grad_evals_mean": statistics.fmean(r["grad_evals"] for r in runs),
                        "seconds_mean": statistics.fmean(r["seconds"] for r in runs)}
        t = table[label]
        print(f"{label}: lr {lr:g}, test RMSE {t['test_rmse_mean']:.4f} +- {t['test_rmse_std']:.4f} "
              f"({args.seeds} seeds), {t['grad_evals_mean']:.0f} grad evals, {t['seconds_mean']:.1f} s per run",
              flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="cv,optimizers", help="comma list of: cv, optimizers")
    parser.add_argument("--recipe", type=Path, default=ROOT / "models" / "ml-100k-svdpp.toml")
    parser.add_argument("--baseline", type=Path, default=ROOT / "models" / "ml-100k-biased-mf-flowadam.toml")
    parser.add_argument("--folds", default="u1..u5")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="optimizer labels to run (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    print(f"load average {os.getloadavg()[0]:.1f}, {args.threads} torch thread(s)", flush=True)
    out: dict[str, Any] = {}
    if "cv" in parts:
        out["cv"] = part_cv(args)
    if "optimizers" in parts:
        out["optimizers"] = part_optimizers(args)
    out["wall_seconds"] = time.perf_counter() - t0
    print(f"wall {out['wall_seconds']:.0f} s, load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
