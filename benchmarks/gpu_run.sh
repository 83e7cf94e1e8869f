#!/usr/bin/env bash
# One short GPU session (an H200 here): correctness first, then the 1B training and decode
# benchmarks against transformers, each part under its own time limit so that a slow one cannot eat
# the others (about 7 minutes expected, 12 at most: each compiled decode shape of the 1B model takes
# about 110 s to compile). Uses the machine's own python3 with its torch and
# transformers; needs no network. Everything it prints is also written under $OUT (default ./gpu-out):
#   env.txt            nvidia-smi, torch / transformers versions
#   cuda_check.log     benchmarks/cuda_check.py: fp32 parity with CPU and transformers, bf16, grouped
#                      experts vs the loop (and no host sync), absorbed vs naive, fused SDPA kernels in training, engine greedy vs CPU
#   cuda_check.json    its figures
#   train.log          benchmarks/train.py, configs/bench-1b.json, 8 x 2048 tokens, bf16 autocast
#                      (SKIP_TRAIN=1 leaves it out when only decode or correctness changed)
#   decode.log         benchmarks/decode.py, configs/bench-1b.json, bf16, batch 1 and 32 at 512 context
#   summary.txt        the tables and verdict lines of the three, gathered at the end
#
#     bash benchmarks/gpu_run.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT/check"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
PY=${PYTHON:-python3}
CONFIG=configs/bench-1b.json

{
  nvidia-smi
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'transformers', transformers.__version__, 'grouped_mm', hasattr(torch, '_grouped_mm'))" 2>&1 || true
} > "$OUT/env.txt" 2>&1
tail -3 "$OUT/env.txt"

echo "== cuda_check (correctness) =="
timeout 130 $PY benchmarks/cuda_check.py --out "$OUT/check" --limit-s 120 --check-timeout-s 60 \
  --only parity_fp32 transformers_fp32 bf16 grouped_experts absorbed_vs_naive fused_attention engine_greedy \
  2>&1 | grep --line-buffered -v '^{' | tee "$OUT/cuda_check.log"
cp "$OUT/check/cuda_check.json" "$OUT/cuda_check.json" 2>/dev/null; rm -rf "$OUT/check"

echo "== train: bench-1b, bf16 autocast =="
[ -n "${SKIP_TRAIN:-}" ] && echo "skipped (SKIP_TRAIN set)" > "$OUT/train.log" || timeout 150 $PY benchmarks/train.py --device cuda --dtype bf16 --config $CONFIG --batch 8 --seq 2048 \
  --steps 4 --warmup 2 2>&1 | tee "$OUT/train.log"

echo "== decode: bench-1b, bf16 =="
timeout 420 $PY benchmarks/decode.py --device cuda --dtype bf16 --config $CONFIG \
  --shapes 1x512x128 32x512x64 --repeats 2 2>&1 | tee "$OUT/decode.log"

{
  echo "== cuda_check"; grep -E ' (PASS|FAIL|SKIP) |passed' "$OUT/cuda_check.log"
  echo "== train"; grep -vE '^\{' "$OUT/train.log" | tail -8
  echo "== decode"; grep -vE '^\{' "$OUT/decode.log" | tail -6
} > "$OUT/summary.txt" 2>&1
echo "==== summary"; cat "$OUT/summary.txt"
