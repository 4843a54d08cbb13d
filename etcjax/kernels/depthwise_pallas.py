"""Depthwise k x k convolution ("same" zero padding) as Pallas kernels, with gradients.

  out[n, h, w, c] = bias[c] + sum_ij xpad[n, h + i, w + j, c] * kernel[i, j, 0, c]

for NHWC activations `x (N, H, W, C)`, a kernel in Flax's grouped-conv layout
`(k, k, 1, C)` and an optional bias `(C,)`: the same function as
`lax.conv_general_dilated(..., feature_group_count=C)` with "SAME" padding (`reference`).
Channels are the contiguous (lane) axis throughout.

Three kernels, one `jax.custom_vjp`:

* forward: grid `(N, C / TC, Ho / TH)`. A program holds one image's zero-padded plane for
  TC channels, `(Ho + k - 1, Wo + k - 1, TC)`, as its input block (the same block for every
  row tile of that image and channel tile, so on TPU it is copied into VMEM once, halo
  included), and writes a `(TH, Wo, TC)` output tile as k*k shifted multiply-adds of that
  block in float32 (a loop over the k kernel rows, the k columns unrolled).
* input gradient: the same kernel applied to the output gradient with the kernel rotated by
  180 degrees and the padding mirrored.
* kernel (and bias) gradient: grid `(N / NB, C / TC)`; a program sums
  `xpad[n, h+i, w+j, c] * g[n, h, w, c]` over its NB images and all rows for every tap
  (i, j), k accumulators at a time (one kernel row), plus `sum g` for the bias, and writes
  a `(k*k + 1, TC)` float32 partial sum. XLA adds the `N / NB` partial sums: no program
  writes what another one writes, which Triton's unordered programs need.

Lowering constraints this is written for (from the Pallas docs and the Triton lowering's
checks; not yet compiled on a GPU or TPU here):

* Triton (GPU): every array a kernel loads or stores must have a power-of-two size. Tiles
  are `(TH, Wo, TC)` with TH, TC powers of two and the output width Wo padded to the next
  power of two (a 56-wide plane computes 64 columns and drops 8); the weight, bias and
  gradient rows are `(1, TC)`. Blocks themselves may have any shape (only loads count).
  Pallas now lowers `pallas_call` on NVIDIA GPUs to Mosaic GPU unless Triton compiler
  parameters are given; these kernels pass `jax.experimental.pallas.triton.CompilerParams`
  and so take the Triton path (Ampere and newer; ROCm too).
* Mosaic (TPU): a block's last two sides must be multiples of (8, 128) or the array's
  own. Channel tiles are 128 lanes (or all channels when there are fewer), widths are
  padded to a multiple of 8, and every other block side is the whole array side. Rows are
  sliced at dynamic offsets along a major axis only; columns at static offsets.

`Tiling` holds those choices and whether to run in Pallas interpret mode. It is fixed when
a function is made (`make_depthwise`); `depthwise` picks one per lowering platform with
`lax.platform_dependent` (interpret mode on CPU, Triton on GPUs, Mosaic on TPUs), so a
CPU process runs the same kernels in interpret mode and nothing reads
`jax.default_backend()`.

Padding (spatial halo, rounding up to whole tiles, channels to whole channel tiles) is
done by `jnp.pad` before each kernel and the excess is sliced off after it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

Array = jax.Array
TARGETS = ("triton", "mosaic")


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How the kernels are tiled and lowered.

  Attributes:
    target: "triton" (GPU: power-of-two tiles) or "mosaic" (TPU: 128-lane channel tiles,
      widths a multiple of 8). In interpret mode either runs anywhere.
    interpret: run in Pallas interpret mode (any backend; the only mode on CPU).
    block_c: channels per tile TC (Triton: a power of two; Mosaic: a multiple of 128).
    block_h: output rows per forward tile TH (Triton: a power of two).
    batch_block: images per kernel-gradient program at most (a power of two; the largest
      power of two dividing N up to this is used).
    num_warps: Triton warps per program.
  """

  target: str = "triton"
  interpret: bool = False
  block_c: int = 32
  block_h: int = 8
  batch_block: int = 4
  num_warps: int = 4

  def __post_init__(self) -> None:
    if self.target not in TARGETS:
      raise ValueError(f"unknown target {self.target!r}; valid: {', '.join(TARGETS)}")
    for name in ("block_c", "block_h", "batch_block"):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(f"Tiling.{name}={value} must be a power of two")
    if self.target == "mosaic" and self.block_c % 128:
      raise ValueError(f"Tiling.block_c={self.block_c}: Mosaic (TPU) channel tiles are "
                       "multiples of 128 lanes")


