"""ConvMixer (Trockman & Kolter, "Patches Are All You Need?"), as used by MaungMaung & Kiya.

Architecture (the paper's PyTorch definition):

  patch_embed: conv p x p, stride p, 3 -> dim;  GELU;  BatchNorm
  depth x [ x + BatchNorm(GELU(depthwise k x k conv, "same" padding)(x))
            pointwise 1x1 conv;  GELU;  BatchNorm ]
  global average pool;  head: Linear(dim -> classes)

GELU is exact (erf), BatchNorm uses PyTorch's defaults (momentum 0.1, i.e. Flax momentum
0.9; epsilon 1e-5), and weights start from PyTorch's default Conv2d / Linear
initialisation (uniform +-1/sqrt(fan_in) for kernels and biases) so that training recipes
carry over. GELU is `activations.gelu`, whose backward pass keeps only its input (autodiff
of `jax.nn.gelu` keeps two more full-size intermediates per call).

Parameters: `patch_embed/{kernel (p, p, 3, dim), bias}`, `patch_norm/{scale, bias}`,
`mixer_{i}/depthwise/{kernel (k, k, 1, dim), bias}` (Flax's grouped-conv layout),
`mixer_{i}/norm_dw`, `mixer_{i}/pointwise/{kernel (dim, dim), bias}`, `mixer_{i}/norm_pw`,
`head/{kernel (dim, classes), bias}`; BatchNorm statistics in the `batch_stats` collection.
They do not depend on the options below, so variables move freely between them.

Input: float NHWC images in [-1, 1] (`normalize`). Scaling by a constant per channel is what
a mean/std normalisation would do too, but EtC images mix channels (channel shuffle) and flip
intensities (p -> 1 - p) block by block, so one affine map that is the same for every
channel and symmetric about 0.5 keeps every encrypted block's statistics alike; the first
BatchNorm absorbs the remaining scale.

Speed. XLA's grouped convolution, the obvious depthwise conv, is many times slower than
PyTorch's on CPU. Options select equivalent, faster formulations (tested equal to float
rounding, forward and gradients):

* `depthwise_impl`: "conv" (XLA grouped conv), "ffi" (etcjax's compiled CPU kernel,
  `depthwise_cpu`: forward, input and kernel gradients each an FFI call), "shift" (fused
  shifted multiply-adds with a hand-written backward pass, `depthwise_shift`), "shift_scan"
  (a `lax.scan` over kernel rows, plain autodiff) or "auto": on CPU "ffi" where the kernel
  is built (else "shift"), "conv" on GPU/TPU.
* `layout`: the activation layout inside the mixer layers, "NHWC" or "CNHW" (channel-major:
  the kernel's planes, and XLA's CPU code vectorises the shifted sums and the BatchNorm /
  kernel-gradient reductions along the contiguous spatial axis), or "auto": "CNHW" with
  "ffi" or "shift" on CPU, else "NHWC". In CNHW the 1x1 convolution is `pointwise_cnhw`,
  whose hand-written backward pass keeps XLA from fusing a transpose into the GELU /
  BatchNorm code (a third of the step before).

The training steps compile with `etcjax.xla_cpu.compiler_options()`. Measured step times
of each formulation, with their date, commit and machine, are in docs/performance.md. The
custom backward passes make "ffi" and "shift" reverse-mode only (`jax.jvp` needs "conv" or
"shift_scan").
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from etcjax.kernels import depthwise_pallas
from etcjax.models import activations, depthwise_cpu

Array = jax.Array

INPUT_RANGE = (-1.0, 1.0)
DEPTHWISE_IMPLS = ("auto", "conv", "shift", "shift_scan", "ffi", "pallas")
LAYOUTS = ("auto", "NHWC", "CNHW")


def normalize(images: Array) -> Array:
  """Maps float images in [0, 1] (any shape) to the ConvMixer input range [-1, 1]."""
  return images * 2.0 - 1.0


def torch_uniform_init(fan_in_axes: tuple[int, ...]) -> nn.initializers.Initializer:
  """PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Args:
    fan_in_axes: axes of the kernel shape whose product is the fan-in.
  """

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    fan_in = 1
    for a in fan_in_axes:
      fan_in *= shape[a]
    bound = fan_in ** -0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _bias_init(fan_in: int) -> nn.initializers.Initializer:
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


def _same_padding(k: int) -> tuple[int, int]:
  # PyTorch padding="same" and XLA "SAME" agree: the extra pixel (even k) goes after.
  lo = (k - 1) // 2
  return lo, k - 1 - lo


# ------------------------------------------------------------- depthwise conv formulations
#
# Every formulation takes `x` `(N, H, W, C)` ("NHWC") or `(C, N, H, W)` ("CNHW") and a kernel
# `(k, k, 1, C)` and returns `out` in x's layout with "same" zero padding:
#   out[n, h, w, c] = sum_ij xpad[n, h + i, w + j, c] * kernel[i, j, 0, c].


def _spatial_axes(layout: str) -> tuple[int, int]:
  return (1, 2) if layout == "NHWC" else (2, 3)


def _pad_spatial(x: Array, pad: tuple[int, int], layout: str) -> Array:
  widths = [(0, 0)] * 4
  for a in _spatial_axes(layout):
    widths[a] = pad
  return jnp.pad(x, widths)


def _window(xp: Array, i: int, j: int, h: int, w: int, layout: str) -> Array:
  if layout == "NHWC":
    return xp[:, i:i + h, j:j + w, :]
  return xp[:, :, i:i + h, j:j + w]


def _tap(taps: Array, i: int, j: int, layout: str) -> Array:
  return taps[i, j] if layout == "NHWC" else taps[i, j][:, None, None, None]


def depthwise_conv(x: Array, kernel: Array, layout: str = "NHWC") -> Array:
  """Depthwise conv with XLA's grouped convolution (`feature_group_count = C`)."""
  k = kernel.shape[0]
  return lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding=(_same_padding(k), _same_padding(k)),
      dimension_numbers=(layout, "HWIO", layout), feature_group_count=kernel.shape[-1])


