"""Pure keyed EtC transforms: block scrambling, rotation/flip, negative-positive, channel shuffle.

The normative spec is DESIGN.md. Images are `(H, W, 3)` or `(N, H, W, 3)` (any number of
leading batch axes), `uint8` in [0, 255] or float in [0, 1]; `H` and `W` are multiples of
the block size `B`. Blocks are numbered in raster order, `b = r * (W/B) + c`, and for
every output block `i`:

    out_block[i] = chperm_i(negpos_i(rotflip_i(in_block[perm[i]])))

* `rotflip[i]` in 0..7: `np.rot90(block, k=rotflip[i] % 4)` over the (H, W) axes, then,
  if `rotflip[i] >= 4`, `np.fliplr` (reverse the W axis).
* `negpos[i]` in {0, 1}: if 1, `p -> p ^ 255` (uint8) or `p -> 1 - p` (float).
* `chperm[i]` in 0..5: index into `itertools.permutations((0, 1, 2))`; output channel
  `c` is input channel `PERMS3[chperm[i]][c]`.

`decrypt` is the exact inverse (bit-exact for uint8 and for float values that are exact
in their dtype, such as k/255 in float32 up to the rounding of `1 - p`).

`encrypt` / `decrypt` take NumPy or JAX arrays:

* JAX arrays, or any call under `jax.jit` / `jax.vmap` (traced schedule or images): a pure
  `jax.numpy` implementation, jit-, vmap- and shard-safe (no host callbacks, no Python
  loop over blocks; one elementwise-fused pass, see `_transform_jnp`). Returns a JAX array.
* NumPy arrays with a concrete schedule: an equivalent host implementation
  (`_transform_np`) for the owner-side tools and host input pipelines. Returns NumPy.

Both give bit-identical results (tested).
"""

from __future__ import annotations

import itertools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# Output channel c of a block with chperm code k is input channel PERMS3[k][c].
PERMS3 = np.array(list(itertools.permutations((0, 1, 2))), np.int32)  # (6, 3)
# Code of the inverse channel permutation: PERMS3[INV_CHPERM[k]] == argsort(PERMS3[k]).
INV_CHPERM = np.array([PERMS3.tolist().index(np.argsort(p).tolist()) for p in PERMS3],
                      np.int32)
# rotflip code k as (transpose, reverse rows, reverse columns), applied in that order:
# out[y, x] = S[B-1-y if REV_Y else y, B-1-x if REV_X else x], S = in.T if TRANSPOSE else in.
TRANSPOSE = np.array([0, 1, 0, 1, 0, 1, 0, 1], np.int32)
REV_Y = np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int32)
REV_X = np.array([0, 0, 1, 1, 1, 1, 0, 0], np.int32)
# Code of the inverse dihedral element: rot90 by k is undone by rot90 by 4-k; the four
# flipped elements are involutions.
INV_ROTFLIP = np.array([0, 3, 2, 1, 4, 5, 6, 7], np.int32)

Array = Any  # np.ndarray | jax.Array


