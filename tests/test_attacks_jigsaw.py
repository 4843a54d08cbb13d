"""Jigsaw-puzzle solver on EtC blocks of real photos."""

import warnings

import numpy as np
import pytest

from etcjax import etc, metrics
from etcjax.attacks import blockstates as bs
from etcjax.attacks import jigsaw, photos
from etcjax.keys import EtcKey


@pytest.fixture(scope="module")
def setup():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    schedule = EtcKey.insecure_from_seed(5).schedule(128, 128, 16)
  return photos.victim_images(128, ("chelsea",))[0], schedule


def test_block_state_tables_match_etc():
  x = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
  for s in range(bs.NUM_STATES):
    one = etc.Schedule(perm=np.array([0]), rotflip=np.array([bs.STATE_ROTFLIP[s]]),
                       negpos=np.array([bs.STATE_NEGPOS[s]]),
                       chperm=np.array([bs.STATE_CHPERM[s]]), block_size=4)
    np.testing.assert_array_equal(etc.encrypt(x, one), bs.apply_state(x.astype(int), s))
    np.testing.assert_array_equal(
        bs.apply_state(bs.apply_state(x.astype(int), s), bs.INVERSE[s]), x)


def test_solves_permutation_only_puzzle_of_real_photo(setup):
  image, schedule = setup
  n = schedule.num_blocks
  zeros = np.zeros(n, np.int32)
  perm_only = schedule.replace(rotflip=zeros, negpos=zeros, chperm=zeros)
  enc = etc.encrypt(image, perm_only)
  result = jigsaw.solve(enc, 16, states="perm-only")
  np.testing.assert_array_equal(result.image, image)
  assert jigsaw.evaluate(result, enc, perm_only) == {
      "direct": 1.0, "neighbour": 1.0, "largest_component": 1.0}


def test_solves_full_etc_puzzle_up_to_a_global_state(setup):
  image, schedule = setup
  enc = etc.encrypt(image, schedule)
  result = jigsaw.solve(enc, 16)  # all 96 states per piece, 64 pieces
  acc = jigsaw.evaluate(result, enc, schedule)
  # Measured 1.0 / 1.0 / 1.0 on this photo; leave room for ties on flat blocks.
  assert acc["direct"] > 0.9 and acc["neighbour"] > 0.9 and acc["largest_component"] > 0.9
  assert metrics.ssim_up_to_global_state(image, result.image) > 0.9
  assert metrics.ssim(image, enc) < 0.3


def test_compatibility_prefers_true_neighbour(setup):
  image, _ = setup
  blocks = jigsaw.to_blocks_np(image.astype(np.float64), 16)
  table = jigsaw.compatibility(blocks)
  assert table.shape == (64, 4, 64, 96)
  # Block 0's right neighbour is block 1 in the identity state (side 0 = right).
  best = np.unravel_index(np.argmin(table[0, 0]), table[0, 0].shape)
  assert best == (1, 0)


def test_errors():
  with pytest.raises(ValueError, match="multiple of the block size"):
    jigsaw.solve(np.zeros((40, 32, 3), np.uint8), 16)
  with pytest.raises(ValueError, match="'all' or 'perm-only'"):
    jigsaw.solve(np.zeros((32, 32, 3), np.uint8), 16, states="some")
