"""Image codecs for EtC images and the file-size analysis of the paper's Table IV.

Formats (all on RGB `uint8` arrays of shape (H, W, 3)):

* `jpeg`: Pillow (libjpeg-turbo) encoder with an explicit quality factor and chroma
  subsampling, 4:2:0 by default. With block size 16 every 16x16 MCU lies inside one EtC
  block, so EtC costs little in file size.
* `png`: lossless (Pillow).
* `jpegls`: lossless JPEG-LS (imagecodecs / CharLS).
* `jpeg2k`: lossless JPEG 2000 (imagecodecs / OpenJPEG, reversible 5/3 wavelet).

JPEG decoding and EtC. libjpeg's default "fancy" chroma upsampling interpolates chroma
across MCU borders, i.e. across EtC block borders, where the neighbouring block of an
encrypted image is an unrelated block of the plain image. After decryption those mixed
chroma values end up inside blocks and cost several dB of PSNR. `decode(...,
jpeg_decoder="nofancy")` uses `tf.io.decode_jpeg(fancy_upscaling=False)`, which upsamples
chroma by replication within each MCU and so commutes with EtC; "pillow" is Pillow's
default decoder. "auto" picks "nofancy" when TensorFlow is importable. `jpeg_psnr_study`
measures the difference.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from etcjax import etc_np
from etcjax.errors import UserError

FORMATS = ("png", "jpeg", "jpegls", "jpeg2k")
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "jpegls": ".jls", "jpeg2k": ".jp2"}
# Files the command-line tools pick up from folders.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".webp",
                    ".jls", ".jp2", ".j2k")
SUBSAMPLINGS = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}
JPEG_DECODERS = ("auto", "nofancy", "pillow")
# Modes converted to RGB on reading; anything with alpha or more than 8 bits is refused
# because converting it would silently lose information.
_CONVERTIBLE_MODES = ("RGB", "L", "P", "1", "CMYK", "YCbCr")


def _check_image(img: np.ndarray) -> np.ndarray:
  img = np.asarray(img)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"expected an RGB uint8 image of shape (H, W, 3), got {img.dtype} "
                     f"{img.shape}")
  return np.ascontiguousarray(img)


def encode(img: np.ndarray, fmt: str = "png", quality: int = 85,
           subsampling: str = "4:2:0", optimize: bool = False) -> bytes:
  """Encodes an RGB uint8 (H, W, 3) image.

  Args:
    fmt: one of FORMATS.
    quality: JPEG quality factor 1..100 (jpeg only).
    subsampling: JPEG chroma subsampling, one of SUBSAMPLINGS (jpeg only).
    optimize: JPEG optimised Huffman tables (jpeg only; off to match common defaults).
  """
  img = _check_image(img)
  if fmt == "jpeg":
    if subsampling not in SUBSAMPLINGS:
      raise ValueError(f"unknown JPEG subsampling {subsampling!r}; choose from "
                       f"{', '.join(SUBSAMPLINGS)}")
    if not 1 <= int(quality) <= 100:
      raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=int(quality),
                              subsampling=SUBSAMPLINGS[subsampling], optimize=optimize)
    return buf.getvalue()
  if fmt == "png":
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG", compress_level=9)
    return buf.getvalue()
  if fmt == "jpegls":
    import imagecodecs

    return bytes(imagecodecs.jpegls_encode(img))
  if fmt == "jpeg2k":
    import imagecodecs

    return bytes(imagecodecs.jpeg2k_encode(img, reversible=True, codecformat="jp2"))
  raise ValueError(f"unknown image format {fmt!r}; choose from {', '.join(FORMATS)}")


def sniff(data: bytes) -> str | None:
  """The format of encoded bytes from their magic number, or None."""
  if data[:3] == b"\xff\xd8\xff":
    return _jpeg_family(data)
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return "png"
  if data[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or data[:4] == b"\xff\x4f\xff\x51":
    return "jpeg2k"
  return None


def _jpeg_family(data: bytes) -> str:
  """"jpegls" if the first frame header is SOF55 (JPEG-LS), else "jpeg"."""
  pos = 2
  while pos + 4 <= len(data):
    if data[pos] != 0xFF:
      break
    marker = data[pos + 1]
    if marker == 0xF7:
      return "jpegls"
    if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
      return "jpeg"
    pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
  return "jpeg"


_TF_DECODE = None


def _tf_decode_jpeg():
  global _TF_DECODE
  if _TF_DECODE is None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    _TF_DECODE = lambda data: tf.io.decode_jpeg(data, channels=3, fancy_upscaling=False,
                                                dct_method="INTEGER_ACCURATE").numpy()
  return _TF_DECODE


def nofancy_available() -> bool:
  """Whether the "nofancy" JPEG decoder (TensorFlow) can be used."""
  try:
    _tf_decode_jpeg()
    return True
  except ImportError:
    return False


def decode_jpeg(data: bytes, decoder: str = "auto") -> np.ndarray:
  """Decodes JPEG bytes to (H, W, 3) uint8 with the chosen decoder (see module doc)."""
  if decoder not in JPEG_DECODERS:
    raise ValueError(f"unknown JPEG decoder {decoder!r}; choose from {', '.join(JPEG_DECODERS)}")
  if decoder in ("auto", "nofancy"):
    try:
      fn = _tf_decode_jpeg()
    except ImportError:
      if decoder == "nofancy":
        raise UserError("the 'nofancy' JPEG decoder needs TensorFlow, which is not "
                        "installed; use --jpeg-decoder pillow") from None
      fn = None
    if fn is not None:
      try:
        return np.asarray(fn(data), np.uint8)
      except Exception as e:  # tf.errors.InvalidArgumentError and friends
        raise ValueError(f"corrupt or truncated JPEG data ({type(e).__name__})") from None
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      return np.asarray(im.convert("RGB"))
  except (OSError, SyntaxError) as e:
    raise ValueError(f"corrupt or truncated JPEG data ({e})") from None


def decode(data: bytes, jpeg_decoder: str = "auto") -> np.ndarray:
  """Decodes PNG / JPEG / JPEG-LS / JPEG 2000 bytes to RGB (H, W, 3) uint8 (strict).

  Raises:
    ValueError: unknown, corrupt or truncated data, or an image that is not 8-bit RGB.
  """
  fmt = sniff(data)
  if fmt == "jpeg":
    return _as_rgb(decode_jpeg(data, jpeg_decoder), "RGB")
  if fmt in ("jpegls", "jpeg2k"):
    import imagecodecs

    try:
      arr = (imagecodecs.jpegls_decode(data) if fmt == "jpegls"
             else imagecodecs.jpeg2k_decode(data))
    except Exception as e:  # imagecodecs raises its own *Error classes
      raise ValueError(f"corrupt or truncated {fmt} data ({e})") from None
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
      raise ValueError(f"unsupported {fmt} image: {arr.dtype} {arr.shape} (need 8-bit RGB)")
    return arr
  with warnings.catch_warnings():
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    try:
      with Image.open(io.BytesIO(data)) as im:
        im.load()
        return _as_rgb(im, im.mode)
    except (OSError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
      if isinstance(e, Image.UnidentifiedImageError):  # its text names a BytesIO object
        raise ValueError("not a readable image (unknown format or corrupt data)") from None
      raise ValueError(f"not a readable image ({e})") from None


def _as_rgb(im, mode: str) -> np.ndarray:
  if isinstance(im, np.ndarray):
    return im
  if mode not in _CONVERTIBLE_MODES or (mode == "P" and "transparency" in im.info):
    raise ValueError(f"unsupported image mode {mode} (alpha channel or more than 8 bits per "
                     "channel); convert it to 8-bit RGB first")
  return np.asarray(im.convert("RGB"), np.uint8)


def read_image(path: str | os.PathLike, jpeg_decoder: str = "pillow") -> np.ndarray:
  """Reads an image file as RGB (H, W, 3) uint8.

  `jpeg_decoder` matters for JPEG files only: Pillow's default decoder is best for plain
  photos; decrypting EtC JPEGs wants "nofancy" or "auto" (see module doc).

  Grey, palette, bilevel, CMYK and YCbCr images are converted to RGB; images with an
  alpha channel or more than 8 bits per channel are refused.

  Raises:
    UserError: missing, unreadable, corrupt, truncated or unsupported file (the message
      names the file).
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
  try:
    return decode(data, jpeg_decoder=jpeg_decoder)
  except ValueError as e:
    raise UserError(f"{path}: {e}") from None


