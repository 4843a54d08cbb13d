"""EtC transforms on the host in NumPy, without importing JAX.

The same transform as `etcjax.etc` (the normative spec is DESIGN.md and `etcjax.etc`'s
module doc), for NumPy arrays and concrete schedules only. The owner-side tools
(`etcjax encrypt`, `decrypt`, `compress-stats`) and `etcjax.codec` use this module, so that
they start without loading JAX; `etcjax.etc` uses the same code for its NumPy path, so the
two are bit-identical by construction.

A schedule here is anything with the fields of `etcjax.etc.Schedule` (`perm`, `rotflip`,
`negpos`, `chperm`: (n,) integer arrays; `block_size`; `grid`): `HostSchedule` (what
`EtcKey.host_schedule` returns) or an `etcjax.etc.Schedule` holding concrete arrays.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
from typing import Any

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

FIELDS = ("perm", "rotflip", "negpos", "chperm")


@dataclasses.dataclass(frozen=True)
class HostSchedule:
  """A concrete EtC key schedule as NumPy arrays (not a JAX pytree; see `etcjax.etc.Schedule`).

  Attributes:
    perm: (n,) int32, a permutation of 0..n-1; output block i takes input block perm[i].
    rotflip: (n,) int32 in 0..7.
    negpos: (n,) int32 in {0, 1}.
    chperm: (n,) int32 in 0..5.
    block_size: B.
    grid: (H/B, W/B) the schedule was made for, or None (any geometry with n blocks).
  """

  perm: np.ndarray
  rotflip: np.ndarray
  negpos: np.ndarray
  chperm: np.ndarray
  block_size: int = 16
  grid: tuple[int, int] | None = None

  @property
  def num_blocks(self) -> int:
    return int(np.shape(self.perm)[-1])

  def inverse(self) -> HostSchedule:
    """The schedule of `decrypt`: encrypt(encrypt(x, s), s.inverse()) == x."""
    return dataclasses.replace(self, **inverse_fields(self))


def inverse_fields(s: Any) -> dict[str, np.ndarray]:
  """The four fields of a concrete schedule's inverse (see `etcjax.etc.Schedule.inverse`).

  Block j of the plain image is block inv[j] of the cipher image (inv = perm^-1),
  transformed by the inverse of that block's rotflip and chperm (negpos is its own
  inverse, and the three per-block steps commute).
  """
  perm = np.asarray(s.perm)
  inv = np.empty_like(perm)
  inv[perm] = np.arange(perm.shape[-1], dtype=perm.dtype)
  return {"perm": inv, "rotflip": INV_ROTFLIP[np.asarray(s.rotflip)[inv]],
          "negpos": np.asarray(s.negpos)[inv], "chperm": INV_CHPERM[np.asarray(s.chperm)[inv]]}


def validate(s: Any) -> None:
  """Checks a concrete schedule's shapes and value ranges; raises ValueError."""
  n = int(np.shape(s.perm)[-1])
  perm = np.asarray(s.perm)
  for name, hi in (("rotflip", 8), ("negpos", 2), ("chperm", 6)):
    arr = np.asarray(getattr(s, name))
    if arr.shape != (n,):
      raise ValueError(f"schedule field {name} has shape {arr.shape}, expected ({n},)")
    if arr.size and (arr.min() < 0 or arr.max() >= hi):
      raise ValueError(f"schedule field {name} has values outside 0..{hi - 1}")
  if perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n)):
    raise ValueError("schedule field perm is not a permutation of 0..n-1")


def grid_of(height: int, width: int, block_size: int) -> tuple[int, int]:
  """(H/B, W/B); ValueError when B < 1 or H, W are not multiples of B."""
  if block_size < 1:
    raise ValueError(f"block size must be >= 1, got {block_size}")
  if height % block_size or width % block_size:
    raise ValueError(f"image size {height}x{width} is not a multiple of the block size "
                     f"{block_size}")
  return height // block_size, width // block_size


