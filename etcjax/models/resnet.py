"""ResNet-18 (He et al. 2016): the non-isotropic baseline.

Unlike ViT and ConvMixer it has no patch embedding: its 3x3 / 7x7 stem and strided stages mix
pixels across EtC block borders, so block scrambling hurts it far more. Two stems:

  "cifar":    conv 3x3 stride 1 (64) -> BN -> ReLU                      (32x32 inputs)
  "imagenet": conv 7x7 stride 2 (64) -> BN -> ReLU -> max-pool 3x3 stride 2   (224x224)

then four stages of two basic blocks (64, 128, 256, 512 channels; stride 2 from stage 2 on,
with a 1x1 conv + BN projection shortcut where the shape changes), global average pool and a
linear head. BatchNorm: momentum 0.9 (PyTorch's 0.1), epsilon 1e-5; statistics in
`batch_stats`. Input: float NHWC in [-1, 1] (`normalize`), like the other models.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

INPUT_RANGE = (-1.0, 1.0)
STEMS = ("cifar", "imagenet")


def normalize(images: Array) -> Array:
  """Maps float images in [0, 1] (any shape) to the ResNet input range [-1, 1]."""
  return images * 2.0 - 1.0


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers and a residual; `(N, H, W, C)` -> `(N, H/s, W/s, features)`."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=nn.initializers.he_normal())
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    s = self.strides
    y = conv(self.features, (3, 3), strides=(s, s), padding=((1, 1), (1, 1)))(x)
    y = nn.relu(norm()(y))
    y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)))(y)
    # Zero-init of the last BN scale makes each block start as the identity (Goyal et al.).
    y = norm(scale_init=nn.initializers.zeros)(y)
    if x.shape[-1] != self.features or s != 1:
      x = conv(self.features, (1, 1), strides=(s, s), name="proj_conv")(x)
      x = norm(name="proj_norm")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet with basic blocks.

  Attributes:
    num_classes: logits per image.
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    widths: channels per stage.
    stem: "cifar" or "imagenet" (see module docstring).
    stem_width: channels of the stem conv.
    dtype: computation dtype; parameters, statistics and logits stay float32.

  Call: `(images (N, H, W, 3) float in [-1, 1], train: bool) -> logits (N, num_classes)`.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  stem: str = "cifar"
  stem_width: int = 64
  dtype: Any = "float32"

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    if self.stem not in STEMS:
      raise ValueError(f"unknown ResNet stem {self.stem!r}; valid: {', '.join(STEMS)}")
    dtype = jnp.dtype(self.dtype)
    x = images.astype(dtype)
    if self.stem == "cifar":
      x = nn.Conv(self.stem_width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                  dtype=dtype, kernel_init=nn.initializers.he_normal(), name="stem_conv")(x)
    else:
      x = nn.Conv(self.stem_width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                  use_bias=False, dtype=dtype, kernel_init=nn.initializers.he_normal(),
                  name="stem_conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                     name="stem_norm")(x)
    x = nn.relu(x)
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(width, strides, dtype, name=f"stage{i + 1}_block{j + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=dtype, name="head")(x)
    return x.astype(jnp.float32)


def ResNet18(num_classes: int, stem: str = "cifar", **kwargs: Any) -> ResNet:  # noqa: N802
  """ResNet-18 (11.17 M parameters with 10 classes) with the "cifar" or "imagenet" stem."""
  return ResNet(num_classes=num_classes, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512),
                stem=stem, **kwargs)


# name -> constructor keyword arguments.
CONFIGS = {
    "ResNet18-cifar": dict(stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem="cifar"),
    "ResNet18-imagenet": dict(stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512),
                              stem="imagenet"),
    "ResNet-tiny-test": dict(stage_sizes=(1, 1), widths=(8, 16), stem="cifar", stem_width=8),
}
