"""Owner tools on a folder: `etcjax encrypt` / `decrypt` / `compress-stats` vs a naive loop.

    python benchmarks/bench_owner.py FOLDER [--limit N] [--rounds 2] [--jobs N] [--out F]
                                     [--stats-limit N] [--auto-decoder]

FOLDER is a tree of images, e.g. the CIFAR-10 test split (10,000 32x32 JPEGs); it is only
read. Everything is written to a temporary folder on the filesystem of --tmp (default the
system temp folder) and removed afterwards. Measured side by side in one run, each
candidate in interleaved rounds (the best round counts), every one as a fresh process so
that start-up is included:

* naive loop: one thread, per file Pillow decode -> flip -> encode JPEG QF 85 -> write
  (no temporary file, no fsync, no checks).
* `etcjax encrypt --format jpeg --quality 85` with `--jobs 1` (no workers), `--jobs N`
  (forked worker processes, the default) and `--jobs N` with `ETCJAX_POOL=thread`.
* `etcjax decrypt` of that output (JPEG in, JPEG QF 85 out, `--jpeg-decoder pillow`), the
  naive loop over the same encrypted files, and with --auto-decoder once with the default
  decoder (`auto`: TensorFlow's non-fancy JPEG decoder).
* `etcjax compress-stats` on the first --stats-limit files, `--jobs 1` vs `--jobs N`.
* start-up: wall time of `etcjax --help` and `etcjax keygen` (best and median of 5), and
  whether JAX / TensorFlow / etcjax.attacks were imported.
* the EtC transform alone: `etcjax.etc_np` (NumPy) per image and per batch of 64, against
  the compiled XLA FFI kernel (`jax.jit(etc.encrypt)`, including the host <-> JAX copies),
  and what importing JAX and loading the kernel costs a fresh process.

Writes the raw figures as JSON (--out; default
benchmarks/results/bench_owner_cpu_<date>.json) with date, commit and machine: wall
times (and files/s) and the CPU seconds of each run (user + sys of all its processes).
Wall times on a shared machine vary with its load (the load average is recorded before
and after); CPU per file does much less.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PY = sys.executable
EXTS = (".png", ".jpg", ".jpeg")
# The code measured here: "+dirty" is added to the commit when any of it is modified.
OWNER_SOURCES = ("etcjax/cli.py", "etcjax/commands/owner.py", "etcjax/parallel.py",
                 "etcjax/etc_np.py", "etcjax/codec.py", "etcjax/fileio.py", "etcjax/keys.py",
                 "benchmarks/bench_owner.py")


def naive_loop(src_dir: str, dst_dir: str, limit: int | None) -> int:
  """The baseline: decode -> flip -> encode JPEG QF 85 -> write, one file at a time."""
  import numpy as np
  from PIL import Image

  files = list_files(src_dir, limit)
  for f in files:
    rel = os.path.relpath(f, src_dir)
    dst = os.path.join(dst_dir, os.path.splitext(rel)[0] + ".jpg")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    img = np.asarray(Image.open(f).convert("RGB"))[:, ::-1]
    Image.fromarray(np.ascontiguousarray(img)).save(dst, quality=85)
  return len(files)


def list_files(folder: str, limit: int | None) -> list[str]:
  files = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                 if p.lower().endswith(EXTS))
  return files[:limit] if limit else files


def linked_subset(folder: str, limit: int, dst: str) -> str:
  """A tree of symbolic links to the first `limit` files (the tools follow them)."""
  for f in list_files(folder, limit):
    p = os.path.join(dst, os.path.relpath(f, folder))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    os.symlink(os.path.abspath(f), p)
  return dst


CPU_S: dict[str, list[float]] = {}


def timed(cmd: list[str], env: dict | None = None, label: str | None = None) -> float:
  """Wall seconds of a command; its CPU seconds (user + sys, workers included) go to CPU_S."""
  r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  r = subprocess.run(cmd, capture_output=True, text=True, env=env)
  dt = time.perf_counter() - t0
  r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  if r.returncode != 0:
    raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
  if label:
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    CPU_S.setdefault(label, []).append(round(cpu, 3))
  return dt


def etcjax_cmd(*args: str) -> list[str]:
  return [PY, "-m", "etcjax.cli", *args]


def machine() -> dict:
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
  except OSError:
    pass
  mem = None
  try:
    mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
  except (ValueError, OSError):
    pass
  return {"cpu": cpu, "usable_cpus": len(os.sched_getaffinity(0)), "memory_gib": mem,
          "os": platform.platform(), "python": platform.python_version()}


def commit() -> str:
  def git(*a):
    return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
  head = git("rev-parse", "--short", "HEAD")
  dirty = git("status", "--porcelain", "--", *OWNER_SOURCES)
  return head + ("+dirty" if dirty else "")


def startup() -> dict:
  out = {}
  with tempfile.TemporaryDirectory() as d:
    for name, cmd in (("help", [os.path.join(os.path.dirname(PY), "etcjax"), "--help"]),
                      ("keygen", None)):
      times = []
      for i in range(5):
        c = cmd or [os.path.join(os.path.dirname(PY), "etcjax"), "keygen",
                    os.path.join(d, f"k{i}.key")]
        times.append(timed(c))
      out[name] = {"best_s": min(times), "median_s": statistics.median(times)}
  probe = ("import sys; from etcjax import cli; cli.build_parser(); "
           "print(sorted(m for m in ('jax', 'tensorflow', 'etcjax.attacks') if m in sys.modules))")
  out["heavy_modules_after_build_parser"] = json.loads(
      subprocess.run([PY, "-c", probe], capture_output=True, text=True, check=True
                     ).stdout.replace("'", '"'))
  return out


def transform_bench(folder: str) -> dict:
  """EtC transform alone: NumPy host path vs the compiled kernel through jax.jit."""
  import warnings

  import numpy as np

  from etcjax import codec, etc_np, keys

  res: dict = {}
  t0 = time.perf_counter()
  subprocess.run([PY, "-c", "import jax; from etcjax import etc; etc.cpu_kernel_available(); "
                  "jax.numpy.zeros(1).block_until_ready()"], check=True, capture_output=True)
  res["fresh_process_import_jax_and_load_kernel_s"] = time.perf_counter() - t0
  key = keys.EtcKey.insecure_from_seed(0)
  files = list_files(folder, 64)
  small = np.stack([codec.read_image(f) for f in files])
  big = np.random.default_rng(0).integers(0, 256, (64, 224, 224, 3), dtype=np.uint8)
  import jax

  from etcjax import etc

  enc = jax.jit(etc.encrypt)
  res["kernel"] = etc.cpu_kernel_status().split(":")[0]
  for name, x in (("32x32", small), ("224x224", big)):
    h, w = x.shape[1:3]
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      hs = key.host_schedule(h, w, 16)
      js = key.schedule(h, w, 16)
    grid = (h // 16, w // 16)

    def np_one(x=x, hs=hs, grid=grid):
      for im in x:
        etc_np.transform(im[None], hs, grid)

    def np_batch(x=x, hs=hs, grid=grid):
      etc_np.transform(x, hs, grid)

    def jax_one(x=x, js=js):
      for im in x:
        np.asarray(enc(im[None], js))

    def jax_batch(x=x, js=js):
      np.asarray(enc(x, js))

    jax_one()
    jax_batch()  # compile
    for label, fn in (("numpy_per_image", np_one), ("numpy_batch64", np_batch),
                      ("kernel_per_image", jax_one), ("kernel_batch64", jax_batch)):
      best = min(_time(fn) for _ in range(5))
      res[f"{name}_{label}_us_per_img"] = round(best / len(x) * 1e6, 2)
  return res


def _time(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("folder", help="image tree to read, e.g. the CIFAR-10 test split")
  ap.add_argument("--limit", type=int, default=0, help="use the first N files (0: all)")
  ap.add_argument("--stats-limit", type=int, default=1000,
                  help="files for the compress-stats runs")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
  ap.add_argument("--tmp", default=None, help="folder for the outputs (default: system temp)")
  ap.add_argument("--out", default=None, help="JSON results file")
  ap.add_argument("--auto-decoder", action="store_true",
                  help="also time decrypt with the default JPEG decoder (TensorFlow)")
  args = ap.parse_args()
  date = datetime.datetime.now(datetime.UTC)
  out_path = args.out or os.path.join(ROOT, "benchmarks", "results",
                                      f"bench_owner_cpu_{date:%Y-%m-%d}.json")
  n = len(list_files(args.folder, args.limit or None))
  doc = {"benchmark": "bench_owner", "date": date.isoformat(timespec="seconds"),
         "commit": commit(), "machine": machine(), "folder": os.path.abspath(args.folder),
         "files": n, "jobs": args.jobs, "rounds": args.rounds,
         "loadavg_before": os.getloadavg()}
  print(f"{n} files; {doc['machine']['usable_cpus']} CPUs; load {doc['loadavg_before']}",
        flush=True)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("ETCJAX_POOL", None)
  with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
    for f in list_files(args.folder, args.limit or None):  # warm the page cache
      with open(f, "rb") as fh:
        fh.read()
    src = args.folder if not args.limit else linked_subset(args.folder, args.limit,
                                                           os.path.join(tmp, "src"))
    key = os.path.join(tmp, "k.key")
    subprocess.run(etcjax_cmd("keygen", key), check=True, capture_output=True)
    enc = ["--key", key, "--format", "jpeg", "--quality", "85"]
    j = str(args.jobs)
    encrypted = os.path.join(tmp, "enc_ref")
    subprocess.run(etcjax_cmd("encrypt", *enc, src, "--out", encrypted, "--jobs", "1"),
                   check=True, capture_output=True, env=env)
    dec = ["--key", key, "--format", "jpeg", "--quality", "85"]
    candidates = {
        "naive_loop_encrypt_side": lambda o: [PY, __file__, "--naive-loop", src, o],
        "encrypt_jobs1": lambda o: etcjax_cmd("encrypt", *enc, src, "--out", o, "--jobs", "1"),
        f"encrypt_jobs{j}_process": lambda o: etcjax_cmd("encrypt", *enc, src, "--out", o,
                                                          "--jobs", j),
        f"encrypt_jobs{j}_thread": lambda o: etcjax_cmd("encrypt", *enc, src, "--out", o,
                                                         "--jobs", j),
        "naive_loop_decrypt_side": lambda o: [PY, __file__, "--naive-loop", encrypted, o],
        "decrypt_jobs1": lambda o: etcjax_cmd("decrypt", *dec, encrypted, "--out", o,
                                              "--jobs", "1", "--jpeg-decoder", "pillow"),
        f"decrypt_jobs{j}_process": lambda o: etcjax_cmd("decrypt", *dec, encrypted, "--out",
                                                          o, "--jobs", j, "--jpeg-decoder",
                                                          "pillow"),
    }
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for r in range(args.rounds):
      for name, make in candidates.items():
        o = os.path.join(tmp, f"{name}_{r}")
        e = dict(env, ETCJAX_POOL="thread") if name.endswith("_thread") else env
        times[name].append(timed(make(o), e, name))
        print(f"  round {r} {name}: {times[name][-1]:.2f} s", flush=True)
        shutil.rmtree(o)
    if args.auto_decoder:
      o = os.path.join(tmp, "dec_auto")
      name = f"decrypt_jobs{j}_auto_decoder"
      times[name] = [timed(etcjax_cmd("decrypt", *dec, encrypted, "--out", o, "--jobs", j),
                           env, name)]
      shutil.rmtree(o)
    # The parallel outputs are the bytes of the one-worker outputs.
    for name in ("encrypt_jobs1", f"encrypt_jobs{j}_process"):
      o = os.path.join(tmp, f"check_{name}")
      subprocess.run(candidates[name](o), check=True, capture_output=True, env=env)
    same = subprocess.run(["diff", "-rq", os.path.join(tmp, "check_encrypt_jobs1"),
                           os.path.join(tmp, f"check_encrypt_jobs{j}_process")],
                          capture_output=True).returncode == 0
    doc["parallel_output_identical_to_jobs1"] = same
    stats_src = linked_subset(args.folder, args.stats_limit, os.path.join(tmp, "stats_src"))
    for jj in ("1", j):
      name = f"compress_stats_{args.stats_limit}_jobs{jj}"
      times[name] = [timed(etcjax_cmd("compress-stats", stats_src, "--key", key, "--jobs", jj),
                           env, name)]
  best = {k: min(v) for k, v in times.items()}
  doc["wall_s"] = times
  doc["best_s"] = best
  doc["img_per_s"] = {k: round((args.stats_limit if k.startswith("compress") else n) / v, 1)
                      for k, v in best.items()}
  # CPU seconds per file (all processes of a run): what one core spends per file, which
  # a loaded machine does not distort the way it distorts wall times.
  doc["cpu_s"] = CPU_S
  doc["cpu_us_per_img"] = {
      k: round(min(v) / (args.stats_limit if k.startswith("compress") else n) * 1e6, 1)
      for k, v in CPU_S.items()}
  doc["speedup_vs_naive_loop"] = {
      k: round(best[f"naive_loop_{k.split('_')[0]}_side"] / v, 2)
      for k, v in best.items() if k.startswith(("encrypt", "decrypt"))}
  doc["startup"] = startup()
  doc["transform"] = transform_bench(args.folder)
  doc["loadavg_after"] = os.getloadavg()
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")
  print(json.dumps({k: doc[k] for k in ("img_per_s", "speedup_vs_naive_loop", "cpu_us_per_img",
                                         "startup",
                                         "transform", "parallel_output_identical_to_jobs1",
                                         "loadavg_after")}, indent=1))
  print(f"wrote {out_path}")


if __name__ == "__main__":
  if sys.argv[1:2] == ["--naive-loop"]:  # a candidate: the baseline in its own process
    naive_loop(sys.argv[2], sys.argv[3], None)
  else:
    main()