def depthwise_shift_scan(x: Array, kernel: Array, layout: str = "NHWC") -> Array:
  """Depthwise conv as a `lax.scan` over kernel rows of k shifted multiply-adds.

  Plain autodiff: under `grad` one padded row band per kernel row is saved (not k*k padded
  copies as with an unrolled sum). Slower than `depthwise_shift`, but differentiable in any
  mode (forward mode included).
  """
  if layout != "NHWC":
    out = depthwise_shift_scan(jnp.transpose(x, (1, 2, 3, 0)), kernel)
    return jnp.transpose(out, (3, 0, 1, 2))
  k = kernel.shape[0]
  n, h, w, c = x.shape
  xp = _pad_spatial(x, _same_padding(k), layout)
  rows = kernel[:, :, 0, :]  # (k, k, C)

  def step(acc: Array, inputs: tuple[Array, Array]) -> tuple[Array, None]:
    i, row = inputs
    band = lax.dynamic_slice_in_dim(xp, i, h, axis=1)  # (N, H, W + k - 1, C)
    for j in range(k):
      acc = acc + band[:, :, j:j + w, :] * row[j]
    return acc, None

  acc0 = jnp.zeros((n, h, w, c), jnp.result_type(x, kernel))
  out, _ = lax.scan(step, acc0, (jnp.arange(k), rows))
  return out


def _shifted_sum(x: Array, taps: Array, pad: tuple[int, int], layout: str) -> Array:
  """`sum_ij window_ij(xpad) * taps[i, j]` as one fused elementwise loop.

  Args:
    x: activations in `layout`.
    taps: `(k, k, C)`.
    pad: zero padding `(before, after)` of both spatial axes.
    layout: "NHWC" or "CNHW".

  Returns:
    x's shape and dtype, accumulated in float32.
  """
  k = taps.shape[0]
  h, w = (x.shape[a] for a in _spatial_axes(layout))
  xp = _pad_spatial(x, pad, layout)
  taps = taps.astype(jnp.float32)
  acc = None
  for i in range(k):
    for j in range(k):
      term = _window(xp, i, j, h, w, layout).astype(jnp.float32) * _tap(taps, i, j, layout)
      acc = term if acc is None else acc + term
  return acc.astype(x.dtype)


