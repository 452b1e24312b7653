#!/usr/bin/env bash
# Every GPU figure and check, in one pass sized for a short lease on a lent machine.
#   bash benchmarks/gpu_session.sh OUT_DIR [BANDWIDTH_BYTES_PER_S]
# Needs the checkpoints of `python benchmarks/gpu_model_check.py --make .gpu/ckpt`
# beside it (built on CPU; the machine cannot download). Installs nothing: the package
# is put on PYTHONPATH in the layout pip would give it (kernels -> compress.kernels).
set -uo pipefail
out=${1:?output directory}
bandwidth=${2:-4.8e12}
mkdir -p "$out" /tmp/site
cp -r compress /tmp/site/ && cp -r kernels /tmp/site/compress/kernels \
  && cp -r evals /tmp/site/compress/evals
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 130 python benchmarks/triton_gpu_check.py --budget-s 100 --json "$out/triton_gpu_check.json" \
  2>&1 | tee "$out/check.log"
timeout 45 python benchmarks/gpu_model_check.py .gpu/ckpt --json "$out/gpu_model_check.json" \
  2>&1 | tee "$out/model.log"
timeout 230 python benchmarks/kernels_gpu.py --sweep --budget-s 200 --bandwidth "$bandwidth" \
  --json "$out/kernels_gpu.json" 2>&1 | tee "$out/bench.log"
