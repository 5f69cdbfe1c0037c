"""ML-100K canonical folds u1..u5: test RMSE of the recipe's model (biased-mf + FlowAdam by
default), per fold and the mean (quality bar: mean <= 0.915; Surprise SVD gets 0.938).

Each fold trains on uK.base (validation carved from it by the data layer, used for early
stopping only; hyper-parameters were tuned on u1's validation part, see models/README.md)
and is scored on uK.test with predictions clipped to 1..5.

    RECSYS_FLOWADAM_DATA=/work/shared/datasets python bench/bench_ml100k_folds.py [--recipe FILE --seeds 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "models" / "ml-100k-biased-mf.toml"))
    ap.add_argument("--folds", default="u1,u2,u3,u4,u5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--extra", default="", help="extra train flags, e.g. --extra='--optimizer adam'")
    ap.add_argument("--data-dir", default=os.environ.get("RECSYS_FLOWADAM_DATA"))
    args = ap.parse_args()
    rmses, maes, secs = [], [], []
    print(f"recipe {args.recipe} {args.extra}".rstrip())
    with tempfile.TemporaryDirectory() as tmp:
        for fold in args.folds.split(","):
            cmd = [sys.executable, "-m", "recsys_flowadam", "train", "--recipe", args.recipe, "--split", fold,
                   "--seed", str(args.seed), "--threads", str(args.threads), "--device", "cpu",
                   "--out", f"{tmp}/{fold}", "--json", *args.extra.split()]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(f"{fold}: train failed ({proc.returncode}): {proc.stderr.strip()}")
            s = json.loads(proc.stdout)
            rmses.append(s["test_rmse"])
            maes.append(s["test_mae"])
            secs.append(wall)
            print(f"{fold}: test RMSE {s['test_rmse']:.4f}  MAE {s['test_mae']:.4f}  val RMSE {s['val_rmse']:.4f}  "
                  f"steps {s['steps']} (best {s['best_step']})  grad_evals {s['grad_evals']}  "
                  f"ode_triggers {s['ode_triggers']}  {wall:.1f} s", flush=True)
    print(f"mean test RMSE {statistics.mean(rmses):.4f} (MAE {statistics.mean(maes):.4f}) over {len(rmses)} folds; "
          f"bar <= 0.915 (Surprise SVD 0.938); {statistics.mean(secs):.1f} s per fold, "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
