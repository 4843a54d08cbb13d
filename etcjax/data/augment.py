"""On-device augmentation: pure functions of (PRNG key, images).

All images are float32 in [0, 1], NHWC (`(n, h, w, 3)`) or one image `(h, w, 3)`.
Per-example functions take one image and are vmapped over the batch with one key per
example, so every example's randomness depends only on its key, never on how the batch
is sharded across devices.

* `resize`, `random_resized_crop`, `random_flip`: geometry (plain images).
* `rand_augment`: a RandAugment in the style of timm's `rand-m9-mstd0.5-inc1` (15 ops,
  each applied with probability 0.5, magnitude ~ N(m, 0.5)), the ConvMixer paper's
  recipe for plain images.
* `random_erase`: timm-style random erasing with uniform noise.
* `mix`: mixup / CutMix over the batch, the only augmentation the paper uses for EtC
  images (it is blind to the block structure, so it applies to encrypted images as-is).
"""

from __future__ import annotations

import math

import dm_pix as pix
import jax
import jax.numpy as jnp

Array = jax.Array

# Fill value of pixels that geometric ops move in from outside (timm: 128 grey).
FILL = 0.5


def resize(images: Array, size: int) -> Array:
  """Resizes `(n, h, w, 3)` images to `(n, size, size, 3)`: bilinear, antialiased."""
  if images.shape[-3:-1] == (size, size):
    return images
  return jax.image.resize(images, (*images.shape[:-3], size, size, images.shape[-1]),
                          method="linear", antialias=True)


