"""Learnable image encryption: LE (Tanaka 2018) and ELE (Madono et al. 2020).

Both work on `B x B` pixel blocks (B = 4 in the papers). Every 8-bit pixel value is split
into its upper and lower 4-bit halves, so a block becomes a `B x B x 6` array of nibbles
(channels R_hi, G_hi, B_hi, R_lo, G_lo, B_lo), flattened in (row, column, channel) order
to `L = 6 B^2` values (96 for B = 4). The key gives

  * a permutation of the L nibble positions: output nibble `j` takes input nibble
    `perm[j]`;
  * an inversion mask with exactly L/2 ones: output nibble `j` is replaced by `15 - v`
    where the mask is 1;

after which upper and lower halves are merged back into 8-bit pixels. LE uses one such
block key for every block. ELE uses a different block key for each output block position
and also scrambles the blocks: output block `i` is `LE_{k_i}(input block block_perm[i])`
(blocks numbered in raster order, as in the EtC spec).

Key derivation (from an `etcjax.keys.EtcKey`, never from a seeded PRNG), with
`D = "etcjax/{le|ele}/v1/H={H},W={W},B={B}"`:

  * `key.stream(D + "/nibble-perm").permutation(L)`: the nibble permutation (ELE draws
    one permutation per block, in block order, from the same stream);
  * `key.stream(D + "/nibble-flip").permutation(L)[:L // 2]`: the inverted positions
    (ELE: one draw per block, in block order);
  * ELE only: `key.stream(D + "/block-perm").permutation(n)`: the block scrambling.

Float images are quantised to 8 bits first (the schemes are defined on 8-bit pixels), so
float round trips are exact for inputs on the 1/255 grid.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from etcjax.schemes.cipher import check_images, from_uint8, to_uint8

DEFAULT_BLOCK_SIZE = 4


def to_blocks(x: jnp.ndarray, block_size: int) -> jnp.ndarray:
  """(…, H, W, C) -> (…, n, B, B, C) with blocks in raster order."""
  *lead, h, w, c = x.shape
  b = block_size
  x = x.reshape(*lead, h // b, b, w // b, b, c)
  x = jnp.swapaxes(x, -4, -3)
  return x.reshape(*lead, (h // b) * (w // b), b, b, c)


def from_blocks(x: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """Inverse of `to_blocks`: (…, n, B, B, C) -> (…, H, W, C)."""
  *lead, _, b, _, c = x.shape
  x = x.reshape(*lead, height // b, width // b, b, b, c)
  x = jnp.swapaxes(x, -4, -3)
  return x.reshape(*lead, height, width, c)


def to_nibbles(x: jnp.ndarray, block_size: int) -> jnp.ndarray:
  """uint8 (…, H, W, 3) -> uint8 (…, n, 6 B^2) nibbles in [0, 15]."""
  blocks = to_blocks(x, block_size)
  nib = jnp.concatenate([blocks >> 4, blocks & 15], axis=-1)
  return nib.reshape(*nib.shape[:-3], -1)


def from_nibbles(nib: jnp.ndarray, height: int, width: int, block_size: int) -> jnp.ndarray:
  """Inverse of `to_nibbles`: uint8 (…, n, 6 B^2) -> uint8 (…, H, W, 3)."""
  b = block_size
  nib = nib.reshape(*nib.shape[:-1], b, b, 6)
  pixels = (nib[..., :3] << 4) | nib[..., 3:]
  return from_blocks(pixels, height, width)


def _gather_last(x: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
  """x[..., i, index[i, j]] with `index` of shape (L,) or (n, L) broadcast over x."""
  return jnp.take_along_axis(x, jnp.broadcast_to(index, x.shape), axis=-1)


@struct.dataclass
class LearnableCipher:
  """LE (one block key) or ELE (per-block keys + block scrambling).

  Leaves (int32 / bool NumPy or JAX arrays; L = 6 B^2, n = H W / B^2):
    nibble_perm: (L,) for LE or (n, L) for ELE; output nibble j takes input nibble perm[j].
    nibble_inv: inverse permutation(s) of `nibble_perm`, same shape.
    nibble_flip: bool, same shape; True -> nibble v becomes 15 - v (after the permutation).
    block_perm: (n,); output block i takes input block block_perm[i] (identity for LE).
    block_inv: (n,) inverse of `block_perm`.
  """

  nibble_perm: jnp.ndarray
  nibble_inv: jnp.ndarray
  nibble_flip: jnp.ndarray
  block_perm: jnp.ndarray
  block_inv: jnp.ndarray
  height: int = struct.field(pytree_node=False)
  width: int = struct.field(pytree_node=False)
  block_size: int = struct.field(pytree_node=False, default=DEFAULT_BLOCK_SIZE)
  name: str = struct.field(pytree_node=False, default="le")

  @classmethod
  def from_arrays(cls, nibble_perm, nibble_flip, block_perm, height: int, width: int,
                  block_size: int = DEFAULT_BLOCK_SIZE, name: str = "le") -> LearnableCipher:
    """Builds a cipher from key material (NumPy arrays as described in the class doc)."""
    check_geometry(height, width, block_size, name)
    nibble_perm = np.asarray(nibble_perm, np.int32)
    nibble_flip = np.asarray(nibble_flip, bool)
    block_perm = np.asarray(block_perm, np.int32)
    length = 6 * block_size * block_size
    n = (height // block_size) * (width // block_size)
    if nibble_perm.shape[-1] != length or nibble_perm.shape != nibble_flip.shape:
      raise ValueError(f"{name}: nibble key arrays must have last axis {length}")
    if nibble_perm.ndim == 2 and nibble_perm.shape[0] != n or block_perm.shape != (n,):
      raise ValueError(f"{name}: per-block key arrays must have {n} rows")
    return cls(nibble_perm=nibble_perm, nibble_inv=np.argsort(nibble_perm, -1).astype(np.int32),
               nibble_flip=nibble_flip, block_perm=block_perm,
               block_inv=np.argsort(block_perm).astype(np.int32), height=height, width=width,
               block_size=block_size, name=name)

  def encrypt(self, images: jnp.ndarray) -> jnp.ndarray:
    """(…, H, W, 3) uint8 [0,255] or float [0,1] -> encrypted, same shape and dtype."""
    x = check_images(images, self.height, self.width, self.name)
    nib = to_nibbles(to_uint8(x), self.block_size)
    nib = jnp.take(nib, jnp.asarray(self.block_perm), axis=-2)
    nib = _gather_last(nib, jnp.asarray(self.nibble_perm))
    nib = jnp.where(self.nibble_flip, 15 - nib, nib)
    return from_uint8(from_nibbles(nib, self.height, self.width, self.block_size), x.dtype)

  def decrypt(self, images: jnp.ndarray) -> jnp.ndarray:
    """Exact inverse of `encrypt` (bit exact for uint8)."""
    x = check_images(images, self.height, self.width, self.name)
    nib = to_nibbles(to_uint8(x), self.block_size)
    nib = jnp.where(self.nibble_flip, 15 - nib, nib)
    nib = _gather_last(nib, jnp.asarray(self.nibble_inv))
    nib = jnp.take(nib, jnp.asarray(self.block_inv), axis=-2)
    return from_uint8(from_nibbles(nib, self.height, self.width, self.block_size), x.dtype)


def check_geometry(height: int, width: int, block_size: int, scheme: str) -> None:
  if block_size < 1 or height % block_size or width % block_size or height < 1 or width < 1:
    raise ValueError(f"{scheme}: image size {height}x{width} must be a positive multiple of "
                     f"the block size {block_size}")


def domain(scheme: str, height: int, width: int, block_size: int) -> str:
  """The key-derivation domain prefix for LE / ELE (see the module doc)."""
  return f"etcjax/{scheme}/v1/H={height},W={width},B={block_size}"


def permutations(stream, length: int, count: int) -> np.ndarray:
  """`count` consecutive `stream.permutation(length)` draws, as an int64 (count, length) array.

  Consumes the stream exactly like `count` calls of `KeyStream.permutation` (Fisher–Yates,
  one rejection-sampled `randbelow(i + 1)` per step, see `etcjax.keys`) but walks the bytes
  in plain Python: one NumPy call per step made ELE key derivation at 224x224 (3136 blocks
  x 96 steps) take seconds. Only for `length <= 256`, where every candidate is one byte.
  The stream must not be used for anything else afterwards (the last read may overshoot).
  """
  if not 1 <= length <= 256:
    raise ValueError(f"permutations: length must be in [1, 256], got {length}")
  out = np.empty((count, length), np.int64)
  buf, pos = b"", 0
  for row in range(count):
    a = list(range(length))
    for i in range(length - 1, 0, -1):
      mask = (1 << i.bit_length()) - 1
      while True:
        if pos == len(buf):
          buf, pos = stream.read(4096), 0
        j = buf[pos] & mask
        pos += 1
        if j <= i:
          break
      a[i], a[j] = a[j], a[i]
    out[row] = a
  return out


def _flip_masks(stream, length: int, count: int) -> np.ndarray:
  """(count, length) bool masks; row r flips positions permutation_r[:length // 2]."""
  perms = permutations(stream, length, count)
  masks = np.zeros((count, length), bool)
  np.put_along_axis(masks, perms[:, : length // 2], True, axis=1)
  return masks


def le_cipher(key, height: int, width: int,
              block_size: int = DEFAULT_BLOCK_SIZE) -> LearnableCipher:
  """LE cipher from an `EtcKey` (one nibble permutation + mask shared by all blocks)."""
  check_geometry(height, width, block_size, "le")
  d = domain("le", height, width, block_size)
  length = 6 * block_size * block_size
  n = (height // block_size) * (width // block_size)
  return LearnableCipher.from_arrays(
      permutations(key.stream(d + "/nibble-perm"), length, 1)[0],
      _flip_masks(key.stream(d + "/nibble-flip"), length, 1)[0],
      np.arange(n), height, width, block_size, name="le")


def ele_cipher(key, height: int, width: int,
               block_size: int = DEFAULT_BLOCK_SIZE) -> LearnableCipher:
  """ELE cipher from an `EtcKey` (per-block nibble keys + block scrambling)."""
  check_geometry(height, width, block_size, "ele")
  d = domain("ele", height, width, block_size)
  length = 6 * block_size * block_size
  n = (height // block_size) * (width // block_size)
  return LearnableCipher.from_arrays(
      permutations(key.stream(d + "/nibble-perm"), length, n),
      _flip_masks(key.stream(d + "/nibble-flip"), length, n),
      key.stream(d + "/block-perm").permutation(n), height, width, block_size, name="ele")

