#!/usr/bin/env bash
# GPU check for the models/trainer: run on a machine with an NVIDIA GPU and a CUDA build of torch.
#   1. the CUDA-marked tests (fast paths vs autograd on the GPU, CUDA optimizer tests),
#   2. GPU timings of the full-batch gradient paths on the Jester-1-sized problem
#      (25,000 x 100, 72% observed, rank 20) and a sparser, larger one,
#   3. GPU timings of one mini-batch step (100k ratings, rank 20, 62k x 10k; both scatter methods,
#      and autograd),
#   4. an end-to-end `train` on a synthetic Jester-1-sized problem with --device cuda, and one
#      that takes the automatic mini-batch path (5M generated ratings),
#   5. bench_scale.py's generated 25M-rating problem with train's defaults on the GPU (default
#      optimizer and Adam; peers are CPU libraries and are left out here).
# Every figure is printed; paste them into the issue note. Exits non-zero without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device (torch %s, built for CUDA %s)" % (torch.__version__, torch.version.cuda))
print("torch", torch.__version__, "CUDA", torch.version.cuda, "device:", torch.cuda.get_device_name(0))
PY

echo "== CUDA-marked tests"
python -m pytest -m cuda -q -rs -p no:cacheprovider

echo "== gradient paths on the GPU: Jester-1 size (25k x 100, 72%, rank 20)"
python bench/bench_gradients.py --device cuda --repeats 50
echo "== gradient paths on the GPU: 100k x 20k, 0.5% observed (10M ratings), rank 64 (no dense grid needed for sparse)"
python bench/bench_gradients.py --device cuda --users 100000 --items 20000 --density 0.005 --rank 64 \
    --repeats 20 --paths sparse,dense

echo "== one mini-batch step on the GPU: 62k x 10k, batch 100k, rank 20 (gradient + Adam)"
python bench/bench_minibatch_step.py --device cuda --repeats 100

echo "== end-to-end train on the GPU (synthetic 25k x 100, FlowAdam, 300 steps)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python -m recsys_flowadam train --dataset synthetic --data-option n_users=25000 --data-option n_items=100 \
    --data-option rank=20 --data-option density=0.72 --data-option noise=0.1 --model mf --rank 20 \
    --optimizer flowadam --lr 0.01 --steps 300 --patience 0 --device cuda --out "$tmp/art" --json

echo "== end-to-end train on the GPU, automatic path (synthetic 50k x 2k, 5% observed, 70% train: 3.5M training ratings -> mini-batches)"
python -m recsys_flowadam train --dataset synthetic --data-option n_users=50000 --data-option n_items=2000 \
    --data-option rank=10 --data-option density=0.05 --data-option noise=0.1 --model biased-mf --rank 20 \
    --optimizer adam --lr 0.01 --steps 400 --device cuda --out "$tmp/auto" --json

echo "== 25M generated ratings, train's defaults on the GPU (bench_scale.py; default optimizer and Adam)"
python bench/bench_scale.py --size 25m --out "$tmp/scale" --no-trace --only ours-default-set,ours-adam-set \
    --ours-set device=cuda
