"""Shake-PyramidNet and the adaptation networks (Table II's "Adaptation + ShakeDrop" rows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etcjax import config as config_lib
from etcjax import models, train
from etcjax.keys import EtcKey
from etcjax.models import adaptnet, pyramidnet

ROOT = Path(__file__).resolve().parents[1]


def _param_count(name: str, size: int = 32, **overrides) -> int:
  model = models.create(name, 10, **overrides)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_table_ii_parameter_counts():
  """PyramidNet-110 alpha 270 is Table II's 28.48 M; with the block-wise adaptation
  network and the reference's unused modules, 62.97 M."""
  plain = _param_count("ShakePyramidNet-110_270")
  adapted = _param_count("ShakePyramidNet-110_270-BlockAdapt")
  assert plain == 28_485_493
  assert adapted == 29_310_661
  unused = sum(adaptnet.REFERENCE_UNUSED_PARAMS.values())
  assert unused == 33_661_825
  assert round((adapted + unused) / 1e6, 2) == 62.97
  assert _param_count("ShakePyramidNet-110_270-LEAdapt") == 28_500_165
  # The reduced CPU variants.
  assert _param_count("ShakePyramidNet-26_48") == 408_250
  assert _param_count("ShakePyramidNet-26_48-BlockAdapt") == 1_233_418


def test_widths_follow_the_additive_pyramid():
  model = models.create("ShakePyramidNet-110_270", 10)
  widths = model.widths()
  assert len(widths) == 3 * 18 + 1
  assert widths[:3] == [16, 21, 26] and widths[-1] == 16 + 270
  with pytest.raises(ValueError, match="6 n \\+ 2"):
    models.create("ShakePyramidNet-tiny-test", 10, depth=9).widths()


@pytest.mark.parametrize("name", ["ShakePyramidNet-tiny-test", "ShakePyramidNet-tiny-test-LEAdapt",
                                  "ShakePyramidNet-tiny-test-BlockAdapt"])
def test_shapes_and_batch_stats_update(name):
  model = models.create(name, 7)
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)
  # Eagerly: op-by-op dispatch is cached across tests, XLA compiles of whole models are
  # slow on a busy CPU.
  variables = model.init(jax.random.key(0), x, train=False)
  logits, updates = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)},
                                mutable=["batch_stats"])
  assert logits.shape == (4, 7) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert len(before) == len(after)
  assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
  evaluated, inter = model.apply(variables, x, train=False, capture_intermediates=True,
                                 mutable=["intermediates"])
  assert evaluated.shape == (4, 7)
  if "Adapt" in name:
    feature = inter["intermediates"]["adaptation"]["__call__"][0]
    assert feature.shape == (4, 32, 32, 2)
    for a, b in zip(jax.tree.leaves(variables["batch_stats"]["adaptation"]),
                    jax.tree.leaves(updates["batch_stats"]["adaptation"]), strict=True):
      assert not np.allclose(a, b)


def test_shakedrop_eval_scales_by_the_keep_probability():
  x = jnp.arange(6.0).reshape(2, 3)
  np.testing.assert_allclose(pyramidnet.shakedrop(x, 0.3, None, train=False), 0.7 * x)


def test_shakedrop_train_coefficients():
  """One gate per batch; forward alpha ~ U[-1, 1], backward beta ~ U[0, 1] per example."""
  p, n = 0.4, 4000
  x = jnp.ones((3, 2, 2, 1))

  def coefficients(key):
    y, vjp = jax.vjp(lambda v: pyramidnet.shakedrop(v, p, key, train=True), x)
    (g,) = vjp(jnp.ones_like(y))
    return y[:, 0, 0, 0], g[:, 0, 0, 0]

  fwd, bwd = jax.vmap(coefficients)(jax.random.split(jax.random.key(0), n))
  fwd, bwd = np.asarray(fwd), np.asarray(bwd)
  kept = (fwd == 1.0).all(1)
  assert np.array_equal(kept, (bwd == 1.0).all(1))  # the gate is shared by both passes
  shaken = ~kept
  assert not (fwd[shaken] == 1.0).any()  # ... and by the whole batch
  assert abs(shaken.mean() - p) < 0.03
  assert fwd[shaken].min() >= -1 and fwd[shaken].max() <= 1
  assert bwd[shaken].min() >= 0 and bwd[shaken].max() <= 1
  assert len(np.unique(fwd[shaken][:, :2])) > 1  # per-example coefficients
  # Expectations: E[forward] = 1 - p (the eval scale), E[backward] = 1 - p + p / 2.
  assert abs(fwd.mean() - (1 - p)) < 0.03
  assert abs(bwd.mean() - (1 - p / 2)) < 0.03
  assert abs(fwd[shaken].mean()) < 0.03 and abs(bwd[shaken].mean() - 0.5) < 0.03


