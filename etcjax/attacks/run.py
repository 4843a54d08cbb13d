"""Runs one attack on one scheme for a set of plain images: the engine of `etcjax attack`.

The caller gives PLAIN images and a key; this module encrypts them (the victim's side),
then runs the attack with only what its threat model allows:

  fr      ciphertext only (`fr.fr_basic` or `fr.fr_advanced`)
  jigsaw  ciphertext only, EtC only (`jigsaw.solve`)
  kpa     image 0 as a known plain/cipher pair; images 1.. are the victims (`kpa.recover`)
  itn     ciphertext + the attacker's own photos under random keys (`itn.attack`)
  gan     ciphertext-only dataset under the victim's key + unrelated plain photos
          (`gan.attack`)

and returns the reconstructions, which the caller scores against the plain images.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from etcjax import schemes
from etcjax.attacks import fr, gan, itn, jigsaw, kpa

ATTACKS = ("fr", "jigsaw", "kpa", "itn", "gan")
SCHEMES = ("etc", "le", "ele", "pe")
FR_MODES = ("basic", "advanced")


@dataclasses.dataclass
class Outcome:
  """encrypted: uint8 (N, H, W, 3) of all inputs; victims: indices into the inputs that
  were attacked; reconstructed: uint8 (len(victims), H, W, 3); info: attack details."""

  encrypted: np.ndarray
  victims: list[int]
  reconstructed: np.ndarray
  info: dict


def check(attack: str, scheme: str, num_images: int) -> None:
  """Raises ValueError for a combination that cannot run (message names the fix)."""
  if attack not in ATTACKS:
    raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
  if scheme not in SCHEMES:
    raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
  if attack == "jigsaw" and scheme != "etc":
    raise ValueError("the jigsaw attack solves EtC block puzzles: use --scheme etc")
  if attack == "kpa" and num_images < 2:
    raise ValueError("kpa needs at least two inputs: the known plain image, then victims")


def run(attack: str, scheme: str, plain: np.ndarray, key, *, block_size: int = 16,
        le_block_size: int = 4, fr_mode: str = "basic",
        train: itn.TrainConfig = itn.DEFAULT_TRAIN, jigsaw_states: str = "all",
        log=None) -> Outcome:
  """Encrypts uint8 `plain` (N, H, W, 3) under `key` and runs `attack` on the result."""
  plain = np.asarray(plain, np.uint8)
  n, h, w, _ = plain.shape
  check(attack, scheme, n)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the callers report the key space themselves
    cipher = schemes.make_cipher(scheme, key, h, w, block_size, le_block_size=le_block_size)
  encrypted = np.asarray(cipher.encrypt(plain))
  victims = list(range(n))
  info: dict = {}
  if attack == "fr":
    if fr_mode not in FR_MODES:
      raise ValueError(f"unknown FR mode {fr_mode!r}; choose from {', '.join(FR_MODES)}")
    recon = fr.fr_basic(encrypted) if fr_mode == "basic" else fr.fr_advanced(encrypted)
    info["mode"] = fr_mode
  elif attack == "jigsaw":
    results = [jigsaw.solve(e, block_size, states=jigsaw_states) for e in encrypted]
    recon = np.stack([r.image for r in results])
    info["accuracy"] = [jigsaw.evaluate(r, e, cipher.schedule)
                        for r, e in zip(results, encrypted, strict=True)]
    info["states"] = jigsaw_states
  elif attack == "kpa":
    rec, info = kpa.recover(scheme, plain[0], encrypted[0], block_size, le_block_size)
    victims = list(range(1, n))
    recon = np.asarray(rec.decrypt(encrypted[1:]))
    if scheme == "etc":
      truth = cipher.schedule
      info["schedule_exact"] = all(
          np.array_equal(np.asarray(getattr(rec.schedule, f)), np.asarray(getattr(truth, f)))
          for f in ("perm", "rotflip", "negpos", "chperm"))
  elif attack == "itn":
    recon = itn.attack(scheme, encrypted, train, block_size, le_block_size, log)
    info["train"] = dataclasses.asdict(train)
  else:
    recon = gan.attack(scheme, encrypted, cipher, train, block_size, le_block_size, log)
    info["train"] = dataclasses.asdict(train)
    info["note"] = "reduced SIA-GAN-style generator/discriminator, see etcjax.attacks.gan"
  return Outcome(encrypted=encrypted, victims=victims, reconstructed=np.asarray(recon, np.uint8),
                 info=info)
