"""Tests for key-adapted ViTs (`etcjax.models.adapt_to_key`) and the model-leak attack."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etcjax import etc, models
from etcjax.attacks import model_leak
from etcjax.keys import EtcKey
from etcjax.models import adapt, vit


def _schedule(seed, size, block):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # small test geometries have small key spaces
    return EtcKey.insecure_from_seed(seed).schedule(size, size, block)


def _plain(name, size, seed=0, **overrides):
  """A plain model and random weights of its shapes (no init: compiling it is slow)."""
  model = models.create(name, 10, **overrides)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(
      lambda s: rng.normal(0.0, 1.0 / np.sqrt(max(s.shape[0] if s.ndim > 1 else 1, 1)),
                           s.shape).astype(np.float32), shapes)
  return model, variables


def _check_exact(name, size, block, seeds, shared, **overrides):
  model, variables = _plain(name, size, **overrides)
  x = np.random.default_rng(0).random((4, size, size, 3)).astype(np.float32)
  apply_plain = jax.jit(model.apply)
  plain = np.asarray(apply_plain(variables, vit.normalize(jnp.asarray(x))))
  apply_adapted = None
  for seed in seeds:
    s = _schedule(seed, size, block)
    if shared:
      s = adapt.shared_schedule(s)
    module, adapted = models.adapt_to_key(name, variables, s, **overrides)
    assert isinstance(module, vit.VisionTransformer)
    assert (type(module) is vit.VisionTransformer) == shared
    enc = np.asarray(etc.encrypt(x, s))
    assert not np.allclose(enc, x)
    apply_adapted = apply_adapted or jax.jit(module.apply)
    logits = np.asarray(apply_adapted(adapted, vit.normalize(jnp.asarray(enc))))
    scale = np.abs(plain).max()
    np.testing.assert_allclose(logits, plain, rtol=0, atol=1e-5 * scale)
    # The plain model on the EtC images is far off: the adaptation is what makes it work.
    off = np.asarray(apply_plain(variables, vit.normalize(jnp.asarray(enc))))
    assert np.abs(off - plain).max() > 1e-2 * scale


@pytest.mark.parametrize("shared", [False, True])
def test_adapted_vit_tiny_exact(shared):
  _check_exact("ViT-tiny-test", 16, 4, seeds=(1, 2, 3), shared=shared)


@pytest.mark.parametrize("shared", [False, True])
def test_adapted_vit_b16_shapes_exact(shared):
  # ViT-B/16 patch and embedding geometry (16x16x3 -> 768, 12 heads), one block for speed.
  _check_exact("ViT-B_16", 32, 16, seeds=(4, 5), shared=shared, num_layers=1)


def test_adapted_gap_classifier_and_larger_blocks_exact():
  # Blocks of 8 over patches of 4: every patch of a block is a rotated plain patch.
  _check_exact("ViT-tiny-test", 16, 8, seeds=(6,), shared=False, classifier="gap")


def test_adapted_variables_layout_and_registry():
  name, size = "ViT-tiny-test", 16
  _, variables = _plain(name, size)
  s = _schedule(1, size, 4)
  module, adapted = models.adapt_to_key(name, variables, s)
  kernel = adapted["params"]["embedding"]["kernel"]
  assert kernel.shape == (16, 4, 4, 3, 32)
  assert adapt.adapted_name(name, adapted) == "ViT-tiny-test-adapted"
  # The registry builds the same module, whose init has the adapted layout.
  created = models.create("ViT-tiny-test-adapted", 10)
  shapes = jax.eval_shape(lambda: created.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  assert jax.tree.map(np.shape, shapes["params"]) == jax.tree.map(np.shape, adapted["params"])
  assert models.preprocess("ViT-tiny-test-adapted") is vit.normalize
  # The input variables are left as they were.
  assert variables["params"]["embedding"]["kernel"].shape == (4, 4, 3, 32)
  # Block-shared keys: a plain ViT with one kernel, adapted name = plain name.
  _, shared = models.adapt_to_key(name, variables, adapt.shared_schedule(s))
  assert adapt.adapted_name(name, shared) == name


@pytest.mark.parametrize("name, why", [
    ("ConvMixer-tiny-test", "depthwise"), ("ResNet-tiny-test", "overlap"),
    ("ViT-tiny-test-adapted", "already adapted")])
def test_no_exact_adaptation(name, why):
  with pytest.raises(ValueError, match=why):
    models.adapt_to_key(name, {"params": {}}, _schedule(1, 16, 4))


def test_adapt_refuses_patch_larger_than_block_and_other_sizes():
  _, variables = _plain("ViT-tiny-test", 16)
  with pytest.raises(ValueError, match="does not divide the EtC block size 2"):
    models.adapt_to_key("ViT-tiny-test", variables, _schedule(1, 16, 2))
  with pytest.raises(ValueError, match="position embedding"):
    models.adapt_to_key("ViT-tiny-test", variables, _schedule(1, 32, 4))


@pytest.mark.parametrize("shared", [False, True])
def test_model_leak_recovers_the_schedule(shared):
  name, size = "ViT-tiny-test", 32
  _, variables = _plain(name, size)
  for seed in (1, 2):
    truth = _schedule(seed, size, 4)
    if shared:
      truth = adapt.shared_schedule(truth)
    _, adapted = models.adapt_to_key(name, variables, truth)
    rec = model_leak.recover(adapted["params"], variables["params"], truth.grid)
    score = model_leak.score(rec.schedule, truth)
    assert score["exact"] and score["block_fraction"] == 1.0
    # Decrypting with the recovered schedule gives the plain images back.
    x = np.random.default_rng(seed).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    np.testing.assert_array_equal(etc.decrypt(etc.encrypt(x, truth), rec.schedule), x)
    # Without the plain weights: every block's state relative to block 0's.
    rel = model_leak.relative_states(adapted["params"])
    assert model_leak.score_relative(rel, truth) == 1.0
    # Small "fine-tuning" noise changes nothing; noise far above the weights' spread does.
    noisy = model_leak.perturb(adapted["params"], 0.3, seed=seed)
    assert model_leak.score(model_leak.recover(noisy, variables["params"], truth.grid).schedule,
                            truth)["exact"]
  lost = model_leak.perturb(adapted["params"], 20.0)
  score = model_leak.score(model_leak.recover(lost, variables["params"], truth.grid).schedule,
                           truth)
  assert score["block_fraction"] < 0.5