def test_pixel_shuffle_is_pytorchs():
  """out[n, c, B h + i, B w + j] = in[n, c B^2 + i B + j, h, w] (torch.nn.PixelShuffle)."""
  b, c, gh, gw = 2, 3, 2, 3
  feats = np.random.default_rng(0).standard_normal((1, gh * gw, c * b * b)).astype(np.float32)
  out = np.asarray(adaptnet.pixel_shuffle(jnp.asarray(feats), (gh, gw), b))
  assert out.shape == (1, gh * b, gw * b, c)
  nchw = feats.reshape(1, gh, gw, c * b * b).transpose(0, 3, 1, 2)
  for ch in range(c):
    for h in range(gh):
      for w in range(gw):
        for i in range(b):
          for j in range(b):
            assert out[0, b * h + i, b * w + j, ch] == nchw[0, ch * b * b + i * b + j, h, w]


def _unshuffle_kernel(b: int, channels: int = 3) -> np.ndarray:
  """A block kernel `(B*B*3, 3 B^2)` whose feature c B^2 + i B + j is pixel (i, j, c):
  followed by the pixel shuffle, the block comes back unchanged."""
  k = np.zeros((b * b * channels, channels * b * b), np.float32)
  for i in range(b):
    for j in range(b):
      for c in range(channels):
        k[(i * b + j) * channels + c, c * b * b + i * b + j] = 1.0
  return k


def _identity_norm(shape):
  return {"mean": np.zeros(shape, np.float32),
          "var": np.full(shape, 1.0 - adaptnet.BN_EPSILON, np.float32)}


def test_blockwise_adaptation_sees_blocks_like_the_reference():
  """Hand-built weights: block k's sub-network scales its block by k + 1, U is a block
  permutation; output block k must be (perm[k] + 1) x input block perm[k], blocks in
  raster order (the reference's `x[:, :, 4 i:4 i + 4, 4 j:4 j + 4]`, k = 8 i + j)."""
  b, size = 4, 16
  grid = size // b
  n = grid * grid
  perm = np.random.default_rng(3).permutation(n)
  u = np.zeros((n, n), np.float32)
  u[perm, np.arange(n)] = 1.0  # h[:, k] = sum_j f_j U[j, k] = f_perm[k]
  kernels = np.stack([(k + 1) * _unshuffle_kernel(b) for k in range(n)])
  width = 3 * b * b
  variables = {
      "params": {"block_kernels": kernels, "permutation": u,
                 "norm": {"scale": np.ones((n, width), np.float32),
                          "bias": np.zeros((n, width), np.float32)}},
      "batch_stats": {"norm": _identity_norm((n, width)),
                      "sn_u": np.ones((n, width), np.float32),
                      "sn_sigma": np.ones((n,), np.float32)}}
  x = np.random.default_rng(4).uniform(0.1, 1.0, (2, size, size, 3)).astype(np.float32)
  net = adaptnet.BlockwiseAdaptation(block_size=b, channels=3)
  out = np.asarray(net.apply(variables, jnp.asarray(x), train=False))
  expected = np.empty_like(x)
  for k in range(n):
    r, s = divmod(k, grid)
    pr, ps = divmod(int(perm[k]), grid)
    expected[:, b * r:b * r + b, b * s:b * s + b] = (
        (perm[k] + 1) * x[:, b * pr:b * pr + b, b * ps:b * ps + b])
  np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_tanaka_adaptation_shares_one_sub_network():
  b, size = 4, 8
  width = 3 * b * b
  variables = {"params": {"kernel": 2.0 * _unshuffle_kernel(b).reshape(b, b, 3, width),
                          "norm": {"scale": np.ones(width, np.float32),
                                   "bias": np.zeros(width, np.float32)}},
               "batch_stats": {"norm": _identity_norm((width,))}}
  x = np.random.default_rng(5).uniform(-1.0, 1.0, (2, size, size, 3)).astype(np.float32)
  out = adaptnet.TanakaAdaptation(block_size=b, channels=3).apply(variables, jnp.asarray(x))
  np.testing.assert_allclose(out, np.where(x > 0, 2 * x, 0.2 * x), rtol=1e-5)  # slope 0.1


