"""Known-plaintext attack: one textured pair gives the key's action away."""

import warnings

import numpy as np
import pytest

from etcjax import metrics, schemes
from etcjax.attacks import kpa, photos
from etcjax.keys import EtcKey

KEY = EtcKey.insecure_from_seed(21)


@pytest.fixture(autouse=True)
def _quiet_keyspace():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    yield


@pytest.fixture(scope="module")
def pair_and_victim():
  known, victim = photos.victim_images(64, ("astronaut", "chelsea"))
  return known, victim


def test_etc_kpa_recovers_exact_schedule(pair_and_victim):
  known, victim = pair_and_victim
  cipher = schemes.make_cipher("etc", KEY, 64, 64, block_size=16)
  rec, info = kpa.recover("etc", known, np.asarray(cipher.encrypt(known)), block_size=16)
  for field in ("perm", "rotflip", "negpos", "chperm"):
    np.testing.assert_array_equal(np.asarray(getattr(rec.schedule, field)),
                                  np.asarray(getattr(cipher.schedule, field)))
  assert info == {"units": "blocks", "total": 16, "ambiguous": 0, "unmatched": 0}
  np.testing.assert_array_equal(np.asarray(rec.decrypt(cipher.encrypt(victim))), victim)


def test_etc_kpa_survives_jpeg(pair_and_victim):
  import io

  from PIL import Image

  known, victim = pair_and_victim
  cipher = schemes.make_cipher("etc", KEY, 64, 64, block_size=16)
  buf = io.BytesIO()
  Image.fromarray(np.asarray(cipher.encrypt(known))).save(buf, "JPEG", quality=90)
  lossy = np.asarray(Image.open(buf))
  rec, _ = kpa.recover_etc(known, lossy, block_size=16)
  np.testing.assert_array_equal(np.asarray(rec.schedule.perm), np.asarray(cipher.schedule.perm))


@pytest.mark.parametrize("name", ["le", "pe"])
def test_le_pe_kpa_decrypts_other_images(name, pair_and_victim):
  known, victim = pair_and_victim
  cipher = schemes.make_cipher(name, KEY, 64, 64)
  rec, info = kpa.recover(name, known, np.asarray(cipher.encrypt(known)))
  out = np.asarray(rec.decrypt(cipher.encrypt(victim)))
  if name == "le":
    np.testing.assert_array_equal(out, victim)
    assert info["ambiguous"] == 0
  else:
    # Pixels whose channels tie in the known image stay uncertain.
    assert metrics.ssim(victim, out) > 0.8


def test_ele_kpa_is_partial(pair_and_victim):
  known, victim = pair_and_victim
  cipher = schemes.make_cipher("ele", KEY, 64, 64)
  enc_victim = np.asarray(cipher.encrypt(victim))
  rec, info = kpa.recover("ele", known, np.asarray(cipher.encrypt(known)))
  np.testing.assert_array_equal(np.asarray(rec.decrypt(cipher.encrypt(known))), known)
  assert info["ambiguous"] > info["total"] // 2
  assert metrics.ssim(victim, rec.decrypt(enc_victim)) < 0.5


def test_kpa_errors(pair_and_victim):
  known, _ = pair_and_victim
  with pytest.raises(ValueError, match="same shape"):
    kpa.recover("etc", known, known[:32])
  with pytest.raises(ValueError, match="supports schemes"):
    kpa.recover("none", known, known)