# The tiling per lowering platform used by `depthwise` (lax.platform_dependent's names).
PLATFORM_TILINGS: dict[str, Tiling] = {
    "cpu": Tiling("triton", interpret=True, block_c=32, block_h=8),
    "cuda": Tiling("triton", block_c=32, block_h=8, batch_block=4, num_warps=4),
    "rocm": Tiling("triton", block_c=32, block_h=8, batch_block=4, num_warps=4),
    "tpu": Tiling("mosaic", block_c=128, block_h=8, batch_block=4),
}


@dataclasses.dataclass(frozen=True)
class _Geometry:
  tc: int  # channels per tile
  th: int  # output rows per forward tile
  ho: int  # output rows, padded to whole tiles
  wo: int  # output columns, padded (Triton: a power of two; Mosaic: a multiple of 8)
  cp: int  # channels, padded to whole tiles


def _geometry(h: int, w: int, c: int, t: Tiling) -> _Geometry:
  if t.target == "triton":
    tc, th, wo = min(t.block_c, _pow2(c)), min(t.block_h, _pow2(h)), _pow2(w)
  else:
    tc, th, wo = (c if c <= t.block_c else t.block_c), min(t.block_h, h), _round_up(w, 8)
  return _Geometry(tc=tc, th=th, ho=_round_up(h, th), wo=wo, cp=_round_up(c, tc))


def _compiler_params(t: Tiling, semantics: tuple[str, ...]) -> object:
  """Triton or Mosaic compiler parameters (interpret mode ignores them)."""
  if t.target == "triton":
    from jax.experimental.pallas import triton as pl_triton
    return pl_triton.CompilerParams(num_warps=t.num_warps, num_stages=1)
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _pad_input(x: Array, pad: tuple[int, int], k: int, g: _Geometry) -> Array:
  """`(N, H, W, C)` -> `(N, Ho + k - 1, Wo + k - 1, Cp)`: halo `pad`, then whole tiles."""
  _, h, w, c = x.shape
  lo, hi = pad
  return jnp.pad(x, ((0, 0), (lo, hi + g.ho - h), (lo, hi + g.wo - w), (0, g.cp - c)))


# ----------------------------------------------------------------------------------- kernels


def _forward_kernel(x_ref, w_ref, b_ref, o_ref, *, k: int, th: int, wo: int) -> None:
  """x_ref `(Ho + k - 1, Wo + k - 1, TC)`, w_ref `(k, k, TC)` f32, b_ref `(1, TC)` f32,
  o_ref `(TH, Wo, TC)`: one output tile, accumulated in float32."""
  r0 = pl.multiple_of(pl.program_id(2) * th, th)

  def kernel_row(i: Array, acc: Array) -> Array:  # a loop over rows, k columns unrolled
    for j in range(k):
      window = x_ref[pl.ds(r0 + i, th), pl.ds(j, wo), :].astype(jnp.float32)
      acc = acc + window * w_ref[i, pl.ds(j, 1), :]
    return acc

  acc = lax.fori_loop(0, k, kernel_row, jnp.zeros(o_ref.shape, jnp.float32) + b_ref[...])
  o_ref[...] = acc.astype(o_ref.dtype)


def _taps_grad_kernel(x_ref, g_ref, o_ref, *, k: int, th: int, wo: int, rows: int,
                      nb: int) -> None:
  """x_ref `(NB, Ho + k - 1, Wo + k - 1, TC)`, g_ref `(NB, Ho, Wo, TC)`, o_ref
  `(k*k + 1, TC)` f32: rows i*k + j hold sum x-window(i, j) * g, row k*k holds sum g."""
  tc = o_ref.shape[-1]
  zero = jnp.zeros((1, tc), jnp.float32)

  def reduce(a: Array) -> Array:
    return jnp.sum(a, axis=(0, 1)).reshape(1, tc)

  for i in range(k):
    with_bias = i == 0

    def body(step: Array, accs: tuple[Array, ...], i: int = i, with_bias: bool = with_bias
             ) -> tuple[Array, ...]:
      n = step // rows
      r0 = pl.multiple_of((step % rows) * th, th)
      gs = g_ref[n, pl.ds(r0, th), :, :].astype(jnp.float32)
      out = []
      for j in range(k):
        window = x_ref[n, pl.ds(r0 + i, th), pl.ds(j, wo), :].astype(jnp.float32)
        out.append(accs[j] + reduce(window * gs))
      if with_bias:
        out.append(accs[k] + reduce(gs))
      return tuple(out)

    accs = lax.fori_loop(0, nb * rows, body, (zero,) * (k + with_bias))
    for j in range(k):
      o_ref[pl.ds(i * k + j, 1), :] = accs[j]
    if with_bias:
      o_ref[pl.ds(k * k, 1), :] = accs[k]


