"""Shake-PyramidNet (PyramidNet, Han et al. 2017, with ShakeDrop, Yamada et al. 2019) for
CIFAR, optionally behind an adaptation network: the "ShakeDrop" rows of Table II.

MaungMaung & Kiya compare their isotropic models with Madono et al.'s (AAAI-WS 2020)
"Adaptation + ShakeDrop" classifier, whose code (MADONOKOUKI/Block-wise-Scrambled-Image-
Recognition) builds `ShakePyramidNet(depth=110, alpha=270)` with basic blocks: the
configuration whose size matches Table II,

  PyramidNet-110, alpha 270, 10 classes:                     28,485,493 parameters
      (Table II, "Plain ShakeDrop": 28.48 M)
  + block-wise adaptation network (`adaptnet.BlockwiseAdaptation`, B = 4, 32 x 32):
                                                              29,310,661 parameters
      (Table II, "Adaptation + ShakeDrop": 62.97 M; the difference, 33,661,825, is modules
       the authors' network defines but never uses, `adaptnet.REFERENCE_UNUSED_PARAMS`)

Architecture (Han et al., Fig. 1 (b) / 6 (a); the reference's layer names):

  c_in: conv 3x3 (in -> 16, bias);  bn_in            (no ReLU: blocks start with BN)
  3 stages x n = (depth - 2) / 6 blocks; block i (0-based, of L = 3n) widens to
    16 + ceil(alpha (i + 1) / L) channels; the first block of stages 2 and 3 has stride 2:
      branch: BN -> conv 3x3 (stride s) -> BN -> ReLU -> conv 3x3 -> BN;  ShakeDrop
      shortcut: x (avg-pool 2x2 when s = 2), zero-padded to the new width;  sum
  bn_out -> ReLU -> global average pool -> fc_out (Linear -> classes)

ShakeDrop (`shakedrop`): block i drops with probability p_i = p_L (i + 1) / L (linear decay
rule, p_L = 0.5). In training the branch output is multiplied by `b + (1 - b) alpha`
forward and `b + (1 - b) beta` backward, b ~ Bernoulli(1 - p_i) ONE per mini-batch, alpha ~
U[-1, 1] and beta ~ U[0, 1] per example (as owruby/shake-drop_pytorch, which the reference
uses); in evaluation by the expectation 1 - p_i. The coefficients come from the "dropout"
RNG stream.

Initialisation as the reference: conv kernels normal(0, sqrt(2 / (k k out))), BN (1, 0),
`c_in` bias and `fc_out` kernel uniform +-1/sqrt(fan_in) (PyTorch's defaults), `fc_out` bias
0. BatchNorm: PyTorch's momentum 0.1 (Flax 0.9), epsilon 1e-5; statistics in `batch_stats`.

`adaptation`: "none" (plain images, `c_in` sees 3 channels), "tanaka" (LE-AdaptNet) or
"blockwise" (ELE-AdaptNet, used for all three encrypted rows of Table II: the authors'
`proposed_cifar10_{LE,ELE,EtC}.py` scripts all build it); with one, `c_in` sees the
adaptation network's 16-channel feature map. See `etcjax.models.adaptnet`.

Input: float NHWC images in [-1, 1] (`normalize`) like the other models (the reference
feeds [0, 1]; the first convolution + BatchNorm absorb the affine map). 32 x 32 for the
adaptation networks' block grid as built at `init` (any multiple of B works, fixed
afterwards).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from etcjax.models import adaptnet

Array = jax.Array

INPUT_RANGE = (-1.0, 1.0)
ADAPTATIONS = ("none", "tanaka", "blockwise")


def normalize(images: Array) -> Array:
  """Maps float images in [0, 1] (any shape) to the PyramidNet input range [-1, 1]."""
  return images * 2.0 - 1.0


def shakedrop(x: Array, p_drop: float, key: jax.Array | None, train: bool,
              alpha_range: tuple[float, float] = (-1.0, 1.0),
              beta_range: tuple[float, float] = (0.0, 1.0)) -> Array:
  """ShakeDrop on a residual branch `x` `(N, ...)`; same shape and dtype.

  Training (`key` required): with probability `p_drop` (one draw for the whole batch) the
  forward value is `alpha_n x_n` and the gradient `beta_n g_n`, alpha_n ~ U(alpha_range),
  beta_n ~ U(beta_range) per example n; else `x` unchanged. Evaluation: `(1 - p_drop) x`,
  the expected forward coefficient (E[alpha] = 0).
  """
  if not train:
    return x * jnp.asarray(1.0 - p_drop, x.dtype)
  k_gate, k_alpha, k_beta = jax.random.split(key, 3)
  keep = jax.random.bernoulli(k_gate, 1.0 - p_drop)
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  alpha = jax.random.uniform(k_alpha, shape, jnp.float32, *alpha_range)
  beta = jax.random.uniform(k_beta, shape, jnp.float32, *beta_range)
  forward = jnp.where(keep, 1.0, alpha).astype(x.dtype)
  backward = jnp.where(keep, 1.0, beta).astype(x.dtype)
  # Value: forward * x; derivative in x: backward.
  return backward * x + jax.lax.stop_gradient((forward - backward) * x)


def _conv_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
  """normal(0, sqrt(2 / (kh kw out))) for a `(kh, kw, in, out)` kernel (the reference's)."""
  kh, kw, _, out = shape
  return math.sqrt(2.0 / (kh * kw * out)) * jax.random.normal(key, shape, dtype)


def _torch_uniform(fan_in: int) -> nn.initializers.Initializer:
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


class ShakeBlock(nn.Module):
  """PyramidNet basic block with ShakeDrop: `(N, H, W, C)` -> `(N, H/s, W/s, features)`."""

  features: int
  strides: int
  p_drop: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)),
                             use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    s = self.strides
    h = norm(name="bn1")(x)
    h = conv(self.features, strides=(s, s), name="conv1")(h)
    h = nn.relu(norm(name="bn2")(h))
    h = conv(self.features, name="conv2")(h)
    h = norm(name="bn3")(h)
    h = shakedrop(h, self.p_drop, self.make_rng("dropout") if train else None, train)
    shortcut = nn.avg_pool(x, (2, 2), strides=(2, 2)) if s == 2 else x
    pad = self.features - shortcut.shape[-1]
    shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, pad)))
    return h + shortcut.astype(h.dtype)


