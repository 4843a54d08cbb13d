"""Data-owner subcommands: `keygen`, `encrypt`, `decrypt`, `compress-stats`.

    etcjax keygen OUT [--force]
    etcjax encrypt --key K INPUTS... --out DIR [--block-size 16] [--format png|jpeg]
                   [--quality 85] [--subsampling 4:2:0] [--jobs N]
    etcjax decrypt --key K INPUTS... --out DIR [--format png|jpeg] [--jpeg-decoder auto]
                   [--jobs N]
    etcjax compress-stats [INPUTS...] [--key K] [--block-size 16] [--csv F] [--json F]
                   [--jobs N]

INPUTS are image files and folders (searched recursively for image files; the folder
structure below each folder is kept in DIR). `encrypt` writes `etcjax-manifest.json` in
DIR with the key fingerprint, block size, format and every file's geometry (never the
key); `decrypt` refuses images whose manifest names another key. Grey, palette and CMYK
images are converted to RGB; images with alpha or more than 8 bits per channel, and sizes
that are not multiples of the block size, are refused. Each output file is written to a
temporary name and renamed when complete.

Folders are processed in parallel (`etcjax.parallel`: forked worker processes, each
reading, decoding, transforming a batch of same-sized images at once, encoding and writing
a chunk of files; `--jobs`, default all CPUs). Outputs are the same bytes whatever the
number of jobs. Every listed output is complete: after the last file, the filesystem is
synced once and only then the manifest is written (also after an error, listing exactly
the files written). An error names the bad file; nothing is written for files after it
in the same chunk, and chunks not yet started are skipped. The transform is
`etcjax.etc_np` (NumPy): nothing here imports JAX.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from etcjax import codec, etc_np, fileio, keys, parallel
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
  _add_jobs_arg(p)
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
  _add_jobs_arg(p)
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
  _add_jobs_arg(p)
  p.set_defaults(func=cmd_compress_stats)


def _add_jobs_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--jobs", type=int, default=0, metavar="N",
                 help="parallel worker processes (default 0: one per CPU; 1: none); the "
                 "outputs do not depend on it")


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
        rel_root = os.path.relpath(root, inp)  # once per folder, not per file
        for f in sorted(files):
          if f.lower().endswith(codec.IMAGE_EXTENSIONS) and not f.startswith(".tmp-"):
            found.append(Item(os.path.join(root, f),
                              f if rel_root == "." else os.path.join(rel_root, f)))
      if not found:
        raise UserError(f"{inp}: folder holds no image files "
                        f"({', '.join(codec.IMAGE_EXTENSIONS)})")
      items.extend(found)
    elif os.path.isfile(inp):
      items.append(Item(inp, os.path.basename(inp)))
    else:
      raise UserError(f"{inp}: no such file or folder")
  return items


def _plan_outputs(items: list[Item], out_dir: str, fmt: str) -> list[tuple[Item, str, str]]:
  """(item, output path, output path relative to `out_dir`) per item; refuses collisions."""
  seen: dict[str, str] = {}
  plan = []
  ext = codec.EXTENSIONS[fmt]
  for it in items:
    rel = os.path.splitext(it.rel)[0] + ext
    dst = os.path.join(out_dir, rel)
    if dst in seen:
      raise UserError(f"{it.src} and {seen[dst]} would both be written to {dst}")
    seen[dst] = it.src
    plan.append((it, dst, rel))
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


# Encrypt / decrypt: one task per file, run in chunks by `etcjax.parallel`.

# A worker transforms, encodes and writes its decoded images once they take this many
# bytes (or at the end of its chunk), so that chunks of large images stay small in memory.
_FLUSH_BYTES = 32 << 20


@dataclass(frozen=True)
class Task:
  """One file to transform: source path, output path, block size, output path in the manifest."""
  src: str
  dst: str
  block_size: int
  rel: str


@dataclass
class _Job:
  """Everything a worker needs for one encrypt/decrypt run (forked workers inherit it).

  `schedules` caches, per (H, W, B), the schedule to apply (the inverse for decryption).
  """
  key: keys.EtcKey
  decrypt: bool
  fmt: str
  quality: int
  subsampling: str
  jpeg_decoder: str = "pillow"
  schedules: dict = dataclasses.field(default_factory=dict)

  def schedule(self, h: int, w: int, b: int) -> etc_np.HostSchedule:
    s = self.schedules.get((h, w, b))
    if s is None:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", keys.KeySpaceWarning)  # reported by the parent
        s = self.key.host_schedule(h, w, b)
      if self.decrypt:
        s = s.inverse()
      self.schedules[(h, w, b)] = s
    return s


def _check_multiple(src: str, h: int, w: int, b: int) -> None:
  if h % b or w % b:
    raise UserError(f"{src}: size {h}x{w} is not a multiple of the block size {b}; crop or "
                    f"resize it (e.g. to {h - h % b or b}x{w - w % b or b}) first")


def transform_files(job: _Job, chunk: Sequence[Task]
                    ) -> tuple[list[tuple], parallel.ChunkError | None]:
  """Reads, en- or decrypts, encodes and writes `chunk`'s files, in order.

  Same-sized images are transformed as one (N, H, W, 3) uint8 batch (`etc_np.transform`:
  a handful of NumPy calls per block, whatever N). Each output is written atomically
  (`fileio.write_bytes`, no fsync: the command syncs the filesystem once at the end).
  Stops at the first file that fails; the files before it are written.

  Returns:
    ([(rel, H, W, B, bytes written)] for the files written, None or the failure).
  """
  done: list[tuple] = []
  pending: list[tuple[int, np.ndarray]] = []
  nbytes = 0
  for i, t in enumerate(chunk):
    try:
      img = codec.read_image(t.src, jpeg_decoder=job.jpeg_decoder)
      _check_multiple(t.src, img.shape[0], img.shape[1], t.block_size)
    except UserError as e:
      return done, _flush(job, chunk, pending, done) or parallel.ChunkError(i, str(e))
    pending.append((i, img))
    nbytes += img.nbytes
    if nbytes >= _FLUSH_BYTES:
      error = _flush(job, chunk, pending, done)
      if error is not None:
        return done, error
      pending, nbytes = [], 0
  return done, _flush(job, chunk, pending, done)


def _flush(job: _Job, chunk: Sequence[Task], pending: list[tuple[int, np.ndarray]],
           done: list[tuple]) -> parallel.ChunkError | None:
  """Transforms `pending` (batched by geometry), encodes and writes it in order."""
  groups: dict[tuple[int, int, int], list[int]] = {}
  for j, (i, img) in enumerate(pending):
    groups.setdefault((img.shape[0], img.shape[1], chunk[i].block_size), []).append(j)
  out: list = [None] * len(pending)
  for (h, w, b), members in groups.items():
    batch = np.stack([pending[j][1] for j in members])
    res = etc_np.transform(batch, job.schedule(h, w, b), (h // b, w // b))
    for k, j in enumerate(members):
      out[j] = res[k]
  for (i, img), enc in zip(pending, out, strict=True):
    t = chunk[i]
    try:
      data = codec.encode(enc, job.fmt, quality=job.quality, subsampling=job.subsampling)
      fileio.write_bytes(t.dst, data, sync=False)
    except OSError as e:
      return parallel.ChunkError(i, f"{t.dst}: cannot write ({e.strerror or e})")
    done.append((t.rel, img.shape[0], img.shape[1], t.block_size, len(data)))
  return None


def _make_sub_dirs(out_dir: str, tasks: Sequence[Task], made: list[str]) -> None:
  """Creates the output sub-folders; appends those it created to `made` (parents first)."""
  for d in sorted({os.path.dirname(t.dst) for t in tasks} - {out_dir}):
    missing = []
    p = d
    while p and p != out_dir and not os.path.isdir(p):
      missing.append(p)
      p = os.path.dirname(p)
    try:
      os.makedirs(d, exist_ok=True)
    except OSError as e:
      raise UserError(f"{d}: cannot create folder ({e.strerror or e})") from None
    made.extend(reversed(missing))


def _run(job: _Job, tasks: list[Task], out_dir: str, created: bool, jobs: int,
         on_results, finish, desc: str) -> None:
  """Runs `tasks`; then syncs and calls `finish(ok)` (also after a failure), cleans up."""
  made: list[str] = []
  ok = False
  wrote = [False]

  def record(results: list) -> None:
    wrote[0] = True
    on_results(results)

  try:
    _make_sub_dirs(out_dir, tasks, made)
    error = parallel.run_chunks(transform_files, tasks, job, jobs=jobs, on_results=record,
                                desc=desc)
    if error is not None:
      raise UserError(error.message)
    ok = True
  finally:
    if wrote[0]:
      fileio.sync_filesystem(out_dir)  # every output is on disk before its record
    finish(ok)
    if not ok:
      for d in reversed(made):
        _remove_if_empty(d)
      if created:
        _remove_if_empty(out_dir)


class _GeometryNotes:
  """Prints the key-space warning once per image geometry (parent process only)."""

  def __init__(self):
    self.seen: set = set()

  def __call__(self, h: int, w: int, b: int) -> None:
    if (h, w, b) not in self.seen:
      self.seen.add((h, w, b))
      if keys.keyspace_bits(h, w, b) < keys.MIN_KEYSPACE_BITS:
        _err("warning: " + keys.keyspace_message(h, w, b))


def cmd_encrypt(args: argparse.Namespace) -> int:
  b = args.block_size
  if b < 1:
    raise UserError(f"--block-size must be >= 1, got {b}")
  if not 1 <= args.quality <= 100:
    raise UserError(f"--quality must be in 1..100, got {args.quality}")
  jobs = parallel.resolve_jobs(args.jobs)
  if args.format == "jpeg" and b % 16:
    _err(f"warning: JPEG 4:2:0 MCUs are 16x16; block size {b} lets them straddle EtC blocks, "
         "which costs file size and quality")
  key = _load_key(args)
  items = collect_inputs(args.inputs)
  plan = _plan_outputs(items, args.out, args.format)
  created = _make_out_dir(args.out)
  manifest = read_manifest(args.out)
  files: dict[str, dict] = {}
  if manifest is not None:
    if manifest["fingerprint"] != key.fingerprint or manifest["block_size"] != b:
      if created:
        _remove_if_empty(args.out)
      raise UserError(f"{args.out} already holds images encrypted with key "
                      f"{manifest['fingerprint']} and block size {manifest['block_size']}; "
                      "choose another --out")
    files = dict(manifest["files"])
  tasks = [Task(it.src, dst, b, rel) for it, dst, rel in plan]
  notes = _GeometryNotes()

  def record(results: list) -> None:
    for rel, h, w, bs, nbytes in results:
      notes(h, w, bs)
      files[rel] = {"height": h, "width": w, "format": args.format, "bytes": nbytes}

  def finish(ok: bool) -> None:
    # Also after an error, so the folder describes exactly the files it holds.
    if files:
      write_manifest(args.out, key, b, args, files)

  job = _Job(key, decrypt=False, fmt=args.format, quality=args.quality,
             subsampling=args.subsampling)
  _run(job, tasks, args.out, created and manifest is None, jobs, record, finish, "encrypt")
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
  jobs = parallel.resolve_jobs(args.jobs)
  key = _load_key(args)
  items = collect_inputs(args.inputs)
  plan = _plan_outputs(items, args.out, args.format)
  tasks = _decrypt_tasks(args, key, plan)  # checks every manifest before any output
  if args.jpeg_decoder != "pillow" and any(t.src.lower().endswith((".jpg", ".jpeg"))
                                           for t in tasks):
    # TensorFlow decodes these ("nofancy"): load it once, here. With it loaded,
    # etcjax.parallel runs worker threads (sharing it) instead of forking processes that
    # would each import it.
    codec.nofancy_available()
  created = _make_out_dir(args.out)
  notes = _GeometryNotes()

  def record(results: list) -> None:
    for _, h, w, bs, _ in results:
      notes(h, w, bs)

  job = _Job(key, decrypt=True, fmt=args.format, quality=args.quality,
             subsampling=args.subsampling, jpeg_decoder=args.jpeg_decoder)
  _run(job, tasks, args.out, created, jobs, record, lambda ok: None, "decrypt")
  print(f"decrypted {len(plan)} image(s) into {args.out}")
  return 0


def _decrypt_tasks(args: argparse.Namespace, key: keys.EtcKey,
                   plan: list[tuple[Item, str, str]]) -> list[Task]:
  """The block size of every input from its manifest; refuses manifests of other keys."""
  # A folder input's manifest lives at its top; a file's next to it (or in a parent
  # folder when the file sits in a sub-folder of an encrypted tree).
  tops = {}
  for inp in args.inputs:
    if os.path.isdir(inp):
      tops[os.path.abspath(inp)] = read_manifest(inp)
  mcache: dict = {}
  by_dir: dict = {}  # input folder -> (manifest, its folder)
  checked: set = set()
  warned_missing = False
  tasks = []
  for it, dst, rel in plan:
    src_dir = os.path.dirname(it.src)
    if src_dir not in by_dir:
      doc, folder = None, None
      src = os.path.abspath(it.src)
      for top, tdoc in tops.items():
        if tdoc is not None and src.startswith(top + os.sep):
          doc, folder = tdoc, top
          break
      if folder is None:
        doc, folder = _manifest_for(it.src, mcache)
      by_dir[src_dir] = doc, folder
    doc, folder = by_dir[src_dir]
    if doc is not None:
      if folder not in checked:
        _check_manifest_key(doc, folder, key, args.key)
        checked.add(folder)
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
    tasks.append(Task(it.src, dst, b, rel))
  return tasks


def cmd_compress_stats(args: argparse.Namespace) -> int:
  b = args.block_size
  if b < 1:
    raise UserError(f"--block-size must be >= 1, got {b}")
  jobs = parallel.resolve_jobs(args.jobs)
  if args.key:
    key = keys.EtcKey.load(args.key, force=args.force_key)
  else:
    key = keys.EtcKey.generate()
  if args.inputs:
    images: list = [it.src for it in collect_inputs(args.inputs)]
  else:
    from etcjax import samples

    images = list(samples.load_all(multiple=b).values())
  notes = _GeometryNotes()
  rows = codec.size_table(images, key=key, block_size=b, subsampling=args.subsampling,
                          progress=True, jobs=jobs, on_geometry=lambda h, w: notes(h, w, b))
  print(codec.format_size_table(rows, len(images)))
  print(f"key {key.fingerprint}, block size {b}, JPEG subsampling {args.subsampling}")
  if args.csv:
    import csv

    buf = io.StringIO()
    wr = csv.writer(buf)
    wr.writerow(["setting", "plain_bytes", "etc_bytes", "etc_overhead"])
    for r in rows:
      wr.writerow([r.setting, r.plain_bytes, r.etc_bytes, f"{r.etc_overhead:.6f}"])
    _write_text(args.csv, buf.getvalue())
  if args.json:
    doc = {"num_images": len(images), "block_size": b, "subsampling": args.subsampling,
           "key_fingerprint": key.fingerprint, "rows": [r.as_dict() for r in rows]}
    _write_text(args.json, json.dumps(doc, indent=1) + "\n")
  return 0


def _write_text(path: str, text: str) -> None:
  try:
    fileio.write_text(path, text)
  except OSError as e:
    raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
