"""The Pallas kernels on this machine's device: correctness, then per-layer timings.

    python -m etcjax.kernels.check --out kernel_check.json          # on a GPU / TPU
    python -m etcjax.kernels.check --smoke --out /tmp/check.json    # tiny, any CPU

1. Correctness: `depthwise_pallas.depthwise` (compiled for the device: Triton on GPUs,
   Mosaic on TPUs; interpret mode on CPU) against XLA's grouped convolution, forward, input
   gradient, kernel and bias gradients, on ConvMixer's layer shapes and on odd ones, in
   float32 and bfloat16. Each result records the largest error relative to the reference's
   largest magnitude, and `ok` against the dtype's tolerance.
2. Timing (skipped with --no-timing): one ConvMixer layer's depthwise conv, forward +
   backward (`jax.vjp`), for each formulation in `--impls` (the Pallas kernels with their
   default tiling and every tiling in `--sweep`, XLA's grouped conv, the shifted sums), median
   of `--steps` after compiling and a warm-up. It says which tiling to make the default and
   whether the kernels beat XLA's convolution at all, before any training-step number.

The JSON records the device kind, the JAX version and the time; the exit status is 1 if
any correctness case failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from etcjax.kernels import depthwise_pallas as dp

# (n, h, w, c, k): ConvMixer-256/8 at 32x32, ConvMixer-384/8 at 224 (56x56 planes after the
# 4x4 patches), and odd sizes with a channel count that is no whole tile.
CHECK_SHAPES = ((8, 32, 32, 256, 9), (4, 56, 56, 384, 9), (3, 13, 17, 100, 7),
                (2, 16, 16, 48, 5))
SMOKE_SHAPES = ((2, 6, 7, 12, 5), (1, 8, 8, 16, 9))
# (label, n, h, w, c, k): a whole layer at the benchmark batch sizes.
TIMING_SHAPES = (("ConvMixer-256/8 layer, batch 256, 32x32", 256, 32, 32, 256, 9),
                 ("ConvMixer-384/8 layer, batch 64, 56x56", 64, 56, 56, 384, 9))
SMOKE_TIMING = (("tiny layer", 2, 8, 8, 16, 5),)
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}  # of the reference's largest magnitude


def _outputs(fn: Callable[..., jax.Array], x: jax.Array, w: jax.Array, b: jax.Array,
             g: jax.Array) -> tuple[jax.Array, ...]:
  out, vjp = jax.vjp(fn, x, w, b)
  return (out, *vjp(g.astype(out.dtype)))


def check_case(fn: Callable[..., jax.Array], shape: tuple[int, ...], dtype: str
               ) -> dict[str, Any]:
  """Forward and gradients of `fn` against `depthwise_pallas.reference`, one shape."""
  n, h, w, c, k = shape
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (n, h, w, c)).astype(dtype)
  kern = (jax.random.normal(keys[1], (k, k, 1, c)) / k).astype(dtype)
  bias = jax.random.normal(keys[2], (c,)).astype(dtype)
  g = jax.random.normal(keys[3], (n, h, w, c))
  got = jax.jit(lambda *a: _outputs(fn, *a))(x, kern, bias, g)
  f32 = tuple(a.astype(jnp.float32) for a in (x, kern, bias))
  want = jax.jit(lambda *a: _outputs(dp.reference, *a))(*f32, g)
  errors = {}
  for name, a, r in zip(("out", "dx", "dkernel", "dbias"), got, want, strict=True):
    a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
    errors[name] = float(np.abs(a - r).max() / max(float(np.abs(r).max()), 1e-30))
  ok = all(e <= TOLERANCE[dtype] for e in errors.values()) and all(
      bool(np.isfinite(np.asarray(a, np.float32)).all()) for a in got)
  return {"shape_nhwc": [n, h, w, c], "k": k, "dtype": dtype, "relative_error": errors,
          "ok": ok}


def _formulations(impls: list[str], sweep: list[dp.Tiling], platform_tiling: dp.Tiling
                  ) -> dict[str, Callable[..., jax.Array]]:
  from etcjax.models import convmixer  # The model's other formulations, for comparison.
  out: dict[str, Callable[..., jax.Array]] = {}
  for impl in impls:
    if impl == "pallas":
      out[f"pallas {_label(platform_tiling)}"] = dp.depthwise
      for t in sweep:
        out[f"pallas {_label(t)}"] = dp.make_depthwise(t)
    elif impl in ("conv", "shift"):
      f = convmixer.DEPTHWISE_FUNCTIONS[impl]
      out[impl] = lambda x, w, b, f=f: f(x, w, "NHWC") + b
    else:
      raise ValueError(f"unknown formulation {impl!r}; valid: pallas, conv, shift")
  return out


def _label(t: dp.Tiling) -> str:
  return (f"{t.target} c{t.block_c} h{t.block_h} nb{t.batch_block} w{t.num_warps}"
          + (" interpret" if t.interpret else ""))


def time_case(label: str, shape: tuple[int, ...], fns: dict[str, Callable[..., jax.Array]],
              dtype: str, steps: int) -> list[dict[str, Any]]:
  """Median forward + backward time of each formulation on one layer's shapes."""
  n, h, w, c, k = shape
  keys = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(keys[0], (n, h, w, c)).astype(dtype)
  kern = (jax.random.normal(keys[1], (k, k, 1, c)) / k).astype(dtype)
  bias = jnp.zeros((c,), dtype)
  g = jax.random.normal(keys[3], (n, h, w, c)).astype(dtype)
  results = []
  for name, fn in fns.items():
    step = jax.jit(lambda *a, fn=fn: _outputs(fn, *a))
    try:
      start = time.perf_counter()
      compiled = step.lower(x, kern, bias, g).compile()
      compile_s = time.perf_counter() - start
      jax.block_until_ready(compiled(x, kern, bias, g))
      times = []
      for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(x, kern, bias, g))
        times.append(time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - one failing tiling must not hide the others
      results.append({"case": label, "impl": name, "error": f"{type(e).__name__}: {e}"[:2000]})
      print(f"  {label:<44} {name:<40} FAILED: {type(e).__name__}", flush=True)
      continue
    ms = 1e3 * statistics.median(times)
    # Bytes a memory-bound implementation must move: x and g read, out and dx written
    # (the kernel's gradient reads x and g again if not fused).
    results.append({"case": label, "impl": name, "dtype": dtype, "fwd_bwd_ms_median": ms,
                    "fwd_bwd_ms_best": 1e3 * min(times), "compile_s": compile_s,
                    "activation_bytes": x.size * x.dtype.itemsize})
    print(f"  {label:<44} {name:<40} {ms:9.3f} ms fwd+bwd", flush=True)
  return results


def _parse_sweep(spec: str, base: dp.Tiling) -> list[dp.Tiling]:
  """"16x8,64x4x2x8" -> Tilings: block_c x block_h [x batch_block [x num_warps]]."""
  out = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    values = [int(v) for v in item.split("x")]
    names = ("block_c", "block_h", "batch_block", "num_warps")[:len(values)]
    out.append(dataclasses.replace(base, **dict(zip(names, values, strict=True))))
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="JSON file to write")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (any CPU)")
  parser.add_argument("--no-timing", action="store_true", help="correctness only")
  parser.add_argument("--impls", default="pallas,conv,shift",
                      help="formulations to time: pallas, conv, shift")
  parser.add_argument("--sweep", default="",
                      help="extra Pallas tilings to time, e.g. '16x8,64x8,32x16x4x8' "
                      "(block_c x block_h [x batch_block [x num_warps]])")
  parser.add_argument("--steps", type=int, default=10, help="timed repetitions")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                      help="dtype of the timed layers")
  args = parser.parse_args(argv)
  platform = jax.devices()[0].platform
  platform_tiling = dp.PLATFORM_TILINGS.get(
      {"gpu": "cuda"}.get(platform, platform), dp.PLATFORM_TILINGS["cpu"])
  device = jax.devices()[0]
  print(f"{device.device_kind} ({platform}), JAX {jax.__version__}; Pallas tiling "
        f"{_label(platform_tiling)}", flush=True)
  checks = []
  for shape in SMOKE_SHAPES if args.smoke else CHECK_SHAPES:
    for dtype in ("float32", "bfloat16"):
      try:
        r = check_case(dp.depthwise, shape, dtype)
      except Exception as e:  # noqa: BLE001 - record the lowering error and go on
        r = {"shape_nhwc_k": list(shape), "dtype": dtype, "ok": False,
             "error": f"{type(e).__name__}: {e}"[:4000]}
      checks.append(r)
      errs = r.get("relative_error") or {}
      print(f"  check {shape} {dtype:<8} {'ok' if r['ok'] else 'FAIL'} "
            + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
            + (f" {r['error'][:300]}" if "error" in r else ""), flush=True)
  timings: list[dict[str, Any]] = []
  if not args.no_timing:
    fns = _formulations([s.strip() for s in args.impls.split(",") if s.strip()],
                        _parse_sweep(args.sweep, platform_tiling), platform_tiling)
    for label, *shape in SMOKE_TIMING if args.smoke else TIMING_SHAPES:
      timings += time_case(label, tuple(shape), fns, args.dtype,
                           2 if args.smoke else args.steps)
  doc = {"device_kind": device.device_kind, "platform": platform,
         "jax_version": jax.__version__, "smoke": args.smoke,
         "platform_tiling": _label(platform_tiling),
         "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
         "command": " ".join(["python -m etcjax.kernels.check", *(argv or sys.argv[1:])]),
         "checks": checks, "timings": timings, "all_ok": all(r["ok"] for r in checks)}
  with open(args.out, "w") as f:
    f.write(json.dumps(doc, indent=2) + "\n")
  print(f"wrote {args.out}: correctness {'ok' if doc['all_ok'] else 'FAILED'}")
  return 0 if doc["all_ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
