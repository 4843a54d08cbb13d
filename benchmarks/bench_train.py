"""Training throughput on this machine: EtC vs plain steps, host pipeline vs model step.

    python benchmarks/bench_train.py [--out bench_train.json] [--steps 5] [--quick]

1. The trainer's jitted step (`etcjax.train.make_train_step`) for the paper's models, with
   researcher-mode EtC (encryption on device, inside the step) and without, timed in
   interleaved rounds on the same synthetic batch: images/s of each and the share of the
   step that EtC costs (target <= 5 %).
2. The host input pipeline (`etcjax.data.pipeline`: gather or JPEG-decode the batch,
   assemble the global array; a background thread in training) in images/s for each data
   path the paper's configs use, next to the model step's images/s on the same machine:
   the pipeline must not be the bottleneck.

Batches are small on a CPU (images/s barely depends on the batch there); on an
accelerator use `benchmarks/gpu_check.py`, which times the full-size batches and MFU.
`--quick` swaps in tiny models (a check that the script works). Timings are only
meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_models import measured, time_interleaved  # noqa: E402

from etcjax import config as config_lib  # noqa: E402
from etcjax import fileio, train, xla_cpu  # noqa: E402
from etcjax.data import pipeline, sources  # noqa: E402
from etcjax.keys import EtcKey  # noqa: E402

# (case, config file recipe, model, image size, block size, CPU batch, quick model)
STEP_CASES = (
    ("ConvMixer-256/8, CIFAR-10 32x32", "convmixer", "ConvMixer-256_8", 32, 16, 16,
     "ConvMixer-tiny-test"),
    ("ConvMixer-384/8, Imagenette 224x224", "convmixer", "ConvMixer-384_8", 224, 16, 4,
     "ConvMixer-tiny-test"),
    ("ViT-B/16, 224x224", "vit", "ViT-B_16", 224, 16, 4, "ViT-tiny-test"),
)
# (case, stored image side, JPEG quality or 0, number of stored images, quick count)
PIPELINE_CASES = (
    ("CIFAR-10 in memory, 32x32 (resized on device)", 32, 0, 50_000, 2_000),
    ("Imagenette in memory, 224x224", 224, 0, 2_000, 200),
    ("JPEG QF 85, 224x224 (JPEG in the loop; encrypted JPEG folders)", 224, 85, 1_000, 100),
)


def step_config(recipe: str, model: str, size: int, block: int, batch: int, encryption: str,
                key_file: str) -> Any:
  """A paper recipe at CPU size; batches are synthetic (digits only sets 10 classes)."""
  tokens = {"etc"} if encryption == "etc" else set()
  c = (config_lib.vit_finetune_recipe(tokens) if recipe == "vit"
       else config_lib.convmixer_recipe(tokens, train_examples=50_000))
  c.dataset, c.model, c.init_from = "digits", model, ""
  c.image_size, c.block_size, c.batch_size = size, block, batch
  c.augment = "none"  # Same work on both sides: only the encryption differs.
  c.key_file = key_file if encryption == "etc" else ""
  return c


def bench_steps(args: argparse.Namespace, key_file: str) -> list[dict[str, Any]]:
  results = []
  rng = np.random.default_rng(0)
  for case, recipe, model, size, block, batch, quick_model in STEP_CASES:
    if args.quick:
      model, size, block, case = quick_model, 32, 8, f"{case} (quick: {quick_model} 32x32)"
    runners, per_mode = {}, {}
    for encryption in ("none", "etc"):
      c = step_config(recipe, model, size, block, batch, encryption, key_file)
      setup = train.build(c)
      tx = train.make_optimizer(c)
      host = {"image": rng.integers(0, 256, (batch, size, size, 3), np.uint8),
              "label": rng.integers(0, 10, (batch,), np.int32)}
      batch_arrays = pipeline.to_global(host, setup.mesh)
      step = train.make_train_step(setup, tx)
      holder = {"state": train.init_state(setup, tx)}

      def run(step=step, holder=holder, batch_arrays=batch_arrays, cipher=setup.cipher):
        holder["state"], metrics = step(holder["state"], batch_arrays, cipher)
        jax.block_until_ready(metrics)

      run()  # Compile.
      runners[encryption] = measured(run)
      per_mode[encryption] = setup
    timings = time_interleaved(runners, args.steps)
    plain, etc = timings["none"][1], timings["etc"][1]
    # The encryption alone, on the same batch: what the step pays for it at most.
    setup = per_mode["etc"]
    images = pipeline.to_global({"image": rng.integers(0, 256, (batch, size, size, 3),
                                                       np.uint8)}, setup.mesh)["image"]
    encrypt = train.encrypt_batch(setup)
    enc = lambda f=encrypt, x=images, c=setup.cipher: jax.block_until_ready(f(x, c))
    enc_time = time_interleaved({"enc": measured(enc)}, max(args.steps, 5))["enc"][1]
    r = {"case": case, "model": model, "image_size": size, "block_size": block,
         "batch_size": batch, "plain_images_per_sec": batch / plain,
         "etc_images_per_sec": batch / etc, "etc_step_overhead": etc / plain - 1,
         "encrypt_only_ms": 1e3 * enc_time, "encrypt_share_of_step": enc_time / etc}
    results.append(r)
    print(f"{case:<48} plain {r['plain_images_per_sec']:8.2f} img/s   EtC "
          f"{r['etc_images_per_sec']:8.2f} img/s   EtC step overhead "
          f"{100 * r['etc_step_overhead']:+5.1f} %   encryption alone "
          f"{100 * r['encrypt_share_of_step']:.2f} % of the step", flush=True)
  return results


def bench_pipeline(args: argparse.Namespace) -> list[dict[str, Any]]:
  results = []
  rng = np.random.default_rng(1)
  mesh = train.create_mesh()
  photos = sources.digits_arrays()[0]  # Real image content, so JPEG sizes are realistic.
  for case, side, quality, count, quick_count in PIPELINE_CASES:
    n = quick_count if args.quick else count
    idx = rng.integers(0, len(photos), n)
    images = np.stack([np.asarray(sources.resize_center_crop(photos[i], side)) for i in
                       idx[:min(n, 500)]])
    images = images[np.arange(n) % len(images)]
    labels = rng.integers(0, 10, n).astype(np.int32)
    data = sources.ArrayImageSet(images, labels)
    if quality:
      data = pipeline.encode_jpeg(data, quality)
    batch = 64
    order = pipeline.TrainOrder(len(data), batch, seed=0)
    steps = max(4, args.steps * 2)
    batches = pipeline.prefetch(pipeline.train_batches(data, order, 0, steps + 1),
                                lambda b: pipeline.to_global(b, mesh))
    jax.block_until_ready(next(batches))  # Thread start, first transfer.
    start = time.perf_counter()
    for b in batches:
      jax.block_until_ready(b)
    seconds = time.perf_counter() - start
    r = {"case": case, "image_size": side, "jpeg_quality": quality, "batch_size": batch,
         "images_per_sec": steps * batch / seconds}
    results.append(r)
    print(f"{case:<66} {r['images_per_sec']:10.0f} img/s", flush=True)
  return results


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="bench_train.json", help="JSON file to write")
  parser.add_argument("--steps", type=int, default=5, help="timed rounds per case")
  parser.add_argument("--quick", action="store_true", help="tiny models (a check the "
                      "script works)")
  parser.add_argument("--only", choices=("steps", "pipeline"), default=None)
  args = parser.parse_args(argv)
  folder = os.path.dirname(os.path.abspath(args.out))
  if os.path.isdir(args.out) or not os.access(folder, os.W_OK | os.X_OK):
    # Before minutes of measuring, not after (a re-run simply replaces the file).
    parser.error(f"--out {args.out}: cannot write a file there")
  kept = xla_cpu.keep_freed_memory()  # As training does (on CPU unless the env var is 0).
  device = jax.devices()[0]
  print(f"{jax.device_count()} x {device.device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPUs, JAX {jax.__version__}, malloc "
        f"{'keeps freed memory' if kept else 'as is'}", flush=True)
  doc: dict[str, Any] = {
      "device_kind": device.device_kind, "backend": jax.default_backend(),
      "cpus": os.cpu_count(), "jax_version": jax.__version__,
      "python": platform.python_version(), "quick": args.quick, "steps": args.steps,
      "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
      "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
  if args.only != "pipeline":
    print("training step, researcher-mode EtC on device vs plain:")
    with tempfile.TemporaryDirectory() as tmp:
      key_file = os.path.join(tmp, "bench.key")
      EtcKey.insecure_from_seed(0).save(key_file)  # Benchmark data only.
      doc["steps_results"] = bench_steps(args, key_file)
  if args.only != "steps":
    print("host input pipeline (batch 64, prefetch thread, global array assembly):")
    doc["pipeline_results"] = bench_pipeline(args)
  fileio.write_text(args.out, json.dumps(doc, indent=2) + "\n")
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
