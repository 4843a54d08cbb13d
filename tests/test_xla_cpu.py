"""XLA:CPU settings: the host allocator and compiler options (etcjax.xla_cpu)."""

import platform
import subprocess
import sys

import pytest

from etcjax import xla_cpu

_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_off_when_told_or_where_an_accelerator_is_expected(monkeypatch):
  monkeypatch.setenv(xla_cpu.ENV_VAR, "0")
  assert xla_cpu.keep_freed_memory() is False
  monkeypatch.delenv(xla_cpu.ENV_VAR)
  monkeypatch.setattr(xla_cpu, "accelerator_expected", lambda: True)
  assert xla_cpu.keep_freed_memory() is False
  assert xla_cpu.keep_freed_memory(force=False) is False


def test_an_accelerator_is_expected_from_jax_platforms_or_installed_plugins(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert xla_cpu.accelerator_expected() is False
  for platforms in ("cuda", "tpu,cpu", "gpu"):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert xla_cpu.accelerator_expected() is True
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(xla_cpu.metadata, "entry_points",
                      lambda group: ["xla_cuda12"] if group == "jax_plugins" else [])
  assert xla_cpu.accelerator_expected() is True
  monkeypatch.setattr(xla_cpu.metadata, "entry_points", lambda group: [])
  monkeypatch.setattr(xla_cpu.importlib.util, "find_spec",
                      lambda name: object() if name == "libtpu" else None)
  assert xla_cpu.accelerator_expected() is True
  monkeypatch.setattr(xla_cpu.importlib.util, "find_spec", lambda name: None)
  assert xla_cpu.accelerator_expected() is False


@pytest.mark.skipif(not _GLIBC, reason="mallopt settings exist only in glibc")
def test_refused_with_a_warning_once_jax_is_running():
  code = ("import warnings, jax.numpy as jnp; from etcjax import xla_cpu\n"
          "jnp.ones(3).block_until_ready()\n"
          "with warnings.catch_warnings(record=True) as w:\n"
          "  warnings.simplefilter('always')\n"
          "  print(xla_cpu.keep_freed_memory(force=True), 'already' in str(w[0].message))\n")
  assert _run(code).split() == ["False", "True"]


def _run(code, **env):
  import os
  # -W error: an unexpected "ignored" warning fails the run.
  return subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code],
                        capture_output=True, text=True,
                        env={**os.environ, **env}, check=True).stdout


@pytest.mark.skipif(not _GLIBC, reason="mallopt settings exist only in glibc")
def test_applied_on_cpu_and_freed_big_buffers_are_reused():
  # A freed 64 MB buffer is reused without page faults (glibc's default unmaps it and the
  # next one faults its pages in again), CPU dispatch is synchronous, and JAX still works.
  code = (
      "import resource; from etcjax import xla_cpu; import numpy as np, jax.numpy as jnp\n"
      "print(xla_cpu.keep_freed_memory())\n"
      "a = np.ones(2**24, np.float32); del a\n"
      "f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
      "b = np.ones(2**24, np.float32)\n"
      "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f < 100)\n"
      "import jax; print(jax.config.read(\"jax_cpu_enable_async_dispatch\"))\n"
      "print(float(jnp.sum(jnp.ones(1000))))\n"
      "print(xla_cpu.keep_freed_memory())\n")  # Again, JAX running: a no-op, no warning.
  on = _run(code, **{xla_cpu.ENV_VAR: "1"}).split()
  assert on == ["True", "True", "False", "1000.0", "True"]
  off = _run(code, **{xla_cpu.ENV_VAR: "0"}).split()
  assert off == ["False", "False", "True", "1000.0", "False"]
  # Unset: on where JAX will run on the CPU, off where a GPU is expected (decided before
  # JAX starts, so no GPU is needed to test it).
  decide = "from etcjax import xla_cpu; print(xla_cpu.keep_freed_memory())"
  assert _run(decide, **{xla_cpu.ENV_VAR: "", "JAX_PLATFORMS": "cpu"}).split() == ["True"]
  assert _run(decide, **{xla_cpu.ENV_VAR: "", "JAX_PLATFORMS": "cuda"}).split() == ["False"]


def test_compiler_options_widen_vectors_on_cpu_only():
  assert xla_cpu.compiler_options("cpu") == {"xla_cpu_prefer_vector_width": 512}
  assert xla_cpu.compiler_options("gpu") == {} and xla_cpu.compiler_options("tpu") == {}
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda x: jnp.tanh(x) * 2, compiler_options=xla_cpu.compiler_options())
  assert float(f(jnp.zeros(()))) == 0.0
