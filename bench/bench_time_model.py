"""time-mf (biased MF + time-binned item biases + user drift) on ML-100K: every figure of the
time-aware section of models/README.md in one command.

Parts (``--parts``, default all):

- ``speed``: seconds per full-batch gradient (dense and sparse) and per mini-batch gradient
  (batch 10,000) of biased-mf and time-mf on the temporal split's training part (rank 100).
- ``temporal``: the biased-mf recipe and the time-aware recipe with ``--split temporal``, seeds
  0..2: validation and test RMSE (``recsys-flowadam train --json``).
- ``cv``: both recipes on the canonical folds u1..u5 (``recsys-flowadam cv --json``), mean test RMSE
  (time-mf with ``--bias-reg 0.01``, the setting validated on u1).
- ``flowadam``: the time-aware recipe's objective under FlowAdam preset E (default), preset B and
  Adam on the temporal split: lr chosen on validation (seed 0) over a small grid, then seeds
  0..2 at that lr: test RMSE mean +- std, gradient evaluations, training seconds.

    RECSYS_FLOWADAM_DATA=/work/shared/datasets python bench/bench_time_model.py [--parts speed,temporal]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIASED = ROOT / "models" / "ml-100k-biased-mf-flowadam.toml"
TIME_AWARE = ROOT / "models" / "ml-100k-time-aware.toml"
SEEDS = (0, 1, 2)
LR_GRID = (0.005, 0.01, 0.02, 0.05)
OPTIMIZERS = {"flowadam-E": ["--optimizer", "flowadam"], "flowadam-B": ["--optimizer", "flowadam", "--preset", "B"],
              "adam": ["--optimizer", "adam"]}


def cli_json(args: list[str]) -> dict:
    """Run ``recsys-flowadam ARGS --json`` and return its JSON summary."""
    out = subprocess.run([sys.executable, "-m", "recsys_flowadam", *args, "--json"], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out[out.index("{"):out.rindex("}") + 1])


def train(recipe: Path, *extra: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return cli_json(["train", "--recipe", str(recipe), "--out", str(Path(tmp) / "m"), *extra])


def part_speed() -> dict:
    """Milliseconds per gradient, median of 20 calls after 3 warm-up calls; the two models' calls
    alternate, so a shared machine's load weighs on both alike."""
    import torch

    from recsys_flowadam.models import init_params, make_path
    from recsys_flowadam.train.config import DataConfig, TrainConfig
    from recsys_flowadam.train.pipeline import load_split
    from recsys_flowadam.train.problem import build_problem

    _r, split, _ = load_split(DataConfig(dataset="ml-100k", split="temporal"), 0)
    problems = {m: build_problem(split.train, TrainConfig(model=m, rank=100, reg=0.1, device="cpu"),
                                 torch.device("cpu")) for m in ("biased-mf", "time-mf")}
    batch = torch.randperm(len(split.train), generator=torch.Generator().manual_seed(0))[:10_000]
    out = {}
    for rep in ("dense", "sparse", "minibatch"):
        calls = {}
        for m, pr in problems.items():
            path = make_path(rep, pr.spec, pr.coords, pr.objective)
            params = init_params(pr.spec, generator=torch.Generator().manual_seed(0))
            args = (params, pr.coords.select(batch)) if rep == "minibatch" else (params,)
            calls[m] = (path, args)
        times: dict[str, list[float]] = {m: [] for m in calls}
        for k in range(23):
            for m, (path, args) in calls.items():
                t0 = time.perf_counter()
                path.loss_and_grad(*args)
                if k >= 3:
                    times[m].append(time.perf_counter() - t0)
        for m, ts in times.items():
            out[f"{m}/{rep}"] = round(statistics.median(ts) * 1e3, 2)
    print("ms per gradient:", out, flush=True)
    return out


def part_temporal() -> dict:
    out = {}
    for label, recipe in (("biased-mf", BIASED), ("time-mf", TIME_AWARE)):
        runs = [train(recipe, "--split", "temporal", "--seed", str(s)) for s in SEEDS]
        out[label] = {"val_rmse": [r["val_rmse"] for r in runs], "test_rmse": [r["test_rmse"] for r in runs],
                      "test_mean": statistics.mean(r["test_rmse"] for r in runs)}
        print("temporal", label, out[label], flush=True)
    return out


def part_cv() -> dict:
    """Both recipes on u1..u5 (time-mf with bias_reg 0.01, its u1-validated setting)."""
    out = {}
    for label, recipe, extra in (("biased-mf", BIASED, []), ("time-mf", TIME_AWARE, ["--bias-reg", "0.01"])):
        rep = cli_json(["cv", "--recipe", str(recipe), *extra, "--folds", "u1,u2,u3,u4,u5"])
        out[label] = {"test_rmse": rep["test_rmse"], "folds": [f["test_rmse"] for f in rep["per_fold"]],
                      "seconds": rep["seconds"]}
        print("cv", label, out[label], flush=True)
    return out


def part_flowadam(lr_grid: tuple[float, ...] = LR_GRID) -> dict:
    out = {}
    for label, flags in OPTIMIZERS.items():
        grid = {lr: train(TIME_AWARE, "--split", "temporal", *flags, "--lr", str(lr))["val_rmse"] for lr in lr_grid}
        lr = min(grid, key=grid.get)
        runs = [train(TIME_AWARE, "--split", "temporal", *flags, "--lr", str(lr), "--seed", str(s)) for s in SEEDS]
        test = [r["test_rmse"] for r in runs]
        out[label] = {"val_by_lr": grid, "lr": lr, "test_mean": statistics.mean(test),
                      "test_std": statistics.stdev(test),
                      "grad_evals": statistics.mean(r["grad_evals"] for r in runs),
                      "train_seconds": statistics.mean(r["train_seconds"] for r in runs)}
        print("optimizer", label, out[label], flush=True)
    return out


PARTS = {"speed": part_speed, "temporal": part_temporal, "cv": part_cv, "flowadam": part_flowadam}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    parser.add_argument("--lr-grid", default=",".join(map(str, LR_GRID)), help="flowadam part: the lr grid")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    grid = tuple(float(x) for x in args.lr_grid.split(","))
    figures = {name: part_flowadam(grid) if name == "flowadam" else PARTS[name]() for name in args.parts.split(",")}
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
