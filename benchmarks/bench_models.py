"""Times one training step of ConvMixer-256/8 and ViT-S/16 in JAX (and PyTorch, if installed).

  .venv/bin/python benchmarks/bench_models.py                      # both models, defaults
  .venv/bin/python benchmarks/bench_models.py --models convmixer --convmixer-batch 16
  python benchmarks/bench_models.py --dtype bfloat16 --vit-model ViT-B_16 --vit-batch 128 \
      --convmixer-batch 256                                         # an NVIDIA GPU

JAX steps are jitted as etcjax training jits them, with `etcjax.xla_cpu.compiler_options()`
(`--default-compiler-options` leaves them out), and both frameworks' processes get the
malloc settings training uses: on a CPU-only install glibc keeps freed memory (see
`etcjax.xla_cpu`; `--default-malloc` or ETCJAX_KEEP_FREED_MEMORY=0 leaves malloc as is,
`--keep-freed-memory` forces it).

A step is forward + cross-entropy + backward + AdamW update (+ BatchNorm statistics for
ConvMixer) on random data, timed after compilation / warm-up as the best and median of
`--steps` runs. For ConvMixer every depthwise formulation in `--depthwise`, for ViT every
attention implementation in `--attention` is timed ("auto" resolves per backend). When
`torch` imports (the optional `bench` extra: `.venv/bin/pip install torch==2.13.0`, a CPU
wheel) the same networks and step run in PyTorch, in a process of its own (its own heap;
see `TorchWorker`), on the CPU or, when JAX runs on an NVIDIA GPU, on CUDA (eager,
`torch.autocast` for bfloat16, channels-last for ConvMixer as its kernels want), and the
JAX / PyTorch time ratio is printed, and for each step its minor page faults and system
CPU time (with default malloc, XLA:CPU maps a step's whole working set afresh every step;
on some VMs faulting it in costs seconds: compare with `--default-malloc`).
Model FLOPs per step are 3x the forward pass's (`etcjax.models.flops`; ConvMixer counted
with the plain grouped conv); on a GPU/TPU with a known peak (or `--peak-tflops`) model
FLOPs utilisation (MFU) is printed too. JAX and PyTorch steps are timed in alternation
(one step at a time in either process), so a busy spell slows both; still, timings on a
shared machine are noisy: rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from etcjax import models, xla_cpu  # noqa: E402
from etcjax.models import convmixer, vit  # noqa: E402
from etcjax.models import flops as model_flops  # noqa: E402

# One step's wall time (seconds), minor page faults and system CPU time (seconds).
Measurement = tuple[float, float, float]


def measured(step: Callable[[], object]) -> Callable[[], Measurement]:
  """Wraps `step` (which must block until done) to return its `Measurement`.

  Page faults and system time come from `getrusage` of the calling process: the cost of
  touching freshly mapped memory, which the wall time includes.
  """
  def run() -> Measurement:
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return seconds, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime

  return run


def time_interleaved(runners: dict[str, Callable[[], Measurement]], steps: int,
                     usage: dict[str, tuple[float, float]] | None = None
                     ) -> dict[str, tuple[float, float]]:
  """Runs every runner once (warm-up), then `steps` rounds of each in turn.

  Interleaving spreads a busy machine's slow spells over all contenders instead of one.
  If `usage` is given it receives `{name: (minor page faults, system CPU seconds)}` per
  step.

  Returns:
    `{name: (best seconds, median seconds)}`.
  """
  for fn in runners.values():
    fn()
  times: dict[str, list[float]] = {name: [] for name in runners}
  faults = {name: 0.0 for name in runners}
  system = {name: 0.0 for name in runners}
  for _ in range(steps):
    for name, fn in runners.items():
      seconds, step_faults, step_system = fn()
      times[name].append(seconds)
      faults[name] += step_faults
      system[name] += step_system
  if usage is not None:
    usage.update({name: (faults[name] / steps, system[name] / steps) for name in runners})
  return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def jax_step_runner(model, batch: int, size: int, num_classes: int,
                    compiler_options: dict | None = None) -> Callable[[], Measurement]:
  """Compiles a training step (with XLA `compiler_options`); returns a runner doing one step."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, num_classes, batch))
  variables = model.init(jax.random.key(0), x[:1], train=False)
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  tx = optax.adamw(1e-3, weight_decay=0.05)
  opt_state = tx.init(params)

  def loss_fn(params, stats, x, y, key):
    logits, updates = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                  rngs={"dropout": key}, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates.get("batch_stats", stats)

  def step(params, stats, opt_state, x, y, key):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  jitted = jax.jit(step, donate_argnums=(0, 1, 2), compiler_options=compiler_options)
  key = jax.random.key(1)
  compiled = jitted.lower(params, stats, opt_state, x, y, key).compile()
  state = [params, stats, opt_state]

  def run():
    state[0], state[1], state[2], loss = compiled(*state, x, y, key)
    jax.block_until_ready(loss)

  return measured(run)


