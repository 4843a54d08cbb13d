"""Schemes: exact round trips, key derivation, jit/vmap safety, errors."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etcjax import schemes
from etcjax.attacks import photos
from etcjax.keys import EtcKey
from etcjax.schemes import learnable

KEY = EtcKey.insecure_from_seed(11)


@pytest.fixture(autouse=True)
def _quiet_keyspace():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    yield


@pytest.fixture(scope="module")
def image():
  return photos.victim_images(32, ("astronaut",))[0]


@pytest.mark.parametrize("name", schemes.names())
def test_round_trip_exact_uint8_and_float(name, image):
  cipher = schemes.make_cipher(name, KEY, 32, 32, block_size=16)
  enc = np.asarray(cipher.encrypt(image))
  assert enc.dtype == np.uint8 and enc.shape == image.shape
  np.testing.assert_array_equal(np.asarray(cipher.decrypt(enc)), image)
  if name != "none":
    assert (enc != image).mean() > 0.5
  batch = np.stack([image, image[::-1]]).astype(np.float32) / 255
  enc_f = cipher.encrypt(batch)
  assert enc_f.dtype == jnp.float32 and enc_f.shape == batch.shape
  np.testing.assert_allclose(np.asarray(cipher.decrypt(enc_f)), batch, atol=1e-6)


@pytest.mark.parametrize("name", ["etc", "le", "ele", "pe"])
def test_jit_vmap_and_pytree(name, image):
  cipher = schemes.make_cipher(name, KEY, 32, 32, block_size=16)
  batch = np.stack([image, image[:, ::-1]])
  eager = np.asarray(cipher.encrypt(batch))
  jitted = jax.jit(lambda c, x: c.encrypt(x))(cipher, batch)
  vmapped = jax.vmap(cipher.encrypt)(batch)
  np.testing.assert_array_equal(np.asarray(jitted), eager)
  np.testing.assert_array_equal(np.asarray(vmapped), eager)
  leaves = jax.tree_util.tree_leaves(cipher)
  assert leaves and all(hasattr(x, "shape") for x in leaves)


def test_keys_are_deterministic_and_key_dependent(image):
  for name in ["etc", "le", "ele", "pe"]:
    a = schemes.make_cipher(name, KEY, 32, 32, 16).encrypt(image)
    b = schemes.make_cipher(name, EtcKey.insecure_from_seed(11), 32, 32, 16).encrypt(image)
    c = schemes.make_cipher(name, EtcKey.insecure_from_seed(12), 32, 32, 16).encrypt(image)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a) != np.asarray(c)).any()


def test_le_structure_matches_spec():
  cipher = schemes.make_cipher("le", KEY, 8, 8)
  assert cipher.block_size == 4
  assert cipher.nibble_perm.shape == (96,)
  assert sorted(cipher.nibble_perm.tolist()) == list(range(96))
  assert cipher.nibble_flip.sum() == 48
  np.testing.assert_array_equal(cipher.block_perm, np.arange(4))
  # LE with the identity permutation and every nibble inverted is 255 - p.
  ident = learnable.LearnableCipher.from_arrays(np.arange(96), np.ones(96, bool), np.arange(4),
                                                8, 8)
  x = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  np.testing.assert_array_equal(np.asarray(ident.encrypt(x)), 255 - x)
  # The key derivation is the documented one.
  stream = KEY.stream("etcjax/le/v1/H=8,W=8,B=4/nibble-perm")
  np.testing.assert_array_equal(cipher.nibble_perm, stream.permutation(96))


def test_ele_has_per_block_keys_and_block_scrambling():
  cipher = schemes.make_cipher("ele", KEY, 16, 16)
  assert cipher.nibble_perm.shape == (16, 96)
  assert (cipher.nibble_flip.sum(1) == 48).all()
  assert len({tuple(r) for r in cipher.nibble_perm.tolist()}) == 16
  assert sorted(cipher.block_perm.tolist()) == list(range(16))
  stream = KEY.stream("etcjax/ele/v1/H=16,W=16,B=4/nibble-perm")
  first, second = stream.permutation(96), stream.permutation(96)
  np.testing.assert_array_equal(cipher.nibble_perm[0], first)
  np.testing.assert_array_equal(cipher.nibble_perm[1], second)


def test_fast_permutations_match_keystream():
  got = learnable.permutations(KEY.stream("t"), 96, 3)
  stream = KEY.stream("t")
  np.testing.assert_array_equal(got, np.stack([stream.permutation(96) for _ in range(3)]))


def test_pe_is_pixelwise_negpos_and_channel_shuffle():
  cipher = schemes.make_cipher("pe", KEY, 4, 6)
  x = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
  enc = np.asarray(cipher.encrypt(x))
  for i in range(4):
    for j in range(6):
      y = np.where(cipher.negpos[i, j], 255 - x[i, j], x[i, j])
      np.testing.assert_array_equal(enc[i, j], y[schemes.pixelwise.CHANNEL_PERMS[
          cipher.chperm[i, j]]])


def test_etc_cipher_matches_etc_module(image):
  cipher = schemes.make_cipher("etc", KEY, 32, 32, 16)
  from etcjax import etc
  np.testing.assert_array_equal(np.asarray(cipher.encrypt(image)),
                                etc.encrypt(image, KEY.schedule(32, 32, 16)))


def test_errors():
  with pytest.raises(ValueError, match="valid schemes: none, etc, le, ele, pe"):
    schemes.make_cipher("aes", KEY, 32, 32)
  with pytest.raises(ValueError, match="needs a key"):
    schemes.make_cipher("le", None, 32, 32)
  with pytest.raises(ValueError, match="multiple of the block size 4"):
    schemes.make_cipher("ele", KEY, 30, 32)
  cipher = schemes.make_cipher("pe", KEY, 32, 32)
  with pytest.raises(ValueError, match="H=32, W=32"):
    cipher.encrypt(np.zeros((16, 16, 3), np.uint8))
  assert schemes.make_cipher("none", None, 8, 8).encrypt(np.zeros((8, 8, 3))).shape == (8, 8, 3)