# -------------------------------------------------------------------------- kernel wrappers


def correlate(x: Array, taps: Array, bias: Array, pad: tuple[int, int], t: Tiling) -> Array:
  """`out[n, h, w, c] = bias[c] + sum_ij xpad[n, h+i, w+j, c] * taps[i, j, c]`.

  Args:
    x: `(N, H, W, C)`, float (float32 or bfloat16).
    taps: `(k, k, C)`, any float dtype (used in float32).
    bias: `(C,)`, any float dtype (used in float32).
    pad: zero rows/columns `(before, after)` on both spatial axes, `before + after = k - 1`.
    t: tiling and mode.

  Returns:
    `(N, H, W, C)` in x's dtype, accumulated in float32.
  """
  n, h, w, c = x.shape
  k = taps.shape[0]
  g = _geometry(h, w, c, t)
  xp = _pad_input(x, pad, k, g)
  hp, wp = xp.shape[1:3]
  taps = jnp.pad(taps.astype(jnp.float32), ((0, 0), (0, 0), (0, g.cp - c)))
  bias = jnp.pad(bias.astype(jnp.float32), (0, g.cp - c)).reshape(1, g.cp)
  out = pl.pallas_call(
      functools.partial(_forward_kernel, k=k, th=g.th, wo=g.wo),
      out_shape=jax.ShapeDtypeStruct((n, g.ho, g.wo, g.cp), x.dtype),
      grid=(n, g.cp // g.tc, g.ho // g.th),
      in_specs=[pl.BlockSpec((None, hp, wp, g.tc), lambda b, ci, r: (b, 0, 0, ci)),
                pl.BlockSpec((k, k, g.tc), lambda b, ci, r: (0, 0, ci)),
                pl.BlockSpec((1, g.tc), lambda b, ci, r: (0, ci))],
      out_specs=pl.BlockSpec((None, g.th, g.wo, g.tc), lambda b, ci, r: (b, r, 0, ci)),
      compiler_params=_compiler_params(t, ("parallel", "parallel", "parallel")),
      interpret=t.interpret, name="depthwise_forward",
  )(xp, taps, bias)
  if out.shape != x.shape:
    out = out[:, :h, :w, :c]
  return out


def taps_and_bias_grad(x: Array, g: Array, k: int, pad: tuple[int, int], t: Tiling
                       ) -> tuple[Array, Array]:
  """Kernel and bias gradients of `correlate`.

  Args:
    x: `(N, H, W, C)` forward input.
    g: `(N, H, W, C)` output gradient.
    k: kernel side.
    pad: the forward's `(before, after)` zero padding.
    t: tiling and mode.

  Returns:
    `dtaps (k, k, C)` with `dtaps[i, j, c] = sum_nhw xpad[n, h+i, w+j, c] g[n, h, w, c]` and
    `dbias (C,)` = `sum_nhw g`, both float32.
  """
  n, h, w, c = x.shape
  geo = _geometry(h, w, c, t)
  xp = _pad_input(x, pad, k, geo)
  gp = jnp.pad(g, ((0, 0), (0, geo.ho - h), (0, geo.wo - w), (0, geo.cp - c)))
  hp, wp = xp.shape[1:3]
  nb = math.gcd(n, t.batch_block)
  rows = geo.ho // geo.th
  parts = pl.pallas_call(
      functools.partial(_taps_grad_kernel, k=k, th=geo.th, wo=geo.wo, rows=rows, nb=nb),
      out_shape=jax.ShapeDtypeStruct((n // nb, k * k + 1, geo.cp), jnp.float32),
      grid=(n // nb, geo.cp // geo.tc),
      in_specs=[pl.BlockSpec((nb, hp, wp, geo.tc), lambda b, ci: (b, 0, 0, ci)),
                pl.BlockSpec((nb, geo.ho, geo.wo, geo.tc), lambda b, ci: (b, 0, 0, ci))],
      out_specs=pl.BlockSpec((None, k * k + 1, geo.tc), lambda b, ci: (b, 0, ci)),
      compiler_params=_compiler_params(t, ("parallel", "parallel")),
      interpret=t.interpret, name="depthwise_kernel_grad",
  )(xp, gp)
  total = jnp.sum(parts, axis=0)[:, :c]
  return total[:k * k].reshape(k, k, c), total[k * k]


# ---------------------------------------------------------------------------- custom VJP

Tilings = tuple[tuple[str, Tiling], ...]  # ((platform or "default", tiling), ...)


def _same_padding(k: int) -> tuple[int, int]:
  lo = (k - 1) // 2  # XLA "SAME" and PyTorch padding="same": the extra pixel goes after
  return lo, k - 1 - lo


def _per_platform(tilings: Tilings, fn: Callable[..., object], *args: object) -> object:
  """`fn(tiling, *args)` with the tiling of the platform being lowered for."""
  if len(tilings) == 1:
    return fn(tilings[0][1], *args)
  branches = {p: functools.partial(fn, t) for p, t in tilings}
  return lax.platform_dependent(*args, **branches)


def _forward(t: Tiling, x: Array, kernel: Array, bias: Array) -> Array:
  return correlate(x, kernel[:, :, 0, :], bias, _same_padding(kernel.shape[0]), t)


def _backward(t: Tiling, x: Array, kernel: Array, g: Array) -> tuple[Array, Array, Array]:
  k = kernel.shape[0]
  lo, hi = _same_padding(k)
  dx = correlate(g, kernel[::-1, ::-1, 0, :], jnp.zeros(kernel.shape[-1:], jnp.float32),
                 (hi, lo), t)
  dtaps, dbias = taps_and_bias_grad(x, g, k, (lo, hi), t)
  return dx, dtaps, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _depthwise(tilings: Tilings, x: Array, kernel: Array, bias: Array | None) -> Array:
  b = jnp.zeros(kernel.shape[-1:], jnp.float32) if bias is None else bias
  return _per_platform(tilings, _forward, x, kernel, b)


def _depthwise_fwd(tilings: Tilings, x: Array, kernel: Array, bias: Array | None
                   ) -> tuple[Array, tuple[Array, Array, Array | None]]:
  return _depthwise(tilings, x, kernel, bias), (x, kernel, bias)


def _depthwise_bwd(tilings: Tilings, res: tuple[Array, Array, Array | None], g: Array
                   ) -> tuple[Array, Array, Array | None]:
  x, kernel, bias = res
  dx, dtaps, dbias = _per_platform(tilings, _backward, x, kernel, g.astype(x.dtype))
  dkernel = dtaps[:, :, None, :].astype(kernel.dtype)
  return dx.astype(x.dtype), dkernel, None if bias is None else dbias.astype(bias.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)

DepthwiseFn = Callable[..., Array]


def make_depthwise(tiling: Tiling | Mapping[str, Tiling] | None = None) -> DepthwiseFn:
  """Returns `fn(x, kernel, bias=None) -> out`, the depthwise conv with these kernels.

  Args:
    tiling: one `Tiling` (its mode and tiles on every platform: the caller decides, e.g.
      `Tiling(interpret=True)` on CPU), or `{platform: Tiling}` with
      `lax.platform_dependent`'s platform names ("cpu", "cuda", "rocm", "tpu", "default"),
      chosen when the function is lowered; None means `PLATFORM_TILINGS`.

  The returned function takes `x (N, H, W, C)` float32 / bfloat16, `kernel (k, k, 1, C)`
  and `bias (C,)` or None, and returns `(N, H, W, C)` in x's dtype (float32 accumulation).
  It is reverse-mode differentiable (`jax.custom_vjp`): the input gradient is x's dtype,
  the kernel and bias gradients those of kernel and bias. Forward mode (`jax.jvp`) is not
  defined.
  """
  if tiling is None:
    tiling = PLATFORM_TILINGS
  tilings: Tilings = (("default", tiling),) if isinstance(tiling, Tiling) else tuple(
      sorted(tiling.items()))

  def depthwise_fn(x: Array, kernel: Array, bias: Array | None = None) -> Array:
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != 1 or (
        kernel.shape[0] != kernel.shape[1] or kernel.shape[3] != x.shape[3]):
      raise ValueError(f"depthwise: x {x.shape} must be (N, H, W, C) and kernel "
                       f"{kernel.shape} (k, k, 1, C)")
    return _depthwise(tilings, x, kernel, bias)

  return depthwise_fn


depthwise = make_depthwise()
depthwise.__doc__ = ("Depthwise conv `(x (N, H, W, C), kernel (k, k, 1, C), bias (C,) | None)"
                     " -> (N, H, W, C)` with `PLATFORM_TILINGS` (interpret mode on CPU); see "
                     "`make_depthwise`.")


def reference(x: Array, kernel: Array, bias: Array | None = None) -> Array:
  """The same function with XLA's grouped convolution (`feature_group_count = C`), at full
  float32 precision (no TF32 on GPUs), the reference for tests and `check`.

  Args:
    x: `(N, H, W, C)`.
    kernel: `(k, k, 1, C)`.
    bias: `(C,)` or None.

  Returns:
    `(N, H, W, C)` in the dtype XLA's convolution gives for x and kernel.
  """
  k = kernel.shape[0]
  out = lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding=(_same_padding(k), _same_padding(k)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=kernel.shape[-1],
      precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  if bias is not None:
    out = out + bias.astype(jnp.float32)
  return out.astype(x.dtype)
