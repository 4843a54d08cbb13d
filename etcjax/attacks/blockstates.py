"""The 96 per-block states of EtC as a group: apply, compose, invert, act on grid offsets.

A state is one choice of the three per-block EtC steps (DESIGN.md): `rotflip` in 0..7,
`negpos` in {0, 1}, `chperm` in 0..5, indexed `s = rotflip * 12 + negpos * 6 + chperm`
(8 rotflips x 2 negpos x 6 chperms). Applying state s to a block gives
`chperm(negpos(rotflip(block)))`, exactly the per-block step of `etcjax.etc.encrypt`, so
an attacker who finds, for a cipher block, the state that maps it back to plain has
found the inverse of that block's key. The set of states is closed under composition
(the dihedral group D4 x Z2 x S3); the tables below are computed from the transform
itself, so they cannot disagree with it.

Blocks are NumPy arrays `(…, B, B, 3)`, uint8 or float in the [0, 255] scale (negative
-positive is `255 - p` for both).
"""

from __future__ import annotations

import numpy as np

from etcjax import etc

NUM_STATES = 96
STATE_ROTFLIP = np.repeat(np.arange(8), 12)
STATE_NEGPOS = np.tile(np.repeat(np.arange(2), 6), 8)
STATE_CHPERM = np.tile(np.arange(6), 16)


def state_index(rotflip, negpos, chperm) -> np.ndarray:
  """(rotflip, negpos, chperm) codes -> state index (broadcasting)."""
  return np.asarray(rotflip) * 12 + np.asarray(negpos) * 6 + np.asarray(chperm)


def rotflip_geometry(x: np.ndarray, rotflip: int) -> np.ndarray:
  """Applies rotflip code `rotflip` to the two axes before the last (…, H, W, C)."""
  if etc.TRANSPOSE[rotflip]:
    x = np.swapaxes(x, -3, -2)
  if etc.REV_Y[rotflip]:
    x = x[..., ::-1, :, :]
  if etc.REV_X[rotflip]:
    x = x[..., :, ::-1, :]
  return x


def apply_state(blocks: np.ndarray, s: int) -> np.ndarray:
  """State `s` applied to every block of `blocks` (…, B, B, 3) (all get the same state)."""
  x = rotflip_geometry(blocks, int(STATE_ROTFLIP[s]))
  if STATE_NEGPOS[s]:
    x = 255 - x
  return x[..., etc.PERMS3[STATE_CHPERM[s]]]


def all_states(blocks: np.ndarray) -> np.ndarray:
  """(n, B, B, 3) -> (n, 96, B, B, 3): every block under every state."""
  return np.stack([apply_state(blocks, s) for s in range(NUM_STATES)], axis=1)


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  # A 3x3 block whose 27 values are distinct and whose negatives (255 - p) are distinct
  # from them identifies every state by its output.
  probe = np.arange(27, dtype=np.int64).reshape(3, 3, 3) * 3 + 1
  images = [apply_state(probe, s) for s in range(NUM_STATES)]
  lookup = {im.tobytes(): s for s, im in enumerate(images)}
  compose = np.empty((NUM_STATES, NUM_STATES), np.int64)
  for a in range(NUM_STATES):
    for b in range(NUM_STATES):
      compose[a, b] = lookup[apply_state(images[b], a).tobytes()]
  inverse = np.argmax(compose == 0, axis=1)
  # How a whole-image rotflip moves block-grid offsets (dy, dx): transform a grid of
  # coordinates the same way as pixels and see where the centre's neighbours land.
  coords = np.stack(np.meshgrid(np.arange(3), np.arange(3), indexing="ij"), -1)  # (3,3,2)
  moves = np.empty((8, 2, 2), np.int64)
  for g in range(8):
    moved = rotflip_geometry(coords, g)
    for axis, offset in enumerate(((1, 0), (0, 1))):
      target = np.array([1 + offset[0], 1 + offset[1]])
      pos = np.argwhere((moved == target).all(-1))[0]
      moves[g, :, axis] = pos - 1
  return compose, inverse, moves


# COMPOSE[a, b]: the state equal to applying b, then a. INVERSE[s]: COMPOSE[s, INVERSE[s]]
# is the identity (0). GRID_MOVE[g] @ (dy, dx): where a grid offset goes when the whole
# image is transformed by rotflip g (each block then also gets rotflip g).
COMPOSE, INVERSE, GRID_MOVE = _tables()


def grid_move(s: int, offset) -> np.ndarray:
  """The grid offset (dy, dx) after transforming the whole image by state s."""
  return GRID_MOVE[STATE_ROTFLIP[s]] @ np.asarray(offset)