# ------------------------------------------------------------------------------- PyTorch


def torch_models(torch):
  """The paper's ConvMixer and a timm-equivalent ViT, in PyTorch (built only if it imports)."""
  nn = torch.nn

  class Residual(nn.Module):
    def __init__(self, fn):
      super().__init__()
      self.fn = fn

    def forward(self, x):
      return self.fn(x) + x

  def conv_mixer(dim, depth, kernel_size, patch_size, n_classes):
    return nn.Sequential(
        nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size), nn.GELU(),
        nn.BatchNorm2d(dim),
        *[nn.Sequential(
            Residual(nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), nn.GELU(),
                nn.BatchNorm2d(dim))),
            nn.Conv2d(dim, dim, kernel_size=1), nn.GELU(), nn.BatchNorm2d(dim))
          for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, n_classes))

  class Block(nn.Module):
    def __init__(self, dim, heads, mlp):
      super().__init__()
      self.heads = heads
      self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
      self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
      self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x):
      b, t, d = x.shape
      q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
      a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
      x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
      return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))

  class ViT(nn.Module):
    def __init__(self, patch, dim, depth, heads, mlp, n_classes, size):
      super().__init__()
      self.patch_embed = nn.Conv2d(3, dim, patch, patch)
      self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
      self.pos_embed = nn.Parameter(torch.randn(1, 1 + (size // patch) ** 2, dim) * 0.02)
      self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
      self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, n_classes)

    def forward(self, x):
      x = self.patch_embed(x).flatten(2).transpose(1, 2)
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
      return self.head(self.norm(self.blocks(x))[:, 0])

  return conv_mixer, ViT


def torch_step_runner(torch, model, batch: int, size: int, num_classes: int,
                      channels_last: bool, device: str = "cpu", bf16: bool = False
                      ) -> Callable[[], None]:
  """Returns a runner doing one PyTorch training step on `device` ("cpu" or "cuda").

  `bf16` computes under `torch.autocast` in bfloat16 with float32 parameters, as the JAX
  models' `dtype="bfloat16"` does. A CUDA step is synchronised before the runner returns.
  """
  torch.manual_seed(0)
  x = (torch.rand(batch, 3, size, size) * 2 - 1).to(device)
  y = torch.randint(0, num_classes, (batch,)).to(device)
  model = model.to(device)
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
  loss_fn = torch.nn.CrossEntropyLoss()

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
      loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()

  return run


# A PyTorch step: ("convmixer" or "vit", batch, image size, ViT architecture as (patch,
# hidden, layers, heads, mlp) or None), by label.
TorchSpec = tuple[str, int, int, tuple[int, int, int, int, int] | None]


def _torch_worker(conn, specs: dict[str, TorchSpec], platform: str, bf16: bool,
                  keep_freed: bool) -> None:
  """The PyTorch process: builds the steps, then runs the one each message names."""
  xla_cpu.keep_freed_memory(force=keep_freed)  # The same malloc settings as the JAX side.
  try:
    import torch
  except ImportError:
    conn.send(("missing", "torch not installed: JAX timings only (pip install the 'bench' "
                          "extra)"))
    return
  device = {"cpu": "cpu", "gpu": "cuda"}.get(platform)  # PyTorch runs where JAX runs.
  if device is None or (device == "cuda" and not torch.cuda.is_available()):
    conn.send(("missing", f"no PyTorch device matches JAX's {platform}: JAX timings only"))
    return
  torch.set_num_threads(os.cpu_count() or 1)
  conv_mixer, vit_cls = torch_models(torch)
  runners = {}
  for label, (kind, batch, size, arch) in specs.items():
    if kind == "convmixer":
      model, channels_last = conv_mixer(256, 8, 9, 1, 10), True
    else:
      model, channels_last = vit_cls(*arch, 10, size), False
    runners[label] = measured(torch_step_runner(torch, model, batch, size, 10, channels_last,
                                                device, bf16))
  conn.send(("ready", f"torch {torch.__version__} on {device}, {torch.get_num_threads()} "
                      "threads, in a process of its own"))
  for label in iter(conn.recv, None):
    conn.send(runners[label]())


class TorchWorker:
  """PyTorch's steps in a process of their own, run one at a time when asked.

  A process of its own gives PyTorch its own heap. In one process the two frameworks'
  allocations interleave in glibc's heap, and XLA's per-step working set was faulted in
  afresh even with glibc keeping freed memory (ViT-S/16: 26k faults, +0.17 s per step).
  """

  def __init__(self, specs: dict[str, TorchSpec], platform: str, bf16: bool,
               keep_freed: bool):
    context = multiprocessing.get_context("spawn")  # no fork of a running JAX
    self._conn, child = context.Pipe()
    self._process = context.Process(target=_torch_worker,
                                    args=(child, specs, platform, bf16, keep_freed),
                                    daemon=True)
    self._process.start()
    child.close()  # so that a worker that dies reads as EOF here
    try:
      status, self.message = self._conn.recv()
    except EOFError:
      status, self.message = "failed", "the PyTorch process exited: JAX timings only"
    self.ready = status == "ready"
    if not self.ready:
      self.close()

  def runner(self, label: str) -> Callable[[], Measurement]:
    def run() -> Measurement:
      self._conn.send(label)
      return self._conn.recv()
    return run

  def close(self) -> None:
    if self._process.is_alive():
      try:
        self._conn.send(None)
      except (BrokenPipeError, OSError):
        pass
    self._process.join(timeout=30)


# ----------------------------------------------------------------------------------- main


def _names(arg: str) -> list[str]:
  """The non-empty items of a comma-separated option value."""
  return [name.strip() for name in arg.split(",") if name.strip()]


def _usage_note(usage: tuple[float, float]) -> str:
  faults, system = usage
  return f"\n{'':30s}   page faults/step {faults:10,.0f}, system CPU {system:6.2f} s/step"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="convmixer,vit",
                      help="comma-separated subset of convmixer,vit")
  parser.add_argument("--convmixer-batch", type=int, default=64)
  parser.add_argument("--vit-batch", type=int, default=8)
  parser.add_argument("--vit-model", default="ViT-S_16",
                      help=f"ViT variant, from {', '.join(vit.CONFIG_NAMES)}")
  parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
  parser.add_argument("--depthwise", default="auto,conv",
                      help=f"ConvMixer depthwise formulations, from {convmixer.DEPTHWISE_IMPLS}")
  parser.add_argument("--layouts", default="auto",
                      help=f"ConvMixer activation layouts, from {convmixer.LAYOUTS}")
  parser.add_argument("--attention", default="auto",
                      help=f"ViT attention implementations, from {vit.ATTENTION_IMPLS}")
  parser.add_argument("--mlp", default="auto",
                      help=f"ViT MLP implementations, from {vit.MLP_IMPLS}")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--vit-remat", action="store_true", help="ViT with remat=True")
  parser.add_argument("--vit-scan", action="store_true", help="ViT with scan=True")
  parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="accelerator peak TFLOP/s for MFU (default: from the device kind)")
  parser.add_argument("--default-compiler-options", action="store_true",
                      help="jit without etcjax.xla_cpu.compiler_options() (as training uses)")
  malloc = parser.add_mutually_exclusive_group()
  malloc.add_argument("--keep-freed-memory", action="store_true",
                      help="glibc malloc keeps freed memory (etcjax.xla_cpu) even where an "
                      "accelerator is installed; the PyTorch process gets it as well")
  malloc.add_argument("--default-malloc", action="store_true",
                      help="glibc malloc as is, also on CPU (where training keeps freed "
                      "memory by default), in both processes")
  args = parser.parse_args(argv)
  # As training does unless told: on CPU (ETCJAX_KEEP_FREED_MEMORY unset) keep freed memory.
  force = True if args.keep_freed_memory else False if args.default_malloc else None
  kept = xla_cpu.keep_freed_memory(force=force)
  options = {} if args.default_compiler_options else xla_cpu.compiler_options()

  device = jax.devices()[0]
  peak = args.peak_tflops or (model_flops.peak_tflops(device) if device.platform != "cpu" else None)
  print(f"jax {jax.__version__} on {device.platform} ({device.device_kind}), "
        f"{jax.device_count()} device(s), {os.cpu_count()} CPU(s), dtype {args.dtype}, "
        f"malloc {'keeps freed memory' if kept else 'as is'}, XLA options {options}")
  wanted = _names(args.models)
  runs = []
  if "convmixer" in wanted:
    for impl in _names(args.depthwise):
      for layout in _names(args.layouts):
        resolved = convmixer.resolve_depthwise_impl(impl)
        label = f"{resolved},{convmixer.resolve_layout(layout, resolved)}"
        runs.append((f"ConvMixer-256/8 [{label}]", "convmixer",
                     models.create("ConvMixer-256_8", 10, depthwise_impl=impl, layout=layout,
                                   dtype=args.dtype), args.convmixer_batch, 32))
  if "vit" in wanted:
    arch = vit.get_config(args.vit_model)  # ValueError naming the valid variants
    vit_label = args.vit_model.replace("_", "/")
    for impl in _names(args.attention):
      for mlp in _names(args.mlp):
        label = f"{vit.resolve_attention_impl(impl)},{vit.resolve_mlp_impl(mlp)}"
        runs.append((f"{vit_label} [{label}]", "vit",
                     models.create(args.vit_model, 10, dtype=args.dtype, remat=args.vit_remat,
                                   scan=args.vit_scan, attention_impl=impl, mlp_impl=mlp),
                     args.vit_batch, 224))

  runners: dict[str, Callable[[], Measurement]] = {}
  flops: dict[str, float] = {}
  torch_specs: dict[str, TorchSpec] = {}
  for label, kind, model, batch, size in runs:
    runners[label] = jax_step_runner(model, batch, size, 10, options)
    # Count ConvMixer with the standard grouped conv: every formulation does the same math.
    counted = model.clone(depthwise_impl="conv", layout="NHWC") if kind == "convmixer" else model
    shapes = jax.eval_shape(lambda m=counted, s=size: m.init(
        jax.random.key(0), jnp.zeros((1, s, s, 3)), train=False))
    flops[label] = batch * model_flops.training_flops_per_image(counted, shapes, size)
    torch_arch = None if kind == "convmixer" else (
        arch.patch_size, arch.hidden_size, arch.num_layers, arch.num_heads, arch.mlp_dim)
    torch_specs.setdefault(f"PyTorch {kind}", (kind, batch, size, torch_arch))
  worker = None
  if not args.no_torch:
    worker = TorchWorker(torch_specs, device.platform,
                         args.dtype == "bfloat16", kept)
    print(worker.message, flush=True)
    if worker.ready:
      runners.update({label: worker.runner(label) for label in torch_specs})
  usage: dict[str, tuple[float, float]] = {}
  try:
    times = time_interleaved(runners, args.steps, usage)
  finally:
    if worker is not None:
      worker.close()

  for label, kind, _, batch, size in runs:
    best, median = times[label]
    line = (f"{label:30s} batch {batch:4d} @{size}: JAX best {best:8.3f} s  median "
            f"{median:8.3f} s  {batch / best:9.1f} img/s")
    f = flops[label]
    line += f"  {f / 1e9:8.1f} model GFLOP/step  {f / best / 1e12:7.3f} TFLOP/s"
    if peak:
      line += f"  MFU {100 * f / best / (peak * 1e12):5.1f}% of {peak:g} TFLOP/s"
    line += _usage_note(usage[label])
    torch_label = f"PyTorch {kind}"
    if torch_label in times:
      tbest, tmedian = times[torch_label]
      line += (f"\n{'':30s} PyTorch best {tbest:8.3f} s  median {tmedian:8.3f} s  "
               f"{batch / tbest:9.1f} img/s   JAX/PyTorch time ratio {best / tbest:5.2f} "
               f"(median {median / tmedian:5.2f})" + _usage_note(usage[torch_label]))
    print(line, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
