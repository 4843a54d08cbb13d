"""Jigsaw-puzzle-solver attack on EtC images (ciphertext-only).

An EtC image is a puzzle whose pieces are its blocks, each moved and put in one of 96
states (`blockstates`: 8 rotations/flips x 2 negative-positive x 6 channel orders). The
solver reassembles it in the spirit of Gallagher (CVPR 2012, "Jigsaw puzzles with pieces
of unknown orientation") as applied to EtC by Chuman, Kurihara & Kiya (2017):

1. Compatibility: Mahalanobis gradient compatibility (MGC) of every piece side against
   every other piece in every state, D = D_LR + D_RL (Gallagher's eq. 1-3, with his nine
   dummy gradients regularising the covariance). MGC does not change when the same
   colour step is applied to both pieces, so piece A is fixed to the identity colour and
   only B runs over the 96 states: an (n, 4, n, 96) table computed with two matrix
   products per term (the quadratic form expanded), in NumPy.
2. Placement: Kruskal-style merging of the most confident edges (D divided by the
   side's best D to any other piece), each merge bringing a whole component into the
   other's frame by one group element and rejected when pieces overlap or the union
   outgrows the image frame (the constrained spanning tree of Gallagher).
3. Framing and filling: the largest component is placed in the frame (trying its
   possible offsets) and the free cells are filled greedily, most-constrained cell first,
   with the unplaced piece and state of least mean D against the placed neighbours.

Accuracies (`evaluate`, needing the true schedule) follow the jigsaw literature and
count a solution that differs from the plain image by one global state (the whole image
rotated, inverted or channel-shuffled) as correct, since it shows the same content:
direct (pieces in the right cell and state), neighbour (true neighbour pairs placed
side by side in the right relative state) and largest component (the biggest connected
set of correctly joined pieces, as a fraction of all pieces).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from etcjax.attacks import blockstates as bs

# Sides of a piece as grid offsets (dy, dx): right, down, left, up.
SIDES = np.array([(0, 1), (1, 0), (0, -1), (-1, 0)])
# Gallagher's dummy gradients: keep the 3x3 covariance invertible on flat blocks.
DUMMY_GRADIENTS = np.array([[0, 0, 0], [1, 1, 1], [-1, -1, -1], [0, 0, 1], [0, 1, 0],
                            [1, 0, 0], [-1, 0, 0], [0, -1, 0], [0, 0, -1]], np.float64)


def _side_rotations() -> np.ndarray:
  """rho[k]: the pure-rotation state that turns side k of a piece to the right."""
  rho = np.empty(4, np.int64)
  for k, side in enumerate(SIDES):
    for g in range(4):
      if (bs.grid_move(g * 12, side) == SIDES[0]).all():
        rho[k] = g * 12
  return rho


RHO = _side_rotations()


@dataclasses.dataclass
class JigsawResult:
  """A solved puzzle.

  Attributes:
    grid: (rows, cols) int, the cipher block placed in each cell (raster order).
    states: (rows, cols) int, the state (`blockstates`) applied to that block.
    image: the reassembled image, (H, W, 3), dtype of the input.
    placed_by_tree: how many pieces the spanning-tree stage placed (the rest filled).
  """

  grid: np.ndarray
  states: np.ndarray
  image: np.ndarray
  placed_by_tree: int


def to_blocks_np(image: np.ndarray, block_size: int) -> np.ndarray:
  h, w, _ = image.shape
  b = block_size
  x = image.reshape(h // b, b, w // b, b, 3).swapaxes(1, 2)
  return x.reshape(-1, b, b, 3)


def from_blocks_np(blocks: np.ndarray, rows: int, cols: int) -> np.ndarray:
  b = blocks.shape[1]
  return blocks.reshape(rows, cols, b, b, 3).swapaxes(1, 2).reshape(rows * b, cols * b, 3)


def _stats(inner: np.ndarray, outer: np.ndarray, ridge: float = 0.0
           ) -> tuple[np.ndarray, np.ndarray]:
  """Gradient mean and inverse covariance of (m, B, 3) boundary gradients outer - inner.

  `ridge` (squared pixel levels) is added to the covariance's diagonal: a noise floor for
  lossy (JPEG) inputs, whose block edges carry quantisation steps that smooth blocks'
  tiny gradient covariance would otherwise punish.
  """
  grad = outer - inner
  dummy = np.broadcast_to(DUMMY_GRADIENTS, (grad.shape[0],) + DUMMY_GRADIENTS.shape)
  g = np.concatenate([grad, dummy], axis=1)
  mu = grad.mean(1)  # Gallagher: mean of the real gradients, covariance with the dummies.
  centred = g - g.mean(1, keepdims=True)
  cov = np.einsum("mri,mrj->mij", centred, centred) / (g.shape[1] - 1)
  return mu, np.linalg.inv(cov + ridge * np.eye(3))


def _quad_terms(x: np.ndarray, u: np.ndarray, sinv: np.ndarray, x_is_row: bool):
  """Pieces of sum_r (x_r - u_r)^T Sinv (x_r - u_r) for every (row, column) pair.

  x: (mx, B, 3) the "free" boundary; u, sinv: (mu, B, 3), (mu, 3, 3) of the side whose
  statistics are used. Returns the (mx, mu) or (mu, mx) matrix of the quadratic form.
  """
  moment = np.einsum("mri,mrj->mij", x, x).reshape(len(x), 9)
  us = np.einsum("mri,mij->mrj", u, sinv).reshape(len(u), -1)
  const = np.einsum("mr,mr->m", us, u.reshape(len(u), -1))
  out = moment @ sinv.reshape(len(sinv), 9).T - 2 * x.reshape(len(x), -1) @ us.T + const
  return out if x_is_row else out.T


def compatibility(blocks: np.ndarray, ridge: float = 0.0) -> np.ndarray:
  """MGC dissimilarity table, float32 (n, 4, n, 96). `ridge`: see `_stats`.

  `D[a, k, b, s]`: piece a turned by `RHO[k]` (its side k on the right, identity colour)
  with piece b in state s to its right. Self pairs are +inf.
  """
  x = np.asarray(blocks, np.float64)
  n = x.shape[0]
  turned = np.stack([bs.apply_state(x, int(r)) for r in RHO], 1)  # (n, 4, B, B, 3)
  a1 = turned[:, :, :, -1].reshape(n * 4, -1, 3)
  a2 = turned[:, :, :, -2].reshape(n * 4, -1, 3)
  allst = bs.all_states(x)  # (n, 96, B, B, 3)
  b1 = allst[:, :, :, 0].reshape(n * 96, -1, 3)
  b2 = allst[:, :, :, 1].reshape(n * 96, -1, 3)
  mu_a, sinv_a = _stats(a2, a1, ridge)
  mu_b, sinv_b = _stats(b2, b1, ridge)
  d_lr = _quad_terms(b1, a1 + mu_a[:, None], sinv_a, x_is_row=False)  # (n*4, n*96)
  d_rl = _quad_terms(a1, b1 + mu_b[:, None], sinv_b, x_is_row=True)
  d = (d_lr + d_rl).astype(np.float32).reshape(n, 4, n, 96)
  d[np.arange(n), :, np.arange(n)] = np.inf
  return d


class _Pairs:
  """Looks up D for two pieces in given states, B at grid offset `offset` from A."""

  def __init__(self, table: np.ndarray):
    self.table = table
    # side index of each grid offset
    self.side_of = {tuple(s): k for k, s in enumerate(SIDES)}

  def cost(self, a: int, state_a: int, offset, b, state_b) -> np.ndarray:
    """D for piece(s) b in state(s) state_b (broadcasting arrays) at a + offset."""
    inv_a = bs.INVERSE[state_a]
    rel = bs.COMPOSE[inv_a, np.asarray(state_b)]
    k = self.side_of[tuple(bs.grid_move(inv_a, offset))]
    return self.table[a, k, np.asarray(b), bs.COMPOSE[RHO[k], rel]]


def _allowed_states(states: str) -> np.ndarray:
  if states == "all":
    return np.arange(bs.NUM_STATES)
  if states == "perm-only":
    return np.array([0])
  raise ValueError(f"jigsaw states must be 'all' or 'perm-only'; got {states!r}")


def solve(cipher_image: np.ndarray, block_size: int = 16, states: str = "all",
          candidates_per_side: int = 8, ridge: float = 0.0) -> JigsawResult:
  """Reassembles an EtC image (H, W, 3) with B x B blocks; see the module doc.

  Args:
    cipher_image: uint8 (or float [0, 1]) EtC image, possibly JPEG-decoded.
    block_size: the EtC block size B.
    states: "all" (the attacker does not know which steps were used) or "perm-only"
      (blocks only moved: identity state assumed).
    candidates_per_side: how many best partners per piece side enter the spanning tree.
    ridge: covariance noise floor in squared pixel levels (0 for lossless inputs; about 8
      helps JPEG-decoded ones, see `_stats`).
  """
  img = np.asarray(cipher_image)
  if img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"jigsaw solver expects one (H, W, 3) image; got {img.shape}")
  h, w, _ = img.shape
  if h % block_size or w % block_size:
    raise ValueError(f"image size {h}x{w} is not a multiple of the block size {block_size}")
  scale = 255.0 if np.issubdtype(img.dtype, np.floating) else 1.0
  blocks = to_blocks_np(img.astype(np.float64) * scale, block_size)
  rows, cols = h // block_size, w // block_size
  n = rows * cols
  if n < 2:
    raise ValueError("jigsaw solver needs at least two blocks")
  allowed = _allowed_states(states)
  table = compatibility(blocks, ridge)
  mask = np.full((4, bs.NUM_STATES), np.inf, np.float32)
  for k in range(4):
    mask[k, bs.COMPOSE[RHO[k], allowed]] = 0
  table = table + mask[None, :, None, :]
  pairs = _Pairs(table)

  comp, pos, state, members = _spanning_tree(table, n, rows, cols, candidates_per_side)
  largest = max(members.values(), key=len)
  grid, states_grid = _frame_and_fill(largest, pos, state, pairs, n, rows, cols, allowed)
  out_blocks = np.stack([bs.apply_state(blocks[grid.flat[i]], int(states_grid.flat[i]))
                         for i in range(n)])
  image = from_blocks_np(out_blocks, rows, cols)
  if scale != 1.0:
    image = (image / scale).astype(img.dtype)
  else:
    image = np.clip(np.round(image), 0, 255).astype(img.dtype)
  return JigsawResult(grid=grid, states=states_grid, image=image, placed_by_tree=len(largest))


def _fits(span_y: int, span_x: int, rows: int, cols: int) -> bool:
  return (span_y <= rows and span_x <= cols) or (span_y <= cols and span_x <= rows)


def _spanning_tree(table, n, rows, cols, per_side):
  """Constrained Kruskal merging; returns per-piece component frames."""
  best = table.min(-1)  # (n, 4, n) best state per partner
  best_state = table.argmin(-1)
  order = np.argsort(best, axis=-1)
  second = np.take_along_axis(best, order[..., 1:2], -1)[..., 0]
  first = np.take_along_axis(best, order[..., :1], -1)[..., 0]
  edges = []
  for a in range(n):
    for k in range(4):
      for b in order[a, k, :per_side]:
        d = best[a, k, b]
        if not np.isfinite(d):
          continue
        # Confidence: D over the best D of this side to any other piece.
        ref = second[a, k] if b == order[a, k, 0] else first[a, k]
        rel = bs.COMPOSE[bs.INVERSE[RHO[k]], best_state[a, k, b]]
        edges.append((d / max(ref, 1e-9), a, int(b), int(rel), k))
  edges.sort()
  comp = np.arange(n)
  pos = np.zeros((n, 2), np.int64)
  state = np.zeros(n, np.int64)
  members = {i: [i] for i in range(n)}
  for _, a, b, rel, k in edges:
    if comp[a] == comp[b]:
      continue
    offset = SIDES[k]
    if len(members[comp[a]]) < len(members[comp[b]]):
      # Move A's (smaller) component instead: A seen from B.
      inv = bs.INVERSE[rel]
      a, b, rel, offset = b, a, inv, bs.grid_move(inv, -offset)
    target_state = bs.COMPOSE[state[a], rel]
    target_pos = pos[a] + bs.grid_move(state[a], offset)
    t = bs.COMPOSE[target_state, bs.INVERSE[state[b]]]
    moving = members[comp[b]]
    new_pos = np.array([target_pos + bs.grid_move(t, pos[q] - pos[b]) for q in moving])
    occupied = {tuple(pos[q]) for q in members[comp[a]]}
    if any(tuple(p) in occupied for p in new_pos):
      continue
    all_pos = np.concatenate([pos[members[comp[a]]], new_pos])
    span = all_pos.max(0) - all_pos.min(0) + 1
    if not _fits(int(span[0]), int(span[1]), rows, cols):
      continue
    ca, cb = comp[a], comp[b]
    for q, p in zip(moving, new_pos, strict=True):
      pos[q] = p
      state[q] = bs.COMPOSE[t, state[q]]
      comp[q] = ca
    members[ca] = members[ca] + moving
    del members[cb]
    if len(members[ca]) == n:
      break
  return comp, pos, state, members


def _frame_and_fill(piece_ids, pos, state, pairs, n, rows, cols, allowed):
  pieces = list(piece_ids)
  p = pos[pieces].copy()
  s = state[pieces].copy()
  span = p.max(0) - p.min(0) + 1
  if not (span[0] <= rows and span[1] <= cols):
    # Only fits transposed: turn the whole component by a quarter turn.
    quarter = 12  # rotflip 1, identity colour
    p = np.array([bs.grid_move(quarter, q) for q in p])
    s = bs.COMPOSE[quarter, s]
    span = p.max(0) - p.min(0) + 1
  p = p - p.min(0)
  offsets = list(itertools.product(range(rows - span[0] + 1), range(cols - span[1] + 1)))
  if len(offsets) > 16:  # many free offsets: the fill decides little; try a spread
    offsets = [offsets[i] for i in np.linspace(0, len(offsets) - 1, 16).astype(int)]
  best = None
  for off in offsets:
    grid = -np.ones((rows, cols), np.int64)
    sgrid = np.zeros((rows, cols), np.int64)
    for q, (y, x), st in zip(pieces, p + np.array(off), s, strict=True):
      grid[y, x], sgrid[y, x] = q, st
    total = _fill(grid, sgrid, pairs, n, allowed)
    if best is None or total < best[0]:
      best = (total, grid, sgrid)
  return best[1], best[2]


def _fill(grid, sgrid, pairs, n, allowed) -> float:
  """Greedily fills free cells in place; returns the summed D of the filled pieces."""
  rows, cols = grid.shape
  unplaced = sorted(set(range(n)) - set(grid[grid >= 0].tolist()))
  total = 0.0
  while unplaced:
    free = np.argwhere(grid < 0)
    neigh = []
    for y, x in free:
      nb = [(y + dy, x + dx) for dy, dx in SIDES
            if 0 <= y + dy < rows and 0 <= x + dx < cols and grid[y + dy, x + dx] >= 0]
      neigh.append(nb)
    most = max(len(nb) for nb in neigh)
    cand = np.array(unplaced)
    choice = None
    for (y, x), nb in zip(free, neigh, strict=True):
      if len(nb) != most:
        continue
      if most == 0:
        cost = np.zeros((len(cand), len(allowed)))
      else:
        cost = sum(pairs.cost(int(grid[ny, nx]), int(sgrid[ny, nx]), (y - ny, x - nx),
                              cand[:, None], allowed[None, :]) for ny, nx in nb) / most
      i, j = np.unravel_index(np.argmin(cost), cost.shape)
      if choice is None or cost[i, j] < choice[0]:
        choice = (float(cost[i, j]), y, x, int(cand[i]), int(allowed[j]))
    c, y, x, piece, st = choice
    grid[y, x], sgrid[y, x] = piece, st
    total += c if np.isfinite(c) else 1e12
    unplaced.remove(piece)
  return total


def true_solution(perm, rotflip, negpos, chperm, rows: int, cols: int):
  """From an EtC schedule: each cipher block's true cell and decrypting state."""
  enc = bs.state_index(np.asarray(rotflip), np.asarray(negpos), np.asarray(chperm))
  perm = np.asarray(perm)
  cells = np.stack([perm // cols, perm % cols], -1)
  return cells, bs.INVERSE[enc]


def evaluate(result: JigsawResult, cipher_image: np.ndarray, schedule) -> dict:
  """Direct, neighbour and largest-component accuracy (fractions in [0, 1]).

  `schedule`: the true `etcjax.etc.Schedule` (or anything with perm/rotflip/negpos/
  chperm/block_size). A piece counts as in a state if it renders identically there, so
  flat or symmetric blocks are not penalised for an invisible choice.
  """
  rows, cols = result.grid.shape
  b = schedule.block_size
  blocks = to_blocks_np(np.asarray(cipher_image).astype(np.float64), b)
  n = rows * cols
  cells, true_state = true_solution(schedule.perm, schedule.rotflip, schedule.negpos,
                                    schedule.chperm, rows, cols)
  found_cell = np.zeros((n, 2), np.int64)
  found_state = np.zeros(n, np.int64)
  for (y, x), piece in np.ndenumerate(result.grid):
    found_cell[piece] = (y, x)
    found_state[piece] = result.states[y, x]
  # ok[i, g]: piece i as found equals its true rendering turned by global state g.
  ok = np.zeros((n, bs.NUM_STATES), bool)
  for i in range(n):
    found = bs.apply_state(blocks[i], int(found_state[i]))
    truth = bs.apply_state(blocks[i], int(true_state[i]))
    for g in range(bs.NUM_STATES):
      ok[i, g] = np.array_equal(bs.apply_state(truth, g), found)
  # Direct: best global state that keeps the frame, cells mapped through the centre.
  centre = np.array([rows - 1, cols - 1])
  direct = 0.0
  for g in range(bs.NUM_STATES):
    if rows != cols and bs.etc.TRANSPOSE[bs.STATE_ROTFLIP[g]]:
      continue
    mapped = (np.array([bs.grid_move(g, 2 * c - centre) for c in cells]) + centre) // 2
    direct = max(direct, float(np.mean(ok[:, g] & (mapped == found_cell).all(-1))))
  # Neighbour pairs and components.
  where = {tuple(c): i for i, c in enumerate(cells)}
  parent = list(range(n))

  def root(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  good = total = 0
  for i in range(n):
    for e in ((0, 1), (1, 0)):
      j = where.get((cells[i][0] + e[0], cells[i][1] + e[1]))
      if j is None:
        continue
      total += 1
      shared = np.nonzero(ok[i] & ok[j])[0]
      if any((found_cell[j] - found_cell[i] == bs.grid_move(g, e)).all() for g in shared):
        good += 1
        parent[root(i)] = root(j)
  sizes = np.bincount([root(i) for i in range(n)])
  return {"direct": direct, "neighbour": good / max(total, 1),
          "largest_component": float(sizes.max() / n)}
