"""ConvMixer (Trockman & Kolter, "Patches Are All You Need?"), as used by MaungMaung & Kiya.

Architecture (the paper's PyTorch definition, NHWC here):

  patch_embed: conv p x p, stride p, 3 -> dim;  GELU;  BatchNorm
  depth x [ x + BatchNorm(GELU(depthwise k x k conv, "same" padding)(x))
            pointwise 1x1 conv;  GELU;  BatchNorm ]
  global average pool;  head: Linear(dim -> classes)

GELU is exact (erf), BatchNorm uses PyTorch's defaults (momentum 0.1, i.e. Flax momentum 0.9;
epsilon 1e-5), and weights start from PyTorch's default Conv2d / Linear initialisation
(uniform +-1/sqrt(fan_in) for kernels and biases) so that training recipes carry over.

Parameters: `patch_embed/{kernel (p, p, 3, dim), bias}`, `patch_norm/{scale, bias}`,
`mixer_{i}/depthwise/{kernel (k, k, 1, dim), bias}` (Flax's grouped-conv layout),
`mixer_{i}/norm_dw`, `mixer_{i}/pointwise/{kernel (dim, dim), bias}`, `mixer_{i}/norm_pw`,
`head/{kernel (dim, classes), bias}`; BatchNorm statistics in the `batch_stats` collection.

Input: float NHWC images in [-1, 1] (`normalize`). Scaling by a constant per channel is what
a mean/std normalisation would do too, but EtC images mix channels (channel shuffle) and flip
intensities (p -> 1 - p) block by block, so one affine map that is the same for every
channel and symmetric about 0.5 keeps every encrypted block's statistics alike; the first
BatchNorm absorbs the remaining scale.

The depthwise convolution has several numerically equivalent formulations
(`DEPTHWISE_IMPLS`); XLA's grouped convolution is slow on CPU, see `DepthwiseConv`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

INPUT_RANGE = (-1.0, 1.0)
DEPTHWISE_IMPLS = ("auto", "conv", "shift_scan")


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


def depthwise_conv(x: Array, kernel: Array) -> Array:
  """Depthwise conv with XLA's grouped convolution.

  Args:
    x: `(N, H, W, C)`.
    kernel: `(k, k, 1, C)` (HWIO with one input channel per group).

  Returns:
    `(N, H, W, C)`: `out[n,h,w,c] = sum_ij xpad[n,h+i,w+j,c] * kernel[i,j,0,c]`, "same" padding.
  """
  k = kernel.shape[0]
  return lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding=(_same_padding(k), _same_padding(k)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def depthwise_shift_scan(x: Array, kernel: Array) -> Array:
  """Depthwise conv as a `lax.scan` over kernel rows of k shifted multiply-adds.

  Same contract as `depthwise_conv`. Each scan step reads one row-shifted window of the padded
  input and accumulates k column shifts, so XLA fuses a step into one elementwise loop, and
  under autodiff only one padded copy per kernel row is saved (not k*k as with an unrolled
  sum).
  """
  k = kernel.shape[0]
  n, h, w, c = x.shape
  (lo, hi) = _same_padding(k)
  xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
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


DEPTHWISE_FUNCTIONS = {"conv": depthwise_conv, "shift_scan": depthwise_shift_scan}


def resolve_depthwise_impl(impl: str) -> str:
  """Maps "auto" to the fastest formulation on the default backend (CPU vs accelerators)."""
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"unknown depthwise_impl {impl!r}; valid: {', '.join(DEPTHWISE_IMPLS)}")
  if impl == "auto":
    return "shift_scan" if jax.default_backend() == "cpu" else "conv"
  return impl


class DepthwiseConv(nn.Module):
  """k x k depthwise convolution with bias, "same" padding; `(N, H, W, C)` -> same.

  Attributes:
    kernel_size: k.
    impl: "conv" (XLA grouped conv; best on GPU/TPU), "shift_scan" (see
      `depthwise_shift_scan`) or "auto" (picked per backend). All give the same result up to
      float rounding and share the parameters `kernel (k, k, 1, C)` and `bias (C,)`.
    dtype: computation dtype.
  """

  kernel_size: int
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c, k = x.shape[-1], self.kernel_size
    kernel = self.param("kernel", torch_uniform_init((0, 1, 2)), (k, k, 1, c), jnp.float32)
    bias = self.param("bias", _bias_init(k * k), (c,), jnp.float32)
    fn = DEPTHWISE_FUNCTIONS[resolve_depthwise_impl(self.impl)]
    x = x.astype(self.dtype)
    return fn(x, kernel.astype(self.dtype)) + bias.astype(self.dtype)


class ConvMixer(nn.Module):
  """ConvMixer-dim/depth classifier.

  Attributes:
    dim: channels h of every mixer layer.
    depth: number of mixer layers.
    kernel_size: depthwise kernel side k.
    patch_size: patch-embedding side and stride p.
    num_classes: logits per image.
    depthwise_impl: see `DepthwiseConv`.
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
  dtype: Any = "float32"

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    dtype = jnp.dtype(self.dtype)
    p, d = self.patch_size, self.dim
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=dtype)
    gelu = functools.partial(nn.gelu, approximate=False)
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                kernel_init=torch_uniform_init((0, 1, 2)), bias_init=_bias_init(p * p * 3),
                name="patch_embed")(images.astype(dtype))
    x = norm(name="patch_norm")(gelu(x))
    for i in range(self.depth):
      x = ConvMixerLayer(self.kernel_size, self.depthwise_impl, dtype, name=f"mixer_{i}")(
          x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=dtype, kernel_init=torch_uniform_init((0,)),
                 bias_init=_bias_init(d), name="head")(x)
    return x.astype(jnp.float32)


class ConvMixerLayer(nn.Module):
  """One mixer layer: residual depthwise conv -> GELU -> BN, then 1x1 conv -> GELU -> BN."""

  kernel_size: int
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    d = x.shape[-1]
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    gelu = functools.partial(nn.gelu, approximate=False)
    y = DepthwiseConv(self.kernel_size, self.depthwise_impl, self.dtype, name="depthwise")(x)
    x = x + norm(name="norm_dw")(gelu(y))
    x = nn.Dense(d, dtype=self.dtype, kernel_init=torch_uniform_init((0,)),
                 bias_init=_bias_init(d), name="pointwise")(x)
    return norm(name="norm_pw")(gelu(x))


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