def test_block_batch_norm_statistics_per_block():
  """Training normalises each block over the batch only; the shared norm's running
  statistics take one PyTorch-style update per block, in raster order."""
  x = jax.random.normal(jax.random.key(0), (5, 4, 3)) * jnp.arange(1.0, 5.0)[None, :, None]
  for shared in (False, True):
    norm = adaptnet.BlockBatchNorm(shared=shared)
    variables = norm.init(jax.random.key(1), x, train=False)
    y, updates = norm.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y).mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y).std(0), 1.0, atol=1e-3)
    mean, var = np.asarray(x).mean(0), np.asarray(x).var(0, ddof=1)
    if shared:
      ra_mean, ra_var = np.zeros(3), np.ones(3)
      for k in range(4):
        ra_mean = 0.9 * ra_mean + 0.1 * mean[k]
        ra_var = 0.9 * ra_var + 0.1 * var[k]
    else:
      ra_mean, ra_var = 0.1 * mean, 0.9 + 0.1 * var
    np.testing.assert_allclose(updates["batch_stats"]["mean"], ra_mean, rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], ra_var, rtol=1e-5)


def test_spectral_norm_power_iteration_converges():
  net = adaptnet.BlockwiseAdaptation(block_size=4, channels=2, penalties=False)
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
  variables = net.init(jax.random.key(1), x, train=False)
  apply = jax.jit(lambda v: net.apply(v, x, train=True, mutable=["batch_stats"])[1])
  for _ in range(300):
    variables = {"params": variables["params"], **apply(variables)}
  singular = np.linalg.svd(np.asarray(variables["params"]["block_kernels"]), compute_uv=False)
  np.testing.assert_allclose(variables["batch_stats"]["sn_sigma"], singular[:, 0], rtol=1e-3)


def test_penalties():
  perm = np.eye(4, dtype=np.float32)[[2, 0, 3, 1]]
  assert float(adaptnet.l12_penalty(jnp.asarray(perm))) == pytest.approx(0.0, abs=1e-6)
  assert float(adaptnet.l12_penalty(jnp.ones((2, 2)))) == pytest.approx(2 - np.sqrt(2))
  # A horizontal ramp of slope 1 in the first channel: (H-1)(W-1) unit differences.
  feature = np.zeros((2, 5, 6, 4), np.float32)
  feature[..., 0] = np.arange(6.0)
  assert float(adaptnet.smoothness_penalty(jnp.asarray(feature))) == pytest.approx(
      2 * 4 * 5 / (4 * 6 * 4) / 2)


def test_penalty_gradients_are_added_in_training():
  net = adaptnet.BlockwiseAdaptation(block_size=4, channels=2)
  x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 3))
  variables = net.init(jax.random.key(1), x, train=False)

  def grads(penalties):
    def loss(params):
      out, _ = net.clone(penalties=penalties).apply(
          {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
          mutable=["batch_stats"])
      return jnp.sum(out * 0.01), out
    return jax.grad(loss, has_aux=True)(variables["params"])

  (with_p, out), (without, out0) = grads(True), grads(False)
  np.testing.assert_array_equal(out, out0)  # forward values unchanged
  u = variables["params"]["permutation"]
  tv_grad = jax.grad(lambda f: net.lambda_s * adaptnet.smoothness_penalty(f))(out)
  # U's gradient gains lambda_U dL_U/dU plus the smoothness term's path through U.
  def smooth_through_u(params):
    f, _ = net.clone(penalties=False).apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
        mutable=["batch_stats"])
    return jnp.sum(f * tv_grad)
  expected = (without["permutation"] + net.lambda_u * jax.grad(adaptnet.l12_penalty)(u)
              + jax.grad(smooth_through_u)(variables["params"])["permutation"])
  np.testing.assert_allclose(with_p["permutation"], expected, rtol=1e-4, atol=1e-7)
  assert not np.allclose(with_p["block_kernels"], without["block_kernels"])


