"""Profiles the trainer's real step with `jax.profiler` and tables the top kernels by time.

    python benchmarks/profile_step.py --out OUTDIR                  # on the accelerator
    python benchmarks/profile_step.py --smoke --out /tmp/profile    # tiny models, any CPU

For each case it builds the step training runs (`etcjax.train.make_train_step`: on-device
EtC encryption, model, loss, backward, optimiser) on synthetic uint8 batches:

  * ConvMixer-256/8 at 32x32, batch 256, AdamW (once per `--depthwise` formulation);
  * ConvMixer-384/8 at 224x224, batch 64, AdamW (likewise);
  * ViT-B/16 at 224x224, batch 128, SGD (the paper's fine-tuning step);

compiles it, times `--steps` steps without the profiler (median wall time), then traces
`--steps` more with `jax.profiler.trace` and reads the trace back with
`jax.profiler.ProfileData` (no TensorBoard needed). The device's "XLA Ops" line (or, where
there is none, its stream lines; on CPU the XLA client threads' op events) gives each
HLO instruction's time; the compiled step's HLO text names what each one is (opcode,
fusion kind, custom-call target: a Pallas kernel, cuBLAS, cuDNN) and which model code it
came from (`op_name` metadata: e.g. `mixer_*/depthwise`, forward or backward).

Written to OUTDIR: `profile.md` (every case: step time, top `--top` ops by time per step,
and time by op kind and by model scope), `profile.json` (the same, machine-readable, with
the device kind, JAX version, XLA_FLAGS and the command line), and per case the optimised
HLO (`<case>.hlo.txt.gz`) and, with `--keep-trace`, the raw trace (`trace_<case>/`, for
XProf / TensorBoard / Perfetto). Op times from a trace are device (or CPU thread) busy
time; on a CPU several threads' ops overlap, so there they need not add up to the step.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from etcjax import config as config_lib  # noqa: E402
from etcjax import fileio, train  # noqa: E402
from etcjax.keys import EtcKey  # noqa: E402

# (label, model, image size, EtC block, optimizer, batch, is_convmixer,
#  smoke model, smoke size, smoke block, smoke batch)
CASES = (
    ("ConvMixer-256/8 32", "ConvMixer-256_8", 32, 4, "adamw", 256, True,
     "ConvMixer-tiny-test", 32, 4, 4),
    ("ConvMixer-384/8 224", "ConvMixer-384_8", 224, 16, "adamw", 64, True,
     "ConvMixer-tiny-test", 32, 8, 4),
    ("ViT-B/16 224", "ViT-B_16", 224, 16, "sgd", 128, False, "ViT-tiny-test", 32, 4, 4),
)
# Events of the CPU trace that are no XLA op.
_CPU_NOISE = ("ThreadpoolListener", "ThunkExecutor", "end: ")
_STAT_KEYS = ("hlo_category", "long_name", "kernel_details", "tf_op", "flops",
              "bytes_accessed", "hlo_op")


def slug(text: str) -> str:
  """A file-name-safe form of a case label: letters, digits, '.', '_' and '-' only."""
  return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def build_step(model: str, size: int, block: int, optimizer: str, batch: int,
               overrides: dict[str, Any], dtype: str, key_file: str
               ) -> tuple[Any, dict[str, Any], Any, Any]:
  """The trainer's compiled step for one case, its first state, a batch and the cipher."""
  c = config_lib.base_config()
  c.dataset = "digits"  # Only for the number of classes; the batches below are synthetic.
  c.model = model
  for k, v in overrides.items():
    c.model_overrides[k] = v
  c.image_size, c.block_size, c.batch_size = size, block, batch
  c.encryption, c.key_file = "etc", key_file
  c.optimizer = optimizer
  c.learning_rate = 0.01 if optimizer == "adamw" else 0.03
  c.dtype = dtype
  setup = train.build(c)
  tx = train.make_optimizer(c)
  state = train.init_state(setup, tx)
  step_fn = train.make_train_step(setup, tx)
  data = NamedSharding(setup.mesh, PartitionSpec("data"))
  rng = np.random.default_rng(0)
  batch_arrays = {
      "image": jax.device_put(rng.integers(0, 256, (batch, size, size, 3), np.uint8), data),
      "label": jax.device_put(rng.integers(0, 10, (batch,), np.int32), data)}
  compiled = step_fn.lower(state, batch_arrays, setup.cipher).compile()
  return compiled, {"state": state}, batch_arrays, setup.cipher


