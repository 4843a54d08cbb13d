"""The compiled depthwise-convolution kernels (etcjax/csrc/depthwise_cpu.cc) and their VJP.

Skipped, with the reason, where the kernels were not built (no C++17 GCC / Clang at install).
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _runs import run_on_fake_devices

from etcjax.models import convmixer, depthwise_cpu

pytestmark = pytest.mark.skipif(not depthwise_cpu.available(),
                                reason=f"depthwise kernel unavailable: {depthwise_cpu.status()}")

ISAS = list(range(depthwise_cpu.best_isa() + 1))  # every code path this CPU runs

# (C, N, H, W, k): ConvMixer's 9x9 on 32x32 (whole vector blocks, output written in place);
# widths and heights off the vector / 4-row blocks (staged output, padded g); even k; 1x1
# planes; k larger than the plane; k = 1; a width over two vector blocks.
GEOMETRIES = [(4, 3, 32, 32, 9), (3, 2, 5, 7, 3), (2, 2, 17, 33, 4), (5, 1, 1, 1, 4),
              (2, 1, 6, 6, 11), (2, 2, 3, 3, 1), (3, 2, 9, 70, 7)]


def data(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("c,n,h,w,k", GEOMETRIES)
def test_conv_and_tap_gradient_match_numpy_for_every_padding_and_code_path(c, n, h, w, k):
  x, g, taps = data((c, n, h, w), 0), data((c, n, h, w), 1), data((c, k, k), 2)
  conv = jax.jit(depthwise_cpu.conv_call, static_argnums=(2, 3))
  tapgrad = jax.jit(depthwise_cpu.tapgrad_call, static_argnums=(2, 3, 4))
  for pad in sorted({0, (k - 1) // 2, k - 1}):
    want = depthwise_cpu.reference_conv(x, taps, pad)
    want_dw = depthwise_cpu.reference_tapgrad(x, g, k, pad)
    for isa in ISAS:
      np.testing.assert_allclose(conv(x, taps, pad, isa), want, rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(tapgrad(x, g, k, pad, isa), want_dw, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 0.05)])
def test_vjp_equals_xla_grouped_conv(dtype, tol):
  x = jnp.asarray(data((6, 3, 11, 13), 3)).astype(dtype)
  w = jnp.asarray(data((9, 9, 1, 6), 4) / 9).astype(dtype)
  g = jnp.asarray(data((6, 3, 11, 13), 5)).astype(dtype)
  out, vjp = jax.vjp(jax.jit(depthwise_cpu.depthwise_cnhw), x, w)
  ref, ref_vjp = jax.vjp(lambda x, w: convmixer.depthwise_conv(x, w, "CNHW"), x, w)
  f32 = lambda a: np.asarray(a.astype(jnp.float32))
  assert out.dtype == dtype
  np.testing.assert_allclose(f32(out), f32(ref), rtol=tol, atol=tol)
  for got, want in zip(vjp(g), ref_vjp(g), strict=True):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(f32(got), f32(want), rtol=tol, atol=tol * 10)


def test_convmixer_auto_runs_the_kernel_on_cpu():
  model = convmixer.ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3)
  x = jnp.zeros((2, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(dict(variables, params=p), x))))
  hlo = grad.lower(variables["params"]).compile().as_text()
  for target in ("etcjax_depthwise_conv_f32", "etcjax_depthwise_tapgrad_f32"):
    assert target in hlo


@pytest.mark.parametrize("in_axes", [(0, None), (None, 0), (0, 0), (1, None)])
def test_vmap_folds_into_the_channels_with_gradients(in_axes):
  """vmap (e.g. per-example gradients) over images, kernels or both, forward and VJP."""
  x = jnp.asarray(data((2, 4, 3, 6, 6), 6))
  w = jnp.asarray(data((2, 3, 3, 1, 4), 7))
  g = jnp.asarray(data((2, 4, 3, 6, 6), 8))
  xs = x if in_axes[0] == 0 else (x[0] if in_axes[0] is None else jnp.moveaxis(x, 0, 1))
  ws = w if in_axes[1] == 0 else w[0]

  def fwd_and_vjp(fn):
    def one(x, w, g):
      out, vjp = jax.vjp(fn, x, w)
      return (out,) + vjp(g)
    return jax.jit(jax.vmap(one, in_axes=in_axes + (0,)))(xs, ws, g)

  got = fwd_and_vjp(depthwise_cpu.depthwise_cnhw)
  want = fwd_and_vjp(lambda x, w: convmixer.depthwise_conv(x, w, "CNHW"))
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call,message", [
    (lambda: depthwise_cpu.conv_call(jnp.zeros((2, 1, 4, 4), jnp.int32),
                                     jnp.zeros((2, 3, 3)), 1), "x must be float32"),
    (lambda: depthwise_cpu.conv_call(jnp.zeros((2, 4, 4)), jnp.zeros((2, 3, 3)), 1),
     r"expected x of shape \(C, N, H, W\), got \(2, 4, 4\)"),
    (lambda: depthwise_cpu.conv_call(jnp.zeros((2, 1, 4, 4)), jnp.zeros((3, 3, 3)), 1),
     r"expected float32 taps of shape \(C, k, k\) with C = 2, got \(3, 3, 3\)"),
    (lambda: depthwise_cpu.conv_call(jnp.zeros((2, 1, 4, 4)), jnp.zeros((2, 3, 3)), 3),
     "padding 3 outside 0..2"),
    (lambda: depthwise_cpu.conv_call(jnp.zeros((2, 1, 4, 4)), jnp.zeros((2, 3, 3)), 1,
                                     isa=3), "isa 3 not available"),
    (lambda: depthwise_cpu.tapgrad_call(jnp.zeros((2, 1, 4, 4)), jnp.zeros((2, 1, 4, 5)), 3,
                                        1), r"g must be float32 of x's shape"),
    (lambda: depthwise_cpu.conv_call(jnp.zeros((2, 1, 4, 4)), jnp.zeros((2, 0, 0)), 0),
     "kernel size must be >= 1, got 0"),
])
def test_bad_calls_are_clear_errors(call, message):
  with pytest.raises(jax.errors.JaxRuntimeError, match="etcjax depthwise: " + message):
    jax.block_until_ready(call())


def test_empty_planes():
  x = jnp.zeros((3, 0, 5, 5))
  assert depthwise_cpu.conv_call(x, jnp.zeros((3, 3, 3)), 1).shape == (3, 0, 5, 5)
  dw = depthwise_cpu.tapgrad_call(jnp.zeros((2, 1, 0, 4)), jnp.zeros((2, 1, 0, 4)), 3, 1)
  np.testing.assert_array_equal(dw, np.zeros((2, 1, 3, 3)))


def test_without_the_library_convmixer_uses_the_xla_formulation(monkeypatch):
  monkeypatch.setattr(depthwise_cpu, "_library", lambda: (None, "not built: simulated"))
  assert not depthwise_cpu.available() and depthwise_cpu.status() == "not built: simulated"
  assert convmixer.resolve_depthwise_impl("auto") == "shift"
  with pytest.raises(ValueError, match="needs the compiled CPU kernel, which is not built"):
    convmixer.resolve_depthwise_impl("ffi")


def test_a_library_failing_its_self_test_is_not_used(monkeypatch):
  monkeypatch.setattr(depthwise_cpu, "_self_test", lambda: "wrong conv output")
  depthwise_cpu._library.cache_clear()
  try:
    assert not depthwise_cpu.available()
    assert "failed its self-test (wrong conv output)" in depthwise_cpu.status()
    assert convmixer.resolve_depthwise_impl("auto") == "shift"
  finally:
    monkeypatch.undo()
    depthwise_cpu._library.cache_clear()
  assert depthwise_cpu.available()


_SHARDED = textwrap.dedent(r"""
    import re
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from etcjax.models import convmixer, depthwise_cpu
    assert jax.device_count() == 8 and depthwise_cpu.available()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 8, 8)).astype(np.float32)   # (C, N, H, W)
    w = rng.standard_normal((3, 3, 1, 4)).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    repl = NamedSharding(mesh, P())
    def loss(x, w):
      return jnp.sum(jnp.sin(depthwise_cpu.depthwise_cnhw(x, w)))
    def ref_loss(x, w):
      return jnp.sum(jnp.sin(convmixer.depthwise_conv(x, w, "CNHW")))
    want = jax.grad(ref_loss, (0, 1))(x, w)
    for spec, local in ((P(None, "data"), "f32[4,4,8,8]"), (P("model", "data"), "f32[2,4,8,8]")):
      xs = NamedSharding(mesh, spec)
      f = jax.jit(jax.grad(loss, (0, 1)), in_shardings=(xs, repl), out_shardings=(xs, repl))
      hlo = f.lower(x, w).compile().as_text()
      assert "etcjax_depthwise_conv_f32" in hlo and "etcjax_depthwise_tapgrad_f32" in hlo
      # Each device filters its own planes: no activations gathered or exchanged (the kernel
      # gradient's sum over images is reduced, and gathered over channels, as it is small).
      assert not re.search(r"f32\[[0-9,]*8,8\][^\n]*(all-gather|all-to-all)\(", hlo), hlo
      assert local in hlo, hlo
      got = f(jax.device_put(x, xs), w)
      for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    print("SHARDED-DEPTHWISE-OK")
""")


def test_sharded_jit_filters_each_devices_planes_without_gathers():
  assert "SHARDED-DEPTHWISE-OK" in run_on_fake_devices(_SHARDED)
