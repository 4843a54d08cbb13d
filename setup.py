"""Builds etcjax's optional CPU kernels; all other metadata is in pyproject.toml.

Two libraries of XLA FFI handlers (not Python modules; etcjax.ffi_library loads them with
ctypes and registers them with JAX on first use):

* `etcjax._etc_cpu` (etcjax/csrc/etc_cpu.cc): the uint8 EtC transform, for etcjax.etc.
* `etcjax._depthwise_cpu` (etcjax/csrc/depthwise_cpu.cc): ConvMixer's depthwise conv and
  its gradients, for etcjax.models.depthwise_cpu (GCC or Clang: vector extensions).

Both are optional: with no C++17 compiler, or if compiling fails, pip prints a warning and
installs etcjax without them, and the callers use their pure-XLA paths
(`etc.cpu_kernel_status()`, `depthwise_cpu.status()` say which).

The XLA FFI headers it compiles against are vendored in etcjax/csrc/third_party (see the
README there) rather than taken from jaxlib at build time: pip builds in an isolated
environment, so using jaxlib's copy would mean a ~100 MB jaxlib download as a build
requirement on every fresh install, while the vendored headers keep `pip install -e .`
and `make venv` offline-safe and quick. The FFI ABI is versioned and XLA checks it when
the handler runs, so the pinned copy does not have to match the installed jaxlib.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_HEADERS = "etcjax/csrc/third_party"
# -isystem: no warnings from the vendored headers under Python's default -Wall.
_FLAGS = {
    "unix": ["-std=c++17", "-O3", "-g0", "-fvisibility=hidden", "-isystem", _HEADERS],
    "mingw32": ["-std=c++17", "-O3", "-g0", "-isystem", _HEADERS],
    "msvc": ["/std:c++17", "/O2", "/EHsc"],
}


class BuildExt(build_ext):
  """C++17 flags per compiler; the library exports only its FFI handler symbols."""

  def build_extensions(self):
    flags = _FLAGS.get(self.compiler.compiler_type, [])
    for ext in self.extensions:
      ext.extra_compile_args = flags + list(ext.extra_compile_args or [])
    super().build_extensions()

  def get_export_symbols(self, ext):
    return []  # not a Python module: no PyInit_ symbol to export




def _kernel(name: str, source: str) -> Extension:
  return Extension(
      f"etcjax.{name}",
      sources=[f"etcjax/csrc/{source}"],
      depends=["etcjax/csrc/ffi_util.h"]
      + [f"{_HEADERS}/xla/ffi/api/{h}" for h in ("api.h", "c_api.h", "ffi.h")],
      include_dirs=[_HEADERS],
      language="c++",
      optional=True,
  )


setup(
    ext_modules=[_kernel("_etc_cpu", "etc_cpu.cc"), _kernel("_depthwise_cpu", "depthwise_cpu.cc")],
    cmdclass={"build_ext": BuildExt},
)
