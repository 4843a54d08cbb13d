"""Model-leak attack: read the EtC key schedule out of a key-adapted ViT and its plain parent.

Threat model: the attacker holds a model adapted to the victim's key
(`etcjax.models.adapt_to_key`) and the public plain weights it was made from (e.g. a
published pretrained ViT), but no key and no images. The adaptation is exact because it
hides nothing: patch embedding q of the adapted model is the plain kernel under block q's
state (rotation/flip, channel shuffle, negative-positive as a sign), and the position
embeddings are the plain ones permuted by the block permutation. So (`recover`):

  * state of block q: the one of the 96 block states (`etcjax.attacks.blockstates`)
    whose image of the plain kernel is nearest (least squares) to adapted kernel q;
  * perm: the assignment of adapted position embeddings to plain ones with the least total
    squared distance (Hungarian algorithm).

With both exact the recovered schedule decrypts every image of that geometry, which is what
the secret key protects (the 32-byte key itself is not needed). Without the plain weights
the adapted kernels still give every block's state relative to block 0's
(`relative_states`): 96 guesses for all block states; the permutation is then hidden only
by how hard it is to order the position embeddings (learned ones are smooth over the grid:
not measured here). Fine-tuning after
adaptation moves the weights; `perturb` adds Gaussian noise of a given size relative to
each weight tensor's spread to measure how much of the key still comes back. Only block
size = patch size is covered (the setting of the adaptation's papers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from etcjax import etc
from etcjax.attacks import blockstates

FIELDS = ("perm", "rotflip", "negpos", "chperm")


@dataclasses.dataclass
class Recovery:
  """What `recover` read from the weights.

  Attributes:
    schedule: the recovered schedule (`etc.Schedule`, block size = patch size): key
      material for this geometry; never log or write it.
    state_margin: (n,) float, per block: squared distance of the second-best state minus
      the best, relative to the kernel's squared norm (small = uncertain).
  """
  schedule: etc.Schedule
  state_margin: np.ndarray


def _state_kernels(kernel: np.ndarray) -> np.ndarray:
  """(p, p, 3, D) plain kernel -> (96, p*p*3*D): the kernel under every block state, as
  `adapt_to_key` would make it for a block in that state."""
  from etcjax.models import adapt
  p = kernel.shape[0]
  flat = kernel.reshape(p * p * 3, -1)
  out = []
  for s in range(blockstates.NUM_STATES):
    one = etc.Schedule(perm=np.zeros(1, np.int32),
                       rotflip=np.array([blockstates.STATE_ROTFLIP[s]], np.int32),
                       negpos=np.array([blockstates.STATE_NEGPOS[s]], np.int32),
                       chperm=np.array([blockstates.STATE_CHPERM[s]], np.int32),
                       block_size=p, grid=(1, 1))
    maps = adapt.patch_maps(one, p)
    out.append((flat[maps["offset"][0]] * maps["sign"][0][..., None]).reshape(-1))
  return np.stack(out)


def recover(adapted_params: Mapping[str, Any], plain_params: Mapping[str, Any],
            grid: tuple[int, int]) -> Recovery:
  """Recovers the schedule an adapted ViT was made with, from it and its plain parent.

  Args:
    adapted_params: params of the adapted model: `embedding/kernel` `(n, p, p, 3, D)` (or
      `(p, p, 3, D)` for a block-shared key) and the position embedding `(1, T, D)`.
    plain_params: params of the plain model it came from (same architecture, `(p, p, 3,
      D)` kernel).
    grid: the block grid (rows, cols) of the adapted image size, rows * cols = n.

  Returns:
    A `Recovery` (block size = patch size p).

  Raises:
    ValueError: params that do not fit together (other widths, patch or image sizes).
  """
  from scipy.optimize import linear_sum_assignment
  plain_k = np.asarray(plain_params["embedding"]["kernel"], np.float64)
  adapted_k = np.asarray(adapted_params["embedding"]["kernel"], np.float64)
  if plain_k.ndim != 4:
    raise ValueError(f"the plain model's embedding kernel has shape {plain_k.shape}; expected "
                     "a plain ViT's (p, p, 3, D)")
  p, d = plain_k.shape[0], plain_k.shape[-1]
  rows, cols = grid
  n = rows * cols
  if adapted_k.ndim == 4:
    adapted_k = np.broadcast_to(adapted_k, (n, *adapted_k.shape))
  if adapted_k.shape != (n, *plain_k.shape):
    raise ValueError(f"the adapted embedding kernel has shape {adapted_k.shape}, expected "
                     f"{(n, *plain_k.shape)} for a {rows}x{cols} block grid and the plain "
                     f"kernel {plain_k.shape}")
  cands = _state_kernels(plain_k)  # (96, P)
  a = adapted_k.reshape(n, -1)
  dist = (np.sum(a * a, 1)[:, None] - 2.0 * a @ cands.T
          + np.sum(cands * cands, 1)[None, :]) / max(np.sum(plain_k ** 2), 1e-30)
  best = np.argmin(dist, axis=1)
  ordered = np.sort(dist, axis=1)
  margin = ordered[:, 1] - ordered[:, 0]

  pos_a = np.asarray(adapted_params["Transformer"]["posembed_input"]["pos_embedding"],
                     np.float64)[0]
  pos_p = np.asarray(plain_params["Transformer"]["posembed_input"]["pos_embedding"],
                     np.float64)[0]
  if pos_a.shape != pos_p.shape or pos_a.shape[0] - n not in (0, 1) or pos_a.shape[1] != d:
    raise ValueError(f"position embeddings {pos_a.shape} (adapted) and {pos_p.shape} (plain) "
                     f"do not fit {n} blocks of width {d}")
  extra = pos_a.shape[0] - n
  pa, pp = pos_a[extra:], pos_p[extra:]
  cost = np.sum(pa * pa, 1)[:, None] - 2.0 * pa @ pp.T + np.sum(pp * pp, 1)[None, :]
  rows_i, perm = linear_sum_assignment(cost)
  perm = perm[np.argsort(rows_i)]
  schedule = etc.Schedule(perm=perm.astype(np.int32),
                          rotflip=blockstates.STATE_ROTFLIP[best].astype(np.int32),
                          negpos=blockstates.STATE_NEGPOS[best].astype(np.int32),
                          chperm=blockstates.STATE_CHPERM[best].astype(np.int32),
                          block_size=p, grid=(rows, cols))
  return Recovery(schedule=schedule, state_margin=margin)


def relative_states(adapted_params: Mapping[str, Any]) -> np.ndarray:
  """Without the plain weights: each block's state relative to block 0's, `(n,)` int.

  Adapted kernel q is the plain kernel under state g_q, so it is adapted kernel 0 under
  g_q g_0^-1 (`blockstates.COMPOSE`): comparing the adapted kernels with each other gives
  every block's state up to one unknown global state, i.e. 96 guesses for all of them.
  `rel[q]` satisfies `COMPOSE[rel[q], g_0] == g_q`.
  """
  k = np.asarray(adapted_params["embedding"]["kernel"], np.float64)
  if k.ndim == 4:  # block-shared key: one kernel, every relative state is the identity
    return np.zeros(1, np.int64)
  cands = _state_kernels(k[0])
  a = k.reshape(k.shape[0], -1)
  dist = np.sum(a * a, 1)[:, None] - 2.0 * a @ cands.T + np.sum(cands * cands, 1)[None, :]
  return np.argmin(dist, axis=1)


def score_relative(rel: np.ndarray, truth: etc.Schedule) -> float:
  """Fraction of blocks whose state `relative_states` gives right once block 0's is known."""
  g = blockstates.state_index(np.asarray(truth.rotflip), np.asarray(truth.negpos),
                              np.asarray(truth.chperm))
  if rel.shape[0] != g.shape[0]:
    rel = np.broadcast_to(rel[:1], g.shape)
  return float(np.mean(blockstates.COMPOSE[rel, g[0]] == g))


def score(recovered: etc.Schedule, truth: etc.Schedule) -> dict[str, Any]:
  """How much of `truth` was recovered: per-field fractions of blocks right, the fraction
  of blocks with all four right, and whether the whole schedule is exact."""
  right = {f: np.asarray(getattr(recovered, f)) == np.asarray(getattr(truth, f))
           for f in FIELDS}
  all_right = np.logical_and.reduce([right[f] for f in FIELDS])
  return {**{f"{f}_fraction": float(np.mean(right[f])) for f in FIELDS},
          "block_fraction": float(np.mean(all_right)), "exact": bool(all_right.all()),
          "num_blocks": int(all_right.size)}


def perturb(params: Mapping[str, Any], relative_std: float, seed: int = 0) -> Any:
  """Adds Gaussian noise to every float leaf: std = `relative_std` x that leaf's std
  (what fine-tuning after adaptation does to the weights, roughly)."""
  if relative_std <= 0:
    return params
  rng = np.random.default_rng(seed)

  def noisy(x):
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating) or x.size < 2:
      return x
    return (x + rng.normal(0.0, relative_std * float(np.std(x)), x.shape)).astype(x.dtype)

  return jax.tree.map(noisy, params)
