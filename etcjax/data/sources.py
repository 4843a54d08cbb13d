"""Data sources: where labelled images come from, loaded into host memory.

A source yields, for one split and one process, an `ImageSet`: random access to uint8
RGB images `(n, h, w, 3)` in [0, 255] and int32 labels `(n,)`. Random access is what
lets the pipeline make the data order a pure function of (seed, step), so a restarted
run needs no iterator state.

Sources (`config.dataset`):
  * `tfds:NAME` (`tfds:cifar10`, `tfds:imagenette`, any TFDS dataset with `image` and
    `label` features). The eval split is `test`, else `validation`.
  * `folder:PATH`: `PATH/<split>/<class>/<image>` (png, jpg, ...) with split `train`
    and `test` (or `validation` / `val`); classes are the sorted folder names.
  * `encrypted:PATH`: a folder written by `etcjax encrypt` (see
    `etcjax.data.encrypted`); read with no key, its manifest's key fingerprint is
    recorded in the run.
  * `digits`: the embedded default, scikit-learn's handwritten digits (see
    `load_digits`).

Multi-host: process `i` of `n` keeps examples `i, i+n, i+2n, ...` of a split
(`shard=(i, n)`), so each process decodes and holds only its own share.

Images of a fixed native size (CIFAR-10 32x32, digits 32x32) are kept at that size and
resized on device to `image_size` (so CIFAR-10 at 224 for ViT costs 32x32 of host
memory); variable-size images (Imagenette, folders) are resized on host: shorter side
to `image_size`, then a centre crop.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from etcjax import codec, fileio
from etcjax.config import parse_dataset
from etcjax.errors import UserError

IMAGE_EXTENSIONS = codec.IMAGE_EXTENSIONS
# Eval split names tried in order, for TFDS datasets and folders.
EVAL_SPLITS = ("test", "validation", "val")
# Threads decoding compressed images; decoders release the GIL.
_DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class ArrayImageSet:
  """Images held decoded in memory.

  Attributes:
    array: uint8 `(n, h, w, 3)`, values [0, 255].
    labels: int32 `(n,)`, values [0, num_classes).
  """
  array: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.array.shape[1:])

  def images(self, indices: np.ndarray) -> np.ndarray:
    """uint8 `(len(indices), h, w, 3)`."""
    return self.array[indices]


@dataclasses.dataclass(frozen=True)
class EncodedImageSet:
  """Images held as compressed files (JPEG / PNG bytes), decoded per batch.

  Used where decoding once would cost too much memory (EtC images at 224x224 for a
  50k-image dataset) and where the bytes themselves are the data (JPEG in the loop,
  encrypted folders). All images decode to `image_shape`.
  """
  blobs: Sequence[bytes]
  labels: np.ndarray
  image_shape: tuple[int, int, int]
  decode: Callable[[bytes], np.ndarray]

  def __len__(self) -> int:
    return len(self.labels)

  def images(self, indices: np.ndarray) -> np.ndarray:
    """uint8 `(len(indices), h, w, 3)`; raises UserError if a file has another shape."""
    out = np.empty((len(indices), *self.image_shape), np.uint8)

    def one(i: int) -> None:
      image = self.decode(self.blobs[indices[i]])
      if image.shape != self.image_shape:
        raise UserError(f"image #{int(indices[i])} decodes to {image.shape}, expected "
                        f"{self.image_shape}")
      out[i] = image

    with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
      list(pool.map(one, range(len(indices))))
    return out


ImageSet = ArrayImageSet | EncodedImageSet


@dataclasses.dataclass(frozen=True)
class EncryptedInfo:
  """What an already-encrypted dataset says about itself (never the key)."""
  scheme: str
  key_fingerprint: str
  block_size: int


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One process's share of a dataset's train and eval splits."""
  name: str
  train: ImageSet | None  # None when loaded for evaluation only.
  eval: ImageSet
  class_names: tuple[str, ...]
  encrypted: EncryptedInfo | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def load(dataset: str, image_size: int, *, shard: tuple[int, int] = (0, 1),
         data_dir: str = "", train: bool = True, cache_dir: str = "") -> Dataset:
  """Loads `dataset` (a `config.dataset` string) for one process.

  Args:
    dataset: "tfds:NAME", "folder:PATH", "encrypted:PATH" or "digits".
    image_size: target side; variable-size images are resized to it on host.
    shard: (process_index, process_count); this process keeps every count-th example.
    data_dir: TFDS data_dir ("" = TFDS default).
    train: also load the train split (False for evaluation-only runs).
    cache_dir: for `folder:` datasets, a folder holding decoded splits keyed by the
      files' contents (`decode_folder_split`); "" = decode every time.

  Raises:
    UserError: unknown dataset, missing folder, or data that cannot be read.
  """
  kind, arg = parse_dataset(dataset)
  if kind == "digits":
    return load_digits(shard=shard, train=train)
  if kind == "tfds":
    return _load_tfds(arg, image_size, shard, data_dir, train)
  if kind == "folder":
    return _load_folder(arg, image_size, shard, train, cache_dir)
  from etcjax.data import encrypted
  return encrypted.load(arg, shard=shard, train=train)


