"""Adaptation networks for block-wise encrypted images (LE / ELE / EtC, block size B = 4).

Before isotropic networks, block-wise encrypted images were classified by putting an
*adaptation network* in front of an ordinary CNN (Table II of MaungMaung & Kiya 2022, rows
"Adaptation + ShakeDrop"). Both networks below cut the image into `B x B` blocks in raster
order (block `k` = rows `B*(k // g) ...`, columns `B*(k % g) ...` with `g = W / B`, the
order of `etcjax.schemes.learnable.to_blocks` and of the EtC spec), map each block to a
`C * B * B` feature vector and put it back with a pixel shuffle, giving a `(N, H, W, C)`
feature map (C = 16) for the classifier:

* `TanakaAdaptation` (LE-AdaptNet; Tanaka, ICCE-TW 2018): ONE sub-network shared by all
  blocks: `conv B x B, stride B (3 -> C B^2, no bias) -> BatchNorm -> LeakyReLU(0.1)`.
* `BlockwiseAdaptation` (ELE-AdaptNet; Madono et al., AAAI-WS 2020): a DIFFERENT
  sub-network per block, `SpectralNorm(conv B x B) -> BatchNorm -> LeakyReLU(0.2)`, then a
  learnable pseudo-permutation matrix `U` (n x n, n = number of blocks) mixes the blocks,
  `h[:, k] = sum_j f_j U[j, k]`, which can learn to undo block scrambling; then the pixel
  shuffle. Training adds `lambda_U L_U(U) + lambda_s L_s(feature)` to the loss (Eqs. 5, 7,
  8 of Madono et al.; `l12_penalty`, `smoothness_penalty`).

Layer structure as in the authors' code (MADONOKOUKI/Block-wise-Scrambled-Image-
Recognition, `archive/tanaka_adaptation_network.py`, `archive/proposed_adaptation_network.py`;
restated in `blockscramble/adaptation.py`). Details that follow it:

* The reference runs the blocks one at a time, so BatchNorm statistics are per block,
  over the mini-batch only (`BlockBatchNorm`). Tanaka's shared BatchNorm has one scale /
  bias and one set of running statistics, updated once per block in raster order (64
  updates per step for 32 x 32 images); ELE's BatchNorms are one per block. Running
  variances are unbiased, momentum 0.1 (PyTorch's convention), epsilon 1e-5.
* Pixel shuffle is PyTorch's `PixelShuffle(B)`: feature `c * B^2 + i * B + j` of block
  `(r, s)` becomes channel `c` of pixel `(B r + i, B s + j)` (`pixel_shuffle`).
* Spectral normalisation: one power iteration per training step on each block's
  `(3 B^2) x (C B^2)` kernel matrix, `u` and `sigma` kept in `batch_stats` (`sn_u`,
  `sn_sigma`), the stored `sigma` used in evaluation (as `flax.linen.SpectralNorm`).
* Conv kernels start He-normal over fan-out (the reference's `normal(0, sqrt(2 / (k k
  out)))`), `U` uniform in +-1/sqrt(n) (PyTorch's Linear default).

The trainer's loss is the cross-entropy of the logits only, so `BlockwiseAdaptation` adds
the gradients of its two penalties in its backward pass instead (`penalize`): forward
values are unchanged, parameter gradients are those of `CE + lambda_U L_U + lambda_s L_s`,
and the logged `train_loss` is the cross-entropy alone. `penalties=False` turns this off.

Input: float NHWC images in any fixed range (the first convolution + BatchNorm absorb an
affine map of the pixels), H and W multiples of `block_size`. Output: float
`(N, H, W, channels)`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# PyTorch BatchNorm defaults: running = (1 - 0.1) running + 0.1 batch, epsilon 1e-5.
BN_MOMENTUM = 0.1
BN_EPSILON = 1e-5


def to_blocks(x: Array, block_size: int) -> Array:
  """`(N, H, W, C)` -> `(N, n, B * B * C)`: blocks in raster order, each flattened (row,
  column, channel)."""
  n, h, w, c = x.shape
  b = block_size
  if h % b or w % b:
    raise ValueError(f"image size {h}x{w} is not a multiple of the block size {b}")
  x = x.reshape(n, h // b, b, w // b, b, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // b) * (w // b), b * b * c)


def pixel_shuffle(features: Array, grid: tuple[int, int], block_size: int) -> Array:
  """PyTorch's `PixelShuffle(B)` on block features: `(N, n, C * B * B)` -> `(N, H, W, C)`.

  Block `k` (raster order on the `grid = (H / B, W / B)` grid) fills pixels
  `(B r + i, B s + j)`, `(r, s) = divmod(k, W / B)`, channel `c` from feature
  `c * B^2 + i * B + j`.
  """
  n, _, f = features.shape
  gh, gw = grid
  b = block_size
  c = f // (b * b)
  x = features.reshape(n, gh, gw, c, b, b).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(n, gh * b, gw * b, c)


def l12_penalty(u: Array) -> Array:
  """L1-2 penalty of the pseudo-permutation matrix (Madono et al., Eq. 7); float scalar.

  `L_U = [sum_i (|u_i,:|_1 - |u_i,:|_2) + sum_j (|u_:,j|_1 - |u_:,j|_2)] / (n m)` for
  `u` of shape `(n, m)`: zero exactly when every row and column has at most one non-zero.
  """
  a = jnp.abs(u)
  rows = a.sum(1) - jnp.sqrt(jnp.square(u).sum(1))
  cols = a.sum(0) - jnp.sqrt(jnp.square(u).sum(0))
  return (rows.sum() + cols.sum()) / u.size


def smoothness_penalty(feature: Array, channels: int = 3) -> Array:
  """Total-variation smoothness penalty `L_s` (Madono et al., Eq. 8) as the reference
  computes it; float scalar.

  `feature`: `(N, H, W, C)`. Squared vertical and horizontal forward differences of the
  first `channels` channels, both on the top-left `(H - 1) x (W - 1)` grid, summed,
  divided by `(H - 1) * W * C` (31 * 32 * 16 for CIFAR) and by the batch size N.
  """
  n, h, w, c = feature.shape
  x = feature[..., :channels].astype(jnp.float32)
  center = x[:, :-1, :-1]
  tv = jnp.square(center - x[:, 1:, :-1]) + jnp.square(center - x[:, :-1, 1:])
  return tv.sum() / ((h - 1) * w * c) / n


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def penalize(x: Array, penalty: Callable[[Array], Array]) -> Array:
  """Identity on `x` whose backward pass adds `grad(penalty)(x)` to the incoming gradient.

  Training through `penalize(x, p)` gives the parameter gradients of `loss + p(x)` while
  the loss value stays `loss`: a way to add a regulariser the training loop does not know.
  """
  del penalty
  return x


def _penalize_fwd(x: Array, penalty: Callable[[Array], Array]) -> tuple[Array, Array]:
  del penalty
  return x, x


def _penalize_bwd(penalty: Callable[[Array], Array], x: Array, g: Array) -> tuple[Array]:
  return (g + jax.grad(penalty)(x).astype(g.dtype),)


penalize.defvjp(_penalize_fwd, _penalize_bwd)


class BlockBatchNorm(nn.Module):
  """BatchNorm with statistics per block, over the mini-batch only (PyTorch conventions).

  Input and output `(N, n, F)`: n blocks of F features. Training normalises block `k` with
  the mean and (biased) variance of `x[:, k, :]`; evaluation with the running statistics.

  Attributes:
    shared: True (Tanaka): one scale / bias `(F,)` for all blocks and one set of running
      statistics `(F,)`, updated once per block in raster order as the reference's loop
      does (`r <- 0.9 r + 0.1 stat_k`, k = 0 .. n-1). False (ELE): everything per block,
      `(n, F)`.
  """

  shared: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    n_blocks, f = x.shape[1], x.shape[2]
    shape = (f,) if self.shared else (n_blocks, f)
    scale = self.param("scale", nn.initializers.ones, shape)
    bias = self.param("bias", nn.initializers.zeros, shape)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, shape)
    ra_var = self.variable("batch_stats", "var", jnp.ones, shape)
    if train:
      x32 = x.astype(jnp.float32)
      mean = x32.mean(0)
      var = jnp.square(x32 - mean).mean(0)
      if not self.is_initializing():
        count = x.shape[0]
        unbiased = var * count / max(count - 1, 1)
        if self.shared:
          # Sequential updates folded: r_n = a^n r_0 + sum_k (1 - a) a^(n-1-k) s_k.
          a = 1.0 - BN_MOMENTUM
          w = BN_MOMENTUM * a ** jnp.arange(n_blocks - 1, -1, -1, dtype=jnp.float32)
          ra_mean.value = a ** n_blocks * ra_mean.value + w @ mean
          ra_var.value = a ** n_blocks * ra_var.value + w @ unbiased
        else:
          ra_mean.value = (1 - BN_MOMENTUM) * ra_mean.value + BN_MOMENTUM * mean
          ra_var.value = (1 - BN_MOMENTUM) * ra_var.value + BN_MOMENTUM * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + BN_EPSILON) * scale + bias
    return y.astype(self.dtype)


def _he_normal_fan_out(fan_out: int) -> nn.initializers.Initializer:
  """The reference's conv init: normal(0, sqrt(2 / fan_out)), fan_out = k * k * out."""
  std = math.sqrt(2.0 / fan_out)
  return lambda key, shape, dtype=jnp.float32: std * jax.random.normal(key, shape, dtype)


