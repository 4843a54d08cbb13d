"""FR-Attack: feature reconstruction (Chang & Case 2020), ciphertext-only, no training.

* `fr_basic`: folds every value `v > 127` to `255 - v`. A pixel and its negative-positive
  image fold to the same value, so whatever a key's negative-positive step did, the
  output equals `fr_basic(plain)`: the "folded" plain image, whose edges and shapes are
  those of the plain image.
* `fr_advanced`: for each pixel, in an anti-diagonal wavefront from the top-left corner,
  tries the 48 colour variants (6 channel orders x 8 per-channel inversions) and keeps the
  one closest (L1) to the mean of its already decoded left and upper neighbours. This
  undoes pixel-wise negative-positive + channel shuffling (PE) up to one global variant
  wherever neighbouring pixels are similar. The corner pixel is kept as it is, so the
  result may be one global colour variant (e.g. the negative) of the plain image.

Images: `(H, W, 3)` or `(N, H, W, 3)`, uint8 [0, 255] or float [0, 1]; output has the
same shape and dtype (float inputs are handled on the 8-bit grid).
"""

from __future__ import annotations

import numpy as np

from etcjax.schemes.pixelwise import CHANNEL_PERMS

# (48, 3) channel orders and (48, 3) inversion masks of the advanced attack's variants.
_FLIPS = np.array([[(m >> c) & 1 for c in range(3)] for m in range(8)], bool)
VARIANT_PERMS = np.repeat(CHANNEL_PERMS, 8, axis=0)
VARIANT_FLIPS = np.tile(_FLIPS, (6, 1))


def _as_uint8(images) -> tuple[np.ndarray, np.dtype]:
  x = np.asarray(images)
  if x.ndim not in (3, 4) or x.shape[-1] != 3:
    raise ValueError(f"expected images of shape (H, W, 3) or (N, H, W, 3); got {x.shape}")
  if x.dtype == np.uint8:
    return x, x.dtype
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"images must be uint8 or float in [0, 1]; got {x.dtype}")
  return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8), x.dtype


def _restore(x: np.ndarray, dtype) -> np.ndarray:
  return x if dtype == np.uint8 else (x.astype(np.float32) / 255).astype(dtype)


def fr_basic(images) -> np.ndarray:
  """Folds values above 127: v -> 255 - v. Same shape and dtype as `images`."""
  x, dtype = _as_uint8(images)
  return _restore(np.where(x > 127, 255 - x, x).astype(np.uint8), dtype)


def fr_advanced(images) -> np.ndarray:
  """Neighbour-guided choice among 48 colour variants per pixel (see module doc)."""
  x, dtype = _as_uint8(images)
  batch = x[None] if x.ndim == 3 else x
  n, h, w, _ = batch.shape
  xi = batch.astype(np.int16)
  # variants[..., v, c] = channel VARIANT_PERMS[v][c] of the pixel, inverted if flipped.
  variants = xi[..., VARIANT_PERMS]  # (n, h, w, 48, 3)
  variants = np.where(VARIANT_FLIPS, 255 - variants, variants)
  out = np.empty_like(xi)
  out[:, 0, 0] = xi[:, 0, 0]
  for d in range(1, h + w - 1):
    rows = np.arange(max(0, d - w + 1), min(d, h - 1) + 1)
    cols = d - rows
    ref = np.zeros((n, rows.size, 3), np.float32)
    count = np.zeros((1, rows.size, 1), np.float32)
    has_left = cols > 0
    has_up = rows > 0
    ref[:, has_left] += out[:, rows[has_left], cols[has_left] - 1]
    ref[:, has_up] += out[:, rows[has_up] - 1, cols[has_up]]
    count[0, :, 0] = has_left.astype(np.float32) + has_up
    ref /= count
    cand = variants[:, rows, cols]  # (n, k, 48, 3)
    best = np.abs(cand - ref[:, :, None, :]).sum(-1).argmin(-1)  # (n, k)
    out[:, rows, cols] = np.take_along_axis(cand, best[..., None, None], axis=2)[:, :, 0]
  out = out.astype(np.uint8)
  return _restore(out[0] if x.ndim == 3 else out, dtype)
