"""ConvMixer's depthwise convolution as a compiled XLA:CPU kernel (etcjax/csrc/depthwise_cpu.cc).

`depthwise_cnhw(x, kernel)` is the "same"-padded depthwise k x k convolution of channel-major
activations, `(C, N, H, W)`, with a hand-written backward pass, all three parts FFI calls:

* forward: the kernel's conv with pad `(k - 1) // 2`;
* input gradient: the same conv of the output gradient with the taps rotated by 180 degrees
  and the padding mirrored;
* kernel gradient: the kernel's per-image tap gradient `(C, N, k, k)`, summed over images by
  XLA (so that under a batch-sharded jit each device sums its own images and XLA adds the
  usual cross-device reduction).

Each call filters independent (channel, image) planes, so under `jax.jit` with sharded
inputs every device runs the kernel on its own channels / images (`custom_partitioning`,
Shardy rule below), and a vmapped axis folds into the channels (`custom_vmap`). The
library is optional: it is built by `pip install` where a C++17 GCC or Clang exists, and
`available()` / `status()` say whether it loaded (ConvMixer's `depthwise_impl="auto"` then
uses it on CPU, else "shift"). Float32 inside; other float dtypes are converted around the
calls.

Per ConvMixer-256/8 layer at batch 64 on a 2-core AVX-512 machine: conv 15 ms and tap
gradient 21 ms, against ~100 ms and ~123 ms for XLA's fused shifted sums (README,
"Benchmarks").
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from etcjax import ffi_library

Array = jax.Array

_CONV_TARGET = "etcjax_depthwise_conv_f32"
_TAPGRAD_TARGET = "etcjax_depthwise_tapgrad_f32"
ISA_NAMES = ("baseline vectors", "AVX2", "AVX-512")  # the kernel's `isa` codes 0, 1, 2


@functools.cache
def _library() -> tuple[Any, str]:
  """Loads and registers the kernels once; returns (ctypes library or None, status)."""
  return ffi_library.load(
      "etcjax._depthwise_cpu",
      {_CONV_TARGET: "DepthwiseConvF32", _TAPGRAD_TARGET: "DepthwiseTapGradF32"},
      describe=lambda lib: ISA_NAMES[lib.DepthwiseBestIsa()],
      self_test=lambda: _self_test())


def available() -> bool:
  """Whether the compiled depthwise kernels are built and registered with JAX (CPU)."""
  return _library()[0] is not None


def status() -> str:
  """One line on the kernels: loaded (and the widest vectors this CPU runs) or why not."""
  return _library()[1]


def best_isa() -> int:
  """The widest code path this CPU runs (index into `ISA_NAMES`); -1 when not loaded."""
  lib = _library()[0]
  return -1 if lib is None else int(lib.DepthwiseBestIsa())


# ------------------------------------------------------------------------ the bare calls


def conv_call(x: Array, taps: Array, pad: int, isa: int = -1) -> Array:
  """`out[c, n, h, w] = sum_ij xpad[c, n, h + i, w + j] * taps[c, i, j]`.

  Args:
    x: `(C, N, H, W)` float32.
    taps: `(C, k, k)` float32.
    pad: zero rows / columns before (`k - 1 - pad` after), in `0..k-1`.
    isa: -1 for the best code path, or 0 / 1 / 2 (`ISA_NAMES`) to force one (tests).

  Returns:
    `(C, N, H, W)` float32. Bad shapes or arguments raise when the call runs.
  """
  call = jax.ffi.ffi_call(_CONV_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32),
                          vmap_method="sequential")
  return call(x, taps, pad=np.int64(pad), isa=np.int64(isa))


def tapgrad_call(x: Array, g: Array, kernel_size: int, pad: int, isa: int = -1) -> Array:
  """`out[c, n, i, j] = sum_hw xpad[c, n, h + i, w + j] * g[c, n, h, w]`.

  Args:
    x, g: `(C, N, H, W)` float32.
    kernel_size: k.
    pad: as in `conv_call`.
    isa: as in `conv_call`.

  Returns:
    `(C, N, k, k)` float32: the kernel gradient of each image.
  """
  c, n = x.shape[:2]
  call = jax.ffi.ffi_call(
      _TAPGRAD_TARGET, jax.ShapeDtypeStruct((c, n, kernel_size, kernel_size), jnp.float32),
      vmap_method="sequential")
  return call(x, g, kernel_size=np.int64(kernel_size), pad=np.int64(pad), isa=np.int64(isa))


def _self_test() -> str | None:
  """Runs both kernels on a small odd-sized input against NumPy; None if right."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 2, 5, 7), np.float32)
  g = rng.standard_normal((3, 2, 5, 7), np.float32)
  taps = rng.standard_normal((3, 3, 3), np.float32)
  with jax.ensure_compile_time_eval():  # runs now, also when first used inside a trace
    out = np.asarray(conv_call(jnp.asarray(x), jnp.asarray(taps), 1))
    dw = np.asarray(tapgrad_call(jnp.asarray(x), jnp.asarray(g), 3, 1))
  if not np.allclose(out, reference_conv(x, taps, 1), rtol=1e-4, atol=1e-4):
    return "wrong conv output"
  if not np.allclose(dw, reference_tapgrad(x, g, 3, 1), rtol=1e-4, atol=1e-4):
    return "wrong tap gradient"
  return None


