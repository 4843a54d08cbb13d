"""FR-Attack: basic folding and neighbour-guided colour variants."""

import warnings

import numpy as np
import pytest

from etcjax import etc, metrics, schemes
from etcjax.attacks import fr, photos
from etcjax.keys import EtcKey


@pytest.fixture(scope="module")
def image():
  return photos.victim_images(32, ("chelsea",))[0]


def test_fr_basic_fully_undoes_negpos(image):
  rng = np.random.default_rng(0)
  # A negative-positive-only EtC schedule: every block may be inverted, nothing else.
  n = 4
  schedule = etc.Schedule(perm=np.arange(n), rotflip=np.zeros(n, int), negpos=rng.integers(
      0, 2, n), chperm=np.zeros(n, int), block_size=16)
  enc = etc.encrypt(image, schedule)
  np.testing.assert_array_equal(fr.fr_basic(enc), fr.fr_basic(image))
  dark = image // 2  # values <= 127: folding is the identity, so recovery is exact
  np.testing.assert_array_equal(fr.fr_basic(etc.encrypt(dark, schedule)), dark)
  # Per-pixel negpos (PE with identity channel order) too.
  mask = rng.integers(0, 2, image.shape).astype(bool)
  np.testing.assert_array_equal(fr.fr_basic(np.where(mask, 255 - dark, dark)), dark)


def test_fr_advanced_undoes_pixelwise_shuffle_on_smooth_image():
  # A smooth image: each pixel is closest to its neighbours in its true colour variant.
  yy, xx = np.mgrid[0:32, 0:32]
  smooth = np.stack([40 + 2 * yy, 60 + 2 * xx, 50 + yy + xx], -1).astype(np.uint8)
  cipher = schemes.make_cipher("pe", EtcKey.insecure_from_seed(3), 32, 32)
  enc = np.asarray(cipher.encrypt(smooth))
  out = fr.fr_advanced(enc)
  assert out.shape == smooth.shape and out.dtype == np.uint8
  # The corner pixel is kept, so the result is one global colour variant of the plain
  # image. Channel values that cross make some pixels pick a wrong variant (measured: 76 %
  # of pixels right here); the cipher image itself matches no variant on ~1/48 of them.
  variants = np.where(fr.VARIANT_FLIPS[:, None, None, :],
                      255 - smooth[..., fr.VARIANT_PERMS].transpose(2, 0, 1, 3),
                      smooth[..., fr.VARIANT_PERMS].transpose(2, 0, 1, 3))
  match = (variants == out[None]).all(-1).mean((1, 2))
  enc_match = (variants == enc[None]).all(-1).mean((1, 2))
  assert match.max() > 0.7 and enc_match.max() < 0.2

def test_fr_beats_encryption_on_pe_photo(image):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    cipher = schemes.make_cipher("pe", EtcKey.insecure_from_seed(3), 32, 32)
  enc = np.asarray(cipher.encrypt(image))
  base = metrics.ssim(image, enc)[()]
  assert metrics.ssim(image, fr.fr_basic(enc))[()] > base + 0.1
  float_out = fr.fr_basic(enc.astype(np.float32) / 255)
  assert float_out.dtype == np.float32
  np.testing.assert_allclose(float_out * 255, fr.fr_basic(enc), atol=1e-3)


def test_fr_rejects_bad_shapes():
  with pytest.raises(ValueError, match="expected images"):
    fr.fr_basic(np.zeros((4, 4)))
