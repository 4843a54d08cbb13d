"""Settings that make training on XLA:CPU fast: the host allocator and compiler options.

Both were found by profiling a ConvMixer-256/8 training step on CPU;
`benchmarks/bench_models.py` measures them against PyTorch, and docs/performance.md has the
measured step times with their date, commit and machine.

Host allocator (on by default where JAX will run on the CPU). XLA:CPU allocates a step's
intermediate buffers in one block (several GiB for a ConvMixer-256/8 step at batch 64)
with `malloc` at every execution and frees it at the end. glibc serves allocations over
32 MiB with fresh `mmap` pages and unmaps them on `free`, so every step page-faults and
zero-fills its whole working set again. `keep_freed_memory()` makes glibc keep and reuse
freed memory instead: no `mmap` per allocation (`M_MMAP_MAX` 0), no trimming (`M_TRIM_THRESHOLD` -1)
and one arena (`M_ARENA_MAX` 1, so that threads share the reused heap), and it runs CPU
computations synchronously (`jax_cpu_enable_async_dispatch` off): with asynchronous
dispatch the next step's block is allocated while the previous one is still being freed,
and the reused heap grows to several working sets. With both, the model steps are faster at
the default's resident memory, and the host input pipeline stays far faster than the model
step (figures in docs/performance.md).

The price: the process keeps its peak host memory until it exits, and every thread
allocates from one arena. So it applies by default only where JAX will compute on the CPU
(`JAX_PLATFORMS` names cpu first, or no accelerator plugin or libtpu is installed) and
never where a GPU/TPU host's input pipeline could contend for the arena;
`ETCJAX_KEEP_FREED_MEMORY=1` forces it, `=0` turns it off. The training entry points, the
demo and the benchmarks call it before JAX starts (it must: threads that already own an
arena keep it, and the dispatch mode is fixed when JAX creates its CPU client). glibc only
(Linux); elsewhere it does nothing.

Compiler options. XLA:CPU vectorises loops for 256-bit registers by default; on AVX-512
machines 512-bit vectors make the ConvMixer step's elementwise, shifted-sum and reduction
loops faster (docs/performance.md). `compiler_options()` returns the options for
`jax.jit(..., compiler_options=...)`; LLVM caps the width at what the CPU has, so they are
safe everywhere, and they are empty off CPU.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import warnings
from importlib import metadata

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


def accelerator_expected() -> bool:
  """Whether JAX will likely compute on a GPU/TPU here, judged without starting it.

  True when `JAX_PLATFORMS` names anything but cpu first, or (unset) when an accelerator
  PJRT plugin (the `jax_plugins` entry points of jax[cuda12], jax[rocm], ...) or libtpu
  is installed.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() != "cpu"
  try:
    if metadata.entry_points(group="jax_plugins"):
      return True
  except Exception:  # noqa: BLE001 - broken package metadata: assume an accelerator
    return True
  return importlib.util.find_spec("libtpu") is not None


def keep_freed_memory(force: bool | None = None) -> bool:
  """Makes glibc malloc keep and reuse freed memory, and CPU dispatch synchronous.

  See the module docstring. Call before the first JAX computation.

  Args:
    force: True/False to apply or not; None follows `ETCJAX_KEEP_FREED_MEMORY` ("1" on,
      "0" off) and, where it is unset or empty, applies it unless `accelerator_expected()`.

  Returns:
    Whether the settings were applied: never on a non-glibc C library, and not (with a
    warning) once JAX has started.
  """
  global _applied
  asked = force is True
  if force is None:
    setting = os.environ.get(ENV_VAR, "").strip()
    asked = setting == "1"
    force = asked if setting else not accelerator_expected()
  if not force or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  if _applied:
    return True
  if _jax_started():
    # Too late: its threads own arenas and its dispatch is asynchronous, the combination
    # that grew the heap to 3x. Better the default allocator than that. Said only when
    # asked for explicitly: the default silently stays off in a process JAX runs in.
    if asked:
      warnings.warn("keeping freed memory (etcjax.xla_cpu) ignored: JAX was already running; "
                    "call etcjax.xla_cpu.keep_freed_memory() before the first JAX "
                    "computation", RuntimeWarning, stacklevel=2)
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