def _pad_planes(x: np.ndarray, k: int, pad: int) -> np.ndarray:
  return np.pad(x, ((0, 0), (0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad)))


def reference_conv(x: np.ndarray, taps: np.ndarray, pad: int) -> np.ndarray:
  """NumPy float64 version of `conv_call` (tests and the self-test)."""
  k, (h, w) = taps.shape[-1], x.shape[2:]
  xp = _pad_planes(x.astype(np.float64), k, pad)
  out = np.zeros(x.shape, np.float64)
  for i in range(k):
    for j in range(k):
      out += xp[:, :, i:i + h, j:j + w] * taps[:, None, None, None, i, j]
  return out


def reference_tapgrad(x: np.ndarray, g: np.ndarray, k: int, pad: int) -> np.ndarray:
  """NumPy float64 version of `tapgrad_call` (tests and the self-test)."""
  h, w = x.shape[2:]
  xp = _pad_planes(x.astype(np.float64), k, pad)
  out = np.zeros(x.shape[:2] + (k, k), np.float64)
  for i in range(k):
    for j in range(k):
      out[:, :, i, j] = np.sum(xp[:, :, i:i + h, j:j + w] * g, axis=(2, 3))
  return out


# ------------------------------------------------------- partitioning over devices
#
# Both kernels work plane by plane, so any sharding of the C and N axes runs as is on every
# device; H, W (and the taps' k x k) stay whole.


def _plane_sharding(sharding: Any, mesh: Any) -> NamedSharding:
  """`sharding` of a (C, N, H, W) array kept on C and N (H, W replicated)."""
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))
    return NamedSharding(sharding.mesh, P(spec[0], spec[1], None, None))
  return NamedSharding(mesh, P())  # unknown form: replicate (correct, slower)


def _channel_sharding(planes: NamedSharding, ndim: int) -> NamedSharding:
  return NamedSharding(planes.mesh, P(planes.spec[0], *([None] * (ndim - 1))))


def _conv_default(x: Array, taps: Array, pad: int) -> Array:
  return conv_call(x, taps, pad)


def _conv_partition(pad, mesh, arg_shapes, result_shape):
  del result_shape
  xs = _plane_sharding(arg_shapes[0].sharding, mesh)
  return xs.mesh, lambda x, taps: conv_call(x, taps, pad), xs, (xs, _channel_sharding(xs, 3))


def _tapgrad_default(x: Array, g: Array, kernel_size: int, pad: int) -> Array:
  return tapgrad_call(x, g, kernel_size, pad)


def _tapgrad_partition(kernel_size, pad, mesh, arg_shapes, result_shape):
  del result_shape
  xs = _plane_sharding(arg_shapes[0].sharding, mesh)
  return xs.mesh, lambda x, g: tapgrad_call(x, g, kernel_size, pad), xs, (xs, xs)


_conv_partitioned = custom_partitioning(_conv_default, static_argnums=(2,))
_conv_partitioned.def_partition(
    partition=_conv_partition,
    infer_sharding_from_operands=lambda pad, mesh, args, result: _plane_sharding(
        args[0].sharding, mesh),
    propagate_user_sharding=lambda pad, mesh, user: _plane_sharding(user.sharding, mesh),
    sharding_rule="c n h w, c i j -> c n h w",
    need_replication_factors=("h", "w", "i", "j"))

