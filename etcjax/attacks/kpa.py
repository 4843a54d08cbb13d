"""Known-plaintext attack: recover a fixed key's effect from ONE plain/encrypted pair.

Every scheme here uses one key for a whole dataset, so a single leaked pair (a published
photo and its encrypted upload) pins down most or all of the key's action, and every
other image encrypted with that key can then be decrypted. This is the honest limit of
fixed-key perceptual encryption; the functions below show it.

* EtC: for each cipher block, the plain block and the one of the 96 block states
  (`blockstates`) mapping it onto the cipher block, solved jointly as an assignment
  problem over squared error (so it also works on JPEG-compressed pairs). On a textured
  pair the full schedule is recovered exactly.
* LE: for each of the 96 nibble positions, the source position and inversion, matched
  across all blocks of the pair (assignment problem). Exact on a textured pair.
* ELE: block positions from inversion-invariant nibble histograms; within a block the
  key is used once per image, so one pair leaves ties that are broken arbitrarily; the
  recovered cipher is partial.
* PE: for each pixel, the one of 48 colour variants that maps plain to cipher; pixels
  with equal channels leave ties (harmless for this pair, maybe not for others).

`recover(scheme, plain, cipher, ...)` returns `(recovered_cipher, info)`; the recovered
cipher has the scheme's usual `decrypt` and `info["ambiguous"]` counts the units (blocks,
nibble positions, pixels) the pair did not determine uniquely.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import linear_sum_assignment

from etcjax import etc
from etcjax.attacks import blockstates as bs
from etcjax.attacks.fr import VARIANT_FLIPS, VARIANT_PERMS
from etcjax.schemes import EtcCipher, LearnableCipher, PixelCipher
from etcjax.schemes.learnable import to_blocks, to_nibbles
from etcjax.schemes.pixelwise import CHANNEL_PERMS

KPA_SCHEMES = ("etc", "le", "ele", "pe")


def _pair(plain, cipher) -> tuple[np.ndarray, np.ndarray]:
  plain, cipher = np.asarray(plain), np.asarray(cipher)
  if plain.shape != cipher.shape or plain.ndim != 3 or plain.shape[-1] != 3:
    raise ValueError(f"known-plaintext attack needs a plain and a cipher image of the same "
                     f"shape (H, W, 3); got {plain.shape} and {cipher.shape}")
  for a in (plain, cipher):
    if a.dtype != np.uint8:
      raise ValueError(f"known-plaintext attack works on uint8 images; got {a.dtype}")
  return plain, cipher


def recover_etc(plain, cipher, block_size: int = 16, tolerance: float = 0.0
                ) -> tuple[EtcCipher, dict]:
  """The EtC schedule from one pair. `tolerance`: mean squared error per pixel value below
  which a (block, state) match counts as a fit, for the ambiguity count (0: exact)."""
  plain, cipher = _pair(plain, cipher)
  h, w, _ = plain.shape
  p = np.asarray(to_blocks(plain, block_size), np.float32)  # (n, B, B, 3)
  c = np.asarray(to_blocks(cipher, block_size), np.float32)
  n = p.shape[0]
  cand = bs.all_states(p).reshape(n * bs.NUM_STATES, -1)  # (n*96, L), row j*96 + s
  cflat = c.reshape(n, -1)
  # Squared distances by ||c||^2 + ||v||^2 - 2 c.v; float64 keeps exact matches at 0.
  dist = np.empty((n, n * bs.NUM_STATES), np.float64)
  cc = (cflat.astype(np.float64) ** 2).sum(1)[:, None]
  for start in range(0, cand.shape[0], 8192):
    chunk = cand[start:start + 8192].astype(np.float64)
    dist[:, start:start + 8192] = cc + (chunk ** 2).sum(1)[None] - 2 * cflat @ chunk.T
  dist = np.maximum(dist, 0).reshape(n, n, bs.NUM_STATES) / cflat.shape[1]
  best_state = dist.argmin(-1)
  cost = dist.min(-1)
  rows, cols = linear_sum_assignment(cost)
  perm = cols[np.argsort(rows)]
  states = best_state[np.arange(n), perm]
  fits = (dist <= tolerance + 1e-9).sum((1, 2))
  schedule = etc.Schedule(
      perm=perm.astype(np.int32), rotflip=bs.STATE_ROTFLIP[states].astype(np.int32),
      negpos=bs.STATE_NEGPOS[states].astype(np.int32),
      chperm=bs.STATE_CHPERM[states].astype(np.int32), block_size=block_size,
      grid=(h // block_size, w // block_size))
  info = {"units": "blocks", "total": int(n), "ambiguous": int((fits > 1).sum()),
          "unmatched": int((cost[np.arange(n), perm] > tolerance + 1e-9).sum())}
  return EtcCipher(schedule=schedule, height=h, width=w), info


def _nibble_match(v: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Matches cipher nibble positions to plain ones over the rows of (m, L) arrays.

  Returns (perm, flip, fits): cipher position q takes plain position perm[q], inverted
  where flip[q]; fits[q] counts the (position, inversion) pairs fitting every row.
  """
  v = v.astype(np.int16)
  w = w.astype(np.int16)
  # mismatch[f][q, k] = number of rows where w[:, q] != (v[:, k] or 15 - v[:, k]).
  mism = np.stack([
      (w[:, :, None] != v[:, None, :]).sum(0),
      (w[:, :, None] != 15 - v[:, None, :]).sum(0)])
  cost = mism.min(0)
  rows, cols = linear_sum_assignment(cost)
  perm = cols[np.argsort(rows)]
  flip = mism[1, np.arange(len(perm)), perm] < mism[0, np.arange(len(perm)), perm]
  fits = (mism == 0).sum((0, 2))
  return perm, flip, fits