def check(shape: tuple[int, ...], dtype: Any, schedule: Any,
          check_dtype: bool = True) -> tuple[int, int]:
  """Validates an image shape/dtype against a schedule; returns the block grid (rows, cols).

  `check_dtype=False` leaves the dtype to the caller (`etcjax.etc` also accepts JAX's
  extended float types such as bfloat16).

  Raises:
    ValueError: wrong rank/channels/dtype, H or W not a multiple of B, or a schedule made
      for another geometry.
  """
  if len(shape) < 3 or shape[-1] != 3:
    raise ValueError(f"expected images of shape (H, W, 3) or (N, H, W, 3), got {shape}")
  dtype = np.dtype(dtype)
  if check_dtype and dtype != np.uint8 and dtype.kind != "f":
    raise ValueError(f"images must be uint8 in [0, 255] or float in [0, 1], got {dtype}")
  h, w = shape[-3], shape[-2]
  grid = grid_of(h, w, schedule.block_size)
  if schedule.grid is not None and tuple(schedule.grid) != grid:
    gh, gw = schedule.grid
    b = schedule.block_size
    raise ValueError(f"schedule was made for {gh * b}x{gw * b} images (block size {b}), "
                     f"got {h}x{w}")
  n = int(np.shape(schedule.perm)[-1])
  if n != grid[0] * grid[1]:
    raise ValueError(f"schedule has {n} blocks but {h}x{w} images with "
                     f"block size {schedule.block_size} have {grid[0] * grid[1]}")
  return grid


def encrypt(images: np.ndarray, schedule: Any) -> np.ndarray:
  """EtC-encrypts NumPy images on the host.

  Args:
    images: (..., H, W, 3) uint8 in [0, 255] or float in [0, 1].
    schedule: a concrete schedule for (H, W, B) (`HostSchedule` or `etcjax.etc.Schedule`).

  Returns:
    A new array, same shape and dtype.

  Raises:
    ValueError: as `check`, or a schedule with invalid fields.
  """
  images = np.asarray(images)
  grid = check(images.shape, images.dtype, schedule)
  validate(schedule)
  return transform(images, schedule, grid)


def decrypt(images: np.ndarray, schedule: Any) -> np.ndarray:
  """Inverts `encrypt` with the same schedule. Same conventions as `encrypt`."""
  images = np.asarray(images)
  grid = check(images.shape, images.dtype, schedule)
  validate(schedule)
  inv = HostSchedule(**inverse_fields(schedule), block_size=schedule.block_size,
                     grid=schedule.grid)
  return transform(images, inv, grid)