def write_image(path: str | os.PathLike, img: np.ndarray, fmt: str = "png",
                quality: int = 85, subsampling: str = "4:2:0") -> int:
  """Encodes and writes an image atomically; returns the number of bytes written."""
  from etcjax import fileio

  data = encode(img, fmt, quality=quality, subsampling=subsampling)
  fileio.write_bytes(path, data)
  return len(data)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """PSNR in dB between two uint8 images (inf when identical)."""
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
  return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


# File-size analysis (the paper's Table IV).

# (label, format, quality) rows of the table, in the paper's order.
TABLE_SETTINGS = (
    ("JPEG QF=85", "jpeg", 85),
    ("JPEG QF=80", "jpeg", 80),
    ("JPEG-LS", "jpegls", None),
    ("JPEG 2000", "jpeg2k", None),
    ("PNG", "png", None),
    ("Uncompressed", "raw", None),
)


@dataclass
class SizeRow:
  """Total bytes of a set of images under one compression setting."""
  setting: str
  plain_bytes: int
  etc_bytes: int

  @property
  def etc_overhead(self) -> float:
    """EtC bytes / plain bytes - 1 (0.004 means EtC files are 0.4 % larger)."""
    return self.etc_bytes / self.plain_bytes - 1 if self.plain_bytes else 0.0

  def as_dict(self) -> dict:
    return {**asdict(self), "etc_overhead": self.etc_overhead}


