#!/usr/bin/env bash
# The Python API (Recommender.fit) against the `train` command on the shipped ML-100K recipe
# (split u1), alternating N rounds while one busy process holds one of the machine's cores (the
# case where spinning OpenMP threads used to make library fits many times slower). Prints each
# run's training seconds and wall seconds, then the medians.
# Usage: bash bench/bench_python_vs_cli.sh [N]   (needs $RECSYS_FLOWADAM_DATA with ml-100k/)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-4}
out=$(mktemp -d)
python - <<'PY' > "$out/fit.py"
print('''import time, tomllib
import numpy as np
from recsys_flowadam import Recommender
from recsys_flowadam.data import load_dataset, split_ratings
recipe = tomllib.load(open("models/ml-100k-biased-mf-flowadam.toml", "rb"))
settings = {k: v for k, v in recipe.items() if k not in ("description", "dataset", "split")}
split = split_ratings(load_dataset("ml-100k"), "u1", seed=0)
rec = Recommender(**settings).fit(split.train, split.val)
t = split.test
rmse = np.sqrt(np.mean((rec.predict(t.user_ids[t.users], t.item_ids[t.items]) - t.values) ** 2))
print(f"python_train {rec.train_seconds_:.2f} test_rmse {rmse:.4f}")''')
PY
python -c "while True: pass" & busy=$!
trap 'kill $busy; rm -rf "$out"' EXIT
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for _ in $(seq "$N"); do
    /usr/bin/time -f "cli_wall %e" recsys-flowadam train --recipe models/ml-100k-biased-mf-flowadam.toml --split u1 \
        --out "$out/cli" --json 2>"$out/err" | python -c "import sys, json; d = json.load(sys.stdin); \
print(f\"cli_train {d['train_seconds']:.2f} test_rmse {d['test_rmse']:.4f}\")"
    tail -1 "$out/err"
    /usr/bin/time -f "python_wall %e" python "$out/fit.py"
done 2>&1 | tee "$out/log"
python - "$out/log" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    key, value = line.split()[:2]
    runs.setdefault(key, []).append(float(value))
for key, values in runs.items():
    print(f"median {key}: {statistics.median(values):.2f} s over {len(values)} runs")
PY