# ----------------------------------------------------------------------------------------
# The embedded default: scikit-learn's handwritten digits.

DIGITS_SIZE = 32
DIGITS_TEST_FRACTION = 0.2


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's digits as coloured 32x32 RGB images, split 80/20.

  The 1797 images are 8x8 counts (0..16) of inked pixels in 4x4 cells of the original
  32x32 NIST bitmaps, so a x4 upscaling restores the original geometry; bilinear
  upscaling (half-pixel centres) turns the cell counts back into smooth strokes. Each
  image then gets its own paper colour (light) and ink colour (dark), drawn from a
  fixed seed independently of the label: with grey digits EtC's colour shuffle would be
  a no-op and the demo would not exercise it. 32x32 holds 4 blocks of 16 or 16 blocks
  of 8 (the demo's EtC block size).

  Returns:
    (train_images, train_labels, test_images, test_labels): uint8 `(n, 32, 32, 3)` and
    int32 `(n,)`; 1437 train and 360 test images, split by a fixed permutation.
  """
  from sklearn.datasets import load_digits as sklearn_digits
  digits = sklearn_digits()
  ink = np.stack([
      np.asarray(Image.fromarray(d.astype(np.float32) / 16.0, mode="F").resize(
          (DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR)) for d in digits.images])
  ink = np.clip(ink, 0.0, 1.0)[..., None]
  rng = np.random.default_rng(20220101)
  n = len(ink)
  paper = rng.uniform(0.55, 1.0, (n, 1, 1, 3))
  pen = rng.uniform(0.0, 0.45, (n, 1, 1, 3))
  images = np.round(255.0 * (paper * (1.0 - ink) + pen * ink)).astype(np.uint8)
  labels = digits.target.astype(np.int32)
  order = rng.permutation(n)
  n_test = math.ceil(n * DIGITS_TEST_FRACTION)
  test, train = order[:n_test], order[n_test:]
  return images[train], labels[train], images[test], labels[test]


def load_digits(shard: tuple[int, int] = (0, 1), train: bool = True) -> Dataset:
  """The embedded default dataset (`digits_arrays`) as a `Dataset`."""
  xtr, ytr, xte, yte = digits_arrays()
  index, count = shard
  return Dataset(
      name="digits",
      train=ArrayImageSet(xtr[index::count], ytr[index::count]) if train else None,
      eval=ArrayImageSet(xte[index::count], yte[index::count]),
      class_names=tuple(str(i) for i in range(10)))


# ----------------------------------------------------------------------------------------
# Resizing and decoding on host.


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` (bicubic, antialiased), then centre-crops.

  Args:
    image: uint8 `(h, w, 3)`.
  Returns:
    uint8 `(size, size, 3)`.
  """
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
  top, left = (nh - size) // 2, (nw - size) // 2
  return resized[top:top + size, left:left + size]


def decode_etc_image(blob: bytes) -> np.ndarray:
  """Decodes PNG / JPEG bytes of an EtC image to uint8 RGB `(h, w, 3)`.

  JPEG is decoded without "fancy" chroma upsampling, which would mix neighbouring EtC
  blocks (`etcjax.codec`, DESIGN.md).
  """
  return codec.decode(blob, jpeg_decoder="nofancy")


# ----------------------------------------------------------------------------------------
# TFDS.

_TFDS_EVAL_SPLIT = {"cifar10": "test", "cifar100": "test", "imagenette": "validation"}


def _load_tfds(name: str, image_size: int, shard: tuple[int, int], data_dir: str,
               train: bool) -> Dataset:
  import tensorflow as tf
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    # TFDS's own message lists every registered dataset (over a thousand names).
    raise UserError(f"config.dataset=tfds:{name}: TFDS has no dataset {name!r}; the paper's "
                    "are tfds:cifar10 and tfds:imagenette (any TFDS dataset with 'image' and "
                    "'label' features works)") from None
  except Exception as e:  # TFDS raises several types for bad configs / versions.
    raise UserError(f"config.dataset=tfds:{name}: {' '.join(str(e).split())[:300]}") from e
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise UserError(f"tfds:{name} has no 'image' and 'label' features "
                    f"(it has {', '.join(features.keys())})")
  base = name.split("/")[0].split(":")[0]
  eval_split = _TFDS_EVAL_SPLIT.get(base) or next(
      (s for s in EVAL_SPLITS if s in builder.info.splits), None)
  if eval_split is None:
    raise UserError(f"tfds:{name} has no test or validation split "
                    f"(it has {', '.join(builder.info.splits)})")
  fixed = None not in features["image"].shape
  index, count = shard

  def read(split: str) -> ArrayImageSet:
    try:
      builder.download_and_prepare()
      ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()},
                              shuffle_files=False)
    except Exception as e:
      raise UserError(f"cannot read tfds:{name} split {split!r} (data_dir="
                      f"{data_dir or 'default'}; prepare it with `tfds build {name}` on a "
                      f"machine with internet): {' '.join(str(e).split())[:300]}") from e
    # Shard before decoding: each process decodes only its own examples.
    ds = ds.shard(count, index)

    def decode(ex):
      image = tf.io.decode_image(ex["image"], channels=3, expand_animations=False)
      return image, tf.cast(ex["label"], tf.int32)

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    images, labels = [], []
    for image, label in tfds.as_numpy(ds.prefetch(64)):
      images.append(image if fixed else resize_center_crop(image, image_size))
      labels.append(label)
    if not images:
      raise UserError(f"tfds:{name} split {split!r} has no examples for process {index}")
    return ArrayImageSet(np.stack(images), np.asarray(labels, np.int32))

  return Dataset(name=f"tfds:{name}", train=read("train") if train else None,
                 eval=read(eval_split),
                 class_names=tuple(features["label"].names))


