"""ITN and reduced GAN attacks: tiny configurations that run in seconds."""

import warnings

import numpy as np
import pytest

from etcjax import metrics
from etcjax.attacks import gan, itn, photos
from etcjax.keys import EtcKey

TINY = itn.TrainConfig(patch_size=16, num_images=16, num_keys=4, steps=20, batch_size=8,
                       features=8, depth=1)


@pytest.fixture(autouse=True)
def _quiet_keyspace():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    yield


def test_random_key_pairs_use_distinct_keys_and_align_patches():
  enc, plain = itn.random_key_pairs("etc", 32, 32, TINY)
  assert enc.shape == plain.shape == (16, 32, 32, 3) and enc.dtype == np.uint8
  sample = itn.patch_sampler((32, 32), 16, 16, seed=0)
  x, y = sample([enc, plain], 4)
  assert x.shape == (4, 16, 16, 3)
  # Each aligned EtC patch is a whole cipher block: some block of the plain crop, turned.
  assert itn.alignment("etc", 16, 4) == 16 and itn.alignment("pe", 16, 4) == 1


def test_itn_learns_something_on_pe():
  victims = photos.victim_images(32)
  cipher = itn.make_cipher_quietly("pe", EtcKey.insecure_from_seed(1), 32, 32, 16, 4)
  enc = np.asarray(cipher.encrypt(victims))
  losses = []
  recon = itn.attack("pe", enc, TINY, log=lambda step, loss: losses.append(loss["l1"]))
  assert recon.shape == victims.shape and recon.dtype == np.uint8
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert metrics.ssim(victims, recon).mean() > metrics.ssim(victims, enc).mean()


def test_gan_runs_and_reports_losses():
  victims = photos.victim_images(32)
  cipher = itn.make_cipher_quietly("pe", EtcKey.insecure_from_seed(2), 32, 32, 16, 4)
  enc = np.asarray(cipher.encrypt(victims))
  logs = []
  recon = gan.attack("pe", enc, cipher, TINY, log=lambda step, loss: logs.append(loss))
  assert recon.shape == victims.shape and recon.dtype == np.uint8
  assert set(logs[0]) == {"d", "g_adv", "structure"}
  assert logs[-1]["structure"] < logs[0]["structure"]


def test_fold_grey_is_invariant_to_pe():
  import jax.numpy as jnp

  x = photos.victim_images(32)[:1].astype(np.float32) / 255
  cipher = itn.make_cipher_quietly("pe", EtcKey.insecure_from_seed(3), 32, 32, 16, 4)
  enc = np.asarray(cipher.encrypt(x))
  np.testing.assert_allclose(gan.fold_grey(jnp.asarray(enc)), gan.fold_grey(jnp.asarray(x)),
                             atol=1e-6)
