"""ConvMixer: the paper's sizes, BatchNorm behaviour, and equal depthwise formulations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etcjax import models
from etcjax.models import convmixer, depthwise_cpu


def _param_count(name, size):
  model = models.create(name, 10)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_paper_sizes():
  assert _param_count("ConvMixer-256_8", 32) == 706_570  # 0.71 M
  assert _param_count("ConvMixer-384_8", 224) == 1_470_346  # 1.47 M


def test_config_table():
  assert convmixer.get_config("ConvMixer-256_8") == dict(dim=256, depth=8, kernel_size=9,
                                                         patch_size=1)
  assert convmixer.get_config("ConvMixer-384_8")["patch_size"] == 4
  with pytest.raises(ValueError, match="ConvMixer-256_8"):
    convmixer.get_config("ConvMixer-1_1")


def _tiny(**kw):
  return models.create("ConvMixer-tiny-test", 4, **kw)


def _images(n=4, size=8):
  return jax.random.uniform(jax.random.key(1), (n, size, size, 3), minval=-1, maxval=1)


def test_parameter_layout_and_batch_stats():
  variables = _tiny().init(jax.random.key(0), _images(), train=False)
  p = variables["params"]
  assert p["patch_embed"]["kernel"].shape == (2, 2, 3, 16)
  assert p["mixer_1"]["depthwise"]["kernel"].shape == (3, 3, 1, 16)
  assert p["mixer_1"]["pointwise"]["kernel"].shape == (16, 16)
  assert p["head"]["kernel"].shape == (16, 4)
  assert variables["batch_stats"]["mixer_0"]["norm_dw"]["mean"].shape == (16,)


def test_training_updates_batch_stats_with_pytorch_momentum():
  model = _tiny()
  variables = model.init(jax.random.key(0), _images(), train=False)
  logits, updates = model.apply(variables, _images(), train=True, mutable=["batch_stats"])
  assert logits.shape == (4, 4) and logits.dtype == jnp.float32
  # One step from mean 0 with momentum 0.1 (PyTorch convention): new = 0.1 * batch mean.
  new_mean = updates["batch_stats"]["patch_norm"]["mean"]
  conv = jax.lax.conv_general_dilated(
      _images(), variables["params"]["patch_embed"]["kernel"], (2, 2), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + variables["params"]["patch_embed"]["bias"]
  batch_mean = jnp.mean(jax.nn.gelu(conv, approximate=False), axis=(0, 1, 2))
  np.testing.assert_allclose(new_mean, 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
  # Evaluation uses the running statistics and is deterministic.
  a = model.apply(variables, _images(), train=False)
  b = model.apply(variables, _images(), train=False)
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layout", ["NHWC", "CNHW"])
@pytest.mark.parametrize("impl", ["conv", "shift", "shift_scan", "ffi"])
@pytest.mark.parametrize("k,shape", [(9, (2, 12, 12, 8)), (4, (1, 5, 7, 3))])
def test_depthwise_formulations_match_xla_grouped_conv(impl, layout, k, shape):
  """Forward and both gradients equal NHWC `lax` grouped conv, in every layout."""
  if impl == "ffi" and not depthwise_cpu.available():
    pytest.skip(f"compiled depthwise kernel unavailable: {depthwise_cpu.status()}")
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (k, k, 1, shape[-1])) / k
  g = jax.random.normal(jax.random.key(2), shape)
  to_layout = (lambda a: a) if layout == "NHWC" else (lambda a: jnp.transpose(a, (3, 0, 1, 2)))
  fn = convmixer.DEPTHWISE_FUNCTIONS[impl]

  def loss(x, w):
    return jnp.sum(fn(to_layout(x), w, layout) * to_layout(g))

  def ref_loss(x, w):
    return jnp.sum(convmixer.depthwise_conv(x, w) * g)

  out = jax.jit(lambda x, w: fn(to_layout(x), w, layout))(x, w)
  np.testing.assert_allclose(out, to_layout(convmixer.depthwise_conv(x, w)), rtol=1e-5,
                             atol=1e-5)
  got = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  ref = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(x, w)
  for a, b in zip(got, ref, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_depthwise_matches_a_direct_sum():
  x = np.random.default_rng(0).normal(size=(1, 5, 5, 2)).astype(np.float32)
  w = np.random.default_rng(1).normal(size=(3, 3, 1, 2)).astype(np.float32)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ref = sum(xp[:, i:i + 5, j:j + 5, :] * w[i, j, 0] for i in range(3) for j in range(3))
  np.testing.assert_allclose(convmixer.depthwise_conv(x, w), ref, rtol=1e-5, atol=1e-5)


def test_depthwise_shift_in_bfloat16():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 1, 4)) / 3
  out = convmixer.depthwise_shift(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), "NHWC")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), convmixer.depthwise_conv(x, w),
                             atol=0.05)
  dw = jax.grad(lambda w: jnp.sum(convmixer.depthwise_shift(
      x.astype(jnp.bfloat16), w, "NHWC").astype(jnp.float32)))(w.astype(jnp.bfloat16))
  assert dw.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_channel_major_pointwise_matches_einsum_forward_and_gradients(dtype):
  x = jax.random.normal(jax.random.key(0), (6, 2, 3, 4)).astype(dtype)
  w = (jax.random.normal(jax.random.key(1), (6, 5)) / 3).astype(dtype)
  g = jax.random.normal(jax.random.key(2), (5, 2, 3, 4)).astype(dtype)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=0.05, atol=0.05)
  einsum = lambda x, w: jnp.einsum("io,inhw->onhw", w, x)
  out, vjp = jax.vjp(jax.jit(convmixer.pointwise_cnhw), x, w)
  ref, ref_vjp = jax.vjp(einsum, x, w)
  assert out.dtype == dtype and out.shape == (5, 2, 3, 4)
  f32 = lambda a: np.asarray(a.astype(jnp.float32))
  np.testing.assert_allclose(f32(out), f32(ref), **tol)
  for got, want in zip(vjp(g), ref_vjp(g), strict=True):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(f32(got), f32(want), **tol)


def test_whole_model_is_the_same_with_every_formulation_and_layout():
  x = _images()
  labels = jnp.arange(4) % 4
  variables = _tiny(depthwise_impl="conv", layout="NHWC").init(jax.random.key(0), x)

  def loss_and_grads(impl, layout):
    model = _tiny(depthwise_impl=impl, layout=layout)

    def loss(params):
      logits, updates = model.apply(dict(variables, params=params), x, train=True,
                                    mutable=["batch_stats"])
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]), (logits, updates)

    (value, (logits, updates)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"])
    return logits, updates, grads

  ref = loss_and_grads("conv", "NHWC")
  cases = [("shift", "NHWC"), ("shift", "CNHW"), ("shift_scan", "CNHW")]
  if depthwise_cpu.available():
    cases += [("ffi", "CNHW"), ("ffi", "NHWC")]
  for impl, layout in cases:
    got = loss_and_grads(impl, layout)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, ref)


def test_auto_choices_depend_on_the_backend():
  on_cpu = jax.default_backend() == "cpu"
  cpu_impl = "ffi" if depthwise_cpu.available() else "shift"
  assert convmixer.resolve_depthwise_impl("auto") == (cpu_impl if on_cpu else "conv")
  assert convmixer.resolve_layout("auto", "shift") == ("CNHW" if on_cpu else "NHWC")
  assert convmixer.resolve_layout("auto", "ffi") == ("CNHW" if on_cpu else "NHWC")
  assert convmixer.resolve_layout("auto", "conv") == "NHWC"
  assert convmixer.resolve_layout("NHWC") == "NHWC"


def test_unknown_impl_and_option_are_errors():
  with pytest.raises(ValueError, match="depthwise_impl"):
    _tiny(depthwise_impl="fft").init(jax.random.key(0), _images())
  with pytest.raises(ValueError, match="layout 'NCHW'"):
    _tiny(layout="NCHW").init(jax.random.key(0), _images())
  with pytest.raises(ValueError, match="unknown option"):
    models.create("ConvMixer-tiny-test", 4, widht=3)
  with pytest.raises(ValueError, match="ViT-B_16"):
    models.create("ConvMixer-9_9", 4)


def test_bfloat16_compute():
  model = _tiny(dtype="bfloat16")
  variables = model.init(jax.random.key(0), _images(), train=False)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  lo = model.apply(variables, _images(), train=False)
  hi = _tiny().apply(variables, _images(), train=False)
  assert lo.dtype == jnp.float32
  np.testing.assert_allclose(lo, hi, atol=0.05 * float(jnp.abs(hi).max()) + 0.02)
  for layout in ("NHWC", "CNHW"):
    other = _tiny(dtype="bfloat16", layout=layout).apply(variables, _images(), train=False)
    np.testing.assert_allclose(other, hi, atol=0.05 * float(jnp.abs(hi).max()) + 0.02)


def test_preprocess_maps_to_symmetric_range():
  assert models.input_range("ConvMixer-256_8") == (-1.0, 1.0)
  np.testing.assert_allclose(models.preprocess("ConvMixer-256_8")(jnp.array([0.0, 1.0])),
                             [-1.0, 1.0])


_SHARDED = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from etcjax import models
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.random.uniform(jax.random.key(1), (8, 8, 8, 3), minval=-1, maxval=1)
ref_model = models.create("ConvMixer-tiny-test", 4, depthwise_impl="conv", layout="NHWC")
model = models.create("ConvMixer-tiny-test", 4)  # auto: ffi (or shift) + CNHW on CPU
variables = ref_model.init(jax.random.key(0), x)
def grads(m, x):
  def loss(p):
    out, upd = m.apply(dict(variables, params=p), x, train=True, mutable=["batch_stats"])
    return jnp.sum(out ** 2), upd
  return jax.grad(loss, has_aux=True)(variables["params"])
ref = jax.jit(lambda x: grads(ref_model, x))(x)
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
got = jax.jit(lambda x: grads(model, x), out_shardings=NamedSharding(mesh, P()))(xs)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, ref)
print("sharded-ok")
"""


@pytest.mark.slow
def test_custom_gradient_under_a_batch_sharded_jit():
  """The custom VJP and channel-major layout under a 4-device data-parallel jit."""
  import subprocess
  import sys

  out = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "sharded-ok" in out.stdout
