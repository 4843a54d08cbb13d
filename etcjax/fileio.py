"""Atomic file output: a reader never sees a half-written file.

Everything etcjax writes for a user (encrypted images, key files, manifests, reports)
goes through `atomic_write`: the bytes go to a temporary file in the destination
folder, which is renamed over the destination only once complete.
"""

from __future__ import annotations

import contextlib
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


def write_bytes(path: str | os.PathLike, data: bytes, perms: int | None = None) -> None:
  """Writes `data` to `path` atomically."""
  with atomic_write(path, "wb", perms=perms) as f:
    f.write(data)


def write_text(path: str | os.PathLike, text: str, perms: int | None = None) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  with atomic_write(path, "w", perms=perms) as f:
    f.write(text)