@flax.struct.dataclass
class Schedule:
  """Per-geometry EtC key schedule: a JAX pytree (the four arrays are leaves).

  Attributes:
    perm: (n,) int, a permutation of 0..n-1; output block i takes input block perm[i].
    rotflip: (n,) int in 0..7 (see module doc).
    negpos: (n,) int in {0, 1}.
    chperm: (n,) int in 0..5.
    block_size: B, static.
    grid: (H/B, W/B) the schedule was made for, static; None means any geometry with
      n blocks (then only n is checked).
  """

  perm: Array
  rotflip: Array
  negpos: Array
  chperm: Array
  block_size: int = flax.struct.field(pytree_node=False, default=16)
  grid: tuple[int, int] | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def num_blocks(self) -> int:
    return int(np.shape(self.perm)[-1])

  @classmethod
  def identity(cls, height: int, width: int, block_size: int = 16) -> Schedule:
    """The schedule that leaves images unchanged (for tests and baselines)."""
    rows, cols = _grid(height, width, block_size)
    n = rows * cols
    z = np.zeros(n, np.int32)
    return cls(perm=np.arange(n, dtype=np.int32), rotflip=z, negpos=z, chperm=z,
               block_size=block_size, grid=(rows, cols))

  def inverse(self) -> Schedule:
    """The schedule of `decrypt`: encrypt(encrypt(x, s), s.inverse()) == x.

    Block j of the plain image is block inv[j] of the cipher image (inv = perm^-1),
    transformed by the inverse of that block's rotflip and chperm (negpos is its own
    inverse, and the three per-block steps commute).
    """
    if _is_concrete(self):
      perm = np.asarray(self.perm)
      inv = np.empty_like(perm)
      inv[perm] = np.arange(perm.shape[-1], dtype=perm.dtype)
      return self.replace(perm=inv, rotflip=INV_ROTFLIP[np.asarray(self.rotflip)[inv]],
                          negpos=np.asarray(self.negpos)[inv],
                          chperm=INV_CHPERM[np.asarray(self.chperm)[inv]])
    perm = jnp.asarray(self.perm)
    inv = jnp.argsort(perm).astype(perm.dtype)
    return self.replace(perm=inv,
                        rotflip=jnp.asarray(INV_ROTFLIP)[jnp.asarray(self.rotflip)[inv]],
                        negpos=jnp.asarray(self.negpos)[inv],
                        chperm=jnp.asarray(INV_CHPERM)[jnp.asarray(self.chperm)[inv]])

  def validate(self) -> Schedule:
    """Checks shapes and value ranges (concrete schedules only); returns self."""
    if not _is_concrete(self):
      return self
    n = self.num_blocks
    perm = np.asarray(self.perm)
    for name, arr, hi in (("rotflip", self.rotflip, 8), ("negpos", self.negpos, 2),
                          ("chperm", self.chperm, 6)):
      arr = np.asarray(arr)
      if arr.shape != (n,):
        raise ValueError(f"schedule field {name} has shape {arr.shape}, expected ({n},)")
      if arr.size and (arr.min() < 0 or arr.max() >= hi):
        raise ValueError(f"schedule field {name} has values outside 0..{hi - 1}")
    if perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n)):
      raise ValueError("schedule field perm is not a permutation of 0..n-1")
    return self


def _is_concrete(tree: Any) -> bool:
  return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def _grid(height: int, width: int, block_size: int) -> tuple[int, int]:
  if block_size < 1:
    raise ValueError(f"block size must be >= 1, got {block_size}")
  if height % block_size or width % block_size:
    raise ValueError(f"image size {height}x{width} is not a multiple of the block size "
                     f"{block_size}")
  return height // block_size, width // block_size


def _check(images: Array, schedule: Schedule) -> tuple[int, int]:
  """Validates images against the schedule; returns the block grid (rows, cols)."""
  shape = np.shape(images)
  if len(shape) < 3 or shape[-1] != 3:
    raise ValueError(f"expected images of shape (H, W, 3) or (N, H, W, 3), got {shape}")
  dtype = np.dtype(images.dtype)
  if dtype != np.uint8 and not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"images must be uint8 in [0, 255] or float in [0, 1], got {dtype}")
  if not isinstance(schedule, Schedule):
    raise ValueError(f"expected an etcjax.etc.Schedule, got {type(schedule).__name__}")
  h, w = shape[-3], shape[-2]
  grid = _grid(h, w, schedule.block_size)
  if schedule.grid is not None and tuple(schedule.grid) != grid:
    gh, gw = schedule.grid
    b = schedule.block_size
    raise ValueError(f"schedule was made for {gh * b}x{gw * b} images (block size {b}), "
                     f"got {h}x{w}")
  if schedule.num_blocks != grid[0] * grid[1]:
    raise ValueError(f"schedule has {schedule.num_blocks} blocks but {h}x{w} images with "
                     f"block size {schedule.block_size} have {grid[0] * grid[1]}")
  return grid


def encrypt(images: Array, schedule: Schedule) -> Array:
  """EtC-encrypts images.

  Args:
    images: (..., H, W, 3) uint8 in [0, 255] or float in [0, 1], NumPy or JAX.
    schedule: the key schedule for (H, W, B), e.g. `key.schedule(H, W, B)`.

  Returns:
    Encrypted images, same shape and dtype (NumPy in -> NumPy out when the schedule is
    concrete; JAX otherwise).

  Raises:
    ValueError: wrong rank/channels/dtype, H or W not a multiple of B, or a schedule
      made for another geometry.
  """
  return _transform(images, schedule)


