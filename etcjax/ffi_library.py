"""Loads etcjax's optional compiled XLA:CPU kernels (etcjax/csrc) and registers them with JAX.

Each kernel library is built by `pip install` where a C++17 compiler exists (setup.py,
optional extensions) and is not a Python module: it exports XLA FFI handler symbols, which
`load` opens with ctypes and registers as CPU custom-call targets. A library that is
missing, fails to load, or registers but computes wrong results with the installed jaxlib
(the FFI ABI is checked only when a handler runs) is reported, not raised: callers fall
back to their pure-XLA formulation and say why in a status line.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Callable, Mapping

import jax


def load(module: str, targets: Mapping[str, str], describe: Callable[[ctypes.CDLL], str],
         self_test: Callable[[], str | None]) -> tuple[ctypes.CDLL | None, str]:
  """Loads `module`'s library, registers its handlers and runs its self-test.

  Args:
    module: the extension's dotted name, e.g. "etcjax._etc_cpu".
    targets: FFI target name -> exported handler symbol.
    describe: library -> a few words on its code path (e.g. "AVX-512 VBMI").
    self_test: runs the registered kernels on a small input; returns None when the results
      are right, else what went wrong.

  Returns:
    `(library, status)`: the ctypes library (keep it referenced: unloading it would leave
    XLA dangling handlers) or None, and one line saying "loaded (...)" or why not.
  """
  try:
    spec = importlib.util.find_spec(module)
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.origin or not os.path.exists(spec.origin):
    return None, (f"not built: no {module} library (reinstall with a C++17 compiler: "
                  "pip install -e .)")
  if not hasattr(jax, "ffi"):
    return None, f"unsupported: jax {jax.__version__} has no jax.ffi"
  path = os.path.realpath(spec.origin)
  try:
    lib = ctypes.CDLL(spec.origin)
    detail = describe(lib)
    for target, symbol in targets.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
  except (OSError, AttributeError, RuntimeError, ValueError) as e:
    return None, f"failed to load {path}: {e}"
  try:
    error = self_test()
  except Exception as e:  # any failure means: do not use the kernel
    error = f"{type(e).__name__}: {e}"
  if error:
    return None, f"failed its self-test ({error}): {path}"
  return lib, f"loaded ({detail}): {path}"