def _tap_gradients(x: Array, g: Array, k: int, layout: str) -> Array:
  """`dw[i, j, c] = sum_nhw xpad[n, h+i, w+j, c] * g[n, h, w, c]`, float32 `(k, k, C)`.

  A `lax.scan` over kernel rows; each step is one variadic reduction with k outputs, so the
  k column shifts of a row share a single pass over the data (81 separate reductions would
  read it 81 times). It runs channel-major, `(C, N, H, W)`: XLA's CPU reductions are fast
  over contiguous minor axes and slow over strided ones (2.8x in a measurement at batch 8).
  """
  if layout == "NHWC":
    x, g = jnp.transpose(x, (3, 0, 1, 2)), jnp.transpose(g, (3, 0, 1, 2))
  _, _, h, w = x.shape
  xt = _pad_spatial(x.astype(jnp.float32), _same_padding(k), "CNHW")
  gt = g.astype(jnp.float32)

  def row(_: None, i: Array) -> tuple[None, Array]:
    band = lax.dynamic_slice_in_dim(xt, i, h, axis=2)  # (C, N, H, W + k - 1)
    products = tuple(band[..., j:j + w] * gt for j in range(k))
    zeros = tuple(jnp.zeros((), jnp.float32) for _ in range(k))
    sums = lax.reduce(products, zeros,
                      lambda a, b: tuple(p + q for p, q in zip(a, b, strict=True)), (1, 2, 3))
    return None, jnp.stack(sums)

  return lax.scan(row, None, jnp.arange(k))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_shift(x: Array, kernel: Array, layout: str = "NHWC") -> Array:
  """Depthwise conv as fused shifted multiply-adds with a hand-written backward pass.

  Forward and input gradient (the same sum with the kernel rotated by 180 degrees and the
  padding mirrored) are each one fused loop over the output; the kernel gradient is
  `_tap_gradients`. Only `x` and `kernel` are saved for the backward pass, so memory stays
  that of one activation (XLA's autodiff of the unrolled sum keeps k*k padded copies and
  asked for 50 GB). Reverse mode only: `jax.jvp` / forward-over-reverse needs "conv" or
  "shift_scan".
  """
  return _shifted_sum(x, kernel[:, :, 0, :], _same_padding(kernel.shape[0]), layout)


def _depthwise_shift_fwd(x: Array, kernel: Array, layout: str
                         ) -> tuple[Array, tuple[Array, Array]]:
  return depthwise_shift(x, kernel, layout), (x, kernel)


def _depthwise_shift_bwd(layout: str, res: tuple[Array, Array], g: Array
                         ) -> tuple[Array, Array]:
  x, kernel = res
  k = kernel.shape[0]
  lo, hi = _same_padding(k)
  dx = _shifted_sum(g.astype(x.dtype), kernel[::-1, ::-1, 0, :], (hi, lo), layout)
  dw = _tap_gradients(x, g, k, layout)[:, :, None, :].astype(kernel.dtype)
  return dx, dw


depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


@jax.custom_vjp
def pointwise_cnhw(x: Array, kernel: Array) -> Array:
  """1x1 convolution of channel-major activations: `out[o] = sum_i kernel[i, o] * x[i]`.

  Args:
    x: `(C_in, N, H, W)`.
    kernel: `(C_in, C_out)`.

  Returns:
    `(C_out, N, H, W)`, x's dtype.

  The forward pass and the input gradient are single matmuls over the contiguous NHW axis.
  The kernel gradient contracts NHW in both operands, so XLA:CPU's canonical matmul needs
  one of them transposed; left to itself it fuses that transpose into the elementwise
  GELU / BatchNorm code that produces the operand, and runs that code in transposed order,
  which made it many times slower (docs/performance.md).
  The backward pass below materialises the output gradient first (an optimisation
  barrier) and transposes it on its own. Same math as `jnp.einsum("io,inhw->onhw", ...)`
  (tested, forward and gradients).
  """
  return jnp.einsum("io,inhw->onhw", kernel, x)


def _pointwise_cnhw_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
  return pointwise_cnhw(x, kernel), (x, kernel)


def _pointwise_cnhw_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
  x, kernel = res
  dx = jnp.einsum("io,onhw->inhw", kernel, g)
  g = lax.optimization_barrier(g)
  g_t = jnp.transpose(g.reshape(g.shape[0], -1))  # (NHW, C_out)
  dk = jnp.dot(x.reshape(x.shape[0], -1), g_t, preferred_element_type=jnp.float32)
  return dx, dk.astype(kernel.dtype)


pointwise_cnhw.defvjp(_pointwise_cnhw_fwd, _pointwise_cnhw_bwd)


