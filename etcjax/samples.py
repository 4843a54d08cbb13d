"""Real photos that ship inside dependencies (scikit-image, scikit-learn), for demos and tests.

No download happens: scikit-image bundles these photos in its wheel and scikit-learn ships
`china.jpg` and `flower.jpg`. Every loader returns RGB `uint8` arrays of shape (H, W, 3)
in [0, 255] whose height and width are multiples of `multiple` (16 by default, the EtC
block size and the JPEG 4:2:0 MCU), center-cropped (never padded).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image


def _skimage(name: str) -> Callable[[], np.ndarray]:
  def load() -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()
  return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
  def load() -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image(filename)
  return load


# name -> loader of the original (H, W, 3) uint8 photo.
_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),                        # 512x512
    "coffee": _skimage("coffee"),                              # 400x600
    "chelsea": _skimage("chelsea"),                            # 300x451
    "rocket": _skimage("rocket"),                              # 427x640
    "immunohistochemistry": _skimage("immunohistochemistry"),  # 512x512
    "hubble_deep_field": _skimage("hubble_deep_field"),        # 872x1000
    "china": _sklearn("china.jpg"),                            # 427x640
    "flower": _sklearn("flower.jpg"),                          # 427x640
}


def names() -> list[str]:
  """Names of the bundled photos."""
  return list(_PHOTOS)


def center_crop(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """The central (height, width) window of an (H, W, C) image."""
  h, w = img.shape[:2]
  if height > h or width > w:
    raise ValueError(f"cannot crop a {h}x{w} image to {height}x{width}")
  top, left = (h - height) // 2, (w - width) // 2
  return img[top:top + height, left:left + width]


def fit(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resizes (Lanczos) so the image covers `size` = (height, width), then center-crops."""
  h, w = img.shape[:2]
  th, tw = size
  scale = max(th / h, tw / w)
  nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
  if (nh, nw) != (h, w):
    img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.LANCZOS))
  return center_crop(img, th, tw)


def load(name: str, size: tuple[int, int] | None = None, multiple: int = 16) -> np.ndarray:
  """One bundled photo as (H, W, 3) uint8.

  Args:
    name: one of `names()`.
    size: (height, width) to resize-and-crop to; None keeps the original resolution,
      center-cropped down to multiples of `multiple`.
    multiple: H and W are made multiples of this (ignored when `size` is given, which
      must then itself be what the caller wants).
  """
  if name not in _PHOTOS:
    raise ValueError(f"unknown sample photo {name!r}; choose from {', '.join(_PHOTOS)}")
  img = np.asarray(_PHOTOS[name](), dtype=np.uint8)[..., :3]
  if size is not None:
    return np.ascontiguousarray(fit(img, size))
  h, w = img.shape[:2]
  return np.ascontiguousarray(center_crop(img, h - h % multiple, w - w % multiple))


def load_all(size: tuple[int, int] | None = None, multiple: int = 16,
             which: list[str] | None = None) -> dict[str, np.ndarray]:
  """{name: photo} for `which` (default: all bundled photos); see `load`."""
  return {n: load(n, size=size, multiple=multiple) for n in (which or names())}