def size_table(images: Iterable[np.ndarray | str], schedules: Mapping[tuple[int, int], Any]
               | None = None, key=None, block_size: int = 16,
               subsampling: str = "4:2:0", settings=TABLE_SETTINGS,
               progress: bool = False, jobs: int | None = 1,
               on_geometry: Callable[[int, int], None] | None = None) -> list[SizeRow]:
  """Total encoded bytes of plain vs EtC images for each setting (Table IV's shape).

  Args:
    images: RGB uint8 (H, W, 3) images, or paths of image files (read with `read_image`
      in the workers), H and W multiples of `block_size`.
    key: `etcjax.keys.EtcKey` used for every image (one key per dataset, as in the
      paper); schedules are derived per geometry. Or pass `schedules` directly
      (`etcjax.etc.Schedule` or `etcjax.etc_np.HostSchedule`, concrete).
    settings: (label, format, quality) rows; format "raw" counts H * W * 3 bytes.
    progress: a progress bar on a terminal (`etcjax.parallel`).
    jobs: parallel workers (`etcjax.parallel.run_chunks`); None or 0: one per CPU. The
      totals do not depend on it.
    on_geometry: called once per image geometry (H, W), in this process.

  Raises:
    ValueError: an image that is not RGB uint8 or whose size is not a multiple of the
      block size; `etcjax.errors.UserError` (naming the file) for such files.
  """
  from etcjax import parallel

  if key is None and schedules is None:
    raise ValueError("size_table needs a key or schedules")
  images = list(images)
  job = _SizeJob(key, dict(schedules or {}), block_size, subsampling, tuple(settings))
  totals = {label: [0, 0] for label, _, _ in settings}
  seen: set = set()

  def add(results: list) -> None:
    for h, w, sizes in results:
      if on_geometry is not None and (h, w) not in seen:
        seen.add((h, w))
        on_geometry(h, w)
      for (label, _, _), (p, e) in zip(settings, sizes, strict=True):
        totals[label][0] += p
        totals[label][1] += e

  error = parallel.run_chunks(_size_chunk, images, job, jobs=jobs, on_results=add,
                              desc="compress-stats", progress=progress)
  if error is not None:
    raise (UserError if isinstance(images[error.index], str) else ValueError)(error.message)
  return [SizeRow(label, *totals[label]) for label, _, _ in settings]


