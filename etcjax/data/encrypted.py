"""Cloud mode: a labelled folder of EtC images written by `etcjax encrypt`, read with no key.

The data owner runs

    etcjax encrypt --key owner.key DATA --out ENC [--format jpeg --quality 85]

on `DATA/<split>/<class>/<image>` (split `train` and `test` / `validation` / `val`);
`etcjax encrypt` keeps the folder layout and writes `ENC/etcjax-manifest.json` with the
key's fingerprint, the block size, the image format and every file's geometry (never the
key). The trainer reads `encrypted:ENC`: the images are used exactly as stored (no
resizing: that would destroy the block structure), and the manifest's fingerprint
identifies the key in the run's metrics and checkpoints, so that evaluating with data
of another key fails loudly.

Files are kept compressed in memory and decoded per batch (JPEG without fancy chroma
upsampling, `etcjax.codec`).
"""

from __future__ import annotations

import concurrent.futures
import os

from etcjax.commands import owner
from etcjax.data import sources
from etcjax.errors import UserError

# Scheme names of `etcjax encrypt` manifests -> `config.encryption` names.
_SCHEMES = {owner.SCHEME: "etc"}


def read_manifest(root: str) -> dict:
  """The manifest of an encrypted folder; UserError if there is none."""
  if not os.path.isdir(root):
    raise UserError(f"config.dataset=encrypted:{root}: no such folder")
  doc = owner.read_manifest(root)
  if doc is None:
    raise UserError(f"{root} has no {owner.MANIFEST_NAME}; make it with `etcjax encrypt "
                    f"--key KEY DATA --out {root}`")
  return doc


def load(root: str, shard: tuple[int, int] = (0, 1), train: bool = True) -> sources.Dataset:
  """Loads this process's share of the train and eval splits of an encrypted folder.

  Raises:
    UserError: no manifest, images the manifest does not list, or images of different
      sizes.
  """
  doc = read_manifest(root)
  index, count = shard
  # Class ids come from the train split's folders, also when only evaluating.
  train_files, train_labels, class_names = sources.list_labelled_files(
      sources.find_split_dir(root, "train"))
  eval_files, eval_labels, _ = sources.list_labelled_files(
      sources.find_split_dir(root, "eval"), class_names)
  shapes = set()
  for path in train_files + eval_files:
    meta = doc["files"].get(os.path.relpath(path, root))
    if meta is None:
      raise UserError(f"{path} is not listed in {root}/{owner.MANIFEST_NAME}: it was not "
                      f"encrypted into this folder")
    shapes.add((meta["height"], meta["width"], 3))
  if len(shapes) != 1:
    raise UserError(f"{root} holds images of several sizes "
                    f"({', '.join(f'{h}x{w}' for h, w, _ in sorted(shapes))}); training needs "
                    f"one size")
  (shape,) = shapes

  def image_set(files, labels):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      blobs = list(pool.map(_read_bytes, files[index::count]))
    return sources.EncodedImageSet(blobs=blobs, labels=labels[index::count],
                                   image_shape=shape, decode=sources.decode_etc_image)

  scheme = _SCHEMES.get(doc.get("scheme"), doc.get("scheme"))
  return sources.Dataset(
      name=f"encrypted:{root}",
      train=image_set(train_files, train_labels) if train else None,
      eval=image_set(eval_files, eval_labels), class_names=class_names,
      encrypted=sources.EncryptedInfo(scheme=scheme, key_fingerprint=doc["fingerprint"],
                                      block_size=int(doc["block_size"])))


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