# ----------------------------------------------------------------------------------------
# Image folders.


def find_split_dir(root: str, split: str) -> str:
  """The folder of `split` ("train" or "eval") under `root`; UserError if missing."""
  names = ("train",) if split == "train" else EVAL_SPLITS
  for name in names:
    path = os.path.join(root, name)
    if os.path.isdir(path):
      return path
  raise UserError(f"{root} has no {' or '.join(names)} folder (expected "
                  f"{root}/<split>/<class>/<image>)")


def list_labelled_files(split_dir: str, class_names: Sequence[str] | None = None
                        ) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
  """Image files under `split_dir/<class>/`, sorted, with int32 labels.

  Args:
    split_dir: a folder of class folders.
    class_names: the classes (their order defines label ids); None = the sorted class
      folders found here. A class folder not in `class_names` is a UserError.
  """
  found = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
  if class_names is None:
    class_names = tuple(found)
  extra = sorted(set(found) - set(class_names))
  if extra:
    raise UserError(f"{split_dir} has class folders {', '.join(extra)} that the train "
                    f"split lacks")
  files, labels = [], []
  for label, name in enumerate(class_names):
    folder = os.path.join(split_dir, name)
    if not os.path.isdir(folder):
      continue
    for f in sorted(os.listdir(folder)):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.join(folder, f))
        labels.append(label)
  if not files:
    raise UserError(f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in class "
                    f"folders")
  return files, np.asarray(labels, np.int32), tuple(class_names)


