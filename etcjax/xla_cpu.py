"""Settings that make training on XLA:CPU fast: the host allocator and compiler options.

Both were found by profiling a ConvMixer-256/8 training step (batch 64, 2-core AMD EPYC);
`benchmarks/bench_models.py` measures them against PyTorch.

Host allocator (opt-in). XLA:CPU allocates a step's intermediate buffers in one block
(6.7 GB for a ConvMixer-256/8 step at batch 64) with `malloc` at every execution and frees
it at the end. glibc serves allocations over 32 MiB with fresh `mmap` pages and unmaps
them on `free`, so every step page-faults and zero-fills its whole working set again: ~30 %
of that step. `keep_freed_memory()` makes glibc keep and reuse freed memory instead: no
`mmap` per allocation (`M_MMAP_MAX` 0), no trimming (`M_TRIM_THRESHOLD` -1) and one arena
(`M_ARENA_MAX` 1, so that threads share the reused heap), and it runs CPU computations
synchronously (`jax_cpu_enable_async_dispatch` off): with asynchronous dispatch the next
step's block is allocated while the previous one is still being freed, and the reused heap
grew to 2-3 working sets (6.8 GiB resident became 19.2 GiB). With both, the ConvMixer step
ran in 4.4-4.6 s instead of 6.9 s at the default's 6.8 GiB resident (ViT-S/16 batch 8:
1.5 s instead of 1.7 s, 1.9 GiB). The process keeps its peak memory until it exits, a
single arena may slow a many-threaded host input pipeline, and this was measured on one
machine, so it is opt-in: set `ETCJAX_KEEP_FREED_MEMORY=1`. The training entry points, the
demo and the benchmarks then call it before JAX starts (it must: threads that already own
an arena keep it, and the dispatch mode is fixed when JAX creates its CPU client). glibc
only (Linux); elsewhere it does nothing.

Compiler options. XLA:CPU vectorises loops for 256-bit registers by default; on AVX-512
machines 512-bit vectors made the ConvMixer step's elementwise, shifted-sum and reduction
loops faster (the whole step 8.6 s -> 6.9 s). `compiler_options()` returns the options for
`jax.jit(..., compiler_options=...)`; LLVM caps the width at what the CPU has, so they are
safe everywhere, and they are empty off CPU.
"""

from __future__ import annotations

import ctypes
import os
import platform
import warnings

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

ENV_VAR = "ETCJAX_KEEP_FREED_MEMORY"
# Process-wide, like the malloc settings it records: a second call is a no-op.
_applied = False


def compiler_options(backend: str | None = None) -> dict[str, int]:
  """XLA options for jitting training / evaluation steps on `backend` (default: JAX's).

  Returns:
    `{"xla_cpu_prefer_vector_width": 512}` on CPU, `{}` elsewhere.
  """
  if backend is None:
    import jax
    backend = jax.default_backend()
  return {"xla_cpu_prefer_vector_width": 512} if backend == "cpu" else {}


def _jax_started() -> bool:
  """Whether JAX has created its backends (clients, thread pools) in this process."""
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # private API moved: assume not started
    return False


def keep_freed_memory(force: bool | None = None) -> bool:
  """Makes glibc malloc keep and reuse freed memory, and CPU dispatch synchronous.

  See the module docstring. Call before the first JAX computation.

  Args:
    force: True/False to apply or not; None applies it when the environment variable
      `ETCJAX_KEEP_FREED_MEMORY` is "1".

  Returns:
    Whether the settings were applied: never on a non-glibc C library, and not (with a
    warning) once JAX has started.
  """
  global _applied
  if force is None:
    force = os.environ.get(ENV_VAR, "").strip() == "1"
  if not force or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  if _applied:
    return True
  if _jax_started():
    # Too late: its threads own arenas and its dispatch is asynchronous, the combination
    # that grew the heap to 3x. Better the default allocator than that.
    warnings.warn(f"{ENV_VAR}=1 ignored: JAX was already running; call "
                  "etcjax.xla_cpu.keep_freed_memory() before the first JAX computation",
                  RuntimeWarning, stacklevel=2)
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # mallopt returns 1 on success; -1 as the trim threshold means "never trim".
  if not all(mallopt(param, value) == 1 for param, value in
             ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1))):
    return False
  import jax
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  _applied = True
  return True