_tapgrad_partitioned = custom_partitioning(_tapgrad_default, static_argnums=(2, 3))
_tapgrad_partitioned.def_partition(
    partition=_tapgrad_partition,
    infer_sharding_from_operands=lambda k, pad, mesh, args, result: _plane_sharding(
        args[0].sharding, mesh),
    propagate_user_sharding=lambda k, pad, mesh, user: _plane_sharding(user.sharding, mesh),
    sharding_rule="c n h w, c n h w -> c n i j",
    need_replication_factors=("h", "w", "i", "j"))


# ------------------------------------------------------------------- batching (vmap)
#
# A vmapped axis folds into the channel axis: planes are independent, so B x C channels of
# images (with the taps repeated, or per example when they are batched too) are one call.


def _fold(a: Array, batched: bool, size: int) -> Array:
  """(B, C, ...) batched or (C, ...) unbatched -> (B * C, ...)."""
  if not batched:
    a = jnp.broadcast_to(a, (size,) + a.shape)
  return a.reshape((size * a.shape[1],) + a.shape[2:])


@functools.cache
def _conv(pad: int):
  @jax.custom_batching.custom_vmap
  def conv(x: Array, taps: Array) -> Array:
    return _conv_partitioned(x, taps, pad)

  @conv.def_vmap
  def _rule(size, in_batched, x, taps):
    out = conv(_fold(x, in_batched[0], size), _fold(taps, in_batched[1], size))
    return out.reshape((size, -1) + out.shape[1:]), True

  return conv


@functools.cache
def _tapgrad(kernel_size: int, pad: int):
  @jax.custom_batching.custom_vmap
  def tapgrad(x: Array, g: Array) -> Array:
    return _tapgrad_partitioned(x, g, kernel_size, pad)

  @tapgrad.def_vmap
  def _rule(size, in_batched, x, g):
    out = tapgrad(_fold(x, in_batched[0], size), _fold(g, in_batched[1], size))
    return out.reshape((size, -1) + out.shape[1:]), True

  return tapgrad


# ------------------------------------------------------------------- the convolution


def _same_padding(k: int) -> tuple[int, int]:
  lo = (k - 1) // 2  # PyTorch padding="same" and XLA "SAME": the extra pixel goes after
  return lo, k - 1 - lo


def _taps(kernel: Array) -> Array:
  """Flax's depthwise kernel `(k, k, 1, C)` -> the kernel's float32 taps `(C, k, k)`."""
  return jnp.transpose(kernel[:, :, 0, :], (2, 0, 1)).astype(jnp.float32)


@jax.custom_vjp
def depthwise_cnhw(x: Array, kernel: Array) -> Array:
  """Depthwise k x k convolution, "same" zero padding, as the compiled CPU kernel.

  Args:
    x: `(C, N, H, W)` float (computed in float32).
    kernel: `(k, k, 1, C)` (Flax's grouped-conv layout).

  Returns:
    `(C, N, H, W)`, x's dtype: `out[c, n, h, w] = sum_ij xpad[c, n, h + i, w + j] *
    kernel[i, j, 0, c]`. Reverse-mode differentiable (`jax.grad`), not forward-mode.
    Requires `available()`; CPU only.
  """
  lo, _ = _same_padding(kernel.shape[0])
  return _conv(lo)(x.astype(jnp.float32), _taps(kernel)).astype(x.dtype)


def _depthwise_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
  return depthwise_cnhw(x, kernel), (x, kernel)


def _depthwise_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
  x, kernel = res
  k = kernel.shape[0]
  lo, hi = _same_padding(k)
  g32 = g.astype(jnp.float32)
  dx = _conv(hi)(g32, _taps(kernel)[:, ::-1, ::-1])
  per_image = _tapgrad(k, lo)(x.astype(jnp.float32), g32)  # (C, N, k, k)
  dw = jnp.transpose(jnp.sum(per_image, axis=1), (1, 2, 0))[:, :, None, :]
  return dx.astype(x.dtype), dw.astype(kernel.dtype)


depthwise_cnhw.defvjp(_depthwise_fwd, _depthwise_bwd)