# Bumped whenever decoding or resizing changes what a cached split holds.
_FOLDER_CACHE_VERSION = 1


def decode_folder_split(files: Sequence[str], labels: np.ndarray, image_size: int,
                        cache_dir: str = "") -> ArrayImageSet:
  """Decodes image files (resized as `resize_center_crop`) into one in-memory split.

  Files are read and decoded on `_DECODE_THREADS` threads. With `cache_dir`, the decoded
  split is stored there as `<digest>.npz`, where the digest covers the cache version,
  `image_size`, and every file's path, label and *bytes* (BLAKE2b): a cache entry is
  found again only for exactly the same files, so it is never stale. Reading and hashing
  60,000 CIFAR-10 JPEGs costs about a second; decoding them about twenty.

  Args:
    files: image paths; labels: int32 `(n,)`.
    image_size: side of the square output.
    cache_dir: cache folder (created); "" = no cache.

  Returns:
    uint8 images `(n, image_size, image_size, 3)` with their labels.

  Raises:
    UserError: a missing, unreadable or corrupt file (named).
  """
  def read(path: str) -> bytes:
    try:
      with open(path, "rb") as f:
        return f.read()
    except OSError as e:
      raise UserError(f"{path}: cannot read ({e.strerror or e})") from None

  def decode(item: tuple[str, bytes]) -> np.ndarray:
    path, blob = item
    try:
      image = codec.decode(blob, jpeg_decoder="pillow")
    except ValueError as e:
      raise UserError(f"{path}: {e}") from None
    return resize_center_crop(image, image_size)

  labels = np.asarray(labels, np.int32)
  with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
    blobs = list(pool.map(read, files))
    cache_path = ""
    if cache_dir:
      digest = hashlib.blake2b(digest_size=20)
      digest.update(f"etcjax-folder-cache v{_FOLDER_CACHE_VERSION} {image_size}\n".encode())
      for path, label, blob in zip(files, labels, blobs, strict=True):
        digest.update(f"{path}\0{int(label)}\0{len(blob)}\0".encode())
        digest.update(blob)
      cache_path = os.path.join(cache_dir, f"{digest.hexdigest()}.npz")
      if os.path.isfile(cache_path):
        with np.load(cache_path) as cached:
          return ArrayImageSet(cached["images"], cached["labels"])
    images = np.stack(list(pool.map(decode, zip(files, blobs, strict=True))))
  if cache_path:
    os.makedirs(cache_dir, exist_ok=True)
    with fileio.atomic_write(cache_path) as f:
      np.savez(f, images=images, labels=labels)
  return ArrayImageSet(images, labels)


def _load_folder(root: str, image_size: int, shard: tuple[int, int], train: bool,
                 cache_dir: str = "") -> Dataset:
  if not os.path.isdir(root):
    raise UserError(f"config.dataset=folder:{root}: no such folder")
  index, count = shard
  train_dir, eval_dir = find_split_dir(root, "train"), find_split_dir(root, "eval")
  train_files, train_labels, classes = list_labelled_files(train_dir)
  eval_files, eval_labels, _ = list_labelled_files(eval_dir, classes)

  def read(files: list[str], labels: np.ndarray) -> ArrayImageSet:
    return decode_folder_split(files[index::count], labels[index::count], image_size,
                               cache_dir)

  return Dataset(name=f"folder:{root}",
                 train=read(train_files, train_labels) if train else None,
                 eval=read(eval_files, eval_labels), class_names=classes)
