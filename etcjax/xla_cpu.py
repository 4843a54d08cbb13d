"""Settings that make training on XLA:CPU fast: the host allocator and compiler options.

Both were found by profiling a ConvMixer-256/8 training step (batch 64, 2-core AMD EPYC);
`benchmarks/bench_models.py` measures them against PyTorch.

Host allocator. XLA:CPU allocates a step's intermediate buffers (gigabytes for a ConvMixer
step) with `malloc` at every execution and frees them at its end. glibc serves each
allocation over 32 MiB with fresh `mmap` pages and unmaps them on `free`, and its
per-thread arenas do the same with their 64 MiB heaps, so every step page-faults and
zero-fills its whole working set again: ~30 % of the step, and a 67 MB elementwise op ran
7x slower on fresh pages. `keep_freed_memory()` makes glibc keep and reuse freed memory: no
`mmap` per allocation (`M_MMAP_MAX` 0), no trimming of the heap top (`M_TRIM_THRESHOLD` -1)
and one arena (`M_ARENA_MAX` 1, so that threads share the reused heap). It has to run
before JAX creates its CPU client (threads that already own an arena keep it): the training
entry points call it first thing. The process then keeps its peak host memory until it
exits, which is what a training job wants. On accelerators the step's buffers live in
device memory, and one arena could slow a many-threaded host input pipeline, so it is only
done when JAX will run on CPU; not on glibc (macOS, musl) there is nothing to do.
Environment: `ETCJAX_KEEP_FREED_MEMORY=1` forces it, `=0` disables it.

Compiler options. XLA:CPU vectorises loops for 256-bit registers by default; on AVX-512
machines 512-bit vectors made the ConvMixer step's elementwise, shifted-sum and reduction
loops ~15 % faster. `compiler_options()` returns the options for `jax.jit(...,
compiler_options=...)`; LLVM caps the width at what the CPU has, so they are safe
everywhere, and they are empty off CPU.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
from importlib import metadata

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

ENV_VAR = "ETCJAX_KEEP_FREED_MEMORY"

# Modules whose presence means JAX will pick a GPU/TPU unless told otherwise.
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin",
                        "jax_rocm60_plugin", "jax_rocm7_plugin")


def compiler_options(backend: str | None = None) -> dict[str, int]:
  """XLA options for jitting training / evaluation steps on `backend` (default: JAX's).

  Returns:
    `{"xla_cpu_prefer_vector_width": 512}` on CPU, `{}` elsewhere.
  """
  if backend is None:
    import jax
    backend = jax.default_backend()
  return {"xla_cpu_prefer_vector_width": 512} if backend == "cpu" else {}


def will_run_on_cpu() -> bool:
  """Whether JAX's default backend will be the CPU, decided without initialising JAX.

  True when `JAX_PLATFORMS` names only "cpu", or when it is unset and no GPU/TPU plugin
  (libtpu, jax CUDA/ROCm plugins, `jax_plugins` entry points) is installed.
  """
  forced = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if forced:
    return forced == ["cpu"]
  if any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_MODULES):
    return False
  return not list(metadata.entry_points(group="jax_plugins"))


def keep_freed_memory(force: bool | None = None) -> bool:
  """Makes glibc malloc keep and reuse freed memory (see the module docstring).

  Call before the first JAX computation. Does nothing on a non-glibc C library, when
  `ETCJAX_KEEP_FREED_MEMORY=0`, or (unless forced) when JAX will not run on CPU.

  Args:
    force: True/False to apply or skip regardless of the backend; None decides from
      `ETCJAX_KEEP_FREED_MEMORY`, else `will_run_on_cpu()`.

  Returns:
    Whether the allocator settings were applied.
  """
  env = os.environ.get(ENV_VAR, "").strip()
  if force is None and env in ("0", "1"):
    force = env == "1"
  if force is False or (force is None and not will_run_on_cpu()):
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # mallopt returns 1 on success; -1 as the trim threshold means "never trim".
  return all(mallopt(param, value) == 1 for param, value in
             ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1)))