def depthwise_ffi(x: Array, kernel: Array, layout: str = "NHWC") -> Array:
  """Depthwise conv as etcjax's compiled CPU kernel (`depthwise_cpu.depthwise_cnhw`).

  Channel-major at heart: NHWC inputs are transposed there and back. CPU only, needs
  `depthwise_cpu.available()`; reverse-mode differentiable.
  """
  if layout == "NHWC":
    out = depthwise_cpu.depthwise_cnhw(jnp.transpose(x, (3, 0, 1, 2)), kernel)
    return jnp.transpose(out, (1, 2, 3, 0))
  return depthwise_cpu.depthwise_cnhw(x, kernel)


def depthwise_pallas_kernels(x: Array, kernel: Array, layout: str = "NHWC") -> Array:
  """Depthwise conv as etcjax's Pallas kernels (`etcjax.kernels.depthwise_pallas.depthwise`).

  Triton on GPUs, Mosaic on TPUs and Pallas interpret mode on CPU, picked per lowering
  platform (`lax.platform_dependent`), not per call. NHWC at heart: CNHW inputs are
  transposed there and back. Reverse-mode differentiable.
  """
  if layout == "NHWC":
    return depthwise_pallas.depthwise(x, kernel)
  out = depthwise_pallas.depthwise(jnp.transpose(x, (1, 2, 3, 0)), kernel)
  return jnp.transpose(out, (3, 0, 1, 2))


DEPTHWISE_FUNCTIONS = {"conv": depthwise_conv, "shift": depthwise_shift,
                       "shift_scan": depthwise_shift_scan, "ffi": depthwise_ffi,
                       "pallas": depthwise_pallas_kernels}


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def resolve_depthwise_impl(impl: str) -> str:
  """Maps "auto" to the fastest formulation on the default backend: on CPU "ffi" where the
  compiled kernel loaded (`depthwise_cpu.status()`), else "shift"; "conv" on GPU/TPU (cuDNN
  / the TPU convolution units handle grouped convs well)."""
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"unknown depthwise_impl {impl!r}; valid: {', '.join(DEPTHWISE_IMPLS)}")
  if impl == "auto":
    if not _on_cpu():
      return "conv"
    return "ffi" if depthwise_cpu.available() else "shift"
  if impl == "ffi" and not _on_cpu():
    raise ValueError(f"depthwise_impl 'ffi' is a CPU kernel; the default backend is "
                     f"{jax.default_backend()}")
  if impl == "ffi" and not depthwise_cpu.available():
    raise ValueError(f"depthwise_impl 'ffi' needs the compiled CPU kernel, which is "
                     f"{depthwise_cpu.status()}")
  return impl


def resolve_layout(layout: str, impl: str = "shift") -> str:
  """Maps "auto" to "CNHW" for the "shift" and "ffi" formulations on CPU, else "NHWC".

  Args:
    layout: one of `LAYOUTS`.
    impl: the resolved depthwise formulation (XLA's grouped conv is slower still on CPU in
      CNHW, and "shift_scan" works in NHWC).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
  if layout == "auto":
    return "CNHW" if _on_cpu() and impl in ("shift", "ffi") else "NHWC"
  return layout


# -------------------------------------------------------------------------------- modules


class DepthwiseConv(nn.Module):
  """k x k depthwise convolution with bias, "same" padding, in `layout`.

  Attributes:
    kernel_size: k.
    impl: a resolved `DEPTHWISE_IMPLS` entry ("conv", "shift", "shift_scan", "ffi").
    layout: "NHWC" or "CNHW".
    dtype: computation dtype.

  Parameters `kernel (k, k, 1, C)` (float32) and `bias (C,)`.
  """

  kernel_size: int
  impl: str = "shift"
  layout: str = "NHWC"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channel_axis = -1 if self.layout == "NHWC" else 0
    c, k = x.shape[channel_axis], self.kernel_size
    kernel = self.param("kernel", torch_uniform_init((0, 1, 2)), (k, k, 1, c), jnp.float32)
    bias = self.param("bias", _bias_init(k * k), (c,), jnp.float32)
    out = DEPTHWISE_FUNCTIONS[self.impl](x.astype(self.dtype), kernel.astype(self.dtype),
                                         self.layout)
    bias = bias.astype(self.dtype)
    return out + (bias if self.layout == "NHWC" else bias[:, None, None, None])


class Pointwise(nn.Module):
  """1x1 conv (a Dense over channels) in `layout`; parameters as `nn.Dense`'s."""

  features: int
  layout: str = "NHWC"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1] if self.layout == "NHWC" else x.shape[0]
    kernel = self.param("kernel", torch_uniform_init((0,)), (c, self.features), jnp.float32)
    bias = self.param("bias", _bias_init(c), (self.features,), jnp.float32)
    kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
    if self.layout == "NHWC":
      return x.astype(self.dtype) @ kernel + bias
    return pointwise_cnhw(x.astype(self.dtype), kernel) + bias[:, None, None, None]


