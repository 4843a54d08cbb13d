"""Matrix products whose backward passes are laid out for XLA:CPU's fast matmuls.

XLA:CPU runs a dot with YNNPACK (its fast matmul library) only when the left operand is
contracted over its minor (last) axis. The weight gradient of `y = x @ w` is `x^T @ dy`,
contracted over the batch axis, which is major in both operands; so is the key / value
gradient of attention, `p^T @ dy`. XLA:CPU then either runs the dot with Eigen, which packs
the transposed operand itself, or transposes the wider of the two operands; in a ViT-S/16
training step that packing is a visible share of the time.

The custom VJPs here write every backward dot in the layout YNNPACK takes, transposing the
narrower operand explicitly; `lax.optimization_barrier` stops XLA's algebraic simplifier from
folding those transposes back into the dots. They compute the same function and, up to float
rounding, the same gradients as autodiff (tests/test_cpu_dots.py). What they save is
measured with `benchmarks/bench_models.py` (`--mlp auto,dense --attention auto,fused`);
the figures, with date, commit and machine, are in docs/performance.md.
On GPUs and TPUs, whose matmuls take transposed operands for free, the explicit transposes
would only cost, so the models use them on CPU only (`vit.resolve_mlp_impl`,
`vit.resolve_attention_impl`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array


def _t(x: Array) -> Array:
  """Swaps the last two axes in memory (the barrier stops XLA folding the transpose into the
  dot that consumes it, which would hand that dot a transposed operand again)."""
  return lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


@jax.custom_vjp
def matmul(x: Array, w: Array) -> Array:
  """`x (..., K) @ w (K, N) -> (..., N)`, any float dtype (both the same)."""
  return x @ w


def _matmul_fwd(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
  return x @ w, (x, w)


def _matmul_bwd(res: tuple[Array, Array], dy: Array) -> tuple[Array, Array]:
  x, w = res
  k, n = w.shape
  x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
  if k > n:
    # dw^T = dy^T @ x: transposes dy (M x N) rather than the wider x (M x K).
    dw = lax.optimization_barrier(_t(dy2) @ x2).T
  else:
    dw = _t(x2) @ dy2
  return dy @ w.T, dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs: Array, rhs: Array, dimension_numbers: Any, precision: Any = None,
                      preferred_element_type: Any = None, **kwargs: Any) -> Array:
  """A `lax.dot_general` for `nn.Dense(dot_general=...)` that differentiates via `matmul`.

  Dense's contraction (last axis of `lhs` with the first of a 2-D `rhs`) at default
  precision goes through `matmul`; anything else is passed to `lax.dot_general` unchanged.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
      and not lhs_batch and not rhs_batch
      and precision is None and preferred_element_type is None and not kwargs):
    return matmul(lhs, rhs)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)


@jax.custom_vjp
def attention(query: Array, key: Array, value: Array) -> Array:
  """Softmax attention `softmax(query key^T) value`, head-major, no mask, no scaling.

  Args:
    query: `(N, heads, T, head_dim)`, already scaled by `1 / sqrt(head_dim)`.
    key, value: `(N, heads, S, head_dim)`, the dtype of `query`.

  Returns:
    `(N, heads, T, head_dim)`; the softmax is taken in the inputs' dtype, as
    `jax.nn.softmax` on the logits would.
  """
  return _attention_fwd(query, key, value)[0]


def _attention_fwd(q: Array, k: Array, v: Array) -> tuple[Array, tuple[Array, ...]]:
  p = jax.nn.softmax(jnp.einsum("nhtd,nhsd->nhts", q, k), axis=-1).astype(q.dtype)
  return jnp.einsum("nhts,nhsd->nhtd", p, v), (q, k, v, p)


def _attention_bwd(res: tuple[Array, ...], dy: Array) -> tuple[Array, Array, Array]:
  q, k, v, p = res
  dp = jnp.einsum("nhtd,nhsd->nhts", dy, v)
  ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))  # softmax's backward pass
  dq = jnp.einsum("nhts,nhsd->nhtd", ds, k)
  # dk = ds^T q and dv = p^T dy contract over the major query axis t; computed transposed
  # (dk^T = q^T ds), so that only the narrow (T, head_dim) operands are transposed.
  dk_t = lax.optimization_barrier(jnp.einsum("nhdt,nhts->nhds", _t(q), ds))
  dv_t = lax.optimization_barrier(jnp.einsum("nhdt,nhts->nhds", _t(dy), p))
  return dq, jnp.swapaxes(dk_t, -1, -2), jnp.swapaxes(dv_t, -1, -2)


attention.defvjp(_attention_fwd, _attention_bwd)


@jax.custom_vjp
def heads_projections(x: Array, kernels: tuple[Array, ...]) -> tuple[Array, ...]:
  """Projections of the same tokens straight into head-major layout (attention's q, k, v).

  Args:
    x: `(N, T, D)` tokens.
    kernels: `(D, heads, head_dim)` each, the dtype of `x`.

  Returns:
    `einsum("ntd,dhk->nhtk", x, kernel)` for each kernel: `(N, heads, T, head_dim)`.

  The backward pass stacks the projections' gradients token-major into one `(N*T, sum of
  heads*head_dim)` matrix, so that the input gradient is one matmul and the kernel
  gradients one matmul with one transpose of `x`, instead of one each per projection.
  """
  return tuple(jnp.einsum("ntd,dhk->nhtk", x, kernel) for kernel in kernels)


def _heads_projections_fwd(x: Array, kernels: tuple[Array, ...]
                           ) -> tuple[tuple[Array, ...], tuple[Array, tuple[Array, ...]]]:
  return heads_projections(x, kernels), (x, kernels)


def _heads_projections_bwd(res: tuple[Array, tuple[Array, ...]], dys: tuple[Array, ...]
                           ) -> tuple[Array, tuple[Array, ...]]:
  x, kernels = res
  n, t, d = x.shape
  # (N*T, sum of heads*head_dim): every projection's gradient, token-major, side by side.
  dy_all = lax.optimization_barrier(jnp.concatenate(
      [jnp.swapaxes(dy, 1, 2).reshape(n * t, -1) for dy in dys], axis=-1))
  w = jnp.concatenate([kernel.reshape(d, -1) for kernel in kernels], axis=1)
  dx = (dy_all @ w.T).reshape(x.shape)
  dw = _t(x.reshape(n * t, d)) @ dy_all
  splits = np.cumsum([kernel.shape[1] * kernel.shape[2] for kernel in kernels])[:-1]
  return dx, tuple(part.reshape(kernel.shape)
                   for part, kernel in zip(jnp.split(dw, splits, axis=1), kernels, strict=True))


heads_projections.defvjp(_heads_projections_fwd, _heads_projections_bwd)
