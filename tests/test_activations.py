"""The exact GELU with a memory-lean backward pass (etcjax.models.activations)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etcjax.models import activations


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_gelu_values_and_gradient_equal_jax_nn_gelu(dtype, tol):
  x = jnp.linspace(-8.0, 8.0, 4001).astype(dtype)
  ref = lambda x: jax.nn.gelu(x, approximate=False)
  np.testing.assert_array_equal(activations.gelu(x), ref(x))
  got = jax.grad(lambda x: jnp.sum(activations.gelu(x).astype(jnp.float32)))(x)
  want = jax.grad(lambda x: jnp.sum(ref(x).astype(jnp.float32)))(x)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=tol, atol=tol)


def test_gelu_backward_keeps_only_its_input():
  """Under `grad`, the residuals saved for the backward pass are x alone."""
  x = jnp.ones((4, 8))
  _, vjp = jax.vjp(activations.gelu, x)
  saved = [leaf for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "shape")]
  assert [a.shape for a in saved if a.size > 1] == [(4, 8)]