def _torch_linear_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's Linear weight init: uniform in +-1/sqrt(fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


class TanakaAdaptation(nn.Module):
  """LE-AdaptNet (Tanaka 2018): one block sub-network shared by every block.

  `(N, H, W, 3)` -> `(N, H, W, channels)`: block conv (`kernel` `(B, B, 3, C B^2)`,
  stride B, no bias) -> `BlockBatchNorm(shared=True)` -> LeakyReLU(0.1) -> pixel shuffle.

  Attributes:
    block_size: B (4 for LE).
    channels: C, channels of the output feature map (16).
    negative_slope: LeakyReLU slope (0.1).
  """

  block_size: int = 4
  channels: int = 16
  negative_slope: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    b = self.block_size
    width = self.channels * b * b
    blocks = to_blocks(x.astype(self.dtype), b)  # (N, n, B*B*3)
    kernel = self.param("kernel", _he_normal_fan_out(b * b * width), (b, b, x.shape[-1], width))
    f = blocks @ kernel.reshape(-1, width).astype(self.dtype)
    f = BlockBatchNorm(shared=True, dtype=self.dtype, name="norm")(f, train)
    f = nn.leaky_relu(f, self.negative_slope)
    return pixel_shuffle(f, (x.shape[1] // b, x.shape[2] // b), b)


class BlockwiseAdaptation(nn.Module):
  """ELE-AdaptNet (Madono et al. 2020): one sub-network per block + pseudo-permutation.

  `(N, H, W, 3)` -> `(N, H, W, channels)`. Parameters: `block_kernels` `(n, B*B*3, C B^2)`
  (block k's conv as a matrix over its pixels in (row, column, channel) order),
  `norm/{scale, bias}` `(n, C B^2)`, `permutation` `(n, n)` (U); `batch_stats`:
  `norm/{mean, var}`, `sn_u` `(n, C B^2)`, `sn_sigma` `(n,)`. n = (H / B) (W / B) is fixed
  by the image size at `init`.

  Attributes:
    block_size: B (4 for ELE / EtC).
    channels: C (16).
    negative_slope: LeakyReLU slope (0.2).
    lambda_u, lambda_s: penalty weights of Eq. (5) (1e-3 and 0.1, as in the paper's code).
    penalties: add the penalties' gradients in training (see the module docstring).
  """

  block_size: int = 4
  channels: int = 16
  negative_slope: float = 0.2
  lambda_u: float = 1e-3
  lambda_s: float = 0.1
  penalties: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    b = self.block_size
    width = self.channels * b * b
    blocks = to_blocks(x, b)  # (N, n, B*B*3)
    n_blocks, patch = blocks.shape[1], blocks.shape[2]
    kernels = self.param("block_kernels", _he_normal_fan_out(b * b * width),
                         (n_blocks, patch, width))
    kernels = kernels / self._spectral_norm(kernels, train)[:, None, None]
    f = jnp.einsum("nkp,kpw->nkw", blocks.astype(self.dtype), kernels.astype(self.dtype))
    f = BlockBatchNorm(shared=False, dtype=self.dtype, name="norm")(f, train)
    f = nn.leaky_relu(f, self.negative_slope)
    u = self.param("permutation", _torch_linear_init(n_blocks), (n_blocks, n_blocks))
    if train and self.penalties:
      u = penalize(u, lambda m: self.lambda_u * l12_penalty(m))
    h = jnp.einsum("njw,jk->nkw", f, u.astype(self.dtype))
    feature = pixel_shuffle(h, (x.shape[1] // b, x.shape[2] // b), b)
    if train and self.penalties:
      feature = penalize(feature, lambda m: self.lambda_s * smoothness_penalty(m))
    return feature

  def _spectral_norm(self, kernels: Array, train: bool) -> Array:
    """Largest singular value of each block's kernel matrix, `(n,)`; one power iteration
    per training step (gradient through the kernels, none through u and v)."""
    n_blocks, _, width = kernels.shape

    def init_u() -> Array:
      u = jax.random.normal(self.make_rng("params"), (n_blocks, width))
      return u / jnp.linalg.norm(u, axis=1, keepdims=True)

    sn_u = self.variable("batch_stats", "sn_u", init_u)
    sn_sigma = self.variable("batch_stats", "sn_sigma", jnp.ones, (n_blocks,))
    if not train:
      return sn_sigma.value
    k = jax.lax.stop_gradient(kernels)
    v = jnp.einsum("kpw,kw->kp", k, sn_u.value)
    v = v / (jnp.linalg.norm(v, axis=1, keepdims=True) + 1e-12)
    u = jnp.einsum("kpw,kp->kw", k, v)
    u = u / (jnp.linalg.norm(u, axis=1, keepdims=True) + 1e-12)
    sigma = jnp.einsum("kp,kpw,kw->k", v, kernels, u)
    if not self.is_initializing():
      sn_u.value = u
      sn_sigma.value = jax.lax.stop_gradient(sigma)
    return sigma


ADAPTATIONS = {"tanaka": TanakaAdaptation, "blockwise": BlockwiseAdaptation}

# Parameters of the authors' ELE-AdaptNet + Shake-PyramidNet module
# (archive/proposed_adaptation_network.py) that its forward pass never uses; counted by
# `sum(p.numel() for p in net.parameters())` they bring the live model's 29.31 M to
# Table II's 62.97 M. Not built here.
REFERENCE_UNUSED_PARAMS = {
    "ml1 = Linear(4096, 4096)": 4096 * 4096 + 4096,
    "ml2 = Linear(4096, 4096)": 4096 * 4096 + 4096,
    "attn1 = Self_Attn(256): query, key 1x1 conv 256 -> 32; value 256 -> 256; gamma":
        2 * (256 * 32 + 32) + 256 * 256 + 256 + 1,
    "u = Parameter(4096)": 4096,
    "fc1, fc2, fc3 = Linear(64, 64)": 3 * (64 * 64 + 64),
    "bn1, bn2, bn3 = BatchNorm1d(64)": 3 * 2 * 64,
}
