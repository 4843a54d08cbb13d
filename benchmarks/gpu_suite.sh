#!/usr/bin/env bash
# The accelerator benchmarks in one go, for a short lease on a GPU machine:
#
#   bash benchmarks/gpu_suite.sh OUTDIR [PYTHON]
#
# 1. gpu_check.py: the trainer's real step (EtC on device, model, loss, backward,
#    optimiser) for ViT-B/16, ConvMixer-256/8 and ConvMixer-384/8, plain and EtC, with MFU
#    -> OUTDIR/gpu_check.json (and .txt);
# 2. bench_models.py: ViT-B/16 (batch 128) and ConvMixer-256/8 (batch 256) steps in JAX
#    and, side by side in a process of its own, PyTorch (eager, CUDA, autocast bf16)
#    -> OUTDIR/bench_models.txt.
# Each stage has its own time limit, so one that fails or hangs leaves the other's figures.
set -u -o pipefail
out=${1:?usage: gpu_suite.sh OUTDIR [PYTHON]}
py=${2:-python3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  | tee "$out/device.txt"
status=0
timeout 330 "$py" "$here/gpu_check.py" --out "$out/gpu_check.json" 2>&1 \
  | tee "$out/gpu_check.txt" || status=1
# JAX takes 75 % of GPU memory by default; leave room for the PyTorch process.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 timeout 200 "$py" "$here/bench_models.py" \
  --dtype bfloat16 --vit-model ViT-B_16 --vit-batch 128 --convmixer-batch 256 \
  --depthwise conv,shift --attention fused --steps 10 2>&1 \
  | tee "$out/bench_models.txt" || status=1
exit $status