# ------------------------------------------------------------------------------ HLO text

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+) = .*?\s([a-z][a-z0-9\-]*)\(")


def hlo_index(hlo_text: str) -> dict[str, dict[str, str]]:
  """Instruction name -> {opcode, kind (fusion kind or custom-call target), op_name}."""
  index = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    info = {"opcode": m.group(2)}
    kind = re.search(r'custom_call_target="([^"]+)"', line) or re.search(r"kind=(k\w+)", line)
    if kind:
      info["kind"] = kind.group(1)
    op_name = re.search(r'op_name="([^"]+)"', line)
    if op_name:
      info["op_name"] = op_name.group(1)
    index[m.group(1)] = info
  return index


def scope(op_name: str) -> str:
  """Model scope of an op: `jit(step)/transpose(jvp(ConvMixer))/mixer_3/depthwise/conv` ->
  `ConvMixer/mixer_*/depthwise (bwd)` (at most four names from the model's class down)."""
  if not op_name:
    return "(no op_name)"
  backward = "transpose(" in op_name
  # jvp(ConvMixer) -> ConvMixer; mixer_3 -> mixer_*.
  parts = [re.sub(r"_\d+\b", "_*", re.sub(r"^(?:[\w.]+\()+([^()]*)\)*$", r"\1", part))
           for part in op_name.split("/")]
  start = next((i for i, p in enumerate(parts) if p[:1].isupper()), None)
  path = "/".join(parts[start:start + 4] if start is not None else parts[-2:])
  return f"{path} ({'bwd' if backward else 'fwd'})"


# --------------------------------------------------------------------------------- trace


def op_events(xplane_path: str) -> tuple[str, list[tuple[str, float, dict[str, Any]]]]:
  """(source, [(op name, duration ns, stats)]) from a trace: device ops, else CPU ops."""
  data = jax.profiler.ProfileData.from_file(xplane_path)
  planes = list(data.planes)
  devices = [p for p in planes if p.name.startswith("/device:")]
  events: list[tuple[str, float, dict[str, Any]]] = []
  if devices:
    for plane in devices:
      lines = list(plane.lines)
      chosen = [ln for ln in lines if ln.name == "XLA Ops"] or [
          ln for ln in lines if "Stream" in ln.name]
      for line in chosen:
        for e in line.events:
          events.append((e.name, e.duration_ns, _stats(e)))
    return f"{len(devices)} device plane(s): {devices[0].name}", events
  for plane in planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if line.name == "python":
        continue
      for e in line.events:
        if e.duration_ns > 0 and not e.name.startswith(_CPU_NOISE) and not e.name.startswith(
            ("PjitFunction", "$")):
          events.append((e.name, e.duration_ns, {}))
  return "host CPU threads", events


def _stats(event: Any) -> dict[str, Any]:
  try:
    return {k: v for k, v in event.stats if k in _STAT_KEYS}
  except Exception:  # noqa: BLE001 - stats are a nicety
    return {}


def summarise(events: list[tuple[str, float, dict[str, Any]]], steps: int,
              index: dict[str, dict[str, str]], top: int) -> dict[str, Any]:
  """Per-op totals per step, the top ops, and totals by op kind and by model scope."""
  total = collections.Counter()
  count = collections.Counter()
  stats: dict[str, dict[str, Any]] = {}
  for name, ns, st in events:
    total[name] += ns
    count[name] += 1
    stats.setdefault(name, st)
  busy = sum(total.values())
  ops = []
  for name, ns in total.most_common():
    info = index.get(name, {})
    kind = info.get("opcode", stats[name].get("hlo_category", "?"))
    if info.get("kind"):
      kind += f" {info['kind']}"
    ops.append({"op": name, "ms_per_step": ns / 1e6 / steps, "share": ns / busy if busy else 0.0,
                "count_per_step": count[name] / steps, "kind": kind,
                "scope": scope(info.get("op_name", "")), "op_name": info.get("op_name", ""),
                **{f"stat_{k}": str(v)[:300] for k, v in stats[name].items()}})
  by_kind: dict[str, float] = collections.defaultdict(float)
  by_scope: dict[str, float] = collections.defaultdict(float)
  for op in ops:
    by_kind[op["kind"]] += op["ms_per_step"]
    by_scope[op["scope"]] += op["ms_per_step"]
  return {"busy_ms_per_step": busy / 1e6 / steps, "ops": ops[:top], "distinct_ops": len(ops),
          "by_kind": sorted(by_kind.items(), key=lambda kv: -kv[1]),
          "by_scope": sorted(by_scope.items(), key=lambda kv: -kv[1])}


def markdown(case: dict[str, Any], top_groups: int = 15) -> str:
  """One case's tables."""
  s = case["summary"]
  lines = [f"## {case['case']}", "",
           f"model `{case['model']}` {case['overrides'] or ''}, {case['image_size']}x"
           f"{case['image_size']}, batch {case['batch_size']}, {case['dtype']}, EtC on device; "
           f"step {case['step_ms_median']:.2f} ms median of {case['timed_steps']} "
           f"(untraced), {case['images_per_sec']:.0f} img/s; traced op time "
           f"{s['busy_ms_per_step']:.2f} ms/step over {s['distinct_ops']} distinct ops "
           f"({case['trace_source']}).", "",
           "| # | op | ms/step | share | calls/step | kind | model scope |",
           "|---:|---|---:|---:|---:|---|---|"]
  for i, op in enumerate(s["ops"], 1):
    lines.append(f"| {i} | `{op['op']}` | {op['ms_per_step']:.3f} | {100 * op['share']:.1f} % "
                 f"| {op['count_per_step']:g} | {op['kind']} | {op['scope']} |")
  for title, rows in (("op kind", s["by_kind"]), ("model scope", s["by_scope"])):
    lines += ["", f"By {title}:", "", f"| {title} | ms/step |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in rows[:top_groups]]
  return "\n".join(lines) + "\n"


def profile_case(label: str, model: str, size: int, block: int, optimizer: str, batch: int,
                 overrides: dict[str, Any], key_file: str, args: argparse.Namespace
                 ) -> dict[str, Any]:
  """Compiles, times and traces one case; writes its HLO (and trace) under args.out."""
  name = slug(label)
  compiled, holder, batch_arrays, cipher = build_step(model, size, block, optimizer, batch,
                                                      overrides, args.dtype, key_file)
  with gzip.open(os.path.join(args.out, f"{name}.hlo.txt.gz"), "wt") as f:
    f.write(compiled.as_text())
  index = hlo_index(compiled.as_text())

  def run() -> None:
    holder["state"], metrics = compiled(holder["state"], batch_arrays, cipher)
    jax.block_until_ready(metrics)

  for _ in range(args.warmup):
    run()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  trace_dir = tempfile.mkdtemp(prefix=f"trace_{name}_")
  with jax.profiler.trace(trace_dir):
    for i in range(args.steps):
      with jax.profiler.StepTraceAnnotation("train", step_num=i):
        run()
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {trace_dir}")
  source, events = op_events(paths[-1])
  if args.keep_trace:
    shutil.copytree(trace_dir, os.path.join(args.out, f"trace_{name}"), dirs_exist_ok=True)
  shutil.rmtree(trace_dir, ignore_errors=True)
  median = statistics.median(times)
  return {"case": label, "model": model, "overrides": overrides, "image_size": size,
          "batch_size": batch, "dtype": args.dtype, "optimizer": optimizer,
          "step_ms_median": 1e3 * median, "step_ms_best": 1e3 * min(times),
          "images_per_sec": batch / median, "timed_steps": args.steps,
          "trace_source": source, "summary": summarise(events, args.steps, index, args.top)}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="output folder (created)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny models and batches (a CPU check that the script works)")
  parser.add_argument("--steps", type=int, default=None, help="timed and traced steps "
                      "(default 5; smoke 2)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--top", type=int, default=25, help="ops in each table")
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                      help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")
  parser.add_argument("--depthwise", default="conv,pallas",
                      help="ConvMixer depthwise formulations to profile (each a case)")
  parser.add_argument("--vit-overrides", default="",
                      help="ViT model overrides, e.g. 'attention_impl=flax'")
  parser.add_argument("--only", default="", help="comma-separated substrings of case labels")
  parser.add_argument("--keep-trace", action="store_true",
                      help="keep the raw traces (trace_<case>/) under --out")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  args.steps = args.steps or (2 if args.smoke else 5)
  args.warmup = min(args.warmup, 1) if args.smoke else args.warmup
  backend = jax.default_backend()
  args.dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
  device = jax.devices()[0]
  print(f"{jax.device_count()} x {device.device_kind} ({backend}), JAX {jax.__version__}, "
        f"dtype {args.dtype}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  vit_overrides = dict(kv.split("=", 1) for kv in args.vit_overrides.split(",") if kv)
  only = [s.strip().lower() for s in args.only.split(",") if s.strip()]
  cases = []
  for label, model, size, block, opt, batch, is_cm, s_model, s_size, s_block, s_batch in CASES:
    if args.smoke:
      model, size, block, batch = s_model, s_size, s_block, s_batch * jax.device_count()
    variants = ([(f"{label} depthwise={impl}", {"depthwise_impl": impl, "layout": "NHWC"})
                 for impl in args.depthwise.split(",") if impl] if is_cm
                else [(label + "".join(f" {k}={v}" for k, v in vit_overrides.items()),
                       vit_overrides)])
    for name, overrides in variants:
      if not only or any(s in name.lower() for s in only):
        cases.append((name, model, size, block, opt, batch, overrides))

  results, failures = [], []
  with tempfile.TemporaryDirectory() as tmp:
    key_file = os.path.join(tmp, "bench.key")
    EtcKey.insecure_from_seed(0).save(key_file)  # Benchmark data only: a reproducible key.
    for name, *rest in cases:
      print(f"profiling {name} ...", flush=True)
      try:
        r = profile_case(name, *rest, key_file, args)
      except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
        failures.append({"case": name, "error": f"{type(e).__name__}: {e}"[:4000]})
        print(f"  FAILED: {type(e).__name__}: {str(e)[:500]}", flush=True)
        continue
      results.append(r)
      top = r["summary"]["ops"][:3]
      print(f"  step {r['step_ms_median']:.2f} ms; top: " + ", ".join(
          f"{o['op']} {o['ms_per_step']:.2f} ms ({o['kind']}, {o['scope']})" for o in top),
          flush=True)

  doc = {"device_kind": device.device_kind, "backend": backend,
         "device_count": jax.device_count(), "jax_version": jax.__version__,
         "python": platform.python_version(), "smoke": args.smoke, "dtype": args.dtype,
         "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
         "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
         "results": results, "failures": failures}
  fileio.write_text(os.path.join(args.out, "profile.json"), json.dumps(doc, indent=2) + "\n")
  header = (f"# Step profiles: {device.device_kind} ({backend}), JAX {jax.__version__}, "
            f"{doc['time_utc']}\n\nXLA_FLAGS={doc['xla_flags']!r}; command: `{doc['command']}`"
            "\n\n")
  body = "\n".join(markdown(r) for r in results)
  body += "".join(f"\n## {f['case']}: FAILED\n\n```\n{f['error']}\n```\n" for f in failures)
  fileio.write_text(os.path.join(args.out, "profile.md"), header + body)
  print(f"wrote {args.out}/profile.md and profile.json")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
