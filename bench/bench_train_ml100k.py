"""End-to-end `train` on ML-100K (load, train to early stop with FlowAdam, evaluate, write
the artifact), timed as the user runs it: a fresh `recsys-flowadam` process per run.

Target: <= 15 s on the 2-core dev box. That box is shared, so the script prints every run
and the median; `--threads` is passed through (1 avoids oversubscription on a busy box).

    RECSYS_FLOWADAM_DATA=/work/shared/datasets python bench/bench_train_ml100k.py [--runs 3 --split u1]
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
    ap.add_argument("--split", default="u1")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=os.environ.get("RECSYS_FLOWADAM_DATA"))
    args = ap.parse_args()
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            cmd = [sys.executable, "-m", "recsys_flowadam", "train", "--recipe", args.recipe, "--split", args.split,
                   "--threads", str(args.threads), "--device", "cpu", "--out", f"{tmp}/run{run}", "--json"]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(f"train failed ({proc.returncode}): {proc.stderr.strip()}")
            s = json.loads(proc.stdout)
            walls.append(wall)
            print(f"run {run + 1}: wall {wall:6.2f} s (train loop {s['train_seconds']:.2f} s)  steps {s['steps']} "
                  f"grad_evals {s['grad_evals']} ode_triggers {s['ode_triggers']}  val {s['val_rmse']:.4f} "
                  f"test {s['test_rmse']:.4f}", flush=True)
    print(f"median end-to-end wall time: {statistics.median(walls):.2f} s over {args.runs} runs "
          f"(target <= 15 s; split {args.split}, threads {args.threads}, load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
