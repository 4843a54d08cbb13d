"""Host input pipeline: deterministic global batches, per-process rows, transfer to devices.

The global batch of step `s` is a pure function of `(seed, s)` and the dataset size, the
same for any number of processes and devices: it takes positions `s*B .. s*B+B-1` of an
endless sequence of epochs, each a fresh permutation of the global example ids drawn from
`(seed, epoch)` (`TrainOrder`). A run restarted from a checkpoint at step `s`, on this or
on any other slice, therefore sees exactly the batches an uninterrupted run would, with no
iterator state to save.

Every process holds the whole train split (`etcjax.train.build` loads it unsharded) and
reads, of each global batch, only the rows its own devices hold (`process_rows`: a
contiguous slice on a 1-D mesh, process 0 first). `to_global` assembles those rows into one
`jax.Array` sharded over the mesh's "data" axis with
`jax.make_array_from_process_local_data`, which maps a process's rows, in increasing
order, onto its devices. Everything random on device is drawn for the global batch inside
the jitted step (`etcjax.train`), so per-example augmentation depends on the example's
position in the global batch, never on the device layout.

Evaluation needs no order: process `i` of `n` evaluates examples `i, i+n, ...`
(`shard_of`), padded to batches of equal count on every process (`eval_batches`).

Batches stay uint8 on host (4x less to copy than float); decoding to float, resizing,
augmentation, encryption and normalisation happen on device (`etcjax.train`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from etcjax import codec
from etcjax.data.sources import EncodedImageSet, ImageSet, decode_etc_image

Batch = dict[str, np.ndarray]


class TrainOrder:
  """The global example ids of every training step: a pure function of (seed, step).

  Args:
    num_examples: size of the (whole, unsharded) train split.
    batch_size: global batch size B.
    seed: `config.seed`.
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int):
    if num_examples < 1:
      raise ValueError("a training split needs at least one example")
    self.num_examples = num_examples
    self.batch_size = batch_size
    self.seed = seed
    self._cache: dict[int, np.ndarray] = {}

  def epoch_permutation(self, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: int64 permutation of `range(num_examples)`."""
    perm = self._cache.get(epoch)
    if perm is None:
      # The 0 is where a process index used to be: single-process runs keep the order
      # (and results) they had when each process drew from its own shard.
      rng = np.random.default_rng([self.seed, 0, epoch])
      perm = rng.permutation(self.num_examples)
      # Batches straddle at most two epochs: keep only the neighbours.
      self._cache = {e: p for e, p in self._cache.items() if abs(e - epoch) <= 1}
      self._cache[epoch] = perm
    return perm

  def indices(self, step: int) -> np.ndarray:
    """int64 `(batch_size,)` example ids of the global batch of step `step` (0-based)."""
    pos = step * self.batch_size + np.arange(self.batch_size)
    epochs, offsets = np.divmod(pos, self.num_examples)
    out = np.empty_like(pos)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self.epoch_permutation(int(epoch))[offsets[sel]]
    return out


def process_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
  """int64 rows of a global batch that this process's devices hold, in increasing order.

  Rows `[i*b, (i+1)*b)` of a batch sharded over "data" go to the i-th device of the
  mesh (b = batch_size / devices); this process feeds those of its own devices.
  `make_array_from_process_local_data` expects a process's rows in this order.
  """
  index_map = data_sharding(mesh).addressable_devices_indices_map((batch_size,))
  rows = {r for (s,) in index_map.values() for r in range(*s.indices(batch_size))}
  return np.array(sorted(rows), np.int64)


def train_batches(images: ImageSet, order: TrainOrder, start_step: int, end_step: int,
                  rows: np.ndarray | None = None) -> Iterator[Batch]:
  """This process's part of the global batches of steps `start_step .. end_step - 1`.

  Args:
    images: the whole train split.
    order: the global order.
    rows: the rows of each global batch to load (`process_rows`); None = all.

  Yields:
    `{"image": uint8 (r, h, w, 3), "label": int32 (r,)}`, r = len(rows).
  """
  for step in range(start_step, end_step):
    idx = order.indices(step)
    if rows is not None:
      idx = idx[rows]
    yield {"image": images.images(idx), "label": images.labels[idx]}


@dataclasses.dataclass(frozen=True)
class ImageSubset:
  """The examples `indices` (int64) of another image set, as an image set of their own.

  Attributes:
    labels: int32 `(len(indices),)`, the labels of those examples.
  """
  base: ImageSet
  indices: np.ndarray
  labels: np.ndarray = dataclasses.field(init=False)

  def __post_init__(self) -> None:
    object.__setattr__(self, "labels", self.base.labels[self.indices])

  def __len__(self) -> int:
    return len(self.indices)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.base.image_shape

  def images(self, indices: np.ndarray) -> np.ndarray:
    """uint8 `(len(indices), h, w, 3)`."""
    return self.base.images(self.indices[np.asarray(indices)])


def shard_of(images: ImageSet, index: int, count: int) -> ImageSet:
  """Examples `index, index + count, ...` of `images` (process `index` of `count`)."""
  if count == 1:
    return images
  return ImageSubset(images, np.arange(index, len(images), count))


def eval_batches(images: ImageSet, local_batch_size: int, num_batches: int,
                 limit: int | None = None) -> Iterator[Batch]:
  """Local eval batches in order, padded to a fixed size.

  Every process must run the same number of batches (the eval step is a collective),
  so `num_batches` is the maximum over processes and short shares are padded.

  Args:
    images: this process's eval examples.
    local_batch_size: examples per batch on this process.
    num_batches: batches to yield (>= ceil(n / local_batch_size)).
    limit: use only the first `limit` local examples (None = all).

  Yields:
    `{"image": uint8 (b, h, w, 3), "label": int32 (b,), "mask": bool (b,)}`; padded
    rows repeat example 0 and have mask False.
  """
  n = len(images) if limit is None else min(limit, len(images))
  for i in range(num_batches):
    idx = np.arange(i * local_batch_size, (i + 1) * local_batch_size)
    mask = idx < n
    idx = np.where(mask, idx, 0)
    yield {"image": images.images(idx), "label": images.labels[idx], "mask": mask}


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh's "data" axis."""
  return NamedSharding(mesh, PartitionSpec("data"))


def to_global(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles every process's local batch into global arrays sharded over "data".

  Each process passes its rows of the global batch (`process_rows` order); all processes
  pass the same number of rows.
  """
  sharding = data_sharding(mesh)
  procs = jax.process_count()
  return {k: jax.make_array_from_process_local_data(
      sharding, v, (v.shape[0] * procs, *v.shape[1:])) for k, v in batch.items()}


def prefetch(iterator: Iterable, transform: Callable = lambda x: x, size: int = 2
             ) -> Iterator:
  """Runs `transform(item)` for the next `size` items on a background thread.

  Exceptions raised by the iterator or `transform` are re-raised in the consumer.
  Closing the returned generator stops the thread.
  """
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def produce() -> None:
    try:
      for item in iterator:
        if stop.is_set():
          return
        q.put((True, transform(item)))
      q.put((True, done))
    except BaseException as e:  # Hand every failure to the consumer.
      q.put((False, e))

  thread = threading.Thread(target=produce, daemon=True, name="etcjax-prefetch")
  thread.start()
  try:
    while True:
      ok, item = q.get()
      if not ok:
        raise item
      if item is done:
        return
      yield item
  finally:
    stop.set()
    while thread.is_alive():  # Unblock a producer waiting on a full queue.
      try:
        q.get(timeout=0.05)
      except queue.Empty:
        pass


def encode_jpeg(images: ImageSet, quality: int,
                transform: Callable[[np.ndarray], np.ndarray] = lambda x: x,
                chunk: int = 256) -> EncodedImageSet:
  """Compresses a split once, as a data owner would before upload: JPEG in the loop.

  Args:
    images: the split (uint8 images).
    quality: JPEG quality factor 1..100 (4:2:0 subsampling).
    transform: applied to each uint8 chunk `(k, h, w, 3)` before compression, returning
      uint8 `(k, H, W, 3)`, e.g. resizing to the training size and EtC encryption
      (researcher mode: JPEG must follow encryption, so both happen here on host).
    chunk: images transformed at a time.

  Returns:
    The compressed split; batches are decoded on the fly, without fancy upsampling.
  """
  blobs: list[bytes] = []
  shape = None
  with concurrent.futures.ThreadPoolExecutor() as pool:
    for start in range(0, len(images), chunk):
      x = np.asarray(transform(images.images(np.arange(start, min(start + chunk,
                                                                  len(images))))))
      shape = x.shape[1:]
      blobs.extend(pool.map(lambda im: codec.encode(im, "jpeg", quality=quality), x))
  return EncodedImageSet(blobs=blobs, labels=images.labels, image_shape=tuple(shape),
                         decode=decode_etc_image)
