"""ML-100K canonical folds u1..u5 with `recsys-flowadam cv` (one process): test RMSE per fold and
the mean (quality bar: mean <= 0.915), per-fold and total time, against Surprise SVD's 5 folds.

`cv` loads the data and starts torch once; each fold trains on uK.base (validation carved from it
by the data layer, used for early stopping only; hyper-parameters were tuned on u1's validation
part, see models/README.md) and is scored on uK.test with predictions clipped to 1..5.

Surprise is optional and never a project dependency: it is used when `surprise` imports here, or
with --surprise-python naming an interpreter that has it (e.g. a venv made with
`python -m venv /tmp/peers-venv && /tmp/peers-venv/bin/pip install scikit-surprise`). Its SVD runs
with its defaults (100 factors, 20 epochs, biased) on the same uK.base/uK.test files. Both sides
run as a command from start to finish (wall: what a user waits for, Python start-up and imports
included); the folds' times count fitting and scoring only. Target: wall ratio <= 2.

`cv` runs two folds at a time on a machine with two cores or more (``--extra='--jobs 1'``: one at
a time); this script runs Surprise's folds one after the other, as its ``cross_validate`` does by
default (``n_jobs=1``).

    RECSYS_FLOWADAM_DATA=/work/shared/datasets python bench/bench_ml100k_folds.py \\
        [--recipe FILE] [--surprise-python /tmp/peers-venv/bin/python]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RMSE_BAR = 0.915
WALL_RATIO_BAR = 2.0

# run by the Surprise interpreter: argv = folder holding uK.base/uK.test, comma list of folds, seed
SURPRISE_SCRIPT = """
import json, sys, time
start = time.perf_counter()
from surprise import SVD, Dataset, Reader, accuracy
from surprise.model_selection import PredefinedKFold
folder, folds, seed = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
data = Dataset.load_from_folds([(f"{folder}/{f}.base", f"{folder}/{f}.test") for f in folds], Reader("ml-100k"))
rows = []
for fold, (train, test) in zip(folds, PredefinedKFold().split(data)):
    t0 = time.perf_counter()
    algo = SVD(random_state=seed)
    algo.fit(train)
    predictions = algo.test(test)
    rows.append({"fold": fold, "rmse": accuracy.rmse(predictions, verbose=False),
                 "mae": accuracy.mae(predictions, verbose=False), "seconds": time.perf_counter() - t0})
print(json.dumps({"per_fold": rows, "in_process_seconds": time.perf_counter() - start}))
"""


def timed(cmd: list[str], what: str) -> tuple[dict, float]:
    """Run ``cmd`` (which prints one JSON object); ``(that object, wall seconds)``."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{what} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout), wall


def run_ours(args: argparse.Namespace, tmp: str) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "recsys_flowadam", "cv", "--recipe", args.recipe, "--folds", args.folds,
           "--seed", str(args.seed), "--threads", str(args.threads), "--device", "cpu", "--json",
           "--out", f"{tmp}/cv.json", *args.extra.split()]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    return timed(cmd, "recsys-flowadam cv")


def print_ours(report: dict, wall: float) -> float:
    """Print our rows and totals; return the folds' time (from the first fold's start to the last
    one's end: the sum of the per-fold seconds when they run one at a time, less when they overlap)."""
    for r in report["per_fold"]:
        print(f"  {r['fold']}: test RMSE {r['test_rmse']:.4f}  MAE {r['test_mae']:.4f}  val RMSE {r['val_rmse']:.4f}  "
              f"steps {r['steps']} (best {r['best_step']})  grad_evals {r['grad_evals']}  "
              f"ode_triggers {r['ode_triggers']}  {r['seconds']:.2f} s (training {r['train_seconds']:.2f} s)")
    folds_s = report["total_seconds"] - report["load_seconds"] - report["warm_up_seconds"]
    rmse, mae = report["test_rmse"], report["test_mae"]
    print(f"  mean test RMSE {rmse['mean']:.4f} ± {rmse['std'] or 0:.4f} (MAE {mae['mean']:.4f}) over "
          f"{report['n_folds']} folds; bar <= {RMSE_BAR}")
    at_once = report.get("jobs", 1)
    print(f"  time: folds {folds_s:.2f} s, {at_once} at a time ({report['seconds']['mean']:.2f} ± "
          f"{report['seconds']['std'] or 0:.2f} s per fold), data load {report['load_seconds']:.2f} s, "
          f"torch warm-up {report['warm_up_seconds']:.2f} s, "
          f"wall {wall:.2f} s (Python start-up and imports included)")
    return folds_s


def surprise_python(args: argparse.Namespace) -> str | None:
    """The interpreter to run Surprise with, or None (not available)."""
    if args.surprise_python:
        return args.surprise_python
    return sys.executable if importlib.util.find_spec("surprise") is not None else None


def run_surprise(python: str, args: argparse.Namespace, folds: list[str]) -> tuple[float, float] | None:
    """Surprise SVD on the same folds; print its rows; ``(sum of per-fold seconds, wall)``."""
    folder = Path(args.data_dir or ROOT / "datasets") / "ml-100k"
    out, wall = timed([python, "-c", SURPRISE_SCRIPT, str(folder), ",".join(folds), str(args.seed)], "Surprise SVD")
    for r in out["per_fold"]:
        print(f"  {r['fold']}: test RMSE {r['rmse']:.4f}  MAE {r['mae']:.4f}  {r['seconds']:.2f} s")
    folds_s = sum(r["seconds"] for r in out["per_fold"])
    print(f"  mean test RMSE {statistics.fmean(r['rmse'] for r in out['per_fold']):.4f}; time: folds {folds_s:.2f} s, "
          f"wall {wall:.2f} s")
    return folds_s, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "models" / "ml-100k-biased-mf.toml"))
    ap.add_argument("--folds", default="u1,u2,u3,u4,u5", help="canonical folds (Surprise runs the same ones)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--extra", default="", help="extra cv flags, e.g. --extra='--optimizer adam'")
    ap.add_argument("--data-dir", default=os.environ.get("RECSYS_FLOWADAM_DATA"))
    ap.add_argument("--surprise-python", help="a Python interpreter that has scikit-surprise (optional)")
    args = ap.parse_args()
    print(f"recsys-flowadam cv, recipe {args.recipe} {args.extra}".rstrip())
    with tempfile.TemporaryDirectory() as tmp:
        report, wall = run_ours(args, tmp)
    folds_s = print_ours(report, wall)
    python = surprise_python(args)
    if python is None:
        print("Surprise SVD: not installed here (pass --surprise-python PATH to compare)")
    elif not all(f in ("u1", "u2", "u3", "u4", "u5", "ua", "ub") for f in report["folds"]):
        print("Surprise SVD: compared on the canonical folds only")
    else:
        print(f"Surprise SVD (defaults), {python}")
        theirs_folds, theirs_wall = run_surprise(python, args, report["folds"])
        ratio = wall / theirs_wall
        print(f"ratio ours / Surprise: wall {ratio:.2f}x (target <= {WALL_RATIO_BAR:g}x: "
              f"{'met' if ratio <= WALL_RATIO_BAR else 'not met'}), folds only {folds_s / theirs_folds:.2f}x")
    rmse_ok = report["test_rmse"]["mean"] <= RMSE_BAR
    print(f"mean RMSE <= {RMSE_BAR}: {'met' if rmse_ok else 'not met'}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
