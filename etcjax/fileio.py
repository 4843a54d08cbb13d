"""Atomic file output: a reader never sees a half-written file.

Everything etcjax writes for a user (encrypted images, key files, manifests, reports)
goes through `atomic_write` or `write_bytes` / `write_text`: the bytes go to a temporary
file (`.tmp-...`) in the destination folder, which is renamed over the destination only
once complete.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", perms: int | None = None
                 ) -> Iterator[IO]:
  """Opens a temporary file next to `path`; renames it to `path` on success.

  Args:
    path: destination file. Its folder must exist.
    mode: "wb" or "w".
    perms: file mode bits (e.g. 0o600 for key files), set before any byte is written.
      Default: what `open()` would give a new file (0o666 minus the umask), since
      `tempfile.mkstemp` itself always creates 0o600 files.

  On any exception the temporary file is removed and `path` is left untouched.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path)[-16:], dir=folder)
  try:
    os.fchmod(fd, _default_perms() if perms is None else perms)
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def _default_perms() -> int:
  umask = os.umask(0o022)  # reading the umask means setting it; restore at once
  os.umask(umask)
  return 0o666 & ~umask


_TMP_COUNTER = itertools.count()
_OPEN_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_BINARY", 0))


def write_bytes(path: str | os.PathLike, data: bytes, perms: int | None = None,
                sync: bool = True) -> None:
  """Writes `data` to `path` atomically (a temporary file renamed over `path`).

  Args:
    path: destination file. Its folder must exist.
    data: the bytes.
    perms: file mode bits; default 0o666 minus the umask.
    sync: fsync the file before the rename, so that it is on disk once `path` exists.
      Folder commands writing many files pass False and call `sync_filesystem` once
      before writing the record of what they wrote (a per-file fsync costs more than
      encoding a small image).

  On any exception the temporary file is removed and `path` is left untouched.
  """
  path = os.fspath(path)
  folder, name = os.path.split(path)
  # pid and a counter make the name unique across processes and threads; O_EXCL refuses
  # anything already there.
  tmp = os.path.join(folder, f".tmp-{os.getpid()}-{next(_TMP_COUNTER)}-{name[-16:]}")
  fd = os.open(tmp, _OPEN_FLAGS, 0o600 if perms is not None else 0o666)
  try:
    try:
      if perms is not None:
        os.fchmod(fd, perms)
      view = memoryview(data)
      while view:
        view = view[os.write(fd, view):]
      if sync:
        os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def sync_filesystem(path: str | os.PathLike) -> None:
  """Flushes every written file of the filesystem holding `path` to disk.

  Linux `syncfs(2)` on that filesystem; elsewhere `os.sync()` (all filesystems).
  """
  try:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
      if libc.syncfs(fd) == 0:
        return
    finally:
      os.close(fd)
  except (OSError, AttributeError):
    pass
  if hasattr(os, "sync"):
    os.sync()


def write_text(path: str | os.PathLike, text: str, perms: int | None = None) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  with atomic_write(path, "w", perms=perms) as f:
    f.write(text)
