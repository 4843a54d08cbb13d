"""Patch-embedding filters as an image grid (MaungMaung & Kiya 2022, Fig. 5).

The paper compares the first-layer (patch embedding) filters that ConvMixer learns from plain
images with those learned from EtC images: with patch size 1 each filter is one RGB colour,
with patch size 4 a 4x4 colour tile. `patch_embedding_grid` renders any model's embedding
kernel that way; `principal_components=k` shows the top k principal components of the
filters instead (as the ViT paper's Fig. 7 does for its 768 filters).

  grid = patch_embedding_grid(variables)          # ConvMixer, ViT or ResNet variables
  save_grid("filters.png", grid)
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from etcjax import fileio
from etcjax.errors import UserError

# Where each model family keeps its first-layer kernel (HWIO: (p, p, 3, D)).
EMBEDDING_PATHS = (("embedding", "kernel"), ("patch_embed", "kernel"), ("stem_conv", "kernel"))


def embedding_kernel(params: Any) -> np.ndarray:
  """Finds the first-layer kernel `(p, p, C, D)` in ViT / ConvMixer / ResNet params.

  Args:
    params: a params tree, a variables dict holding "params", or the kernel array itself.

  Raises:
    UserError: no `embedding/kernel`, `patch_embed/kernel` or `stem_conv/kernel` found.
  """
  if isinstance(params, Mapping) and "params" in params:
    params = params["params"]
  if not isinstance(params, Mapping):
    kernel = np.asarray(params)
  else:
    for path in EMBEDDING_PATHS:
      node: Any = params
      for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
      if node is not None:
        kernel = np.asarray(node)
        break
    else:
      raise UserError("no patch-embedding kernel in the params (looked for "
                      + ", ".join("/".join(p) for p in EMBEDDING_PATHS) + ")")
  if kernel.ndim != 4:
    raise UserError(f"patch-embedding kernel must be 4-D (p, p, C, D), got shape {kernel.shape}")
  return kernel.astype(np.float32)


def _to_unit(tiles: np.ndarray, normalize: str) -> np.ndarray:
  """Scales `(D, p, p, C)` tiles to [0, 1], per tile or with one scale for all."""
  if normalize == "per_filter":
    lo = tiles.min(axis=(1, 2, 3), keepdims=True)
    hi = tiles.max(axis=(1, 2, 3), keepdims=True)
  elif normalize == "global":
    lo, hi = tiles.min(), tiles.max()
  else:
    raise ValueError(f"normalize must be 'per_filter' or 'global', got {normalize!r}")
  span = np.where(hi - lo > 0, hi - lo, 1.0)
  # A constant tile (span 0) maps to mid grey rather than dividing by zero.
  return np.where(hi - lo > 0, (tiles - lo) / span, 0.5)


def patch_embedding_grid(params: Any, *, columns: int | None = None, tile_size: int = 16,
                         gap: int = 1, normalize: str = "per_filter",
                         principal_components: int | None = None,
                         max_filters: int | None = None) -> np.ndarray:
  """Renders patch-embedding filters as one RGB image.

  Args:
    params: ViT (`embedding/kernel`), ConvMixer (`patch_embed/kernel`) or ResNet
      (`stem_conv/kernel`) params or variables, or a `(p, p, 3, D)` kernel.
    columns: tiles per row (default: ceil(sqrt(number of tiles))).
    tile_size: minimum side in pixels of one tile; a p x p filter is enlarged by the integer
      factor ceil(tile_size / p) with nearest-neighbour sampling (a 1x1 filter becomes a
      swatch).
    gap: white pixels between tiles and around the grid.
    normalize: "per_filter" (each tile stretched to its own [min, max], as in the ConvMixer
      and EtC papers) or "global" (one scale for all, keeps relative magnitudes).
    principal_components: if set, show this many top principal components of the filters
      (flattened, mean removed) instead of the filters.
    max_filters: show only the first this many filters.

  Returns:
    `uint8` array `(height, width, 3)` in [0, 255]. Kernels with other than 3 input channels
    are shown channel-averaged in grey.
  """
  kernel = embedding_kernel(params)
  p_h, p_w, c, d = kernel.shape
  tiles = np.transpose(kernel, (3, 0, 1, 2))  # (D, p, p, C)
  if principal_components is not None:
    flat = tiles.reshape(d, -1)
    flat = flat - flat.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    k = max(1, min(principal_components, vt.shape[0]))
    tiles = vt[:k].reshape(k, p_h, p_w, c)
  if max_filters is not None:
    tiles = tiles[:max(1, max_filters)]
  if c != 3:
    tiles = np.repeat(tiles.mean(axis=-1, keepdims=True), 3, axis=-1)
  tiles = _to_unit(tiles, normalize)

  n = tiles.shape[0]
  cols = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  scale = max(1, math.ceil(tile_size / max(p_h, p_w)))
  tiles = np.repeat(np.repeat(tiles, scale, axis=1), scale, axis=2)
  th, tw = tiles.shape[1:3]
  grid = np.ones((rows * (th + gap) + gap, cols * (tw + gap) + gap, 3), np.float32)
  for idx in range(n):
    r, col = divmod(idx, cols)
    y, x = gap + r * (th + gap), gap + col * (tw + gap)
    grid[y:y + th, x:x + tw] = tiles[idx]
  return np.round(grid * 255).astype(np.uint8)


def save_grid(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes a `uint8 (H, W, 3)` image as PNG, atomically."""
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  fileio.write_bytes(path, buf.getvalue())
