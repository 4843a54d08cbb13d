"""Data-owner subcommands: `keygen`, `encrypt`, `decrypt`, `compress-stats`.

    etcjax keygen OUT [--force]
    etcjax encrypt --key K INPUTS... --out DIR [--block-size 16] [--format png|jpeg]
                   [--quality 85] [--subsampling 4:2:0]
    etcjax decrypt --key K INPUTS... --out DIR [--format png|jpeg] [--jpeg-decoder auto]
    etcjax compress-stats [INPUTS...] [--key K] [--block-size 16] [--csv F] [--json F]

INPUTS are image files and folders (searched recursively for image files; the folder
structure below each folder is kept in DIR). `encrypt` writes `etcjax-manifest.json` in
DIR with the key fingerprint, block size, format and every file's geometry (never the
key); `decrypt` refuses images whose manifest names another key. Grey, palette and CMYK
images are converted to RGB; images with alpha or more than 8 bits per channel, and sizes
that are not multiples of the block size, are refused. Each output file is written to a
temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np

from etcjax import codec, etc, fileio, keys
from etcjax.errors import KeyMismatchError, UserError

MANIFEST_NAME = "etcjax-manifest.json"
MANIFEST_FORMAT = "etcjax-manifest"
MANIFEST_VERSION = 1
SCHEME = "etc/v1"
OUTPUT_FORMATS = ("png", "jpeg")


def register(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
      "keygen", help="create a secret key file (mode 0600)",
      description="Create a random 32-byte EtC key and write it to OUT with mode 0600. "
      "Prints the key's fingerprint (never the key).")
  p.add_argument("out", metavar="OUT", help="key file to create")
  p.add_argument("--force", action="store_true", help="overwrite an existing file")
  p.set_defaults(func=cmd_keygen)

  p = subparsers.add_parser(
      "encrypt", help="EtC-encrypt image files and folders",
      description="EtC-encrypt images with a key (block scrambling, rotation/flip, "
      "negative-positive and channel shuffling; DESIGN.md). Folder structure is kept and "
      f"DIR/{MANIFEST_NAME} records the key fingerprint, block size and geometry.")
  _add_key_args(p)
  p.add_argument("inputs", nargs="+", metavar="INPUTS", help="image files or folders")
  p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
  p.add_argument("--block-size", type=int, default=16, help="EtC block size (default 16, "
                 "the JPEG 4:2:0 MCU)")
  _add_format_args(p, default_format="png")
  p.set_defaults(func=cmd_encrypt)

  p = subparsers.add_parser(
      "decrypt", help="decrypt EtC images made by `etcjax encrypt`",
      description="Decrypt EtC images. The block size comes from the manifest next to "
      "the images (or --block-size); a manifest made with another key is refused.")
  _add_key_args(p)
  p.add_argument("inputs", nargs="+", metavar="INPUTS", help="encrypted files or folders")
  p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
  p.add_argument("--block-size", type=int, default=None,
                 help="block size when there is no manifest (default 16)")
  _add_format_args(p, default_format="png")
  p.add_argument("--jpeg-decoder", choices=codec.JPEG_DECODERS, default="auto",
                 help="JPEG decoder for encrypted JPEG inputs: 'nofancy' (TensorFlow, no "
                 "chroma blending across blocks; best PSNR), 'pillow', or 'auto' (nofancy "
                 "if available)")
  p.set_defaults(func=cmd_decrypt)

  p = subparsers.add_parser(
      "compress-stats", help="file sizes of plain vs EtC images (the paper's Table IV)",
      description="Total bytes of plain vs EtC images under JPEG QF 85 and 80, JPEG-LS, "
      "JPEG 2000, PNG and uncompressed. Without INPUTS, uses the photos bundled with "
      "scikit-image and scikit-learn. Without --key, uses a fresh random key.")
  p.add_argument("inputs", nargs="*", metavar="INPUTS", help="image files or folders")
  p.add_argument("--key", metavar="K", help="key file (default: a fresh random key)")
  p.add_argument("--force-key", action="store_true",
                 help="accept a key file readable by other users")
  p.add_argument("--block-size", type=int, default=16, help="EtC block size (default 16)")
  p.add_argument("--subsampling", choices=tuple(codec.SUBSAMPLINGS), default="4:2:0",
                 help="JPEG chroma subsampling (default 4:2:0)")
  p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
  p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
  p.set_defaults(func=cmd_compress_stats)


def _add_key_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--key", required=True, metavar="K", help="key file from `etcjax keygen`")
  p.add_argument("--force-key", action="store_true",
                 help="accept a key file readable by other users")


def _add_format_args(p: argparse.ArgumentParser, default_format: str) -> None:
  p.add_argument("--format", choices=OUTPUT_FORMATS, default=default_format,
                 help=f"output format (default {default_format}; jpeg is lossy)")
  p.add_argument("--quality", type=int, default=85, help="JPEG quality 1..100 (default 85)")
  p.add_argument("--subsampling", choices=tuple(codec.SUBSAMPLINGS), default="4:2:0",
                 help="JPEG chroma subsampling (default 4:2:0)")


def _err(msg: str) -> None:
  print(f"etcjax: {msg}", file=sys.stderr)


# Inputs and outputs.

@dataclass(frozen=True)
class Item:
  """One input file and its path relative to the output folder."""
  src: str
  rel: str


def collect_inputs(inputs: list[str]) -> list[Item]:
  """Expands files and folders (recursively, image extensions only) into Items.

  A file keeps its base name; a folder's files keep their paths below that folder.
  """
  items: list[Item] = []
  for inp in inputs:
    if os.path.isdir(inp):
      found = []
      for root, dirs, files in os.walk(inp):
        dirs.sort()
        for f in sorted(files):
          if f.lower().endswith(codec.IMAGE_EXTENSIONS) and not f.startswith(".tmp-"):
            path = os.path.join(root, f)
            found.append(Item(path, os.path.relpath(path, inp)))
      if not found:
        raise UserError(f"{inp}: folder holds no image files "
                        f"({', '.join(codec.IMAGE_EXTENSIONS)})")
      items.extend(found)
    elif os.path.isfile(inp):
      items.append(Item(inp, os.path.basename(inp)))
    else:
      raise UserError(f"{inp}: no such file or folder")
  return items


def _output_path(out_dir: str, rel: str, fmt: str) -> str:
  return os.path.join(out_dir, os.path.splitext(rel)[0] + codec.EXTENSIONS[fmt])


def _plan_outputs(items: list[Item], out_dir: str, fmt: str) -> list[tuple[Item, str]]:
  seen: dict[str, str] = {}
  plan = []
  for it in items:
    dst = _output_path(out_dir, it.rel, fmt)
    if dst in seen:
      raise UserError(f"{it.src} and {seen[dst]} would both be written to {dst}")
    seen[dst] = it.src
    plan.append((it, dst))
  return plan


def _make_out_dir(out_dir: str) -> bool:
  """Creates `out_dir` if needed; returns whether this call created it."""
  created = not os.path.isdir(out_dir)
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create output folder {out_dir}: {e.strerror or e}") from None
  if not os.access(out_dir, os.W_OK | os.X_OK):
    raise UserError(f"output folder {out_dir} is not writable")
  return created


def _remove_if_empty(folder: str) -> None:
  """Removes a folder this command created when a failure left nothing in it."""
  with contextlib.suppress(OSError):
    os.rmdir(folder)


def _write(dst: str, img: np.ndarray, args: argparse.Namespace) -> int:
  try:
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    return codec.write_image(dst, img, args.format, quality=args.quality,
                             subsampling=args.subsampling)
  except OSError as e:
    raise UserError(f"{dst}: cannot write ({e.strerror or e})") from None


def _progress(iterable, total: int, desc: str):
  from tqdm import tqdm

  # disable=None: a bar on a terminal, silent in pipes and logs.
  return tqdm(iterable, total=total, desc=desc, unit="img", disable=None if total > 1 else True,
              file=sys.stderr)


def _load_key(args: argparse.Namespace) -> keys.EtcKey:
  return keys.EtcKey.load(args.key, force=args.force_key)


# Manifests.

def read_manifest(folder: str) -> dict | None:
  """The manifest in `folder`, or None when there is none."""
  path = os.path.join(folder, MANIFEST_NAME)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: cannot read manifest ({e})") from None
  if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
    raise UserError(f"{path} is not an etcjax manifest")
  if doc.get("version") != MANIFEST_VERSION or doc.get("scheme") != SCHEME:
    raise UserError(f"{path}: unsupported manifest version {doc.get('version')!r} / scheme "
                    f"{doc.get('scheme')!r} (this etcjax reads version {MANIFEST_VERSION}, "
                    f"scheme {SCHEME})")
  for field in ("fingerprint", "block_size", "files"):
    if field not in doc:
      raise UserError(f"{path}: manifest has no {field!r}")
  return doc


def _check_manifest_key(doc: dict, folder: str, key: keys.EtcKey, key_path: str) -> None:
  if doc["fingerprint"] != key.fingerprint:
    raise KeyMismatchError(
        f"{os.path.join(folder, MANIFEST_NAME)}: images were encrypted with the key of "
        f"fingerprint {doc['fingerprint']}, but {key_path} has fingerprint {key.fingerprint}")


def write_manifest(out_dir: str, key: keys.EtcKey, block_size: int, args: argparse.Namespace,
                   files: dict[str, dict]) -> None:
  doc = {
      "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "scheme": SCHEME,
      "fingerprint": key.fingerprint, "block_size": block_size,
      "image_format": args.format,
      "jpeg": ({"quality": args.quality, "subsampling": args.subsampling}
               if args.format == "jpeg" else None),
      "files": dict(sorted(files.items())),
  }
  fileio.write_text(os.path.join(out_dir, MANIFEST_NAME), json.dumps(doc, indent=1) + "\n")


# Commands.

def cmd_keygen(args: argparse.Namespace) -> int:
  key = keys.EtcKey.generate()
  key.save(args.out, overwrite=args.force)
  print(f"wrote key {args.out} (mode 0600), fingerprint {key.fingerprint}")
  return 0


def _schedule(cache: dict, key: keys.EtcKey, h: int, w: int, b: int, src: str) -> etc.Schedule:
  if (h, w) not in cache:
    if h % b or w % b:
      raise UserError(f"{src}: size {h}x{w} is not a multiple of the block size {b}; crop or "
                      f"resize it (e.g. to {h - h % b or b}x{w - w % b or b}) first")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", keys.KeySpaceWarning)
      cache[(h, w)] = key.schedule(h, w, b)
    if keys.keyspace_bits(h, w, b) < keys.MIN_KEYSPACE_BITS:
      _err("warning: " + keys.keyspace_message(h, w, b))
  return cache[(h, w)]


def cmd_encrypt(args: argparse.Namespace) -> int:
  b = args.block_size
  if b < 1:
    raise UserError(f"--block-size must be >= 1, got {b}")
  if not 1 <= args.quality <= 100:
    raise UserError(f"--quality must be in 1..100, got {args.quality}")
  if args.format == "jpeg" and b % 16:
    _err(f"warning: JPEG 4:2:0 MCUs are 16x16; block size {b} lets them straddle EtC blocks, "
         "which costs file size and quality")
  key = _load_key(args)
  items = collect_inputs(args.inputs)
  created = _make_out_dir(args.out)
  manifest = read_manifest(args.out)
  files: dict[str, dict] = {}
  if manifest is not None:
    if manifest["fingerprint"] != key.fingerprint or manifest["block_size"] != b:
      raise UserError(f"{args.out} already holds images encrypted with key "
                      f"{manifest['fingerprint']} and block size {manifest['block_size']}; "
                      "choose another --out")
    files = dict(manifest["files"])
  plan = _plan_outputs(items, args.out, args.format)
  cache: dict = {}
  try:
    for it, dst in _progress(plan, len(plan), "encrypt"):
      img = codec.read_image(it.src)
      h, w = img.shape[:2]
      out = etc.encrypt(img, _schedule(cache, key, h, w, b, it.src))
      nbytes = _write(dst, out, args)
      files[os.path.relpath(dst, args.out)] = {"height": h, "width": w, "format": args.format,
                                                "bytes": nbytes}
  finally:
    # Also after an error, so the folder describes exactly the files it holds.
    if files:
      write_manifest(args.out, key, b, args, files)
    elif created:
      _remove_if_empty(args.out)
  print(f"encrypted {len(plan)} image(s) into {args.out} with key {key.fingerprint}, "
        f"block size {b}")
  return 0


def _manifest_for(src: str, cache: dict) -> tuple[dict | None, str]:
  """The manifest next to `src` or in the nearest parent folder holding one."""
  folder = os.path.dirname(os.path.abspath(src))
  while True:
    if folder not in cache:
      cache[folder] = read_manifest(folder)
    parent = os.path.dirname(folder)
    if cache[folder] is not None or parent == folder:
      return cache[folder], folder
    folder = parent


def cmd_decrypt(args: argparse.Namespace) -> int:
  if args.block_size is not None and args.block_size < 1:
    raise UserError(f"--block-size must be >= 1, got {args.block_size}")
  if not 1 <= args.quality <= 100:
    raise UserError(f"--quality must be in 1..100, got {args.quality}")
  key = _load_key(args)
  items = collect_inputs(args.inputs)
  # A folder input's manifest lives at its top; a file's next to it (or in a parent
  # folder when the file sits in a sub-folder of an encrypted tree).
  tops = {}
  for inp in args.inputs:
    if os.path.isdir(inp):
      tops[os.path.abspath(inp)] = read_manifest(inp)
  created = _make_out_dir(args.out)
  try:
    _decrypt_all(args, key, items, tops)
  except BaseException:
    if created:
      _remove_if_empty(args.out)
    raise
  return 0


def _decrypt_all(args: argparse.Namespace, key: keys.EtcKey, items: list[Item],
                 tops: dict) -> None:
  plan = _plan_outputs(items, args.out, args.format)
  mcache: dict = {}
  scache: dict = {}
  warned_missing = False
  for it, dst in _progress(plan, len(plan), "decrypt"):
    doc, folder = None, None
    for top, tdoc in tops.items():
      if tdoc is not None and os.path.abspath(it.src).startswith(top + os.sep):
        doc, folder = tdoc, top
        break
    if folder is None:
      doc, folder = _manifest_for(it.src, mcache)
    if doc is not None:
      _check_manifest_key(doc, folder, key, args.key)
      b = int(doc["block_size"])
      if args.block_size is not None and args.block_size != b:
        raise UserError(f"--block-size {args.block_size} contradicts the manifest in {folder} "
                        f"(block size {b})")
    else:
      b = args.block_size or 16
      if not warned_missing:
        _err(f"warning: no {MANIFEST_NAME} next to {it.src}: cannot check the key; assuming "
             f"block size {b}")
        warned_missing = True
    img = codec.read_image(it.src, jpeg_decoder=args.jpeg_decoder)
    h, w = img.shape[:2]
    _write(dst, etc.decrypt(img, _schedule(scache, key, h, w, b, it.src)), args)
  print(f"decrypted {len(plan)} image(s) into {args.out}")


def cmd_compress_stats(args: argparse.Namespace) -> int:
  from etcjax import samples

  b = args.block_size
  if args.key:
    key = keys.EtcKey.load(args.key, force=args.force_key)
  else:
    key = keys.EtcKey.generate()
  if args.inputs:
    imgs = {}
    for it in collect_inputs(args.inputs):
      img = codec.read_image(it.src)
      h, w = img.shape[:2]
      if h % b or w % b:
        raise UserError(f"{it.src}: size {h}x{w} is not a multiple of the block size {b}")
      imgs[it.src] = img
  else:
    imgs = samples.load_all(multiple=b)
  for h, w in sorted({im.shape[:2] for im in imgs.values()}):
    if keys.keyspace_bits(h, w, b) < keys.MIN_KEYSPACE_BITS:
      _err("warning: " + keys.keyspace_message(h, w, b))
  rows = codec.size_table(imgs.values(), key=key, block_size=b, subsampling=args.subsampling,
                          progress=True)
  print(codec.format_size_table(rows, len(imgs)))
  print(f"key {key.fingerprint}, block size {b}, JPEG subsampling {args.subsampling}")
  if args.csv:
    buf = io.StringIO()
    wr = csv.writer(buf)
    wr.writerow(["setting", "plain_bytes", "etc_bytes", "etc_overhead"])
    for r in rows:
      wr.writerow([r.setting, r.plain_bytes, r.etc_bytes, f"{r.etc_overhead:.6f}"])
    _write_text(args.csv, buf.getvalue())
  if args.json:
    doc = {"num_images": len(imgs), "block_size": b, "subsampling": args.subsampling,
           "key_fingerprint": key.fingerprint, "rows": [r.as_dict() for r in rows]}
    _write_text(args.json, json.dumps(doc, indent=1) + "\n")
  return 0


def _write_text(path: str, text: str) -> None:
  try:
    fileio.write_text(path, text)
  except OSError as e:
    raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
