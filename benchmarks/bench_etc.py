"""EtC encryption throughput on host (CPU): jitted encrypt vs a memcpy bound vs a per-block loop.

    python benchmarks/bench_etc.py [--batch 256] [--size 224] [--block-size 16]

Measures images/s on a batch of uint8 (size x size x 3) images, side by side in one run
(each candidate timed in interleaved rounds; the best round counts):

* copy: `np.copyto` of the batch into a preallocated buffer (the memory-bandwidth bound).
* encrypt jit: `jax.jit(etc.encrypt)` writing into a recycled (donated) output buffer,
  the JAX counterpart of the preallocated copy, and with a fresh output each call. On CPU
  this is the compiled kernel (etcjax/csrc) when it is built, else the XLA gather; the
  first line of the report says which.
* XLA gather jit: the same with the kernel switched off (`ETCJAX_ETC_KERNEL=0` while it
  is traced): the pure-XLA path that GPU/TPU and kernel-less installs run.
* kernel jit, 1 thread: the kernel limited to one thread (it otherwise splits the batch
  over XLA's intra-op thread pool; the copy runs on one thread).
* encrypt host: `etc.encrypt` on NumPy arrays (the owner tools' path).
* loop: a straightforward per-image, per-block Python loop over the spec (research code).

Prints the ratios against the targets: encrypt >= 25 % of copy and >= 15x the loop.
Timings are only meaningful on a quiet machine; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from etcjax import etc, fileio, keys  # noqa: E402

TARGET_COPY_FRACTION = 0.25
TARGET_LOOP_SPEEDUP = 15.0


def loop_encrypt(x: np.ndarray, s: etc.Schedule, out: np.ndarray) -> None:
  """Per-image, per-block Python loop (what research code does)."""
  b = s.block_size
  cols = x.shape[2] // b
  perm, rotflip, negpos, chperm = (np.asarray(a).tolist() for a in
                                   (s.perm, s.rotflip, s.negpos, s.chperm))
  for img, o in zip(x, out, strict=True):
    for i, p in enumerate(perm):
      pr, pc = divmod(p, cols)
      blk = np.rot90(img[pr * b:(pr + 1) * b, pc * b:(pc + 1) * b], k=rotflip[i] % 4)
      if rotflip[i] >= 4:
        blk = np.fliplr(blk)
      if negpos[i]:
        blk = 255 - blk
      r, c = divmod(i, cols)
      o[r * b:(r + 1) * b, c * b:(c + 1) * b] = blk[..., etc.PERMS3[chperm[i]]]


def traced_with_gather(f, *args):
  """Calls (hence traces) jitted `f` with the CPU kernel off, so that it keeps the gather."""
  old = os.environ.get("ETCJAX_ETC_KERNEL")
  os.environ["ETCJAX_ETC_KERNEL"] = "0"
  try:
    return f(*args)
  finally:
    if old is None:
      del os.environ["ETCJAX_ETC_KERNEL"]
    else:
      os.environ["ETCJAX_ETC_KERNEL"] = old


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=256, help="images per batch (default 256, "
                 "~38 MB at 224x224: larger than the caches)")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--loop-images", type=int, default=8,
                 help="images per round for the (slow) loop baseline")
  p.add_argument("--json", help="also write the figures to this file")
  args = p.parse_args(argv)
  if args.json:
    folder = os.path.dirname(os.path.abspath(args.json))
    if os.path.isdir(args.json) or not os.access(folder, os.W_OK | os.X_OK):
      # Before minutes of measuring, not after (a re-run simply replaces the file).
      p.error(f"--json {args.json}: cannot write a file there")

  n, size = args.batch, args.size
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", keys.KeySpaceWarning)
    s = keys.EtcKey.insecure_from_seed(0).schedule(size, size, args.block_size)
  x = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  xj = jnp.asarray(x)
  buf = np.empty_like(x)
  want = etc.encrypt(x[:2], s)

  platform = jax.devices()[0].platform
  kernel = platform == "cpu" and etc._kernel_enabled()
  if kernel:
    path = f"CPU kernel, {etc.cpu_kernel_status()}"
  elif platform != "cpu":
    path = f"XLA gather ({platform})"
  elif etc.cpu_kernel_available():
    path = "XLA gather (CPU kernel switched off by ETCJAX_ETC_KERNEL=0)"
  else:
    path = f"XLA gather (CPU kernel {etc.cpu_kernel_status()})"

  enc = jax.jit(etc.encrypt)
  # `out` is donated and unused: XLA writes the result into its buffer, as np.copyto does.
  into = lambda f: jax.jit(lambda x, out, s: f(x, s), donate_argnums=1, keep_unused=True)
  enc_into, gather_into = into(etc.encrypt), into(etc.encrypt)
  fields = [jnp.asarray(getattr(s, k), jnp.int32) for k in ("perm", "rotflip", "negpos", "chperm")]
  # The kernel's FFI call itself (private), capped at one thread.
  kernel1_into = into(lambda x, s: etc._kernel_call(x, *fields, s.block_size, threads=1))
  outs = {k: jnp.zeros_like(xj) for k in ("kernel", "gather") + (("kernel1",) if kernel else ())}
  outs["gather"] = traced_with_gather(gather_into, xj, outs["gather"], s)  # compiles the gather

  def recycled(key, f):
    def run():
      outs[key] = f(xj, outs[key], s)
      outs[key].block_until_ready()
    return run

  loop_x, loop_out = x[:args.loop_images], np.empty_like(x[:args.loop_images])
  cands = {
      "copy (np.copyto, preallocated)": (lambda: np.copyto(buf, x), n),
      "encrypt jit, recycled output": (recycled("kernel", enc_into), n),
      "encrypt jit, fresh output": (lambda: enc(xj, s).block_until_ready(), n),
      "XLA gather jit, recycled output": (recycled("gather", gather_into), n),
  }
  if kernel:
    cands["kernel jit, 1 thread, recycled"] = (recycled("kernel1", kernel1_into), n)
  cands["encrypt host (NumPy)"] = (lambda: etc.encrypt(x, s), n)
  cands["per-block Python loop"] = (lambda: loop_encrypt(loop_x, s, loop_out), args.loop_images)
  # Warm up (compiles) and check every implementation agrees with the loop.
  for f, _ in cands.values():
    f()
  loop_encrypt(x[:2], s, loop_out[:2])
  assert np.array_equal(loop_out[:2], want)
  for key in ("kernel", "gather") + (("kernel1",) if kernel else ()):
    assert np.array_equal(np.asarray(outs[key][:2]), want), key
  assert np.array_equal(np.asarray(enc(xj[:2], s)), want)
  hlo = gather_into.lower(xj, outs["gather"], s).compile().as_text()
  assert etc._KERNEL_TARGET not in hlo, "the gather row ran the kernel"

  best = dict.fromkeys(cands, 0.0)
  for _ in range(args.rounds):
    for name, (f, count) in cands.items():
      t = time.perf_counter()
      f()
      best[name] = max(best[name], count / (time.perf_counter() - t))

  copy = best["copy (np.copyto, preallocated)"]
  loop = best["per-block Python loop"]
  print(f"EtC encrypt throughput, batch {n} x {size}x{size}x3 uint8, block {args.block_size}, "
        f"{platform}, {os.cpu_count()} CPUs, JAX {jax.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}")
  print(f"encrypt jit path: {path}")
  for name, v in best.items():
    print(f"  {name:<34}{v:>11.0f} img/s {100 * v / copy:>7.1f} % of copy {v / loop:>8.1f}x loop")
  fig = best["encrypt jit, recycled output"]
  ok_copy = fig >= TARGET_COPY_FRACTION * copy
  ok_loop = fig >= TARGET_LOOP_SPEEDUP * loop
  print(f"jitted encrypt: {100 * fig / copy:.1f} % of copy (target >= "
        f"{100 * TARGET_COPY_FRACTION:.0f} %: {'met' if ok_copy else 'NOT met'}), "
        f"{fig / loop:.1f}x the loop (target >= {TARGET_LOOP_SPEEDUP:.0f}x: "
        f"{'met' if ok_loop else 'NOT met'})")
  if args.json:
    with fileio.atomic_write(args.json, "w") as f:
      json.dump({"batch": n, "size": size, "block_size": args.block_size, "path": path,
                 "img_per_s": best,
                 "load_average": os.getloadavg()[0],
                 "copy_fraction": fig / copy, "loop_speedup": fig / loop}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