class ShakePyramidNet(nn.Module):
  """Shake-PyramidNet with basic blocks for 32 x 32 images, optional adaptation network.

  Attributes:
    num_classes: logits per image.
    depth: 6 n + 2 (n blocks per stage); 110 in the reference.
    alpha: total widening (channels grow from 16 to 16 + alpha); 270 in the reference.
    p_last: ShakeDrop drop probability of the last block (linear decay rule); 0.5.
    adaptation: "none", "tanaka" or "blockwise" (module docstring).
    block_size: the adaptation network's block size B (4; must equal the encryption's).
    adaptation_channels: channels of the adaptation network's output (16).
    adaptation_penalties: "blockwise" only: train with its L_U / L_s penalties.
    dtype: computation dtype; parameters, statistics and logits stay float32.

  Call: `(images (N, H, W, 3) float in [-1, 1], train: bool) -> logits (N, num_classes)`
  float32. Training draws ShakeDrop coefficients from the "dropout" RNG stream and updates
  `batch_stats`.
  """

  num_classes: int
  depth: int = 110
  alpha: float = 270
  p_last: float = 0.5
  adaptation: str = "none"
  block_size: int = 4
  adaptation_channels: int = 16
  adaptation_penalties: bool = True
  dtype: Any = "float32"

  def widths(self) -> list[int]:
    """Output channels of the stem and of every block: `[16, ...]`, 3 n + 1 entries."""
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f"PyramidNet depth {self.depth} is not 6 n + 2 with n >= 1")
    blocks = 3 * ((self.depth - 2) // 6)
    return [16] + [16 + math.ceil(self.alpha / blocks * (i + 1)) for i in range(blocks)]

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    if self.adaptation not in ADAPTATIONS:
      raise ValueError(f"unknown adaptation {self.adaptation!r}; valid: "
                       f"{', '.join(ADAPTATIONS)}")
    dtype = jnp.dtype(self.dtype)
    x = images.astype(dtype)
    if self.adaptation == "tanaka":
      x = adaptnet.TanakaAdaptation(self.block_size, self.adaptation_channels,
                                          dtype=dtype, name="adaptation")(x, train)
    elif self.adaptation == "blockwise":
      x = adaptnet.BlockwiseAdaptation(self.block_size, self.adaptation_channels,
                                             penalties=self.adaptation_penalties, dtype=dtype,
                                             name="adaptation")(x, train)
    widths = self.widths()
    blocks = len(widths) - 1
    n = blocks // 3
    fan_in = x.shape[-1] * 9
    x = nn.Conv(widths[0], (3, 3), padding=((1, 1), (1, 1)), dtype=dtype,
                kernel_init=_conv_init, bias_init=_torch_uniform(fan_in), name="c_in")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                     name="bn_in")(x)
    for i in range(blocks):
      stage, j = divmod(i, n)
      strides = 2 if stage > 0 and j == 0 else 1
      x = ShakeBlock(widths[i + 1], strides, self.p_last * (i + 1) / blocks, dtype,
                     name=f"stage{stage + 1}_block{j + 1}")(x, train)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                     name="bn_out")(x)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=dtype, kernel_init=_torch_uniform(x.shape[-1]),
                 bias_init=nn.initializers.zeros, name="fc_out")(x)
    return x.astype(jnp.float32)


# name -> constructor keyword arguments.
CONFIGS = {
    # Table II, "Plain ShakeDrop" (28.49 M with 10 classes).
    "ShakePyramidNet-110_270": dict(depth=110, alpha=270),
    # Table II, "{LE, ELE, EtC} + Adaptation + ShakeDrop" (29.31 M live; see the docstring).
    "ShakePyramidNet-110_270-BlockAdapt": dict(depth=110, alpha=270, adaptation="blockwise"),
    # Tanaka's LE-AdaptNet in front (Madono et al.'s Table 3 baseline; 28.50 M).
    "ShakePyramidNet-110_270-LEAdapt": dict(depth=110, alpha=270, adaptation="tanaka"),
    # Reduced for a 2-core CPU: PyramidNet-26, alpha 48 (0.41 M), same adaptation networks.
    "ShakePyramidNet-26_48": dict(depth=26, alpha=48),
    "ShakePyramidNet-26_48-BlockAdapt": dict(depth=26, alpha=48, adaptation="blockwise"),
    "ShakePyramidNet-26_48-LEAdapt": dict(depth=26, alpha=48, adaptation="tanaka"),
    # For tests: one block per stage, a 2-channel adaptation output.
    "ShakePyramidNet-tiny-test": dict(depth=8, alpha=12),
    "ShakePyramidNet-tiny-test-BlockAdapt": dict(depth=8, alpha=12, adaptation="blockwise",
                                                 adaptation_channels=2),
    "ShakePyramidNet-tiny-test-LEAdapt": dict(depth=8, alpha=12, adaptation="tanaka",
                                              adaptation_channels=2),
}