def random_resized_crop(key: Array, image: Array, size: int, scale_min: float,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Array:
  """Crops a random box and resizes it to `(size, size, 3)` (Inception-style).

  The box covers a fraction U(scale_min, 1) of the image area with aspect ratio
  log-uniform in `ratio`, clipped to the image.
  """
  h, w = image.shape[:2]
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, minval=scale_min, maxval=1.0) * h * w
  aspect = jnp.exp(jax.random.uniform(k_ratio, minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  ch = jnp.minimum(jnp.sqrt(area / aspect), h)
  cw = jnp.minimum(jnp.sqrt(area * aspect), w)
  y0 = jax.random.uniform(k_y) * (h - ch)
  x0 = jax.random.uniform(k_x) * (w - cw)
  scale = jnp.stack([size / ch, size / cw])
  translation = -jnp.stack([y0, x0]) * scale
  return jax.image.scale_and_translate(image, (size, size, image.shape[-1]), (0, 1), scale,
                                       translation, method="linear", antialias=True)


def random_flip(key: Array, image: Array) -> Array:
  """Mirrors `(h, w, 3)` left-right with probability 0.5."""
  return jnp.where(jax.random.bernoulli(key), image[:, ::-1], image)


# ----------------------------------------------------------------------------------------
# RandAugment. Ops take (image, level in [0, 1], sign in {-1, 1}).


def _grey(x: Array) -> Array:
  return pix.rgb_to_grayscale(x, keep_dims=True)


def _blend(degenerate: Array, x: Array, factor: Array) -> Array:
  """PIL ImageEnhance: degenerate + factor * (x - degenerate), clipped to [0, 1]."""
  return jnp.clip(degenerate + factor * (x - degenerate), 0.0, 1.0)


def _enhance_factor(level: Array, sign: Array) -> Array:
  # timm's *Increasing enhancements: 1 +- 0.9 * level.
  return 1.0 + sign * 0.9 * level


def _auto_contrast(x, level, sign):
  lo = x.min(axis=(0, 1), keepdims=True)
  hi = x.max(axis=(0, 1), keepdims=True)
  return jnp.where(hi > lo, (x - lo) / jnp.where(hi > lo, hi - lo, 1.0), x)


def _equalize(x, level, sign):
  """Per-channel histogram equalisation over 256 levels (PIL ImageOps.equalize)."""
  q = jnp.round(x * 255.0).astype(jnp.int32)

  def channel(c):
    hist = jnp.bincount(c.ravel(), length=256)
    cdf = jnp.cumsum(hist)
    cdf_min = cdf[jnp.argmax(hist > 0)]
    denom = jnp.maximum(cdf[-1] - cdf_min, 1)
    lut = jnp.clip((cdf - cdf_min) / denom, 0.0, 1.0)
    return jnp.where(cdf[-1] > cdf_min, lut[c], c / 255.0)

  return jax.vmap(channel, in_axes=-1, out_axes=-1)(q)


def _invert(x, level, sign):
  return 1.0 - x


def _posterize(x, level, sign):
  bits = 8 - jnp.floor(4.0 * level).astype(jnp.int32)  # 8 bits (no-op) .. 4 bits.
  step = jnp.left_shift(1, 8 - bits).astype(jnp.float32)
  return jnp.floor(jnp.round(x * 255.0) / step) * step / 255.0


def _solarize(x, level, sign):
  return pix.solarize(x, 1.0 - level)


def _solarize_add(x, level, sign):
  return jnp.where(x < 0.5, jnp.minimum(x + level * 110.0 / 255.0, 1.0), x)


def _color(x, level, sign):
  return _blend(_grey(x), x, _enhance_factor(level, sign))


def _contrast(x, level, sign):
  return _blend(_grey(x).mean(), x, _enhance_factor(level, sign))


def _brightness(x, level, sign):
  return _blend(jnp.zeros_like(x), x, _enhance_factor(level, sign))


def _sharpness(x, level, sign):
  """Blends with PIL's SMOOTH filter (3x3, centre weight 5), borders kept."""
  kernel = jnp.array([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  smooth = jax.vmap(lambda c: jax.scipy.signal.convolve2d(c, kernel, mode="same"),
                    in_axes=-1, out_axes=-1)(x)
  inner = jnp.zeros(x.shape[:2], bool).at[1:-1, 1:-1].set(True)[..., None]
  return _blend(jnp.where(inner, smooth, x), x, _enhance_factor(level, sign))


def _identity(x, level, sign):
  return x


# (name, colour op or None for geometric ops). Order and set follow timm's
# _RAND_INCREASING_TRANSFORMS.
RAND_AUGMENT_OPS = (
    ("AutoContrast", _auto_contrast), ("Equalize", _equalize), ("Invert", _invert),
    ("Rotate", None), ("Posterize", _posterize), ("Solarize", _solarize),
    ("SolarizeAdd", _solarize_add), ("Color", _color), ("Contrast", _contrast),
    ("Brightness", _brightness), ("Sharpness", _sharpness), ("ShearX", None),
    ("ShearY", None), ("TranslateX", None), ("TranslateY", None),
)
_OP_INDEX = {name: i for i, (name, _) in enumerate(RAND_AUGMENT_OPS)}


def _affine_matrix(op: Array, level: Array, sign: Array, h: int, w: int
                   ) -> tuple[Array, Array]:
  """(matrix (2, 2), offset (2,)) mapping output (y, x) to input coordinates.

  Rotate: up to 30 degrees about the centre; ShearX/Y: up to 0.3; TranslateX/Y: up to
  0.45 of the side. Other ops give the identity.
  """
  angle = jnp.deg2rad(30.0 * level) * sign
  shear = 0.3 * level * sign
  shift = 0.45 * level * sign
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  centre = jnp.array([(h - 1) / 2.0, (w - 1) / 2.0])
  eye = jnp.eye(2)
  rot = jnp.array([[cos, -sin], [sin, cos]])
  mats = {
      "Rotate": (rot, centre - rot @ centre),
      "ShearX": (jnp.array([[1.0, 0.0], [shear, 1.0]]), jnp.zeros(2)),
      "ShearY": (jnp.array([[1.0, shear], [0.0, 1.0]]), jnp.zeros(2)),
      "TranslateX": (eye, jnp.array([0.0, shift * w])),
      "TranslateY": (eye, jnp.array([shift * h, 0.0])),
  }
  matrix, offset = eye, jnp.zeros(2)
  for name, (m, o) in mats.items():
    hit = op == _OP_INDEX[name]
    matrix = jnp.where(hit, m, matrix)
    offset = jnp.where(hit, o, offset)
  return matrix, offset


def _apply_op(key: Array, x: Array, magnitude: float) -> Array:
  h, w = x.shape[:2]
  k_op, k_apply, k_mag, k_sign = jax.random.split(key, 4)
  op = jax.random.randint(k_op, (), 0, len(RAND_AUGMENT_OPS))
  level = jnp.clip(magnitude + 0.5 * jax.random.normal(k_mag), 0.0, 10.0) / 10.0
  sign = jnp.where(jax.random.bernoulli(k_sign), 1.0, -1.0)
  matrix, offset = _affine_matrix(op, level, sign, h, w)
  full = jnp.eye(3).at[:2, :2].set(matrix)
  y = pix.affine_transform(x, full, offset=jnp.append(offset, 0.0), order=1,
                           mode="constant", cval=FILL)
  colour = [fn or _identity for _, fn in RAND_AUGMENT_OPS]
  y = jax.lax.switch(op, colour, y, level, sign)
  return jnp.where(jax.random.bernoulli(k_apply), y, x)


def rand_augment(key: Array, image: Array, num_ops: int = 2, magnitude: float = 9.0
                 ) -> Array:
  """Applies `num_ops` random RandAugment ops, each with probability 0.5.

  Args:
    key: PRNG key.
    image: float `(h, w, 3)` in [0, 1].
    num_ops: ops drawn per image (timm: 2).
    magnitude: mean magnitude on timm's 0..10 scale (per-op std 0.5).

  Returns:
    float `(h, w, 3)` in [0, 1].
  """
  for k in jax.random.split(key, num_ops):
    image = _apply_op(k, image, magnitude)
  return jnp.clip(image, 0.0, 1.0)


def random_erase(key: Array, image: Array, prob: float) -> Array:
  """With probability `prob`, fills a random box (2-33 % of the area, aspect 0.3-3.3)
  with uniform noise (timm's "pixel" mode in [0, 1] units)."""
  h, w = image.shape[:2]
  k_do, k_area, k_ratio, k_y, k_x, k_noise = jax.random.split(key, 6)
  area = jax.random.uniform(k_area, minval=0.02, maxval=1 / 3) * h * w
  aspect = jnp.exp(jax.random.uniform(k_ratio, minval=math.log(0.3), maxval=math.log(1 / 0.3)))
  eh = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, h)
  ew = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, w)
  y0 = jnp.floor(jax.random.uniform(k_y) * (h - eh + 1))
  x0 = jnp.floor(jax.random.uniform(k_x) * (w - ew + 1))
  ys = jnp.arange(h)[:, None, None]
  xs = jnp.arange(w)[None, :, None]
  box = (ys >= y0) & (ys < y0 + eh) & (xs >= x0) & (xs < x0 + ew)
  box &= jax.random.bernoulli(k_do, prob)
  return jnp.where(box, jax.random.uniform(k_noise, image.shape), image)


def mix(key: Array, images: Array, targets: Array, mixup_alpha: float, cutmix_alpha: float
        ) -> tuple[Array, Array]:
  """Mixup or CutMix of each example with its mirror in the batch (timm's batch mode).

  With both alphas > 0 each batch uses CutMix with probability 0.5, else mixup. The
  partner of example i is example n-1-i; lam ~ Beta(alpha, alpha); CutMix pastes one
  box of area (1 - lam) at a uniform centre (clipped) and corrects lam to the pasted
  area.

  Args:
    key: PRNG key.
    images: float `(n, h, w, 3)`.
    targets: float `(n, classes)` label distributions.
    mixup_alpha, cutmix_alpha: 0 disables that method (static Python floats).

  Returns:
    (images, targets) of the same shapes.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  k_which, k_mix, k_cut, k_y, k_x = jax.random.split(key, 5)
  partner_x, partner_t = images[::-1], targets[::-1]
  h, w = images.shape[1:3]
  results = []
  if mixup_alpha > 0:
    lam = jax.random.beta(k_mix, mixup_alpha, mixup_alpha)
    results.append((lam * images + (1 - lam) * partner_x, lam))
  if cutmix_alpha > 0:
    lam = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha)
    cut = jnp.sqrt(1.0 - lam)
    cy = jax.random.uniform(k_y) * h
    cx = jax.random.uniform(k_x) * w
    y0 = jnp.clip(jnp.round(cy - cut * h / 2), 0, h)
    y1 = jnp.clip(jnp.round(cy + cut * h / 2), 0, h)
    x0 = jnp.clip(jnp.round(cx - cut * w / 2), 0, w)
    x1 = jnp.clip(jnp.round(cx + cut * w / 2), 0, w)
    ys = jnp.arange(h)[:, None, None]
    xs = jnp.arange(w)[None, :, None]
    box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    results.append((jnp.where(box, partner_x, images), lam))
  if len(results) == 2:
    use_cut = jax.random.bernoulli(k_which)
    mixed = jnp.where(use_cut, results[1][0], results[0][0])
    lam = jnp.where(use_cut, results[1][1], results[0][1])
  else:
    mixed, lam = results[0]
  return mixed, lam * targets + (1 - lam) * partner_t
