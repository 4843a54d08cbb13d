"""ResNet-18 baseline: sizes, stems, BatchNorm state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etcjax import models
from etcjax.models import resnet


def _param_count(model, size):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_resnet18_sizes():
  assert _param_count(models.create("ResNet18-cifar", 10), 32) == 11_173_962
  assert _param_count(resnet.ResNet18(10, stem="imagenet"), 224) == 11_181_642


def test_stem_resolutions():
  for stem, size, final in [("cifar", 32, 4), ("imagenet", 64, 2)]:
    model = resnet.ResNet18(10, stem=stem)
    x = jnp.zeros((1, size, size, 3))
    variables = jax.eval_shape(lambda m=model, x=x: m.init(jax.random.key(0), x))
    feats = jax.eval_shape(
        lambda v, m=model, x=x: m.apply(v, x, capture_intermediates=True,
                                        mutable=["intermediates"]), variables)
    inter = feats[1]["intermediates"]
    assert inter["stage4_block2"]["__call__"][0].shape == (1, final, final, 512)


def test_tiny_forward_and_training_step_state():
  model = models.create("ResNet-tiny-test", 3)
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3), minval=-1, maxval=1)
  variables = model.init(jax.random.key(0), x, train=False)
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (4, 3) and logits.dtype == jnp.float32
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_bad_stem():
  with pytest.raises(ValueError, match="cifar"):
    resnet.ResNet18(10, stem="tiny").init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
