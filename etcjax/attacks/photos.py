"""Real photographs that ship with scikit-image and scikit-learn, for attacks and tests.

No downloads: `skimage.data` bundles its photos and `sklearn.datasets.load_sample_images`
its two JPEGs. The photos are split in two disjoint sets so that attacks that learn
(ITN, GAN) never train on the images they are evaluated on:

* attacker photos (training data an attacker "knowing the data distribution" could have):
  coffee, rocket, immunohistochemistry, motorcycle (left view), retina, china;
* victim photos (what the report and tests encrypt and attack): astronaut, chelsea
  (the cat), flower.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

ATTACKER_PHOTOS = ("coffee", "rocket", "immunohistochemistry", "motorcycle", "retina",
                   "china")
VICTIM_PHOTOS = ("astronaut", "chelsea", "flower")


@functools.lru_cache(maxsize=16)
def photo(name: str) -> np.ndarray:
  """One photo as uint8 (H, W, 3); read-only."""
  import skimage.data

  if name == "motorcycle":
    img = skimage.data.stereo_motorcycle()[0]
  elif name in ("china", "flower"):
    from sklearn.datasets import load_sample_image

    img = load_sample_image(f"{name}.jpg")
  elif name in ATTACKER_PHOTOS + VICTIM_PHOTOS:
    img = getattr(skimage.data, name)()
  else:
    raise ValueError(f"unknown photo {name!r}; choose from "
                     f"{', '.join(ATTACKER_PHOTOS + VICTIM_PHOTOS)}")
  img = np.ascontiguousarray(img[..., :3], dtype=np.uint8)
  img.flags.writeable = False
  return img


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Centre-crops to the target aspect ratio, then resizes (Lanczos): uint8 (h, w, 3)."""
  h, w = image.shape[:2]
  scale = min(h / height, w / width)
  ch, cw = int(round(height * scale)), int(round(width * scale))
  top, left = (h - ch) // 2, (w - cw) // 2
  crop = Image.fromarray(np.asarray(image[top:top + ch, left:left + cw]))
  return np.asarray(crop.resize((width, height), Image.Resampling.LANCZOS), np.uint8)


def victim_images(size: int, names: tuple[str, ...] = VICTIM_PHOTOS) -> np.ndarray:
  """The victim photos, centre-cropped and resized to size x size: uint8 (k, s, s, 3)."""
  return np.stack([resize(photo(n), size, size) for n in names])


def training_crops(size: int, count: int, seed: int = 0,
                   names: tuple[str, ...] = ATTACKER_PHOTOS, width: int | None = None
                   ) -> np.ndarray:
  """`count` random crops of the attacker photos, resized to size x width (default square).

  Crop heights are drawn between 1/8 and 1/2 of the shorter photo side (so a 32x32 crop
  looks like a small natural image, not a patch of texture); half are mirrored.
  Returns uint8 (count, size, width, 3).
  """
  width = size if width is None else width
  rng = np.random.default_rng(seed)
  out = np.empty((count, size, width, 3), np.uint8)
  for i in range(count):
    img = photo(names[rng.integers(len(names))])
    h, w = img.shape[:2]
    ch = int(rng.integers(min(h, w) // 8, min(h, w) // 2 + 1))
    cw = min(w, max(1, int(round(ch * width / size))))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(np.asarray(img[top:top + ch, left:left + cw]))
    crop = np.asarray(crop.resize((width, size), Image.Resampling.BILINEAR), np.uint8)
    out[i] = crop[:, ::-1] if rng.integers(2) else crop
  return out