def source_index(perm: Any, rotflip: Any, chperm: Any, grid: tuple[int, int],
                 block_size: int, xp: Any = np) -> Any:
  """Flat source index of every output byte of one (H, W, 3) image; int32 (H*W*3,).

  `out.reshape(-1)[k] = in.reshape(-1)[index[k]]` (before negpos) for the schedule's
  block permutation, rotation/flip and channel shuffle. Computed arithmetically from the
  per-block arrays (no per-element tables), with `xp` = `numpy` or `jax.numpy` (traceable).
  """
  rows, cols = grid
  b = block_size
  n = rows * cols
  perm = xp.asarray(perm).astype(xp.int32)
  rotflip = xp.asarray(rotflip)
  col = lambda table: xp.asarray(table)[rotflip].reshape(n, 1, 1).astype(bool)
  y = xp.arange(b, dtype=xp.int32).reshape(1, b, 1)
  x = xp.arange(b, dtype=xp.int32).reshape(1, 1, b)
  # out[y, x] = S[y', x'] with y', x' optionally reversed and S = in.T if TRANSPOSE.
  yr = xp.where(col(REV_Y), b - 1 - y, y)
  xr = xp.where(col(REV_X), b - 1 - x, x)
  t = col(TRANSPOSE)
  sy, sx = xp.where(t, xr, yr), xp.where(t, yr, xr)  # (n, b, b) source pixel in its block
  pixel = ((perm // cols).reshape(n, 1, 1) * b + sy) * (cols * b) \
      + (perm % cols).reshape(n, 1, 1) * b + sx
  chans = xp.asarray(PERMS3)[xp.asarray(chperm)].astype(xp.int32)  # (n, 3)
  index = pixel[..., None] * 3 + chans[:, None, None, :]  # (n, b, b, 3), blocks in raster order
  return blocks_to_image(index, grid, xp).reshape(-1)


def blocks_to_image(a: Any, grid: tuple[int, int], xp: Any = np) -> Any:
  """(n, B, B, ...) per-block values -> (H, W, ...) image layout."""
  rows, cols = grid
  b = a.shape[1]
  a = a.reshape((rows, cols, b, b) + a.shape[3:])
  return xp.moveaxis(a, 2, 1).reshape((rows * b, cols * b) + a.shape[4:])


def negpos_map(negpos: Any, grid: tuple[int, int], block_size: int, xp: Any = np) -> Any:
  """bool (H, W, 1): pixels of blocks whose negpos is 1."""
  n = grid[0] * grid[1]
  neg = xp.asarray(negpos).astype(bool).reshape(n, 1, 1, 1)
  return blocks_to_image(xp.broadcast_to(neg, (n, block_size, block_size, 1)), grid, xp)


# Above this many blocks the per-block host loop's Python overhead outweighs its faster
# copies, and `transform` uses one `np.take` over a cached index map instead.
HOST_LOOP_MAX_BLOCKS = 1024
# Batches smaller than this go through `np.take` too once their schedule's index map is
# cached (a geometry seen before): per image, the loop's per-block calls then cost more
# than the gather (e.g. 224x224: ~1 ms loop vs ~0.35 ms take; building the map ~3.5 ms).
SMALL_BATCH = 4
_MAX_MAPS = 16
_maps: collections.OrderedDict = collections.OrderedDict()
_seen: dict = {}
_maps_lock = threading.Lock()  # worker threads share the maps

def transform(x: np.ndarray, s: Any, grid: tuple[int, int]) -> np.ndarray:
  """The host transform of (..., H, W, 3) images under a checked schedule `s`.

  For up to `HOST_LOOP_MAX_BLOCKS` blocks: one strided copy per (output block, channel),
  each vectorised over the whole batch (inner loops run along a block row, not along the
  3 channels), so a batch of images costs about as many NumPy calls as one image.
  Otherwise, and for batches under `SMALL_BATCH` images of a geometry seen before, one
  `np.take` over the cached `source_index` map. Returns a new array.
  """
  lead = x.shape[:-3]
  rows, cols = grid
  b = s.block_size
  if rows * cols > HOST_LOOP_MAX_BLOCKS:
    return _transform_take(x, s, grid)
  if rows * cols > 1 and int(np.prod(lead, dtype=np.int64)) < SMALL_BATCH:
    key = _map_key(s, grid)
    # Build the map for a geometry's second small batch: one-off images keep the loop.
    if key in _maps or key in _seen:
      return _transform_take(x, s, grid, key)
    if len(_seen) > 1024:
      _seen.clear()
    _seen[key] = True
  src = np.ascontiguousarray(x).reshape((-1, rows, b, cols, b, 3))
  out = np.empty_like(src)
  perm, rotflip, negpos, chperm = (np.asarray(getattr(s, f)).tolist() for f in FIELDS)
  is_u8 = x.dtype == np.uint8
  one = np.asarray(1, x.dtype)
  for i, p in enumerate(perm):
    blk = src[:, p // cols, :, p % cols]  # (M, B, B, 3) view
    rf = rotflip[i]
    if TRANSPOSE[rf]:
      blk = blk.swapaxes(1, 2)
    if REV_Y[rf]:
      blk = blk[:, ::-1]
    if REV_X[rf]:
      blk = blk[:, :, ::-1]
    dst = out[:, i // cols, :, i % cols]
    for c, k in enumerate(PERMS3[chperm[i]].tolist()):
      if not negpos[i]:
        dst[..., c] = blk[..., k]
      elif is_u8:
        np.bitwise_xor(blk[..., k], np.uint8(255), out=dst[..., c])
      else:
        np.subtract(one, blk[..., k], out=dst[..., c])
  return out.reshape(lead + x.shape[-3:])


def _map_key(s: Any, grid: tuple[int, int]) -> tuple:
  return tuple(np.ascontiguousarray(np.asarray(getattr(s, f)), np.int64).tobytes()
               for f in FIELDS) + (tuple(grid), s.block_size)


def _host_maps(key: tuple) -> tuple[np.ndarray, np.ndarray]:
  """(index map, negpos map) of a schedule key, kept for the last `_MAX_MAPS` keys."""
  with _maps_lock:
    maps = _maps.get(key)
    if maps is not None:
      _maps.move_to_end(key)
      return maps
  perm, rotflip, negpos, chperm, grid, b = key
  a = lambda buf: np.frombuffer(buf, np.int64)
  index = source_index(a(perm), a(rotflip), a(chperm), grid, b).astype(np.intp)
  maps = index, negpos_map(a(negpos), grid, b)
  with _maps_lock:
    _maps[key] = maps
    while len(_maps) > _MAX_MAPS:
      _maps.popitem(last=False)
  return maps


def _transform_take(x: np.ndarray, s: Any, grid: tuple[int, int],
                    key: tuple | None = None) -> np.ndarray:
  """`transform` as one `np.take` over the schedule's cached index map."""
  index, neg = _host_maps(key or _map_key(s, grid))
  flat = np.ascontiguousarray(x).reshape(-1, index.shape[0])
  out = np.take(flat, index, axis=1).reshape((-1,) + x.shape[-3:])
  if x.dtype == np.uint8:
    np.bitwise_xor(out, (neg * np.uint8(255)).astype(np.uint8), out=out)
  else:
    out = np.where(neg, np.asarray(1, x.dtype) - out, out).astype(x.dtype, copy=False)
  return out.reshape(x.shape)
