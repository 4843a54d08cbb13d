"""GAN-Attack: a REDUCED, unpaired generator/discriminator in the spirit of SIA-GAN
(Madono, Tanaka, Onishi & Ogawa 2021). Not a reproduction of SIA-GAN.

Threat model (ciphertext-only, as in the paper's Sec. III): the attacker holds many images
encrypted under the victim's key (the encrypted dataset on the cloud) and, separately,
unrelated plain images of the same kind. No pairs, no key.

* Generator (`itn.Generator`): encrypted image -> plain-looking image.
* Discriminator: a small PatchGAN (two stride-2 4x4 convs + a 3x3 conv, LeakyReLU)
  telling the attacker's plain images from generated ones; least-squares GAN losses.
* Structure loss (the unpaired tie between input and output): L1 between the
  "fold-grey" image of the generator's output and of its input, where fold-grey is the
  channel mean of min(p, 1 - p). Fold-grey is unchanged by negative-positive
  transforms and by channel shuffles, so for schemes built from those steps the
  encrypted image tells the generator the plain image's folded luminance; where it is
  not invariant (LE's nibble shuffling, EtC's block moves), the loss ties the output to
  the scrambled structure instead, and the attack fails, as it should.

Simulation: the "cloud dataset" is `num_images` attacker photos at the victims' size,
encrypted with the victim's cipher; the plain set is a disjoint set of attacker photos.
Both are cut into aligned `patch_size` patches as in `itn`. Sized for CPUs (a minute or
two with the defaults).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from etcjax.attacks import photos
from etcjax.attacks.itn import (
  DEFAULT_TRAIN,
  Generator,
  TrainConfig,
  alignment,
  apply_generator,
  patch_sampler,
  patch_size_for,
  to_unit,
)

STRUCTURE_WEIGHT = 10.0


class Discriminator(nn.Module):
  """PatchGAN: float (N, h, w, 3) in [0, 1] -> (N, h/4, w/4, 1) real/fake scores."""

  features: int = 16

  @nn.compact
  def __call__(self, x):
    h = nn.leaky_relu(nn.Conv(self.features, (4, 4), strides=(2, 2))(x * 2 - 1), 0.2)
    h = nn.leaky_relu(nn.Conv(2 * self.features, (4, 4), strides=(2, 2))(h), 0.2)
    return nn.Conv(1, (3, 3))(h)


def fold_grey(x: jnp.ndarray) -> jnp.ndarray:
  """Channel mean of min(p, 1 - p): invariant to negative-positive and channel shuffles."""
  return jnp.mean(jnp.minimum(x, 1 - x), axis=-1)


def attack(scheme: str, encrypted, victim_cipher, config: TrainConfig = DEFAULT_TRAIN,
           block_size: int = 16, le_block_size: int = 4,
           log: Callable[[int, dict], None] | None = None) -> np.ndarray:
  """Trains the reduced GAN against `victim_cipher` and reconstructs `encrypted`.

  Args:
    scheme: the scheme name (for patch alignment).
    encrypted: uint8 (N, H, W, 3) victim images encrypted with `victim_cipher`.
    victim_cipher: the victim's cipher, used ONLY to simulate the encrypted dataset the
      attacker observes (never to decrypt).
  """
  encrypted = np.asarray(encrypted)
  _, h, w, _ = encrypted.shape
  count = config.num_images
  observed = photos.training_crops(h, count, seed=config.seed, width=w)
  observed = np.asarray(victim_cipher.encrypt(observed))
  real = photos.training_crops(h, count, seed=config.seed + 1, width=w)
  align = alignment(scheme, block_size, le_block_size)
  patch = patch_size_for(config, h, w, align)
  sample_enc = patch_sampler((h, w), patch, align, config.seed)
  sample_real = patch_sampler((h, w), patch, 1, config.seed + 1)

  gen, disc = Generator(config.features, config.depth), Discriminator(config.features)
  kg, kd = jax.random.split(jax.random.key(config.seed))
  dummy = jnp.zeros((1, patch, patch, 3))
  g_params = gen.init(kg, dummy)["params"]
  d_params = disc.init(kd, dummy)["params"]
  g_tx = optax.adam(config.learning_rate, b1=0.5)
  d_tx = optax.adam(config.learning_rate, b1=0.5)
  g_opt, d_opt = g_tx.init(g_params), d_tx.init(d_params)

  @jax.jit
  def step(g_params, d_params, g_opt, d_opt, enc, real):
    def d_loss_fn(dp):
      fake = jax.lax.stop_gradient(gen.apply({"params": g_params}, enc))
      return (jnp.mean((disc.apply({"params": dp}, real) - 1) ** 2)
              + jnp.mean(disc.apply({"params": dp}, fake) ** 2))

    def g_loss_fn(gp):
      fake = gen.apply({"params": gp}, enc)
      adv = jnp.mean((disc.apply({"params": d_params}, fake) - 1) ** 2)
      structure = jnp.mean(jnp.abs(fold_grey(fake) - fold_grey(enc)))
      return adv + STRUCTURE_WEIGHT * structure, (adv, structure)

    d_loss, d_grads = jax.value_and_grad(d_loss_fn)(d_params)
    updates, d_opt = d_tx.update(d_grads, d_opt, d_params)
    d_params = optax.apply_updates(d_params, updates)
    (_, (adv, structure)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(g_params)
    updates, g_opt = g_tx.update(g_grads, g_opt, g_params)
    g_params = optax.apply_updates(g_params, updates)
    return g_params, d_params, g_opt, d_opt, {"d": d_loss, "g_adv": adv,
                                              "structure": structure}

  for i in range(config.steps):
    (enc,) = sample_enc([observed], config.batch_size)
    (rl,) = sample_real([real], config.batch_size)
    g_params, d_params, g_opt, d_opt, losses = step(g_params, d_params, g_opt, d_opt,
                                                    to_unit(enc), to_unit(rl))
    if log is not None and (i % 200 == 0 or i == config.steps - 1):
      log(i, {k: float(v) for k, v in losses.items()})
  return apply_generator(gen, g_params, encrypted)
