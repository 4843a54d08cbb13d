#!/usr/bin/env bash
# The accelerator checks in one go, for a short lease on a GPU machine (about 6 minutes on
# an H100 / H200 at the default STAGES; every stage has its own time limit, so one that
# fails or hangs leaves the others' outputs):
#
#   bash benchmarks/gpu_suite.sh OUTDIR [PYTHON]
#
# Default stages (STAGES="kernels profile convmixer vit"):
#   kernels    python -m etcjax.kernels.check: the Pallas depthwise kernels compiled for the
#              device (Triton; not interpret mode) against XLA's grouped conv, forward and
#              gradients, f32 and bf16; then one ConvMixer layer's fwd+bwd time for pallas
#              (default tiling and a small tiling sweep), conv and shift
#              -> OUTDIR/kernel_check.json, kernel_check.txt
#   profile    profile_step.py: jax.profiler traces of the trainer's step (ConvMixer-256/8
#              32x32 b256 and ConvMixer-384/8 224 b64, each with depthwise conv and pallas;
#              ViT-B/16 224 b128) and tables of the top ops by time
#              -> OUTDIR/profile/{profile.md,profile.json,*.hlo.txt.gz}, profile.txt
#   convmixer  bench_models.py: ConvMixer-256/8 step, batch 256, depthwise conv, shift and
#              pallas side by side -> OUTDIR/steps_convmixer.txt
#   vit        bench_models.py: ViT-B/16 steps at batch 256 (fused and flax attention), and
#              at batch 128 with XLA's latency-hiding scheduler on
#              -> OUTDIR/steps_vit_b256.txt, steps_vit_lhs.txt
# Optional stages (add to STAGES): gpu_check (the trainer's step with and without EtC,
# with MFU -> gpu_check.json / .txt; ~2 minutes) and torch (JAX beside PyTorch, as
# recorded on 2026-11-27 -> bench_models.txt; ~3 minutes).
set -u -o pipefail
out=${1:?usage: gpu_suite.sh OUTDIR [PYTHON]}
py=${2:-python3}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
stages=" ${STAGES:-kernels profile convmixer vit} "
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
status=0
want() { [[ $stages == *" $1 "* ]]; }
# run SECONDS LOGFILE COMMAND...: one stage, its output shown and kept.
run() {
  local limit=$1 log=$2
  shift 2
  echo "== $(date -u +%H:%M:%S) $* (limit ${limit}s)" | tee -a "$out/suite.log"
  timeout "$limit" "$@" 2>&1 | tee "$out/$log" || { status=1; echo "== failed: $log" \
    | tee -a "$out/suite.log"; }
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$py" -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1
  echo "git $(git -C "$root" rev-parse --short HEAD 2>/dev/null) $(date -u +%FT%TZ)"
} | tee "$out/device.txt"
if want kernels; then
  run 60 kernel_check.txt "$py" -m etcjax.kernels.check --out "$out/kernel_check.json" \
    --sweep 16x8,64x8,32x16,32x4x8,32x8x4x8
fi
if want profile; then
  run 140 profile.txt "$py" "$here/profile_step.py" --out "$out/profile" \
    --depthwise conv,pallas --steps 5
fi
if want convmixer; then
  run 60 steps_convmixer.txt "$py" "$here/bench_models.py" --models convmixer \
    --dtype bfloat16 --convmixer-batch 256 --depthwise conv,shift,pallas --layouts NHWC \
    --steps 10 --no-torch
fi
if want vit; then
  run 50 steps_vit_b256.txt "$py" "$here/bench_models.py" --models vit --dtype bfloat16 \
    --vit-model ViT-B_16 --vit-batch 256 --attention fused,flax --steps 10 --no-torch
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true" \
    run 40 steps_vit_lhs.txt "$py" "$here/bench_models.py" --models vit --dtype bfloat16 \
    --vit-model ViT-B_16 --vit-batch 128 --attention fused --steps 10 --no-torch
fi
if want gpu_check; then
  run 330 gpu_check.txt "$py" "$here/gpu_check.py" --out "$out/gpu_check.json"
fi
if want torch; then
  # JAX takes 75 % of GPU memory by default; leave room for the PyTorch process.
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 run 200 bench_models.txt "$py" "$here/bench_models.py" \
    --dtype bfloat16 --vit-model ViT-B_16 --vit-batch 128 --convmixer-batch 256 \
    --depthwise conv,shift --attention fused --steps 10
fi
echo "== $(date -u +%H:%M:%S) done, status $status" | tee -a "$out/suite.log"
exit $status
