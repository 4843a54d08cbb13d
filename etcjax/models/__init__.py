"""Model registry: ViT, ConvMixer (the paper's isotropic networks), a ResNet-18 baseline and
Shake-PyramidNet with or without an adaptation network (the older way, Table II).

  model = etcjax.models.create("ConvMixer-256_8", num_classes=10)
  x = etcjax.models.preprocess("ConvMixer-256_8")(images01)   # float [0, 1] -> model input
  variables = model.init(rng, x, train=False)
  logits, updates = model.apply(variables, x, train=True, rngs={"dropout": key},
                                mutable=["batch_stats"])

Every model takes float NHWC images normalised by `preprocess(name)` (all current models map
[0, 1] to [-1, 1]; see `input_range`) and returns float32 logits `(N, num_classes)`.
ConvMixer and ResNet keep BatchNorm statistics in the `batch_stats` collection; ViT has none
(`mutable=["batch_stats"]` then returns an empty update). Dropout / stochastic depth draw from
the "dropout" RNG stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from etcjax.models import adapt, convmixer, pyramidnet, resnet, vit
from etcjax.models.adapt import adapt_to_key

_FAMILIES = (
    (vit.CONFIG_NAMES, vit),
    (adapt.CONFIG_NAMES, adapt),
    (tuple(convmixer.CONFIGS), convmixer),
    (tuple(resnet.CONFIGS), resnet),
    (tuple(pyramidnet.CONFIGS), pyramidnet),
)


def names() -> list[str]:
  """All registered model names, e.g. "ViT-B_16", "ConvMixer-256_8", "ResNet18-cifar",
  "ShakePyramidNet-110_270-BlockAdapt"."""
  return [n for family_names, _ in _FAMILIES for n in family_names]


def _family(name: str) -> Any:
  for family_names, module in _FAMILIES:
    if name in family_names:
      return module
  raise ValueError(f"unknown model {name!r}; valid: {', '.join(names())}")


def create(name: str, num_classes: int, **overrides: Any) -> nn.Module:
  """Builds a registered model.

  Args:
    name: one of `names()`.
    num_classes: logits per image.
    **overrides: module attributes replacing the named config's, e.g. `dtype="bfloat16"`,
      `dropout_rate=0.1`, `stochastic_depth=0.1`, `remat=True`, `scan=True`,
      `representation_size=768`, `attention_impl="flax"` (ViT); `depthwise_impl="conv"`,
      `layout="NHWC"` (ConvMixer); `stem=...` (ResNet); `depth=...`, `alpha=...`,
      `adaptation="blockwise"` (ShakePyramidNet). Unknown attributes raise ValueError
      naming them and the valid ones.

  Returns:
    An unbound `flax.linen.Module`.
  """
  family = _family(name)
  if family is adapt:  # Key-adapted ViTs (`adapt_to_key`): one patch embedding per position.
    return adapt.create(name, num_classes, **overrides)
  if family is vit:
    fields = dict(vit.get_config(name))
    cls = vit.VisionTransformer
  elif family is convmixer:
    fields = convmixer.get_config(name)
    cls = convmixer.ConvMixer
  elif family is pyramidnet:
    fields = dict(pyramidnet.CONFIGS[name])
    cls = pyramidnet.ShakePyramidNet
  else:
    fields = dict(resnet.CONFIGS[name])
    cls = resnet.ResNet
  valid = set(cls.__dataclass_fields__) - {"parent", "name", "num_classes"}
  unknown = sorted(set(overrides) - valid)
  if unknown:
    raise ValueError(f"unknown option(s) {', '.join(unknown)} for model {name!r}; "
                     f"valid: {', '.join(sorted(valid))}")
  return cls(num_classes=num_classes, **{**fields, **overrides})


def input_range(name: str) -> tuple[float, float]:
  """The value range `(low, high)` the named model expects its input pixels in."""
  return _family(name).INPUT_RANGE


def preprocess(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the map from float images in [0, 1] (any shape) to the named model's input."""
  return _family(name).normalize


__all__ = ["adapt_to_key", "create", "input_range", "names", "preprocess"]
