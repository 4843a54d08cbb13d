"""ViT: sizes, upstream parameter names, options (dropout, stochastic depth, bf16, remat, scan)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from etcjax import models
from etcjax.models import vit


def _param_count(model, size):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_vit_b16_has_the_papers_85_81m_parameters():
  assert _param_count(models.create("ViT-B_16", 10), 224) == 85_806_346
  # The i21k checkpoint's representation layer adds a 768x768 tanh Dense.
  with_rep = models.create("ViT-B_16", 10, representation_size=768)
  assert _param_count(with_rep, 224) == 85_806_346 + 768 * 768 + 768


@pytest.mark.parametrize("name,count", [
    ("ViT-Ti_16", 5_526_346), ("ViT-S_16", 21_669_514), ("ViT-B_32", 87_462_922),
    ("ViT-L_16", 303_311_882)])
def test_variant_sizes(name, count):
  assert _param_count(models.create(name, 10), 224) == count


def test_parameter_names_and_shapes_follow_vision_transformer():
  model = models.create("ViT-B_16", 10, representation_size=768)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  flat = {k: v.shape for k, v in
          traverse_util.flatten_dict(shapes["params"], sep="/").items()}
  block = "Transformer/encoderblock_11/"
  expected = {
      "embedding/kernel": (16, 16, 3, 768), "embedding/bias": (768,), "cls": (1, 1, 768),
      "Transformer/posembed_input/pos_embedding": (1, 197, 768),
      block + "LayerNorm_0/scale": (768,),
      block + "MultiHeadDotProductAttention_0/query/kernel": (768, 12, 64),
      block + "MultiHeadDotProductAttention_0/key/bias": (12, 64),
      block + "MultiHeadDotProductAttention_0/out/kernel": (12, 64, 768),
      block + "LayerNorm_1/bias": (768,),
      block + "MlpBlock_0/Dense_0/kernel": (768, 3072),
      block + "MlpBlock_0/Dense_1/kernel": (3072, 768),
      "Transformer/encoder_norm/scale": (768,),
      "pre_logits/kernel": (768, 768), "head/kernel": (768, 10), "head/bias": (10,)}
  for key, shape in expected.items():
    assert flat[key] == shape, key


def _tiny(**kw):
  return models.create("ViT-tiny-test", 5, **kw)


def _images(n=2, size=16):
  return jax.random.uniform(jax.random.key(1), (n, size, size, 3), minval=-1, maxval=1)


def test_forward_shape_dtype_and_zero_head():
  model = _tiny()
  variables = model.init(jax.random.key(0), _images(), train=False)
  logits = model.apply(variables, _images(), train=False)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  # The head starts at zero (fine-tuning convention), so initial logits are all zero.
  np.testing.assert_array_equal(logits, 0.0)


def test_gap_classifier_has_no_class_token():
  model = _tiny(classifier="gap")
  params = model.init(jax.random.key(0), _images(), train=False)["params"]
  assert "cls" not in params
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 16, 32)


def test_bad_patch_multiple_and_classifier_are_errors():
  with pytest.raises(ValueError, match="multiple of the patch size"):
    _tiny().init(jax.random.key(0), jnp.zeros((1, 18, 16, 3)))
  with pytest.raises(ValueError, match="classifier"):
    _tiny(classifier="map").init(jax.random.key(0), _images())
  with pytest.raises(ValueError, match="ViT-B_16"):
    vit.get_config("ViT-X_16")


def _random_params(model, seed=0):
  """Init, then perturb every leaf so that zero-initialised heads do not hide bugs."""
  params = model.init(jax.random.key(seed), _images(), train=False)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x + 0.1 * rng.standard_normal(x.shape), np.float32),
                      params)


def test_scan_and_remat_compute_the_same_function():
  params = _random_params(_tiny())
  ref = _tiny().apply({"params": params}, _images())
  scanned = vit.scan_params(params)
  assert scanned["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape == (2, 32)
  for kw, p in [(dict(remat=True), params), (dict(scan=True), scanned),
                (dict(scan=True, remat=True), scanned)]:
    np.testing.assert_allclose(_tiny(**kw).apply({"params": p}, _images()), ref,
                               rtol=1e-5, atol=1e-5)
  back = vit.unscan_params(scanned)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_gradients_agree_with_scan_and_remat():
  params = _random_params(_tiny())

  def loss(model, p):
    return jnp.sum(model.apply({"params": p}, _images()) ** 2)

  ref = jax.jit(jax.grad(lambda p: loss(_tiny(), p)))(params)
  got = jax.jit(jax.grad(lambda p: loss(_tiny(scan=True, remat=True), p)))(
      vit.scan_params(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               vit.unscan_params(got), ref)


@pytest.mark.parametrize("scan", [False, True])
def test_dropout_and_stochastic_depth_are_random_in_training_only(scan):
  model = _tiny(dropout_rate=0.1, attention_dropout_rate=0.1, stochastic_depth=0.5, scan=scan)
  params = _random_params(_tiny())
  params = vit.scan_params(params) if scan else params
  x = _images(8)
  apply = jax.jit(lambda seed, train: model.apply(
      {"params": params}, x, train=train, rngs={"dropout": jax.random.key(seed)}),
      static_argnums=1)
  np.testing.assert_array_equal(apply(0, False), apply(1, False))
  t1, t2, t1b = apply(1, True), apply(2, True), apply(1, True)
  np.testing.assert_array_equal(t1, t1b)
  assert not np.allclose(t1, t2)
  assert not np.allclose(t1, apply(0, False))


def test_every_attention_impl_agrees_in_logits_gradients_and_initial_values():
  params = _random_params(_tiny())
  x = _images()

  def logits_and_grads(impl):
    model = _tiny(attention_impl=impl, mlp_impl="dense")
    return jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(params)

  ref = logits_and_grads("flax")
  for impl in ("fused", "heads", "auto"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 logits_and_grads(impl), ref)
  # Same parameter tree and, from the same RNG, the same initial values.
  init = {impl: _tiny(attention_impl=impl).init(jax.random.key(0), x)["params"]
          for impl in ("flax", "heads")}
  jax.tree.map(np.testing.assert_array_equal, init["heads"], init["flax"])
  for impl in ("fused", "heads"):
    with pytest.raises(ValueError, match="attention dropout"):
      _tiny(attention_impl=impl, attention_dropout_rate=0.1).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="attention_impl"):
    _tiny(attention_impl="flash").init(jax.random.key(0), _images())


def test_every_mlp_impl_agrees_in_logits_gradients_dropout_and_initial_values():
  params = _random_params(_tiny())
  x = _images()

  def logits_and_grads(impl, train):
    model = _tiny(mlp_impl=impl, dropout_rate=0.2 if train else 0.0)
    loss = lambda p: jnp.sum(model.apply(  # noqa: E731
        {"params": p}, x, train=train, rngs={"dropout": jax.random.key(3)}) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  for train in (False, True):
    ref = logits_and_grads("dense", train)
    for impl in ("cpu", "auto"):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                   logits_and_grads(impl, train), ref)
  init = {impl: _tiny(mlp_impl=impl).init(jax.random.key(0), x)["params"]
          for impl in ("dense", "cpu")}
  jax.tree.map(np.testing.assert_array_equal, init["cpu"], init["dense"])
  assert vit.resolve_mlp_impl("auto") == "cpu"  # the tests run on CPU
  with pytest.raises(ValueError, match="mlp_impl"):
    _tiny(mlp_impl="fast").init(jax.random.key(0), x)


def test_drop_path_keeps_the_expectation():
  x = jnp.ones((20000, 3))
  y = vit.drop_path(x, 0.25, jax.random.key(0))
  kept = np.asarray(y[:, 0] != 0)
  assert abs(kept.mean() - 0.75) < 0.02
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = _tiny(dtype="bfloat16")
  variables = model.init(jax.random.key(0), _images(), train=False)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  params = _random_params(_tiny())
  lo = model.apply({"params": params}, _images())
  hi = _tiny().apply({"params": params}, _images())
  assert lo.dtype == jnp.float32
  np.testing.assert_allclose(lo, hi, atol=0.1 * float(jnp.abs(hi).max()) + 0.05)


def test_normalize_maps_unit_range_to_symmetric_range():
  assert models.input_range("ViT-B_16") == (-1.0, 1.0)
  np.testing.assert_allclose(models.preprocess("ViT-B_16")(jnp.array([0.0, 0.5, 1.0])),
                             [-1.0, 0.0, 1.0])
