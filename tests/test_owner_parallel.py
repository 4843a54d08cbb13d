"""Parallel owner commands: same bytes as one worker and as the plain library path,
complete outputs and one clear error after a failure, the atomic writer, the host transform.

JAX is loaded in this process (conftest), so `etcjax.parallel` runs worker threads here;
tests/test_cli_startup.py covers forked worker processes.
"""

import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from etcjax import cli, codec, etc, etc_np, fileio, keys, parallel


@pytest.fixture()
def small_chunks(monkeypatch):
  """Several workers and chunks even for a dozen files."""
  monkeypatch.setattr(parallel, "MIN_ITEMS_PER_WORKER", 1)
  monkeypatch.setattr(parallel, "MAX_CHUNK", 2)


@pytest.fixture()
def images(tmp_path):
  rng = np.random.default_rng(1)
  src = tmp_path / "in"
  (src / "sub").mkdir(parents=True)
  for i in range(12):
    h, w = ((32, 32), (16, 48))[i % 2]
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    folder = src / "sub" if i % 3 == 0 else src
    img.save(folder / f"{i:02d}.png") if i % 4 else img.save(folder / f"{i:02d}.jpg", quality=92)
  return src


def run(capsys, *argv):
  rc = cli.main([str(a) for a in argv])
  return rc, *capsys.readouterr()


def files(folder) -> dict:
  return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
          for r, _, fs in os.walk(folder) for f in fs}


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_parallel_outputs_are_the_bytes_of_one_worker_and_of_the_library(
    tmp_path, images, capsys, small_chunks, fmt):
  key_path = tmp_path / "k.key"
  assert run(capsys, "keygen", key_path)[0] == 0
  for jobs in (1, 3):
    rc, _, err = run(capsys, "encrypt", "--key", key_path, images, "--out",
                     tmp_path / f"e{jobs}", "--format", fmt, "--jobs", jobs)
    assert rc == 0, err
    assert "img/s" not in err  # no progress bar when stderr is not a terminal
  par, one = files(tmp_path / "e3"), files(tmp_path / "e1")
  assert par == one and len(par) == 13
  # The same bytes as reading, encrypting (etcjax.etc) and encoding each file by hand.
  key = keys.EtcKey.load(key_path)
  ext = codec.EXTENSIONS[fmt]
  for rel in (r for r in par if r != "etcjax-manifest.json"):
    stem = os.path.splitext(rel)[0]
    src = next(p for p in (images / (stem + ".png"), images / (stem + ".jpg")) if p.exists())
    img = codec.read_image(src)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", keys.KeySpaceWarning)
      want = codec.encode(etc.encrypt(img, key.schedule(*img.shape[:2], 16)), fmt)
    assert rel.endswith(ext) and par[rel] == want, rel
  # Decryption in parallel: the same bytes too.
  for jobs in (1, 3):
    rc, _, err = run(capsys, "decrypt", "--key", key_path, tmp_path / "e1", "--out",
                     tmp_path / f"d{jobs}", "--jobs", jobs, "--jpeg-decoder", "pillow")
    assert rc == 0, err
  assert files(tmp_path / "d3") == files(tmp_path / "d1")


def test_a_bad_file_among_many_leaves_complete_listed_outputs(tmp_path, images, capsys,
                                                              small_chunks):
  (images / "05_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  key_path = tmp_path / "k.key"
  run(capsys, "keygen", key_path)
  rc, _, err = run(capsys, "encrypt", "--key", key_path, images, "--out", tmp_path / "o",
                   "--jobs", 3)
  lines = [ln for ln in err.splitlines() if ln.startswith("etcjax: error:")]
  assert rc == 2 and len(lines) == 1 and "05_bad.png" in lines[0] and "Traceback" not in err
  out = files(tmp_path / "o")
  assert not any(os.path.basename(p).startswith(".tmp-") for p in out)
  manifest = json.loads(out.pop("etcjax-manifest.json"))
  assert sorted(manifest["files"]) == sorted(out)  # exactly the files written
  for rel in out:  # each one complete
    codec.decode(out[rel])
  # Every file before the bad one (in input order) was written.
  assert {"01.png", "02.png", "04.png", "05.png"} <= set(out)


def test_jobs_and_pool_options(tmp_path, images, capsys, monkeypatch):
  key_path = tmp_path / "k.key"
  run(capsys, "keygen", key_path)
  rc, _, err = run(capsys, "encrypt", "--key", key_path, images, "--out", tmp_path / "o",
                   "--jobs", -1)
  assert rc == 2 and "--jobs must be >= 0" in err
  monkeypatch.setattr(parallel, "MIN_ITEMS_PER_WORKER", 1)
  monkeypatch.setenv(parallel.POOL_ENV, "fibers")
  rc, _, err = run(capsys, "encrypt", "--key", key_path, images, "--out", tmp_path / "o",
                   "--jobs", 2)
  assert rc == 2 and "ETCJAX_POOL='fibers'" in err
  assert not (tmp_path / "o").exists()


def test_run_chunks_reports_every_result_and_the_first_error():
  def work(state, chunk):
    out = []
    for i, v in enumerate(chunk):
      if v in state:
        return out, parallel.ChunkError(i, f"bad {v}")
      out.append(v)
    return out, None

  got = []
  assert parallel.run_chunks(work, list(range(100)), set(), jobs=3, on_results=got.extend) \
      is None
  assert sorted(got) == list(range(100))
  got = []
  err = parallel.run_chunks(work, list(range(100)), {40, 90}, jobs=1, on_results=got.extend)
  assert err == parallel.ChunkError(40, "bad 40") and got == list(range(40))


def test_write_bytes_is_atomic_and_keeps_modes(tmp_path):
  path = tmp_path / "f.bin"
  fileio.write_bytes(path, b"abc", sync=False)
  assert path.read_bytes() == b"abc"
  fileio.write_bytes(path, b"x" * 100_000, perms=0o600)
  assert path.read_bytes() == b"x" * 100_000 and (os.stat(path).st_mode & 0o777) == 0o600
  with pytest.raises(TypeError):
    fileio.write_bytes(path, 12345)  # not bytes: nothing replaced, no temporary left
  assert path.read_bytes() == b"x" * 100_000 and os.listdir(tmp_path) == ["f.bin"]
  fileio.sync_filesystem(tmp_path)


@pytest.mark.parametrize("shape", [(1, 32, 32, 3), (2, 64, 48, 3), (5, 32, 32, 3)])
def test_host_transform_paths_agree(shape):
  """The block loop and the cached np.take map give the same bytes (both directions)."""
  x = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", keys.KeySpaceWarning)
    s = keys.EtcKey.insecure_from_seed(3).host_schedule(shape[1], shape[2], 16)
  grid = (shape[1] // 16, shape[2] // 16)
  want = etc_np._transform_take(x, s, grid)
  for _ in range(2):  # the second small batch of a geometry uses the map
    np.testing.assert_array_equal(etc_np.transform(x, s, grid), want)
  np.testing.assert_array_equal(etc_np.decrypt(etc_np.encrypt(x, s), s), x)
  np.testing.assert_array_equal(etc_np.encrypt(x, s), want)