def recover_le(plain, cipher, block_size: int = 4) -> tuple[LearnableCipher, dict]:
  """The LE nibble permutation and inversion mask from one pair."""
  plain, cipher = _pair(plain, cipher)
  h, w, _ = plain.shape
  v = np.asarray(to_nibbles(plain, block_size))
  c = np.asarray(to_nibbles(cipher, block_size))
  perm, flip, fits = _nibble_match(v, c)
  rec = LearnableCipher.from_arrays(perm, flip, np.arange(v.shape[0]), h, w, block_size, "le")
  return rec, {"units": "nibble positions", "total": int(perm.size),
               "ambiguous": int((fits > 1).sum())}


def recover_ele(plain, cipher, block_size: int = 4) -> tuple[LearnableCipher, dict]:
  """ELE block scrambling and (partly) the per-block nibble keys from one pair."""
  plain, cipher = _pair(plain, cipher)
  h, w, _ = plain.shape
  v = np.asarray(to_nibbles(plain, block_size))  # (n, L)
  c = np.asarray(to_nibbles(cipher, block_size))
  n, length = v.shape
  # min(v, 15 - v) is unchanged by inversion and the multiset by permutation.
  def hist(x):
    return np.stack([np.bincount(r, minlength=8) for r in np.minimum(x, 15 - x)])
  hv, hc = hist(v), hist(c)
  cost = np.abs(hc[:, None, :] - hv[None, :, :]).sum(-1)
  rows, cols = linear_sum_assignment(cost)
  block_perm = cols[np.argsort(rows)]
  perms = np.empty((n, length), np.int64)
  flips = np.empty((n, length), bool)
  ambiguous = 0
  for i in range(n):
    perms[i], flips[i], fits = _nibble_match(v[block_perm[i]][None], c[i][None])
    ambiguous += int((fits > 1).sum())
  rec = LearnableCipher.from_arrays(perms, flips, block_perm, h, w, block_size, "ele")
  return rec, {"units": "nibble positions", "total": int(n * length), "ambiguous": ambiguous}


def recover_pe(plain, cipher) -> tuple[PixelCipher, dict]:
  """The PE per-pixel inversions and channel orders from one pair."""
  plain, cipher = _pair(plain, cipher)
  h, w, _ = plain.shape
  p = plain.astype(np.int16)
  # Variant v of a pixel as PE makes it: invert input channels, then shuffle.
  flips = VARIANT_FLIPS  # (48, 3) over input channels
  perms = VARIANT_PERMS
  inv = np.where(flips[None, None], 255 - p[:, :, None, :], p[:, :, None, :])  # (h,w,48,3)
  cand = np.take_along_axis(inv, np.broadcast_to(perms, inv.shape), axis=-1)
  err = np.abs(cand - cipher.astype(np.int16)[:, :, None, :]).sum(-1)  # (h, w, 48)
  best = err.argmin(-1)
  chperm_of_variant = np.array([CHANNEL_PERMS.tolist().index(list(q)) for q in perms])
  rec = PixelCipher.from_arrays(flips[best], chperm_of_variant[best], h, w)
  return rec, {"units": "pixels", "total": int(h * w),
               "ambiguous": int(((err == 0).sum(-1) > 1).sum())}


def recover(scheme: str, plain, cipher, block_size: int = 16, le_block_size: int = 4):
  """Dispatches to the scheme's recovery; returns (recovered cipher, info dict)."""
  if scheme == "etc":
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return recover_etc(plain, cipher, block_size)
  if scheme == "le":
    return recover_le(plain, cipher, le_block_size)
  if scheme == "ele":
    return recover_ele(plain, cipher, le_block_size)
  if scheme == "pe":
    return recover_pe(plain, cipher)
  raise ValueError(f"known-plaintext attack supports schemes {', '.join(KPA_SCHEMES)}; "
                   f"got {scheme!r}")
