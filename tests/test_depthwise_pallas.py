"""Pallas depthwise kernels (interpret mode on CPU) equal XLA's grouped convolution.

Forward, input gradient, kernel and bias gradients, for the Triton (GPU) and Mosaic (TPU)
tilings, odd and even sizes, kernels 4/5/7/9, channel counts that are and are not whole
tiles, float32 and bfloat16; and ConvMixer with `depthwise_impl="pallas"`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etcjax import models
from etcjax.kernels import depthwise_pallas as dp

TRITON_SMALL = dp.Tiling("triton", interpret=True, block_c=8, block_h=4, batch_block=2)
MOSAIC = dp.Tiling("mosaic", interpret=True, block_c=128, block_h=4, batch_block=4)


def _value_and_grads(fn, x, w, b, g):
  """`fn(x, w, b)` and the gradients of `sum(fn(x, w, b) * g)`, in one compiled program."""

  def run(x, w, b):
    out, vjp = jax.vjp(fn, x, w, b)
    return out, vjp(g.astype(out.dtype))

  return jax.jit(run)(x, w, b)


def _f32(a):
  return np.asarray(a.astype(jnp.float32))


@pytest.mark.parametrize("shape,k,tiling,dtype,with_bias", [
    # Odd sizes; C=12 is 1.5 channel tiles, H=7 1.75 row tiles, W=9 pads to 16 columns.
    ((2, 7, 9, 12), 5, TRITON_SMALL, jnp.float32, True),
    # Even sizes, k=7, the TPU tiling (all 20 channels in one lane tile, W padded to 8).
    ((1, 8, 6, 20), 7, MOSAIC, jnp.float32, True),
    # k=9 (ConvMixer's) wider than the 5x5 image; `depthwise`'s per-platform tiling.
    ((1, 5, 5, 8), 9, None, jnp.float32, True),
    # bfloat16 activations, kernel and bias (float32 accumulation inside); an even k, whose
    # extra padding pixel goes after, as XLA's "SAME" puts it; three channel tiles.
    ((2, 6, 5, 24), 4, TRITON_SMALL, jnp.bfloat16, True),
    # More than one 128-lane tile, the last one partial; no bias.
    ((1, 3, 4, 130), 3, MOSAIC, jnp.float32, False),
])
def test_forward_and_gradients_equal_grouped_conv(shape, k, tiling, dtype, with_bias):
  keys = jax.random.split(jax.random.key(0), 4)
  c = shape[-1]
  x = jax.random.normal(keys[0], shape).astype(dtype)
  w = (jax.random.normal(keys[1], (k, k, 1, c)) / k).astype(dtype)
  b = jax.random.normal(keys[2], (c,)).astype(dtype) if with_bias else None
  g = jax.random.normal(keys[3], shape)
  fn = dp.depthwise if tiling is None else dp.make_depthwise(tiling)
  out, grads = _value_and_grads(fn, x, w, b, g)
  # The reference in float32 from the same (possibly bf16-rounded) inputs.
  f32 = lambda a: None if a is None else a.astype(jnp.float32)
  ref_out, ref_grads = _value_and_grads(dp.reference, f32(x), f32(w), f32(b), g)
  assert out.shape == shape and out.dtype == dtype
  if not with_bias:
    assert grads[2] is None
    grads, ref_grads, b = grads[:2], ref_grads[:2], None
  for got, want in zip(grads, (x, w, b), strict=False):
    assert got.shape == want.shape and got.dtype == want.dtype
  rtol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: one rounding, 8 bits of mantissa
  for got, want in zip((out, *grads), (ref_out, *ref_grads), strict=True):
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(_f32(got), _f32(want), rtol=rtol, atol=rtol * scale)


def test_shape_errors():
  x = jnp.zeros((1, 4, 4, 8))
  with pytest.raises(ValueError, match=r"\(k, k, 1, C\)"):
    dp.depthwise(x, jnp.zeros((3, 3, 1, 4)))
  with pytest.raises(ValueError, match=r"\(k, k, 1, C\)"):
    dp.depthwise(x[0], jnp.zeros((3, 3, 1, 8)))


def test_tiling_rules():
  with pytest.raises(ValueError, match="power of two"):
    dp.Tiling(block_c=48)
  with pytest.raises(ValueError, match="128 lanes"):
    dp.Tiling("mosaic", block_c=64)
  with pytest.raises(ValueError, match="target"):
    dp.Tiling("cuda")
  assert dp.PLATFORM_TILINGS["cpu"].interpret
  assert not any(dp.PLATFORM_TILINGS[p].interpret for p in ("cuda", "rocm", "tpu"))
  assert dp.PLATFORM_TILINGS["tpu"].target == "mosaic"


def test_convmixer_with_pallas_equals_the_grouped_conv():
  """Logits, BatchNorm statistics and every parameter gradient of a training step."""
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
  labels = jnp.arange(2) % 4
  ref_model = models.create("ConvMixer-tiny-test", 4, depth=1, depthwise_impl="conv",
                            layout="NHWC")
  variables = ref_model.init(jax.random.key(0), x)

  def step(model):
    def loss(params):
      logits, updates = model.apply(dict(variables, params=params), x, train=True,
                                    mutable=["batch_stats"])
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels]), (logits, updates)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

  want = step(ref_model)
  got = step(models.create("ConvMixer-tiny-test", 4, depth=1, depthwise_impl="pallas",
                          layout="NHWC"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
