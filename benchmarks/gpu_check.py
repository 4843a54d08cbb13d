"""Device check for a GPU (or TPU) machine: training-step and EtC throughput, one JSON.

    python benchmarks/gpu_check.py --out gpu_check.json           # on the accelerator
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke.json  # tiny sizes, any CPU

It times the trainer's real jitted step (`etcjax.train.make_train_step`: on-device EtC
encryption in researcher mode, model, loss, backward, optimiser) on synthetic uint8
batches, for

  * ViT-B/16 at 224x224 (blocks of 16 = patches), SGD, the paper's fine-tuning step;
  * ConvMixer-256/8 (p=1, k=9) at 32x32 (blocks of 4) and ConvMixer-384/8 (p=4, k=9) at
    224x224 (blocks of 16), AdamW, the paper's from-scratch step;

each with `encryption="none"` and `"etc"` (the EtC cost is the difference), and the EtC
transform alone: the jitted on-device encryption of a 224x224 batch and the host NumPy
path the owner-side tools use. Per case: images/s, ms per step (best and median of
`--steps` after compile and warm-up), XLA's FLOP count of the compiled step, and MFU when
the device's peak is known (`--peak-tflops` overrides it). The JSON also records the device
kind, JAX version and the command line, so that README figures name the card.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from etcjax import config as config_lib  # noqa: E402
from etcjax import etc, fileio, train  # noqa: E402
from etcjax.keys import EtcKey  # noqa: E402
from etcjax.models import convmixer, flops  # noqa: E402

# (name, model, model overrides, image size, block size, optimizer, full batch, smoke batch)
STEP_CASES = (
    ("ViT-B/16 224", "ViT-B_16", {}, 224, 16, "sgd", 128, 4),
    ("ConvMixer-256/8 32", "ConvMixer-256_8", {}, 32, 4, "adamw", 128, 4),
    ("ConvMixer-384/8 224", "ConvMixer-384_8", {}, 224, 16, "adamw", 64, 4),
)
# Tiny stand-ins with the same structure, for --smoke on a CPU.
SMOKE_MODELS = {"ViT-B_16": ("ViT-tiny-test", 32, 4), "ConvMixer-256_8":
                ("ConvMixer-tiny-test", 32, 4), "ConvMixer-384_8": ("ConvMixer-tiny-test", 32, 8)}


def time_it(fn: Callable[[], Any], steps: int, warmup: int) -> tuple[float, float]:
  """(best, median) seconds of `fn()` (which must block until done) after `warmup` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times), statistics.median(times)


def model_flops_per_step(setup: train.Setup, state: train.TrainState, batch: int) -> float:
  """Model FLOPs of one training step (3x forward; ConvMixer counted as the grouped conv)."""
  model = setup.model
  if isinstance(model, convmixer.ConvMixer):  # FFI kernels are opaque to the counter
    model = model.clone(depthwise_impl="conv", layout="NHWC")
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return batch * flops.training_flops_per_image(model, variables, setup.config.image_size)


def step_case(name: str, model: str, overrides: dict, size: int, block: int, optimizer: str,
              batch: int, encryption: str, key_file: str, args: argparse.Namespace
              ) -> dict[str, Any]:
  """Times the trainer's step for one model / encryption on synthetic data."""
  c = config_lib.base_config()
  c.dataset = "digits"  # Only for the number of classes; the batches below are synthetic.
  c.model = model
  for k, v in overrides.items():
    c.model_overrides[k] = v
  c.image_size, c.block_size, c.batch_size = size, block, batch
  c.encryption = encryption
  c.key_file = key_file if encryption != "none" else ""
  c.optimizer = optimizer
  c.learning_rate = 0.01 if optimizer == "adamw" else 0.03
  c.dtype = args.dtype
  setup = train.build(c)
  tx = train.make_optimizer(c)
  state = train.init_state(setup, tx)
  step_fn = train.make_train_step(setup, tx)
  data = NamedSharding(setup.mesh, PartitionSpec("data"))
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (batch, size, size, 3), np.uint8), data)
  labels = jax.device_put(rng.integers(0, 10, (batch,), np.int32), data)
  batch_arrays = {"image": images, "label": labels}
  compiled = step_fn.lower(state, batch_arrays, setup.cipher).compile()
  step_flops = model_flops_per_step(setup, state, batch)
  holder = {"state": state}

  def run() -> None:
    holder["state"], metrics = compiled(holder["state"], batch_arrays, setup.cipher)
    jax.block_until_ready(metrics)

  best, median = time_it(run, args.steps, args.warmup)
  result = {"case": name, "model": model, "image_size": size, "block_size": block,
            "encryption": encryption, "batch_size": batch, "dtype": args.dtype,
            "optimizer": optimizer, "step_ms_best": 1e3 * best, "step_ms_median": 1e3 * median,
            "images_per_sec": batch / median, "model_flops_per_step": step_flops,
            "model_tflops_per_sec": step_flops / median / 1e12}
  peak = args.peak_tflops or flops.peak_tflops(jax.devices()[0])
  if peak:
    result["mfu"] = step_flops / median / (peak * 1e12 * jax.device_count())
  return result