def decrypt(images: Array, schedule: Schedule) -> Array:
  """Inverts `encrypt` with the same schedule. Same conventions as `encrypt`."""
  _check(images, schedule)
  return _transform(images, schedule.inverse())


def _transform(images: Array, schedule: Schedule) -> Array:
  grid = _check(images, schedule)
  if isinstance(images, np.ndarray) and _is_concrete(schedule):
    return _transform_np(images, schedule.validate(), grid)
  return _transform_jnp(jnp.asarray(images), schedule, grid)


def _transform_jnp(x: jax.Array, s: Schedule, grid: tuple[int, int]) -> jax.Array:
  """Pure-jnp transform: out block i = chperm(negpos(rotflip(in block perm[i])))."""
  lead = x.shape[:-3]
  rows, cols = grid
  b = s.block_size
  n = rows * cols
  x = x.reshape((-1, rows, b, cols, b, 3)).transpose(0, 1, 3, 2, 4, 5).reshape(-1, n, b, b, 3)
  x = jnp.take(x, jnp.asarray(s.perm), axis=1)

  def per_block(table, codes):  # (n,) -> (1, n, 1, 1, 1) bool, broadcast over the block
    return jnp.asarray(table)[jnp.asarray(codes)].astype(bool)[None, :, None, None, None]

  rf = s.rotflip
  x = jnp.where(per_block(TRANSPOSE, rf), x.swapaxes(2, 3), x)
  x = jnp.where(per_block(REV_Y, rf), x[:, :, ::-1], x)
  x = jnp.where(per_block(REV_X, rf), x[:, :, :, ::-1], x)
  src = jnp.asarray(PERMS3)[jnp.asarray(s.chperm)][None, :, None, None, :]  # (1,n,1,1,3)
  chans = [x[..., k:k + 1] for k in range(3)]
  x = jnp.where(src == 0, chans[0], jnp.where(src == 1, chans[1], chans[2]))
  neg = jnp.asarray(s.negpos).astype(bool)[None, :, None, None, None]
  if x.dtype == jnp.uint8:
    x = x ^ (neg.astype(jnp.uint8) * jnp.uint8(255))
  else:
    x = jnp.where(neg, 1 - x, x)
  x = x.reshape(-1, rows, cols, b, b, 3).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(lead + (rows * b, cols * b, 3))


def _transform_np(x: np.ndarray, s: Schedule, grid: tuple[int, int]) -> np.ndarray:
  """Host NumPy transform, bit-identical to `_transform_jnp`; blocks grouped by code."""
  lead = x.shape[:-3]
  rows, cols = grid
  b = s.block_size
  n = rows * cols
  perm = np.asarray(s.perm)
  rotflip = np.asarray(s.rotflip)
  chperm = np.asarray(s.chperm)
  negpos = np.asarray(s.negpos).astype(bool)
  src = x.reshape((-1, rows, b, cols, b, 3)).transpose(1, 3, 0, 2, 4, 5).reshape(n, -1, b, b, 3)
  out = np.empty_like(src)
  # The schedule is concrete, so blocks that share (rotflip, chperm) codes share one
  # strided NumPy copy instead of a per-block loop.
  for code in np.unique(rotflip * 6 + chperm):
    idx = np.nonzero(rotflip * 6 + chperm == code)[0]
    rf, cp = divmod(int(code), 6)
    blk = src[perm[idx]]  # (k, N, B, B, 3)
    if TRANSPOSE[rf]:
      blk = blk.swapaxes(2, 3)
    if REV_Y[rf]:
      blk = blk[:, :, ::-1]
    if REV_X[rf]:
      blk = blk[:, :, :, ::-1]
    out[idx] = blk[..., PERMS3[cp]]
  if negpos.any():
    if out.dtype == np.uint8:
      out[negpos] ^= np.uint8(255)
    else:
      out[negpos] = 1 - out[negpos]
  out = out.reshape(rows, cols, -1, b, b, 3).transpose(2, 0, 3, 1, 4, 5)
  return np.ascontiguousarray(out).reshape(lead + (rows * b, cols * b, 3))
