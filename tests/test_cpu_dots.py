"""cpu_dots: same values and gradients as autodiff, backward dots all in YNNPACK layouts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from etcjax.models import cpu_dots


def _rand(*shape, seed=0, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _reference_attention(q, k, v):
  p = jax.nn.softmax(jnp.einsum("nhtd,nhsd->nhts", q, k), axis=-1).astype(q.dtype)
  return jnp.einsum("nhts,nhsd->nhtd", p, v)


def _grads(fn, *args):
  """Value and gradients of a non-linear scalar loss of `fn(*args)` (so that the cotangent
  is not constant), jitted."""
  loss = lambda *a: jnp.sum(jnp.sin(fn(*a)).astype(jnp.float32))  # noqa: E731
  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(*args)


def _entry_dots(fn, *args) -> int:
  """Dots XLA:CPU left outside YNNPACK fusions in the compiled backward pass of `fn`."""
  loss = lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
  text = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))).lower(*args).compile().as_text()
  entry = text[text.index("\nENTRY"):]
  return len(re.findall(r"= \S+ dot\(", entry))


@pytest.mark.parametrize("k, n", [(32, 64), (64, 16), (24, 24)])
def test_matmul_matches_autodiff_in_value_and_gradients(k, n):
  x, w = _rand(2, 15, k, seed=1), _rand(k, n, seed=2)
  want_val, want_grads = _grads(lambda x, w: x @ w, x, w)
  got_val, got_grads = _grads(cpu_dots.matmul, x, w)
  np.testing.assert_allclose(got_val, want_val, rtol=1e-5)
  for got, want in zip(got_grads, want_grads, strict=True):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_matmul_bfloat16_gradients_keep_dtype_and_track_float32():
  x, w = _rand(40, 32, seed=3), _rand(32, 8, seed=4)
  _, (dx32, dw32) = _grads(cpu_dots.matmul, x, w)
  _, (dx16, dw16) = _grads(cpu_dots.matmul, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert dx16.dtype == dw16.dtype == jnp.bfloat16
  np.testing.assert_allclose(dw16.astype(np.float32), dw32, rtol=0.05, atol=0.2)
  np.testing.assert_allclose(dx16.astype(np.float32), dx32, rtol=0.05, atol=0.2)


def test_dense_dot_general_routes_only_dense_contractions_through_matmul():
  x, w = _rand(4, 6, seed=5), _rand(6, 3, seed=6)
  dense = (((1,), (0,)), ((), ()))
  np.testing.assert_allclose(cpu_dots.dense_dot_general(x, w, dense), x @ w, rtol=1e-6)
  # Anything else (another contraction, an explicit precision) is lax.dot_general's.
  other = (((0,), (0,)), ((), ()))
  y = _rand(4, 5, seed=7)
  np.testing.assert_allclose(cpu_dots.dense_dot_general(x, y, other), x.T @ y, rtol=1e-6)
  got = cpu_dots.dense_dot_general(x, w, dense, precision=lax.Precision.HIGHEST)
  np.testing.assert_allclose(got, x @ w, rtol=1e-6)


def test_attention_matches_autodiff_in_value_and_gradients():
  q, k, v = (_rand(2, 3, 17, 8, seed=s) for s in (8, 9, 10))
  want_val, want_grads = _grads(_reference_attention, q, k, v)
  got_val, got_grads = _grads(cpu_dots.attention, q, k, v)
  np.testing.assert_allclose(got_val, want_val, rtol=1e-5)
  for got, want in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_attention_with_fewer_keys_than_queries_and_under_vmap():
  q, k, v = _rand(1, 2, 9, 4, seed=11), _rand(1, 2, 5, 4, seed=12), _rand(1, 2, 5, 4, seed=13)
  _, want = _grads(_reference_attention, q, k, v)
  _, got = _grads(jax.vmap(cpu_dots.attention), q[None], k[None], v[None])
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g[0], w, rtol=1e-4, atol=1e-5)


def _reference_projections(x, kernels):
  return tuple(jnp.einsum("ntd,dhk->nhtk", x, kernel) for kernel in kernels)


def _sum_heads(fn):
  """`fn`'s tuple of projections combined non-uniformly into one array."""
  return lambda x, *ws: sum((i + 1.0) * y for i, y in enumerate(fn(x, ws)))


def test_heads_projections_match_autodiff_in_value_and_gradients():
  x = _rand(2, 11, 12, seed=19)
  kernels = (_rand(12, 3, 4, seed=20), _rand(12, 3, 4, seed=21), _rand(12, 3, 4, seed=22))
  want_val, want_grads = _grads(_sum_heads(_reference_projections), x, *kernels)
  got_val, got_grads = _grads(_sum_heads(cpu_dots.heads_projections), x, *kernels)
  np.testing.assert_allclose(got_val, want_val, rtol=1e-5)
  for got, want in zip(got_grads, want_grads, strict=True):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # One projection, or kernels of different widths, work the same way.
  for ks in (kernels[:1], (kernels[0], _rand(12, 2, 5, seed=23))):
    narrow = lambda fn: lambda x, *ws: sum(jnp.sum(y ** 2) for y in fn(x, ws))  # noqa: E731
    _, want = _grads(narrow(_reference_projections), x, *ks)
    _, got = _grads(narrow(cpu_dots.heads_projections), x, *ks)
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_backward_passes_leave_no_dot_to_eigen_on_cpu():
  """The point of the module: autodiff's backward has dots XLA:CPU cannot give YNNPACK;
  these custom VJPs have none."""
  x, w = _rand(2, 24, 32, seed=14), _rand(32, 64, seed=15)
  assert _entry_dots(lambda x, w: x @ w, x, w) >= 1, "XLA:CPU now lays out autodiff's dots"
  assert _entry_dots(cpu_dots.matmul, x, w) == 0
  assert _entry_dots(cpu_dots.matmul, x, w[:, :16]) == 0
  q, k, v = (_rand(2, 3, 10, 8, seed=s) for s in (16, 17, 18))
  assert _entry_dots(_reference_attention, q, k, v) >= 1
  assert _entry_dots(cpu_dots.attention, q, k, v) == 0
  x, kernels = _rand(2, 10, 24, seed=19), tuple(_rand(24, 3, 8, seed=s) for s in (20, 21, 22))
  assert _entry_dots(_sum_heads(cpu_dots.heads_projections), x, *kernels) == 0
