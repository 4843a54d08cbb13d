"""Secret keys -> per-geometry EtC key schedules; key files; fingerprints.

A key is 32 secret bytes (`secrets.token_bytes`). Everything keyed in etcjax is derived
from it deterministically with SHAKE-256, so that outside tools can reimplement the
derivation bit for bit from this docstring alone.

Key stream (`EtcKey.stream(domain)`)
-----------------------------------
    M      = b"etcjax-kdf-v1" || 0x00 || key (32 bytes) || domain (UTF-8)
    stream = SHAKE-256(M), read as one infinite byte string, consumed front to back.

Domains never contain a NUL byte, so `M` is unambiguous. Two helpers consume the stream:

* `randbelow(bound, size)`: `size` integers uniform in `[0, bound)`, by rejection
  sampling. Let `L = (bound - 1).bit_length()`, `k = ceil(L / 8)`. Each candidate is the
  next `k` stream bytes read as a big-endian unsigned integer, masked to its low `L` bits;
  it is accepted if `< bound`, otherwise discarded and the next candidate is read.
  `bound == 1` consumes nothing and gives zeros.
* `permutation(n)`: Fisher–Yates. Start from `a = [0, 1, ..., n-1]`; for `i = n-1` down
  to `1`: `j = randbelow(i + 1)` (one value, as above), swap `a[i]` and `a[j]`.

EtC schedule (`EtcKey.schedule(H, W, B)`)
-----------------------------------------
With `D = "etcjax/etc/v1/H={H},W={W},B={B}"` (decimal integers, no spaces) and
`n = (H/B) * (W/B)`, each field has its own stream:

    perm    = stream(D + "/perm").permutation(n)
    rotflip = stream(D + "/rotflip").randbelow(8, n)
    negpos  = stream(D + "/negpos").randbelow(2, n)
    chperm  = stream(D + "/chperm").randbelow(6, n)

The meaning of the fields is the normative table in DESIGN.md (see `etcjax.etc`). Other
schemes derive their keys with their own domains, e.g. "etcjax/le/v1/H=32,W=32,B=4".

Fingerprint
-----------
    fingerprint = SHA-256(b"etcjax-fingerprint-v1" || 0x00 || key).hexdigest()[:16]

It identifies a key (datasets, manifests and checkpoints carry it) without revealing it.

Key file
--------
UTF-8 JSON, written with mode 0600 through `etcjax.fileio`:
`{"format": "etcjax-key", "version": 1, "key": "<64 hex digits>", "fingerprint": "<16 hex>"}`.
`EtcKey.load` refuses files readable or writable by group or others unless `force=True`.

Insecure mode
-------------
`EtcKey.insecure_from_seed(seed)` (experiments and tests only, e.g. many keys for attack
training) sets `key = SHAKE-256(b"etcjax-insecure-seed-v1" || 0x00 || str(seed)).digest(32)`.
Anyone who knows or guesses the seed has the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import stat
import warnings

import numpy as np

from etcjax import fileio
from etcjax.errors import UserError

KEY_BYTES = 32
KEY_FILE_FORMAT = "etcjax-key"
KEY_FILE_VERSION = 1
ETC_SCHEME_VERSION = 1
# Below this many bits of key space the tools warn: brute force becomes conceivable.
MIN_KEYSPACE_BITS = 128.0

_KDF_PREFIX = b"etcjax-kdf-v1\x00"
_FINGERPRINT_PREFIX = b"etcjax-fingerprint-v1\x00"
_INSECURE_PREFIX = b"etcjax-insecure-seed-v1\x00"


class KeySpaceWarning(UserWarning):
  """The key space of a geometry is small enough to brute-force (< 128 bits)."""


class KeyStream:
  """A deterministic byte stream: SHAKE-256 of (prefix, key, domain); see module doc.

  Not thread-safe: each helper call consumes bytes from the current position.
  """

  def __init__(self, key_bytes: bytes, domain: str):
    if "\x00" in domain:
      raise ValueError("key-stream domain must not contain NUL characters")
    self._xof = hashlib.shake_256(_KDF_PREFIX + key_bytes + domain.encode("utf-8"))
    self._buf = b""
    self._pos = 0

  def read(self, nbytes: int) -> bytes:
    """Returns the next `nbytes` bytes of the stream."""
    end = self._pos + nbytes
    if end > len(self._buf):
      # SHAKE output is a prefix-stable XOF: a longer digest extends a shorter one.
      self._buf = self._xof.digest(max(2 * len(self._buf), end, 256))
    out = self._buf[self._pos:end]
    self._pos = end
    return out

  def randbelow(self, bound: int, size: int) -> np.ndarray:
    """`size` unbiased integers in [0, bound) (rejection sampling); int64 array (size,)."""
    bound, size = int(bound), int(size)
    if bound < 1:
      raise ValueError(f"randbelow bound must be >= 1, got {bound}")
    if size < 0:
      raise ValueError(f"randbelow size must be >= 0, got {size}")
    if bound == 1:
      return np.zeros(size, np.int64)
    nbits = (bound - 1).bit_length()
    if nbits > 62:
      raise ValueError(f"randbelow bound {bound} is too large (at most 2**62)")
    k = (nbits + 7) // 8
    mask = (1 << nbits) - 1
    out = np.empty(size, np.int64)
    filled = 0
    while filled < size:
      # Reading exactly as many candidates as values still needed consumes the stream
      # exactly like the one-candidate-at-a-time description in the module docstring.
      need = size - filled
      raw = np.frombuffer(self.read(need * k), np.uint8).reshape(need, k).astype(np.int64)
      cand = np.zeros(need, np.int64)
      for col in range(k):
        cand = (cand << 8) | raw[:, col]
      cand &= mask
      ok = cand[cand < bound]
      out[filled:filled + ok.size] = ok
      filled += ok.size
    return out

  def permutation(self, n: int) -> np.ndarray:
    """A uniformly random permutation of 0..n-1 (Fisher–Yates); int64 array (n,)."""
    n = int(n)
    if n < 0:
      raise ValueError(f"permutation size must be >= 0, got {n}")
    a = list(range(n))
    for i in range(n - 1, 0, -1):
      j = int(self.randbelow(i + 1, 1)[0])
      a[i], a[j] = a[j], a[i]
    return np.asarray(a, np.int64)


def _check_geometry(height: int, width: int, block_size: int) -> tuple[int, int]:
  for name, v in (("height", height), ("width", width), ("block_size", block_size)):
    if int(v) != v or v < 1:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  if height % block_size or width % block_size:
    raise ValueError(f"image size {height}x{width} is not a multiple of the block size "
                     f"{block_size}")
  return height // block_size, width // block_size


def keyspace_bits(height: int, width: int, block_size: int = 16) -> float:
  """log2(n! * 8^n * 2^n * 6^n) for n = (H/B)*(W/B) blocks: the EtC key space in bits."""
  rows, cols = _check_geometry(height, width, block_size)
  n = rows * cols
  return math.lgamma(n + 1) / math.log(2) + n * (3 + 1 + math.log2(6))


def check_keyspace(height: int, width: int, block_size: int = 16, stacklevel: int = 2) -> float:
  """Returns `keyspace_bits`; warns (`KeySpaceWarning`) when it is below 128 bits."""
  bits = keyspace_bits(height, width, block_size)
  if bits < MIN_KEYSPACE_BITS:
    warnings.warn(keyspace_message(height, width, block_size), KeySpaceWarning,
                  stacklevel=stacklevel)
  return bits


def keyspace_message(height: int, width: int, block_size: int = 16) -> str:
  """One line describing the key space of a geometry (and whether it is weak)."""
  bits = keyspace_bits(height, width, block_size)
  n = (height // block_size) * (width // block_size)
  msg = (f"EtC key space for {height}x{width} images with block size {block_size} "
         f"({n} blocks) is {bits:.1f} bits")
  if bits < MIN_KEYSPACE_BITS:
    msg += (f", below {MIN_KEYSPACE_BITS:.0f} bits: the key can be brute-forced; use larger "
            "images or a smaller block size where secrecy matters")
  return msg


def etc_domain(height: int, width: int, block_size: int = 16) -> str:
  """The key-stream domain of the EtC schedule for one geometry."""
  return f"etcjax/etc/v{ETC_SCHEME_VERSION}/H={height},W={width},B={block_size}"


class EtcKey:
  """A 32-byte secret key. `repr` and `str` show only the fingerprint."""

  __slots__ = ("_bytes", "_insecure")

  def __init__(self, key_bytes: bytes, *, insecure: bool = False):
    if not isinstance(key_bytes, bytes | bytearray) or len(key_bytes) != KEY_BYTES:
      raise ValueError(f"an EtC key is exactly {KEY_BYTES} bytes")
    self._bytes = bytes(key_bytes)
    self._insecure = insecure

  @classmethod
  def generate(cls) -> EtcKey:
    """A fresh random key from the operating system's CSPRNG."""
    return cls(secrets.token_bytes(KEY_BYTES))

  @classmethod
  def from_bytes(cls, key_bytes: bytes) -> EtcKey:
    """Wraps exactly 32 bytes of key material."""
    return cls(key_bytes)

  @classmethod
  def insecure_from_seed(cls, seed: int) -> EtcKey:
    """INSECURE deterministic key from an integer seed, for experiments and tests only."""
    if int(seed) != seed:
      raise ValueError(f"seed must be an integer, got {seed!r}")
    digest = hashlib.shake_256(_INSECURE_PREFIX + str(int(seed)).encode()).digest(KEY_BYTES)
    return cls(digest, insecure=True)

  @property
  def insecure(self) -> bool:
    """True for keys made by `insecure_from_seed`."""
    return self._insecure

  @property
  def fingerprint(self) -> str:
    """16 hex digits identifying the key (see module doc); safe to log and store."""
    return hashlib.sha256(_FINGERPRINT_PREFIX + self._bytes).hexdigest()[:16]

  def to_bytes(self) -> bytes:
    """The raw secret. Handle with care: never log or store it outside a key file."""
    return self._bytes

  def __repr__(self) -> str:
    tag = ", insecure" if self._insecure else ""
    return f"EtcKey(fingerprint={self.fingerprint}{tag})"

  __str__ = __repr__

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, EtcKey):
      return NotImplemented
    return hmac.compare_digest(self._bytes, other._bytes)

  def __hash__(self) -> int:
    return hash(self.fingerprint)

  def __reduce__(self):
    # Pickling would copy the secret into checkpoints or process pools silently.
    raise TypeError("EtcKey cannot be pickled; pass the key file path instead")

  def stream(self, domain: str) -> KeyStream:
    """A fresh deterministic key stream for `domain` (see module doc)."""
    return KeyStream(self._bytes, domain)

  def schedule(self, height: int, width: int, block_size: int = 16):
    """The EtC schedule (`etcjax.etc.Schedule`, a JAX pytree) of this key for one geometry.

    Warns with `KeySpaceWarning` when the geometry's key space is below 128 bits.
    """
    from etcjax import etc  # etc imports jax; keep `import etcjax.keys` light.

    check_keyspace(height, width, block_size, stacklevel=3)
    return etc.Schedule(**self._schedule_fields(height, width, block_size))

  def host_schedule(self, height: int, width: int, block_size: int = 16):
    """The same schedule as `schedule`, as an `etcjax.etc_np.HostSchedule` (NumPy only).

    For host-side tools that must not import JAX (`etcjax.etc_np.encrypt`). Warns with
    `KeySpaceWarning` when the geometry's key space is below 128 bits.
    """
    from etcjax import etc_np

    check_keyspace(height, width, block_size, stacklevel=3)
    return etc_np.HostSchedule(**self._schedule_fields(height, width, block_size))

  def _schedule_fields(self, height: int, width: int, block_size: int) -> dict:
    """The schedule's four int32 (n,) arrays, block size and grid (module doc)."""
    rows, cols = _check_geometry(height, width, block_size)
    n = rows * cols
    d = etc_domain(height, width, block_size)
    return dict(
        perm=self.stream(d + "/perm").permutation(n).astype(np.int32),
        rotflip=self.stream(d + "/rotflip").randbelow(8, n).astype(np.int32),
        negpos=self.stream(d + "/negpos").randbelow(2, n).astype(np.int32),
        chperm=self.stream(d + "/chperm").randbelow(6, n).astype(np.int32),
        block_size=block_size,
        grid=(rows, cols),
    )

  # Key files.

  def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Writes the key file (mode 0600, atomically). Refuses to replace a file unless told."""
    path = os.fspath(path)
    if os.path.lexists(path) and not overwrite:
      raise UserError(f"key file {path} already exists; refusing to overwrite it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
      raise UserError(f"cannot write key file {path}: folder {folder} does not exist")
    doc = {"format": KEY_FILE_FORMAT, "version": KEY_FILE_VERSION,
           "key": self._bytes.hex(), "fingerprint": self.fingerprint}
    try:
      fileio.write_text(path, json.dumps(doc) + "\n", perms=0o600)
    except OSError as e:
      raise UserError(f"cannot write key file {path}: {e.strerror or e}") from None

  @classmethod
  def load(cls, path: str | os.PathLike, force: bool = False) -> EtcKey:
    """Reads a key file written by `save`.

    Raises:
      UserError: missing or unreadable file, a file readable/writable by group or
        others (unless `force`), or content that is not an etcjax key file. Messages
        name the path and never include key material.
    """
    path = os.fspath(path)
    try:
      st = os.stat(path)
    except FileNotFoundError:
      raise UserError(f"key file {path} does not exist") from None
    except OSError as e:
      raise UserError(f"cannot read key file {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
      raise UserError(f"key file {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 and not force:
      raise UserError(
          f"key file {path} has mode {mode:04o}, so users other than its owner can read or "
          f"change it; run `chmod 600 {path}` (or pass force=True / --force-key)")
    try:
      with open(path, "rb") as f:
        raw_text = f.read(4096)
    except OSError as e:
      raise UserError(f"cannot read key file {path}: {e.strerror or e}") from None
    try:
      # Error details could quote file content, so they are not passed on.
      doc = json.loads(raw_text.decode("utf-8"))
      ok = isinstance(doc, dict) and doc.get("format") == KEY_FILE_FORMAT
    except ValueError:  # includes UnicodeDecodeError
      ok = False
    if not ok:
      raise UserError(f"{path} is not an etcjax key file")
    if doc.get("version") != KEY_FILE_VERSION:
      raise UserError(f"key file {path} has version {doc.get('version')!r}; this etcjax "
                      f"reads version {KEY_FILE_VERSION}")
    try:
      raw = bytes.fromhex(doc["key"])
    except (KeyError, TypeError, ValueError):
      raw = b""
    if len(raw) != KEY_BYTES:
      raise UserError(f"key file {path} is damaged: the key is not {KEY_BYTES} hex bytes")
    key = cls(raw)
    if "fingerprint" in doc and doc["fingerprint"] != key.fingerprint:
      raise UserError(f"key file {path} is damaged: its fingerprint does not match its key")
    return key