class ConvMixerLayer(nn.Module):
  """One mixer layer: residual depthwise conv -> GELU -> BN, then 1x1 conv -> GELU -> BN."""

  kernel_size: int
  impl: str = "shift"
  layout: str = "NHWC"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    channel_axis = -1 if self.layout == "NHWC" else 0
    d = x.shape[channel_axis]
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, axis=channel_axis)
    gelu = activations.gelu
    y = DepthwiseConv(self.kernel_size, self.impl, self.layout, self.dtype, name="depthwise")(x)
    x = x + norm(name="norm_dw")(gelu(y))
    x = Pointwise(d, self.layout, self.dtype, name="pointwise")(x)
    return norm(name="norm_pw")(gelu(x))


class ConvMixer(nn.Module):
  """ConvMixer-dim/depth classifier.

  Attributes:
    dim: channels h of every mixer layer.
    depth: number of mixer layers.
    kernel_size: depthwise kernel side k.
    patch_size: patch-embedding side and stride p.
    num_classes: logits per image.
    depthwise_impl: one of `DEPTHWISE_IMPLS` (module docstring).
    layout: one of `LAYOUTS` (module docstring).
    dtype: computation dtype ("float32" or "bfloat16"); parameters, BatchNorm statistics and
      logits stay float32.

  Call: `(images (N, H, W, 3) float in [-1, 1], train: bool) -> logits (N, num_classes)`;
  with `train=True` apply it with `mutable=["batch_stats"]`.
  """

  dim: int
  depth: int
  kernel_size: int = 9
  patch_size: int = 7
  num_classes: int = 1000
  depthwise_impl: str = "auto"
  layout: str = "auto"
  dtype: Any = "float32"

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    impl = resolve_depthwise_impl(self.depthwise_impl)
    layout = resolve_layout(self.layout, impl)
    dtype = jnp.dtype(self.dtype)
    p, d = self.patch_size, self.dim
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                kernel_init=torch_uniform_init((0, 1, 2)), bias_init=_bias_init(p * p * 3),
                name="patch_embed")(images.astype(dtype))
    channel_axis = -1
    if layout == "CNHW":
      x, channel_axis = jnp.transpose(x, (3, 0, 1, 2)), 0
    x = activations.gelu(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                     axis=channel_axis, name="patch_norm")(x)
    for i in range(self.depth):
      x = ConvMixerLayer(self.kernel_size, impl, layout, dtype, name=f"mixer_{i}")(x, train)
    x = jnp.mean(x, axis=(1, 2)) if layout == "NHWC" else jnp.mean(x, axis=(2, 3)).T
    x = nn.Dense(self.num_classes, dtype=dtype, kernel_init=torch_uniform_init((0,)),
                 bias_init=_bias_init(d), name="head")(x)
    return x.astype(jnp.float32)


# name -> (dim, depth, kernel_size, patch_size); the paper's CIFAR/224 sizes and the ImageNet
# models of Trockman & Kolter (Table 1).
CONFIGS = {
    "ConvMixer-256_8": (256, 8, 9, 1),
    "ConvMixer-384_8": (384, 8, 9, 4),
    "ConvMixer-768_32": (768, 32, 7, 7),
    "ConvMixer-1536_20": (1536, 20, 9, 7),
    "ConvMixer-tiny-test": (16, 2, 3, 2),
}


def get_config(name: str) -> dict[str, int]:
  """Returns `dict(dim, depth, kernel_size, patch_size)` for a name in `CONFIGS`."""
  if name not in CONFIGS:
    raise ValueError(f"unknown ConvMixer config {name!r}; valid: {', '.join(CONFIGS)}")
  dim, depth, k, p = CONFIGS[name]
  return dict(dim=dim, depth=depth, kernel_size=k, patch_size=p)