@dataclass
class _SizeJob:
  """What `_size_chunk` needs (forked workers inherit it, key included)."""
  key: Any
  schedules: dict
  block_size: int
  subsampling: str
  settings: tuple


def _size_chunk(job: _SizeJob, chunk: list) -> tuple[list, Any]:
  """[(H, W, [(plain bytes, EtC bytes) per setting])] for a chunk of images or paths."""
  from etcjax import parallel

  out = []
  for i, item in enumerate(chunk):
    try:
      if isinstance(item, str):
        img = read_image(item)
        h, w = img.shape[:2]
        b = job.block_size
        if h % b or w % b:
          raise UserError(f"{item}: size {h}x{w} is not a multiple of the block size {b}")
      else:
        img = _check_image(item)
      geom = img.shape[:2]
      if geom not in job.schedules:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")  # callers report key-space warnings themselves
          job.schedules[geom] = job.key.host_schedule(geom[0], geom[1], job.block_size)
      enc = etc_np.encrypt(img, job.schedules[geom])
    except (UserError, ValueError) as e:
      return out, parallel.ChunkError(i, str(e))
    sizes = []
    for _, fmt, q in job.settings:
      sizes.append(tuple(im.size if fmt == "raw" else
                         len(encode(im, fmt, quality=q or 85, subsampling=job.subsampling))
                         for im in (img, enc)))
    out.append((geom[0], geom[1], sizes))
  return out, None


def format_size_table(rows: list[SizeRow], num_images: int) -> str:
  """A plain-text table: setting, plain MB, EtC MB, EtC overhead."""
  lines = [f"File sizes of {num_images} images (MB = 10^6 bytes)",
           f"{'setting':<14}{'plain MB':>12}{'EtC MB':>12}{'EtC vs plain':>14}"]
  for r in rows:
    lines.append(f"{r.setting:<14}{r.plain_bytes / 1e6:>12.3f}{r.etc_bytes / 1e6:>12.3f}"
                 f"{100 * r.etc_overhead:>+13.1f}%")
  return "\n".join(lines)


@dataclass
class JpegPsnr:
  """PSNR (dB, vs the original) of plain JPEG and of decrypted EtC JPEG, per decoder."""
  name: str
  decoder: str
  plain_psnr: float
  etc_psnr: float
  plain_bytes: int
  etc_bytes: int


def jpeg_psnr_study(images: Mapping[str, np.ndarray], key, quality: int = 85,
                    block_size: int = 16, subsampling: str = "4:2:0",
                    decoders: Iterable[str] = ("pillow", "nofancy")) -> list[JpegPsnr]:
  """Encrypt -> JPEG -> decode -> decrypt vs plain JPEG, for each decoder and image."""
  out = []
  for name, img in images.items():
    img = _check_image(img)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      s = key.host_schedule(img.shape[0], img.shape[1], block_size)
    plain_jpg = encode(img, "jpeg", quality, subsampling)
    etc_jpg = encode(etc_np.encrypt(img, s), "jpeg", quality, subsampling)
    for dec in decoders:
      plain_dec = decode_jpeg(plain_jpg, dec)
      etc_dec = etc_np.decrypt(decode_jpeg(etc_jpg, dec), s)
      out.append(JpegPsnr(name, dec, psnr(img, plain_dec), psnr(img, etc_dec),
                          len(plain_jpg), len(etc_jpg)))
  return out
