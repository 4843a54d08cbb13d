"""The common shape of every keyed image cipher, and the pixel conventions they share.

A cipher is a JAX pytree (a `flax.struct.dataclass` whose key material is array leaves)
with two pure methods, `encrypt(images)` and `decrypt(images)`. Both take `(H, W, 3)` or
`(N, H, W, 3)` images, either `uint8` in [0, 255] or floating point in [0, 1], NumPy or
JAX, and return the same shape and dtype as a JAX array. They are built from `jnp` ops
only, so they can be jitted, vmapped and used inside a sharded `jit`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax.numpy as jnp
from flax import struct


@runtime_checkable
class Cipher(Protocol):
  """A keyed, exactly invertible image transform for one image geometry."""

  name: str
  height: int
  width: int

  def encrypt(self, images: jnp.ndarray) -> jnp.ndarray:
    """(…, H, W, 3) uint8 [0,255] or float [0,1] -> same shape and dtype."""
    ...

  def decrypt(self, images: jnp.ndarray) -> jnp.ndarray:
    """Exact inverse of `encrypt`."""
    ...


def check_images(images, height: int, width: int, scheme: str) -> jnp.ndarray:
  """Returns `images` as a jnp array after checking the shape `(…, height, width, 3)`."""
  x = jnp.asarray(images)
  if x.ndim not in (3, 4) or x.shape[-1] != 3 or x.shape[-3:-1] != (height, width):
    raise ValueError(
        f"{scheme}: expected images of shape (H, W, 3) or (N, H, W, 3) with "
        f"H={height}, W={width}; got {tuple(x.shape)}")
  if x.dtype != jnp.uint8 and not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{scheme}: images must be uint8 or floating point; got {x.dtype}")
  return x


def to_uint8(x: jnp.ndarray) -> jnp.ndarray:
  """uint8 stays as is; float [0,1] is rounded to the nearest of the 256 levels."""
  if x.dtype == jnp.uint8:
    return x
  return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def from_uint8(x: jnp.ndarray, dtype) -> jnp.ndarray:
  """Inverse of `to_uint8` for the dtype the caller passed in."""
  if dtype == jnp.uint8:
    return x
  return (x.astype(jnp.float32) / 255.0).astype(dtype)


@struct.dataclass
class IdentityCipher:
  """The "none" scheme: plain images, for baselines. Keyless."""

  height: int = struct.field(pytree_node=False)
  width: int = struct.field(pytree_node=False)
  name: str = struct.field(pytree_node=False, default="none")

  def encrypt(self, images: jnp.ndarray) -> jnp.ndarray:
    return check_images(images, self.height, self.width, self.name)

  def decrypt(self, images: jnp.ndarray) -> jnp.ndarray:
    return check_images(images, self.height, self.width, self.name)