def etc_cases(key: EtcKey, key_file: str, args: argparse.Namespace) -> list[dict[str, Any]]:
  """EtC encryption alone: on device (the trainer's jitted transform) and on host (NumPy)."""
  size, block, batch = (32, 8, 8) if args.smoke else (224, 16, 256)
  rng = np.random.default_rng(1)
  host = rng.integers(0, 256, (batch, size, size, 3), np.uint8)
  c = config_lib.base_config()
  c.dataset, c.image_size, c.block_size = "digits", size, block
  c.encryption, c.key_file, c.batch_size = "etc", key_file, batch
  c.model = "ConvMixer-tiny-test"
  setup = train.build(c)
  encrypt = train.encrypt_batch(setup)
  images = jax.device_put(host, NamedSharding(setup.mesh, PartitionSpec("data")))
  best, median = time_it(lambda: jax.block_until_ready(encrypt(images, setup.cipher)),
                         args.steps, args.warmup)
  out = [{"case": f"EtC encrypt {size}x{size} B={block} (device, jit)", "batch_size": batch,
          "images_per_sec": batch / median, "batch_ms_best": 1e3 * best,
          "batch_ms_median": 1e3 * median}]
  schedule = key.schedule(size, size, block)
  best, median = time_it(lambda: etc.encrypt(host, schedule), args.steps, 1)
  out.append({"case": f"EtC encrypt {size}x{size} B={block} (host, NumPy)", "batch_size": batch,
              "images_per_sec": batch / median, "batch_ms_best": 1e3 * best,
              "batch_ms_median": 1e3 * median})
  # Reference: copying the same bytes, the floor for any host-side transform.
  dst = np.empty_like(host)
  best, median = time_it(lambda: np.copyto(dst, host), args.steps, 1)
  out.append({"case": f"np.copyto {size}x{size} (host reference)", "batch_size": batch,
              "images_per_sec": batch / median})
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="gpu_check.json", help="JSON file to write")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny models and batches (a CPU check that the script works)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                      help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="peak TFLOP/s per device for MFU, if the device is not in the table")
  parser.add_argument("--only", default="", help="comma-separated substrings of case names")
  args = parser.parse_args(argv)
  folder = os.path.dirname(os.path.abspath(args.out))
  if os.path.isdir(args.out) or not os.access(folder, os.W_OK | os.X_OK):
    # Before minutes of measuring, not after (a re-run simply replaces the file).
    parser.error(f"--out {args.out}: cannot write a file there")
  args.steps = args.steps or (2 if args.smoke else 10)
  args.warmup = min(args.warmup, 1) if args.smoke else args.warmup
  backend = jax.default_backend()
  args.dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
  device = jax.devices()[0]
  print(f"{jax.device_count()} x {device.device_kind} ({backend}), JAX {jax.__version__}, "
        f"dtype {args.dtype}{', smoke sizes' if args.smoke else ''}", flush=True)
  if backend == "cpu" and not args.smoke:
    print("warning: no accelerator; the full sizes take very long on a CPU (use --smoke)",
          file=sys.stderr)

  only = [s.strip().lower() for s in args.only.split(",") if s.strip()]
  wanted = lambda name: not only or any(s in name.lower() for s in only)
  results: list[dict[str, Any]] = []
  with tempfile.TemporaryDirectory() as tmp:
    key = EtcKey.insecure_from_seed(0)  # Benchmark data only: a reproducible key.
    key_file = os.path.join(tmp, "bench.key")
    key.save(key_file)
    for name, model, overrides, size, block, opt, batch, smoke_batch in STEP_CASES:
      if args.smoke:
        model, size, block = SMOKE_MODELS[model]
        name, batch = f"{name} (smoke: {model} {size})", smoke_batch * jax.device_count()
      if not wanted(name):
        continue
      for encryption in ("none", "etc"):
        r = step_case(name, model, overrides, size, block, opt, batch, encryption, key_file,
                      args)
        results.append(r)
        print(f"  {name:<40} {encryption:>4}: {r['images_per_sec']:9.1f} img/s  "
              f"{r['step_ms_median']:8.2f} ms/step  {r['model_tflops_per_sec']:7.2f} TFLOP/s"
              + (f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""), flush=True)
      plain, enc = results[-2], results[-1]
      enc["etc_overhead"] = enc["step_ms_median"] / plain["step_ms_median"] - 1.0
      print(f"  {'':<40} EtC costs {100 * enc['etc_overhead']:+.1f}% of the step time")
    if wanted("etc encrypt"):
      for r in etc_cases(key, key_file, args):
        results.append(r)
        print(f"  {r['case']:<46} {r['images_per_sec']:11.1f} img/s", flush=True)

  doc = {"device_kind": device.device_kind, "backend": backend,
         "device_count": jax.device_count(), "jax_version": jax.__version__,
         "python": platform.python_version(), "smoke": args.smoke, "dtype": args.dtype,
         "steps": args.steps, "peak_tflops": args.peak_tflops or flops.peak_tflops(device),
         "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
         "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
         "results": results}
  fileio.write_text(args.out, json.dumps(doc, indent=2) + "\n")
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
