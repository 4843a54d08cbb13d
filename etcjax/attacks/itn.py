"""ITN-Attack: inverse-transformation network (after Ito, Kinoshita & Kiya 2021).

The attacker knows the scheme and the kind of images, not the key. They encrypt their
own images with many random keys, train a network to map encrypted images back to
plain ones, and apply it to the victim's images, which were encrypted under a key the
network never saw. Whatever the network learns must therefore be key-invariant: the
folding of negative-positive steps, the colour statistics of pixels, the local texture
that survives scrambling.

Reduced for CPUs: a fully convolutional residual network (3x3 convs, `features` wide,
`depth` residual blocks) trained with L1 loss on `patch_size` patches (aligned to the
scheme's block grid) cut from attacker photos (`photos`) of the victims' own size,
encrypted under `num_keys` random keys; Adam with cosine decay; about a minute on two
CPU cores with the defaults. Being fully convolutional, the network is then applied to
the whole victim images. The original ITN is a U-Net trained on CIFAR-10 for hours;
expect this one to be weaker.

Training keys are INSECURE seeded keys (`EtcKey.insecure_from_seed`), seeds from
`TRAINING_KEY_SEED_BASE`, so runs are reproducible and never reuse a victim's key.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from etcjax import schemes
from etcjax.attacks import photos
from etcjax.keys import EtcKey

TRAINING_KEY_SEED_BASE = 10_000_000


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Sizes and optimiser settings of a learned attack (ITN or GAN)."""

  patch_size: int = 32  # training patch side in pixels
  num_images: int = 256  # attacker images at the victims' size
  num_keys: int = 32  # random keys those images are spread over (ITN)
  steps: int = 600
  batch_size: int = 16
  learning_rate: float = 2e-3
  features: int = 16
  depth: int = 3
  seed: int = 0


DEFAULT_TRAIN = TrainConfig()


class Generator(nn.Module):
  """Encrypted image -> plain image. float (N, H, W, 3) in [0, 1] in and out."""

  features: int = 16
  depth: int = 3

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.features, (3, 3))(x * 2 - 1)
    for _ in range(self.depth):
      y = nn.Conv(self.features, (3, 3))(nn.gelu(h))
      h = h + nn.Conv(self.features, (3, 3))(nn.gelu(y))
    return nn.sigmoid(nn.Conv(3, (3, 3))(nn.gelu(h)))


def make_cipher_quietly(scheme: str, key: EtcKey, height: int, width: int, block_size: int,
                        le_block_size: int):
  """`schemes.make_cipher` without the small-key-space warning (expected for small images)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return schemes.make_cipher(scheme, key, height, width, block_size,
                               le_block_size=le_block_size)


def alignment(scheme: str, block_size: int, le_block_size: int) -> int:
  """Patches start on multiples of this, so they cut the scheme's blocks whole."""
  return {"etc": block_size, "le": le_block_size, "ele": le_block_size}.get(scheme, 1)


def random_key_pairs(scheme: str, height: int, width: int, config: TrainConfig,
                     block_size: int = 16, le_block_size: int = 4
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(encrypted, plain) uint8 (num_images, H, W, 3): attacker photos under random keys."""
  plain = photos.training_crops(height, config.num_images, seed=config.seed, width=width)
  enc = np.empty_like(plain)
  groups = np.array_split(np.arange(config.num_images), config.num_keys)
  for i, idx in enumerate(groups):
    key = EtcKey.insecure_from_seed(TRAINING_KEY_SEED_BASE + config.seed * 100_000 + i)
    cipher = make_cipher_quietly(scheme, key, height, width, block_size, le_block_size)
    enc[idx] = np.asarray(cipher.encrypt(plain[idx]))
  return enc, plain


def patch_sampler(shape: tuple[int, int], patch: int, align: int, seed: int
                  ) -> Callable[[list[np.ndarray], int], list[np.ndarray]]:
  """Returns `sample(arrays, batch)`: the same random aligned patches of each array."""
  h, w = shape
  rng = np.random.default_rng(seed)

  def sample(arrays, batch):
    idx = rng.integers(0, len(arrays[0]), batch)
    top = rng.integers(0, (h - patch) // align + 1, batch) * align
    left = rng.integers(0, (w - patch) // align + 1, batch) * align
    rows = top[:, None] + np.arange(patch)
    cols = left[:, None] + np.arange(patch)
    return [a[idx[:, None, None], rows[:, :, None], cols[:, None, :]] for a in arrays]

  return sample


def patch_size_for(config: TrainConfig, height: int, width: int, align: int) -> int:
  """The training patch side: config.patch_size, shrunk to fit and to the alignment."""
  size = min(config.patch_size, height, width)
  size = max(align, size // align * align)
  if size > min(height, width):
    raise ValueError(f"images of {height}x{width} are smaller than one block ({align})")
  return size


def to_unit(x: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(x, jnp.float32) / 255.0


def apply_generator(module: Generator, params, images, batch_size: int = 32) -> np.ndarray:
  """Runs a trained generator on uint8 (N, H, W, 3) images; returns uint8."""
  fn = jax.jit(lambda p, x: module.apply({"params": p}, x))
  x = np.asarray(images)
  out = []
  for i in range(0, len(x), batch_size):
    y = fn(params, to_unit(x[i:i + batch_size]))
    out.append(np.asarray(jnp.round(y * 255), np.uint8))
  return np.concatenate(out)


def train(scheme: str, height: int, width: int, config: TrainConfig = DEFAULT_TRAIN,
          block_size: int = 16, le_block_size: int = 4,
          log: Callable[[int, dict], None] | None = None) -> tuple[Generator, dict]:
  """Trains an ITN for `scheme` at (height, width); returns (module, params)."""
  enc, plain = random_key_pairs(scheme, height, width, config, block_size, le_block_size)
  align = alignment(scheme, block_size, le_block_size)
  patch = patch_size_for(config, height, width, align)
  sample = patch_sampler((height, width), patch, align, config.seed)
  module = Generator(config.features, config.depth)
  params = module.init(jax.random.key(config.seed), jnp.zeros((1, patch, patch, 3)))["params"]
  tx = optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      return jnp.mean(jnp.abs(module.apply({"params": p}, x) - y))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for i in range(config.steps):
    x, y = sample([enc, plain], config.batch_size)
    params, opt_state, loss = step(params, opt_state, to_unit(x), to_unit(y))
    if log is not None and (i % 200 == 0 or i == config.steps - 1):
      log(i, {"l1": float(loss)})
  return module, params


def attack(scheme: str, encrypted, config: TrainConfig = DEFAULT_TRAIN, block_size: int = 16,
           le_block_size: int = 4, log=None) -> np.ndarray:
  """Trains an ITN with random keys and reconstructs `encrypted` (uint8 (N, H, W, 3))."""
  encrypted = np.asarray(encrypted)
  _, h, w, _ = encrypted.shape
  module, params = train(scheme, h, w, config, block_size, le_block_size, log)
  return apply_generator(module, params, encrypted)
