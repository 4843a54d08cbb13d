"""Keyed image-encryption schemes behind one interface: EtC and the older baselines.

    cipher = etcjax.schemes.make_cipher("le", key, height=32, width=32)
    enc = cipher.encrypt(images)            # (…, H, W, 3) uint8 or float [0,1]
    assert (cipher.decrypt(enc) == images).all()

Schemes (`names()`):

  * "none": identity (plain images; the baseline).
  * "etc": Encryption-then-Compression block scrambling (Chuman et al. 2019; the spec in
    DESIGN.md, `etcjax.etc`), block size `block_size` (16 = the JPEG MCU).
  * "le": learnable encryption (Tanaka 2018), `etcjax.schemes.learnable`, block size
    `le_block_size` (4, as in the paper).
  * "ele": extended LE (Madono et al. 2020): per-block keys + block scrambling.
  * "pe": pixel-wise encryption (Sirichotedumrong et al. 2019),
    `etcjax.schemes.pixelwise`.

Every cipher is a pytree with pure, jit/vmap-safe `encrypt` / `decrypt`; key material is
derived from an `etcjax.keys.EtcKey` through `key.stream(domain)` with the domain strings
documented in each scheme's module (EtC: `etcjax.keys`).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from etcjax import etc
from etcjax.schemes.cipher import Cipher, IdentityCipher, check_images
from etcjax.schemes.learnable import LearnableCipher, ele_cipher, le_cipher
from etcjax.schemes.pixelwise import PixelCipher, pe_cipher

__all__ = ["Cipher", "EtcCipher", "IdentityCipher", "LearnableCipher", "PixelCipher",
           "make_cipher", "names"]

_NAMES = ("none", "etc", "le", "ele", "pe")


def names() -> list[str]:
  """The scheme names `make_cipher` accepts."""
  return list(_NAMES)


@struct.dataclass
class EtcCipher:
  """EtC (`etcjax.etc`) behind the `Cipher` interface; the schedule is the only leaf."""

  schedule: etc.Schedule
  height: int = struct.field(pytree_node=False)
  width: int = struct.field(pytree_node=False)
  name: str = struct.field(pytree_node=False, default="etc")

  def encrypt(self, images: jnp.ndarray) -> jnp.ndarray:
    """(…, H, W, 3) uint8 [0,255] or float [0,1] -> EtC image, same shape and dtype."""
    return etc.encrypt(check_images(images, self.height, self.width, self.name), self.schedule)

  def decrypt(self, images: jnp.ndarray) -> jnp.ndarray:
    """Exact inverse of `encrypt`."""
    return etc.decrypt(check_images(images, self.height, self.width, self.name), self.schedule)


def make_cipher(name: str, key, height: int, width: int, block_size: int = 16, *,
                le_block_size: int = 4) -> Cipher:
  """A cipher of scheme `name` for `height` x `width` images.

  Args:
    name: one of `names()`.
    key: an `etcjax.keys.EtcKey`; may be None only for "none".
    height, width: image size in pixels.
    block_size: the EtC block size (ignored by the other schemes).
    le_block_size: the LE / ELE block size (4 in Tanaka 2018 and Madono et al. 2020).

  Raises:
    ValueError: unknown scheme (the message lists the valid ones), a missing key, or a
      size that is not a multiple of the scheme's block size.
  """
  if name not in _NAMES:
    raise ValueError(f"unknown encryption scheme {name!r}; valid schemes: {', '.join(_NAMES)}")
  if name == "none":
    return IdentityCipher(height=int(height), width=int(width))
  if key is None:
    raise ValueError(f"encryption scheme {name!r} needs a key")
  if name == "etc":
    return EtcCipher(schedule=key.schedule(height, width, block_size), height=int(height),
                     width=int(width))
  if name == "le":
    return le_cipher(key, height, width, le_block_size)
  if name == "ele":
    return ele_cipher(key, height, width, le_block_size)
  return pe_cipher(key, height, width)
