"""Patch-embedding filter grids (the paper's Fig. 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from etcjax import models
from etcjax.errors import UserError
from etcjax.models import visualize


def test_one_by_one_filters_become_colour_swatches():
  kernel = np.zeros((1, 1, 3, 4), np.float32)
  kernel[0, 0, :, 0] = [1.0, 0.0, 0.0]  # red
  kernel[0, 0, :, 1] = [0.0, 0.0, 1.0]  # blue
  kernel[0, 0, :, 2] = [0.2, 0.2, 0.2]  # constant: mid grey
  kernel[0, 0, :, 3] = [0.0, 1.0, 1.0]  # cyan
  grid = visualize.patch_embedding_grid(kernel, tile_size=4, gap=1)
  assert grid.dtype == np.uint8 and grid.shape == (2 * 5 + 1, 2 * 5 + 1, 3)
  np.testing.assert_array_equal(grid[1, 1], [255, 0, 0])
  np.testing.assert_array_equal(grid[1:5, 6:10], np.broadcast_to([0, 0, 255], (4, 4, 3)))
  np.testing.assert_array_equal(grid[6, 1], [128, 128, 128])
  np.testing.assert_array_equal(grid[6, 6], [0, 255, 255])
  np.testing.assert_array_equal(grid[0], 255)  # white gap


def test_convmixer_and_vit_params_and_layout():
  x = jnp.zeros((1, 8, 8, 3))
  cm = models.create("ConvMixer-tiny-test", 3).init(jax.random.key(0), x)
  grid = visualize.patch_embedding_grid(cm, columns=8, tile_size=2, gap=0)
  # 16 filters of 2x2, 8 per row, no gaps: 2 rows of 2-pixel tiles.
  assert grid.shape == (4, 16, 3)
  vit_params = models.create("ViT-tiny-test", 3).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  grid = visualize.patch_embedding_grid(vit_params["params"], tile_size=8, gap=1)
  assert grid.shape == (6 * 9 + 1, 6 * 9 + 1, 3)  # 32 filters in a 6x6 grid
  # Per-filter normalisation stretches every tile to the full range.
  tile = grid[1:9, 1:9].astype(int)
  assert tile.min() == 0 and tile.max() == 255
  resnet = models.create("ResNet-tiny-test", 3).init(jax.random.key(0), x)
  assert visualize.patch_embedding_grid(resnet, max_filters=4, tile_size=3, gap=0).shape == \
      (6, 6, 3)


def test_global_normalisation_keeps_relative_magnitudes():
  kernel = np.zeros((1, 1, 3, 2), np.float32)
  kernel[..., 0] = 1.0
  kernel[..., 1] = -1.0
  grid = visualize.patch_embedding_grid(kernel, normalize="global", tile_size=1, gap=0)
  np.testing.assert_array_equal(grid[0, 0], [255, 255, 255])
  np.testing.assert_array_equal(grid[0, 1], [0, 0, 0])
  with pytest.raises(ValueError, match="normalize"):
    visualize.patch_embedding_grid(kernel, normalize="log")


def test_principal_components():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(4, 4, 3, 1))
  kernel = (base * rng.normal(size=(1, 1, 1, 64)) + 0.01 * rng.normal(size=(4, 4, 3, 64)))
  grid = visualize.patch_embedding_grid(kernel.astype(np.float32), principal_components=3,
                                        columns=3, tile_size=4, gap=0)
  assert grid.shape == (4, 12, 3)
  # The first component is the shared pattern (up to sign): its tile correlates with it.
  first = grid[:, :4].astype(float).ravel()
  corr = np.corrcoef(first, base[..., 0].ravel())[0, 1]
  assert abs(corr) > 0.95


def test_errors_and_save(tmp_path):
  with pytest.raises(UserError, match="no patch-embedding kernel"):
    visualize.patch_embedding_grid({"head": {"kernel": np.zeros((3, 3))}})
  with pytest.raises(UserError, match="4-D"):
    visualize.patch_embedding_grid(np.zeros((3, 3)))
  grid = visualize.patch_embedding_grid(np.ones((2, 2, 3, 3), np.float32))
  visualize.save_grid(tmp_path / "f.png", grid)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "f.png")), grid)