# --- through the trainer ---------------------------------------------------------------


def _trainer_config(key_file: str, encryption: str = "ele"):
  c = config_lib.base_config()
  c.dataset = "digits"
  c.image_size = 32
  c.block_size = 4
  c.encryption = encryption
  c.key_file = key_file
  c.model = "ShakePyramidNet-tiny-test-BlockAdapt"
  c.optimizer = "sgd"
  c.learning_rate = 0.05
  c.weight_decay = 5e-4
  c.schedule = "constant"
  c.grad_clip_norm = 0.0
  c.augment = "flip_crop"
  c.batch_size = 16
  c.num_train_steps = 2
  c.num_eval_examples = 32
  c.log_every_steps = 1
  c.eval_every_steps = 2
  c.checkpoint_every_steps = 2
  return c


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("keys") / "k.key"
  EtcKey.insecure_from_seed(17).save(path)
  return str(path)


@pytest.fixture(scope="module")
def ele_run(tmp_path_factory, key_file):
  workdir = tmp_path_factory.mktemp("ele_run")
  config = _trainer_config(key_file)
  return config, workdir, train.train_and_evaluate(config, str(workdir))


def test_trains_on_ele_images_and_checkpoint_round_trip(ele_run):
  config, workdir, result = ele_run
  assert result["step"] == 2 and np.isfinite(result["eval_loss"])
  assert result["history"][-1]["train_loss"] is not None
  again = train.evaluate(config, str(workdir))
  assert again["step"] == 2
  assert again["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-6)
  assert again["eval_accuracy"] == result["eval_accuracy"]


_EIGHT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import jax
from test_pyramidnet import _trainer_config
from etcjax import train
assert jax.device_count() == 8
result = train.train_and_evaluate(_trainer_config(sys.argv[2]), sys.argv[3])
print(json.dumps({"loss": result["eval_loss"], "step": result["step"]}))
"""


@pytest.mark.slow  # minutes on 2 busy cores: runs in `make test-slow`
def test_eight_devices_match_one_device(ele_run, tmp_path, key_file):
  """Data-parallel on 8 fake CPU devices: per-block BatchNorm and ShakeDrop see the global
  batch, so the run matches the 1-device one."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  proc = subprocess.run([sys.executable, "-c", _EIGHT, str(Path(__file__).parent), key_file,
                         str(tmp_path / "eight")], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  eight = json.loads(proc.stdout.strip().splitlines()[-1])
  assert eight["step"] == 2
  assert eight["loss"] == pytest.approx(ele_run[2]["eval_loss"], rel=1e-3)


def test_config_variants():
  import importlib.util

  from etcjax.errors import UserError
  spec = importlib.util.spec_from_file_location("shakedrop_cifar10",
                                                ROOT / "configs" / "shakedrop_cifar10.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  plain = module.get_config("plain")
  assert (plain.model, plain.encryption) == ("ShakePyramidNet-110_270", "none")
  assert (plain.batch_size, plain.num_train_steps, plain.learning_rate) == (512, 29_296, 0.1)
  for scheme in ("le", "ele", "etc"):
    c = module.get_config(scheme)
    assert (c.model, c.encryption, c.block_size) == (
        "ShakePyramidNet-110_270-BlockAdapt", scheme, 4)
    assert c.augment == "flip_crop"  # plain-image crops and flips, encrypted afterwards
    config_lib.validate(c)
  assert module.get_config("ele,jpeg85").jpeg_quality == 85
  assert module.get_config("etc,reduced").model == "ShakePyramidNet-26_48-BlockAdapt"
  assert module.get_config("reduced").model == "ShakePyramidNet-26_48"
  assert module.get_config("le,tanaka").model == "ShakePyramidNet-110_270-LEAdapt"
  with pytest.raises(UserError, match="choose one encryption"):
    module.get_config("le,ele")
