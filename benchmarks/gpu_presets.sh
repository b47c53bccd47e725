#!/usr/bin/env bash
# Issue 20's GPU figures in one short run: decode_bench.py and train_bench.py with --preset gpu
# (7B-shaped, randomly initialised Llama in bf16), each under its own time limit, their output
# and the device's description written to $OUT (default: ./gpu-out). Record the figures in
# BENCHMARKS.md with this command and the device line.
#
#   bash benchmarks/gpu_presets.sh             # on a machine with CUDA and this repository
#   DRY_RUN=1 bash benchmarks/gpu_presets.sh   # the plumbing on any machine: tiny sizes
#
# What it needs besides torch, transformers, peft, accelerate, safetensors, pyarrow, numpy, tqdm
# and pyyaml: pydantic (the run config) and prefect (the reference-pass stage that train_bench
# builds its inputs with). A machine that cannot reach a package index takes them as wheels in
# .whl/ at the repository's root, made beforehand on a machine that can, for the other machine's
# Python (here 3.12) and platform, e.g.:
#   python3 -m pip download --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#     -c constraints.txt -d .whl prefect pydantic pyyaml      # about 40 MB
# (keep .whl/ out of git: echo /.whl/ >> .git/info/exclude)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
DECODE_LIMIT=${DECODE_LIMIT:-300}
TRAIN_LIMIT=${TRAIN_LIMIT:-240}
mkdir -p "$OUT"

if ! "$PY" -c "import pydantic, prefect" 2>/dev/null; then
  if [ -d .whl ]; then
    "$PY" -m pip install --quiet --no-index --find-links .whl prefect pydantic pyyaml > "$OUT/install.txt" 2>&1 \
      || { echo "installing the wheels in .whl/ failed: $OUT/install.txt"; exit 1; }
  else
    echo "pydantic and prefect are missing and there is no .whl/ to install them from (see this script's header)"
    exit 1
  fi
fi
# the repository's own package: alignheads/ links the top-level folders into it
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
  date -u
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} > "$OUT/device.txt" 2>&1

if [ -n "${DRY_RUN:-}" ]; then
  # the GPU presets' 7B-shaped bf16 layer is far too slow on a CPU: the CPU preset's dry run stands in for decoding
  decode=(benchmarks/decode_bench.py --dry-run)
  train=(benchmarks/train_bench.py --preset gpu --dry-run)
else
  decode=(benchmarks/decode_bench.py --preset gpu)
  train=(benchmarks/train_bench.py --preset gpu)
fi
status=0
timeout "$DECODE_LIMIT" "$PY" "${decode[@]}" > "$OUT/decode_gpu.txt" 2>&1 || { echo "decode_bench: exit $?"; status=1; }
timeout "$TRAIN_LIMIT" "$PY" "${train[@]}" > "$OUT/train_gpu.txt" 2>&1 || { echo "train_bench: exit $?"; status=1; }
for f in device decode_gpu train_gpu; do
  echo "== $OUT/$f.txt"
  tail -n 40 "$OUT/$f.txt"
done
exit $status
