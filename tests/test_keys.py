"""Tests for etcjax.keys: derivation (re-implemented from the docstring), KATs, key files."""

import hashlib
import json
import os
import pickle
import stat
import warnings

import numpy as np
import pytest

from etcjax import keys
from etcjax.errors import UserError

FIXED = bytes(range(32))


# An independent implementation of the derivation exactly as the keys module docstring
# states it, one candidate at a time, straight from hashlib.
def _doc_stream(key: bytes, domain: str):
  data = hashlib.shake_256(b"etcjax-kdf-v1\x00" + key + domain.encode()).digest(1 << 16)
  pos = 0

  def randbelow(bound):
    nonlocal pos
    if bound == 1:
      return 0
    nbits = (bound - 1).bit_length()
    k = (nbits + 7) // 8
    while True:
      cand = int.from_bytes(data[pos:pos + k], "big") & ((1 << nbits) - 1)
      pos += k
      if cand < bound:
        return cand

  return randbelow


def _doc_schedule(key: bytes, h: int, w: int, b: int):
  d = f"etcjax/etc/v1/H={h},W={w},B={b}"
  n = (h // b) * (w // b)
  rb = _doc_stream(key, d + "/perm")
  a = list(range(n))
  for i in range(n - 1, 0, -1):
    j = rb(i + 1)
    a[i], a[j] = a[j], a[i]
  fields = {"perm": a}
  for name, bound in (("rotflip", 8), ("negpos", 2), ("chperm", 6)):
    rb = _doc_stream(key, d + "/" + name)
    fields[name] = [rb(bound) for _ in range(n)]
  return fields


@pytest.fixture(autouse=True)
def _quiet_keyspace_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", keys.KeySpaceWarning)
    yield


@pytest.mark.parametrize("geom", [(32, 32, 16), (64, 48, 8), (224, 224, 16), (48, 96, 16)])
@pytest.mark.parametrize("seed", [0, 1])
def test_schedule_matches_documented_derivation(geom, seed):
  key = keys.EtcKey.insecure_from_seed(seed)
  s = key.schedule(*geom)
  want = _doc_schedule(key.to_bytes(), *geom)
  for name in ("perm", "rotflip", "negpos", "chperm"):
    np.testing.assert_array_equal(np.asarray(getattr(s, name)), want[name], err_msg=name)
  assert s.block_size == geom[2]
  assert s.grid == (geom[0] // geom[2], geom[1] // geom[2])


def test_known_answer_vectors():
  # Pinned: a change here breaks every encrypted dataset and outside re-implementation.
  key = keys.EtcKey.from_bytes(FIXED)
  assert key.fingerprint == "ffe43b93fab3990f"
  s = key.schedule(32, 32, 16)
  assert s.perm.tolist() == [3, 0, 2, 1]
  assert s.rotflip.tolist() == [0, 4, 6, 0]
  assert s.negpos.tolist() == [1, 0, 0, 1]
  assert s.chperm.tolist() == [3, 5, 2, 2]
  s = key.schedule(224, 224, 16)
  assert s.perm[:8].tolist() == [106, 40, 70, 191, 187, 8, 161, 174]
  assert s.rotflip[:8].tolist() == [3, 3, 2, 3, 1, 3, 6, 3]
  assert s.negpos[:8].tolist() == [0, 1, 0, 0, 1, 0, 0, 1]
  assert s.chperm[:8].tolist() == [2, 2, 2, 1, 0, 1, 3, 2]
  s = key.schedule(64, 48, 8)
  assert s.perm[:8].tolist() == [12, 16, 41, 20, 42, 44, 2, 18]
  st = key.stream("etcjax/le/v1/H=32,W=32,B=4")
  assert st.read(8).hex() == "eb073bb11584ee64"
  assert st.randbelow(1000, 5).tolist() == [885, 753, 811, 345, 436]
  assert keys.EtcKey.insecure_from_seed(0).to_bytes().hex()[:16] == "20637bcc4d84f08d"


def test_schedules_differ_across_keys_and_geometries():
  k1, k2 = keys.EtcKey.insecure_from_seed(1), keys.EtcKey.insecure_from_seed(2)
  a, b = k1.schedule(224, 224, 16), k2.schedule(224, 224, 16)
  assert not np.array_equal(a.perm, b.perm)
  assert not np.array_equal(a.rotflip, b.rotflip)
  # Same block count, different geometry: domain separation gives a different schedule.
  c, d = k1.schedule(64, 32, 16), k1.schedule(32, 64, 16)
  assert c.num_blocks == d.num_blocks == 8
  assert not (np.array_equal(c.perm, d.perm) and np.array_equal(c.rotflip, d.rotflip))
  # Deterministic.
  np.testing.assert_array_equal(a.perm, k1.schedule(224, 224, 16).perm)


def test_stream_helpers():
  st = keys.EtcKey.insecure_from_seed(3).stream("test/v1")
  v = st.randbelow(6, 60000)
  assert v.dtype == np.int64 and v.min() == 0 and v.max() == 5
  counts = np.bincount(v, minlength=6)
  # Unbiased: each count within 5 sigma of 10000.
  assert np.all(np.abs(counts - 10000) < 5 * np.sqrt(60000 * (1 / 6) * (5 / 6)))
  assert st.randbelow(1, 4).tolist() == [0, 0, 0, 0]
  big = st.randbelow(70000, 1000)
  assert big.max() < 70000 and big.max() > 60000
  p = st.permutation(500)
  assert sorted(p.tolist()) == list(range(500))
  assert st.permutation(0).tolist() == [] and st.permutation(1).tolist() == [0]
  with pytest.raises(ValueError):
    st.randbelow(0, 1)
  with pytest.raises(ValueError):
    keys.EtcKey.insecure_from_seed(0).stream("a\x00b")


def test_key_objects_hide_the_secret():
  key = keys.EtcKey.generate()
  secret = key.to_bytes().hex()
  assert len(key.to_bytes()) == 32
  assert secret not in repr(key) and secret not in str(key)
  assert key.fingerprint in repr(key)
  assert len(key.fingerprint) == 16
  with pytest.raises(TypeError):
    pickle.dumps(key)
  assert keys.EtcKey.from_bytes(key.to_bytes()) == key
  assert keys.EtcKey.generate() != key
  with pytest.raises(ValueError):
    keys.EtcKey.from_bytes(b"short")
  ins = keys.EtcKey.insecure_from_seed(7)
  assert ins.insecure and "insecure" in repr(ins)
  assert ins == keys.EtcKey.insecure_from_seed(7) and not key.insecure


def test_key_file_round_trip_and_mode(tmp_path):
  key = keys.EtcKey.generate()
  path = tmp_path / "k.key"
  key.save(path)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  doc = json.loads(path.read_text())
  assert doc["format"] == "etcjax-key" and doc["version"] == 1
  assert doc["fingerprint"] == key.fingerprint
  assert keys.EtcKey.load(path) == key
  with pytest.raises(UserError, match="already exists"):
    key.save(path)
  other = keys.EtcKey.generate()
  other.save(path, overwrite=True)
  assert keys.EtcKey.load(path) == other
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_key_file_refuses_loose_permissions(tmp_path):
  key = keys.EtcKey.generate()
  path = tmp_path / "k.key"
  key.save(path)
  os.chmod(path, 0o644)
  with pytest.raises(UserError) as e:
    keys.EtcKey.load(path)
  msg = str(e.value)
  assert str(path) in msg and "0644" in msg and "chmod 600" in msg
  assert key.to_bytes().hex() not in msg
  assert keys.EtcKey.load(path, force=True) == key


@pytest.mark.parametrize("content, match", [
    ("not json", "not an etcjax key file"),
    ('{"format": "other"}', "not an etcjax key file"),
    ('{"format": "etcjax-key", "version": 9, "key": "00"}', "version 9"),
    ('{"format": "etcjax-key", "version": 1, "key": "abcd"}', "damaged"),
    ('{"format": "etcjax-key", "version": 1, "key": "' + "00" * 32
     + '", "fingerprint": "0000000000000000"}', "fingerprint does not match"),
])
def test_key_file_bad_content(tmp_path, content, match):
  path = tmp_path / "bad.key"
  path.write_text(content)
  os.chmod(path, 0o600)
  with pytest.raises(UserError, match=match) as e:
    keys.EtcKey.load(path)
  assert str(path) in str(e.value)


def test_key_file_missing_and_unwritable(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    keys.EtcKey.load(tmp_path / "nope.key")
  with pytest.raises(UserError, match="does not exist"):
    keys.EtcKey.generate().save(tmp_path / "no" / "dir" / "k.key")


def test_keyspace_bits_and_warning():
  # n = 4: log2(4!) + 4 * (3 + 1 + log2 6) = 4.585 + 26.34
  assert keys.keyspace_bits(32, 32, 16) == pytest.approx(30.925, abs=1e-3)
  assert keys.keyspace_bits(224, 224, 16) > 2000
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    keys.EtcKey.insecure_from_seed(0).schedule(32, 32, 16)
    keys.EtcKey.insecure_from_seed(0).schedule(224, 224, 16)
  weak = [w for w in rec if issubclass(w.category, keys.KeySpaceWarning)]
  assert len(weak) == 1
  assert "30.9 bits" in str(weak[0].message) and "32x32" in str(weak[0].message)
  assert weak[0].filename == __file__  # points at the caller, not at keys.py
  with pytest.raises(ValueError, match="not a multiple"):
    keys.keyspace_bits(30, 32, 16)
