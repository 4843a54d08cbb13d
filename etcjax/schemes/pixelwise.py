"""PE: pixel-wise encryption (Sirichotedumrong, Kinoshita & Kiya 2019).

Every pixel gets, from the key,

  * a negative-positive bit per colour channel: `p -> 255 - p` (uint8; `1 - p` for float);
  * a colour-channel shuffle, an index into `itertools.permutations((0, 1, 2))`
    (lexicographic order, as in the EtC spec): output channel `c` is the
    (negative-positive transformed) input channel `perm3[c]`.

The original paper draws a fresh key per image ("without key management"); here, as for
the other schemes, one key serves a whole dataset, which is the setting the attacks test.

Key derivation, with `D = "etcjax/pe/v1/H={H},W={W}"`:
  * `key.stream(D + "/negpos").randbelow(2, H * W * 3)`, reshaped to (H, W, 3);
  * `key.stream(D + "/chperm").randbelow(6, H * W)`, reshaped to (H, W).
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
from flax import struct

from etcjax.schemes.cipher import check_images

# Row k: the k-th permutation of (0, 1, 2) in lexicographic order; and its inverse.
CHANNEL_PERMS = np.array(list(itertools.permutations((0, 1, 2))), np.int32)
CHANNEL_PERMS_INV = np.argsort(CHANNEL_PERMS, axis=1).astype(np.int32)


def negate(x: jnp.ndarray) -> jnp.ndarray:
  """Negative-positive transform: 255 - p for uint8 (= p XOR 255), 1 - p for float."""
  return (255 - x) if x.dtype == jnp.uint8 else (1 - x)


@struct.dataclass
class PixelCipher:
  """PE key material for one (H, W) geometry.

  Leaves: negpos (H, W, 3) bool; chperm (H, W) int32 in [0, 6).
  """

  negpos: jnp.ndarray
  chperm: jnp.ndarray
  height: int = struct.field(pytree_node=False)
  width: int = struct.field(pytree_node=False)
  name: str = struct.field(pytree_node=False, default="pe")

  @classmethod
  def from_arrays(cls, negpos, chperm, height: int, width: int) -> PixelCipher:
    negpos = np.asarray(negpos, bool).reshape(height, width, 3)
    chperm = np.asarray(chperm, np.int32).reshape(height, width)
    if chperm.min(initial=0) < 0 or chperm.max(initial=0) > 5:
      raise ValueError("pe: chperm values must be in [0, 6)")
    return cls(negpos=negpos, chperm=chperm, height=height, width=width)

  def encrypt(self, images: jnp.ndarray) -> jnp.ndarray:
    """(…, H, W, 3) uint8 [0,255] or float [0,1] -> encrypted, same shape and dtype."""
    x = check_images(images, self.height, self.width, self.name)
    y = jnp.where(self.negpos, negate(x), x)
    index = jnp.asarray(CHANNEL_PERMS)[jnp.asarray(self.chperm)]
    return jnp.take_along_axis(y, jnp.broadcast_to(index, y.shape), axis=-1)

  def decrypt(self, images: jnp.ndarray) -> jnp.ndarray:
    """Inverse of `encrypt` (bit exact for uint8, to rounding for float)."""
    x = check_images(images, self.height, self.width, self.name)
    index = jnp.asarray(CHANNEL_PERMS_INV)[jnp.asarray(self.chperm)]
    y = jnp.take_along_axis(x, jnp.broadcast_to(index, x.shape), axis=-1)
    return jnp.where(self.negpos, negate(y), y)


def domain(height: int, width: int) -> str:
  """The key-derivation domain prefix for PE (see the module doc)."""
  return f"etcjax/pe/v1/H={height},W={width}"


def pe_cipher(key, height: int, width: int) -> PixelCipher:
  """PE cipher from an `EtcKey`."""
  if height < 1 or width < 1:
    raise ValueError(f"pe: image size {height}x{width} must be positive")
  d = domain(height, width)
  return PixelCipher.from_arrays(
      key.stream(d + "/negpos").randbelow(2, height * width * 3),
      key.stream(d + "/chperm").randbelow(6, height * width), height, width)

