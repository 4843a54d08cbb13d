"""Model FLOPs from jaxprs: exact counts for products, convolutions and control flow."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from etcjax import models
from etcjax.models import flops


def _shapes(model, size):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


def test_matrix_product_counts_two_flops_per_multiply_add():
  a, b = jnp.zeros((3, 5, 7)), jnp.zeros((3, 7, 11))
  assert flops.count_flops(jnp.matmul, a, b) == 2 * 3 * 5 * 7 * 11
  assert flops.count_flops(lambda x: jnp.tanh(x) + 1, a) == 0  # elementwise is not counted


def test_grouped_convolution_counts_input_features_per_group_and_taps():
  x = jnp.zeros((2, 16, 16, 8))
  w = jnp.zeros((3, 3, 2, 8))  # 4 groups of 2 input features

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=4,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  assert flops.count_flops(conv, x, w) == 2 * (2 * 16 * 16 * 8) * (3 * 3 * 2)


def test_control_flow_counts_as_it_runs():
  m = jnp.zeros((4, 4))
  one = 2 * 4 * 4 * 4

  def scanned(m):
    return lax.scan(lambda c, _: (c @ m, None), m, None, length=5)[0]

  def branched(m):
    return lax.cond(True, lambda m: m @ m @ m, lambda m: m @ m, m)

  assert flops.count_flops(scanned, m) == 5 * one
  assert flops.count_flops(branched, m) == 2 * one  # the costliest branch
  assert flops.count_flops(jax.jit(jax.checkpoint(lambda m: m @ m)), m) == one


def test_vit_b16_matches_the_closed_form():
  # Per layer and token: q, k, v, out (4 d^2) and the MLP (2 d m) multiply-adds; per layer
  # the two attention products (2 T^2 d); plus the patch embedding and the head.
  t, d, m, layers, patch = 197, 768, 3072, 12, 16
  macs = (layers * (t * (4 * d * d + 2 * d * m) + 2 * t * t * d)
          + (t - 1) * patch * patch * 3 * d + d * 10)
  model = models.create("ViT-B_16", 10)
  per_image = flops.training_flops_per_image(model, _shapes(model, 224), 224)
  assert per_image == 3 * 2 * macs
  assert per_image / 3 == pytest.approx(35.13e9, rel=1e-3)  # timm: 17.56 GMACs


def test_scan_and_remat_count_the_same_model_flops():
  base = models.create("ViT-Ti_16", 10)
  want = flops.training_flops_per_image(base, _shapes(base, 224), 224)
  for option in ({"scan": True}, {"remat": True}):
    model = models.create("ViT-Ti_16", 10, **option)
    assert flops.training_flops_per_image(model, _shapes(model, 224), 224) == want


def test_convmixer_256_8_matches_the_closed_form():
  # Patch embedding (p=1) + 8 x (9x9 depthwise + 1x1 pointwise) on 32x32, + head.
  hw, dim = 32 * 32, 256
  macs = hw * 3 * dim + 8 * hw * (81 * dim + dim * dim) + dim * 10
  model = models.create("ConvMixer-256_8", 10, depthwise_impl="conv", layout="NHWC")
  assert flops.training_flops_per_image(model, _shapes(model, 32), 32) == 3 * 2 * macs


def test_peak_tflops_matches_the_longest_name_in_the_device_kind():
  class Device:
    def __init__(self, kind):
      self.device_kind = kind

  assert flops.peak_tflops(Device("NVIDIA H100 80GB HBM3")) == 989.0
  assert flops.peak_tflops(Device("TPU v5 lite")) == 197.0  # not "TPU v5" (459)
  assert flops.peak_tflops(Device("NVIDIA L40S")) == 362.0  # not "L4"
  assert flops.peak_tflops(Device("cpu")) is None
