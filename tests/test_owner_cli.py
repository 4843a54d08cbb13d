"""Tests for `etcjax keygen / encrypt / decrypt / compress-stats` through etcjax.cli.main."""

import csv
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from etcjax import cli, codec, samples
from etcjax.commands import owner


def run(capsys, *argv):
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def error_line(err: str) -> str:
  """The single `etcjax: error:` line; fails on tracebacks or several error lines."""
  assert "Traceback" not in err
  lines = [ln for ln in err.splitlines() if ln.startswith("etcjax: error:")]
  assert len(lines) == 1, err
  return lines[0]


def no_temp_files(folder) -> bool:
  return not any(f.startswith(".tmp-") for _, _, files in os.walk(folder) for f in files)


@pytest.fixture()
def tree(tmp_path):
  """in/a.png (48x64), in/sub/b.jpg (32x48), in/grey.png (16x32, L mode)."""
  src = tmp_path / "in"
  (src / "sub").mkdir(parents=True)
  a = samples.load("chelsea", size=(48, 64))
  Image.fromarray(a).save(src / "a.png")
  Image.fromarray(samples.load("coffee", size=(32, 48))).save(src / "sub" / "b.jpg", quality=95)
  Image.fromarray(samples.load("rocket", size=(16, 32))).convert("L").save(src / "grey.png")
  return tmp_path


@pytest.fixture()
def keyfile(tree, capsys):
  path = tree / "k.key"
  rc, out, _ = run(capsys, "keygen", path)
  assert rc == 0
  return path


def test_keygen(tmp_path, capsys):
  path = tmp_path / "owner.key"
  rc, out, err = run(capsys, "keygen", path)
  assert rc == 0 and "fingerprint" in out
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  secret = json.loads(path.read_text())["key"]
  assert secret not in out and secret not in err
  rc, _, err = run(capsys, "keygen", path)
  assert rc == 2 and "already exists" in error_line(err)
  assert run(capsys, "keygen", path, "--force")[0] == 0
  rc, _, err = run(capsys, "keygen", tmp_path / "nodir" / "k.key")
  assert rc == 2 and "does not exist" in error_line(err)


def test_help_on_every_subcommand(capsys):
  for sub in ("keygen", "encrypt", "decrypt", "compress-stats"):
    with pytest.raises(SystemExit) as e:
      cli.main([sub, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_encrypt_decrypt_round_trip_keeps_structure(tree, keyfile, capsys):
  rc, out, err = run(capsys, "encrypt", "--key", keyfile, tree / "in", "--out", tree / "enc")
  assert rc == 0, err
  # 16x32 images have a 4-block (~31-bit) key space: the tool must say so.
  assert "warning" in err and "bits" in err and "16x32" in err
  assert sorted(os.path.relpath(os.path.join(r, f), tree / "enc")
                for r, _, fs in os.walk(tree / "enc") for f in fs) == \
      ["a.png", "etcjax-manifest.json", "grey.png", os.path.join("sub", "b.png")]
  manifest = json.loads((tree / "enc" / "etcjax-manifest.json").read_text())
  secret = json.loads(keyfile.read_text())["key"]
  assert secret not in json.dumps(manifest)
  assert manifest["block_size"] == 16 and manifest["scheme"] == "etc/v1"
  assert manifest["files"]["a.png"]["height"] == 48 and manifest["files"]["a.png"]["width"] == 64
  assert manifest["fingerprint"] == json.loads(keyfile.read_text())["fingerprint"]
  plain = codec.read_image(tree / "in" / "a.png")
  enc = codec.read_image(tree / "enc" / "a.png")
  assert not np.array_equal(plain, enc)
  rc, out, err = run(capsys, "decrypt", "--key", keyfile, tree / "enc", "--out", tree / "dec")
  assert rc == 0, err
  np.testing.assert_array_equal(codec.read_image(tree / "dec" / "a.png"), plain)
  np.testing.assert_array_equal(codec.read_image(tree / "dec" / "sub" / "b.png"),
                                codec.read_image(tree / "in" / "sub" / "b.jpg"))
  grey = codec.read_image(tree / "dec" / "grey.png")  # converted to RGB, documented
  np.testing.assert_array_equal(grey[..., 0], grey[..., 1])
  # A single file finds the manifest in its folder.
  rc, _, err = run(capsys, "decrypt", "--key", keyfile, tree / "enc" / "sub" / "b.png",
                   "--out", tree / "dec1")
  assert rc == 0, err
  np.testing.assert_array_equal(codec.read_image(tree / "dec1" / "b.png"),
                                codec.read_image(tree / "in" / "sub" / "b.jpg"))
  # A sub-folder of an encrypted tree finds the manifest in a parent folder.
  rc, _, err = run(capsys, "decrypt", "--key", keyfile, tree / "enc" / "sub", "--out",
                   tree / "dec2")
  assert rc == 0 and "no etcjax-manifest.json" not in err, err
  np.testing.assert_array_equal(codec.read_image(tree / "dec2" / "b.png"),
                                codec.read_image(tree / "in" / "sub" / "b.jpg"))
  rc, _, err = run(capsys, "decrypt", "--key", keyfile, tree / "enc", "--out", tree / "d3",
                   "--block-size", "8")
  assert rc == 2 and "contradicts the manifest" in error_line(err)
  assert no_temp_files(tree)


def test_jpeg_output_and_decrypt(tree, keyfile, capsys):
  rc, _, err = run(capsys, "encrypt", "--key", keyfile, tree / "in" / "a.png", "--out",
                   tree / "encj", "--format", "jpeg", "--quality", "90")
  assert rc == 0, err
  assert (tree / "encj" / "a.jpg").exists()
  manifest = json.loads((tree / "encj" / "etcjax-manifest.json").read_text())
  assert manifest["jpeg"] == {"quality": 90, "subsampling": "4:2:0"}
  rc, _, err = run(capsys, "decrypt", "--key", keyfile, tree / "encj", "--out", tree / "decj",
                   "--jpeg-decoder", "pillow")
  assert rc == 0, err
  psnr = codec.psnr(codec.read_image(tree / "decj" / "a.png"),
                    codec.read_image(tree / "in" / "a.png"))
  assert psnr > 25


def test_wrong_and_missing_keys(tree, keyfile, capsys):
  assert run(capsys, "encrypt", "--key", keyfile, tree / "in", "--out", tree / "enc")[0] == 0
  other = tree / "other.key"
  run(capsys, "keygen", other)
  rc, _, err = run(capsys, "decrypt", "--key", other, tree / "enc", "--out", tree / "dec")
  line = error_line(err)
  assert rc == 2 and "fingerprint" in line and "etcjax-manifest.json" in line
  assert not (tree / "dec").exists() or not os.listdir(tree / "dec")
  # Encrypting into a folder made with another key is refused too.
  rc, _, err = run(capsys, "encrypt", "--key", other, tree / "in", "--out", tree / "enc")
  assert rc == 2 and "already holds" in error_line(err)
  rc, _, err = run(capsys, "encrypt", "--key", tree / "nope.key", tree / "in", "--out",
                   tree / "x")
  assert rc == 2 and "nope.key does not exist" in error_line(err)
  os.chmod(keyfile, 0o644)
  rc, _, err = run(capsys, "encrypt", "--key", keyfile, tree / "in", "--out", tree / "y")
  assert rc == 2 and "0644" in error_line(err) and str(keyfile) in err
  rc, _, err = run(capsys, "encrypt", "--key", keyfile, "--force-key", tree / "in", "--out",
                   tree / "y")
  assert rc == 0, err
  not_a_key = tree / "in" / "a.png"
  os.chmod(not_a_key, 0o600)
  rc, _, err = run(capsys, "decrypt", "--key", not_a_key, tree / "enc", "--out", tree / "z")
  assert rc == 2 and "not an etcjax key file" in error_line(err)


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "rgba", "wrong_size", "missing"])
def test_bad_inputs_name_the_file_and_leave_no_partial_output(tree, keyfile, capsys, kind):
  bad_dir = tree / "bad"
  bad_dir.mkdir()
  good = samples.load("chelsea", size=(32, 32))
  Image.fromarray(good).save(bad_dir / "0_good.png")
  bad = bad_dir / "1_bad.png"
  if kind == "corrupt":
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  elif kind == "truncated":
    data = codec.encode(good, "png")
    bad.write_bytes(data[: len(data) // 3])
  elif kind == "rgba":
    Image.fromarray(good).convert("RGBA").save(bad)
  elif kind == "wrong_size":
    Image.fromarray(samples.load("chelsea", size=(30, 32))).save(bad)
  target = bad if kind != "missing" else bad_dir / "nothere.png"
  rc, _, err = run(capsys, "encrypt", "--key", keyfile, bad_dir / "0_good.png", target,
                   "--out", tree / "out")
  line = error_line(err)
  assert rc == 2 and target.name in line
  assert not (tree / "out" / "1_bad.png").exists()
  assert no_temp_files(tree)
  if kind == "wrong_size":
    assert "not a multiple of the block size 16" in line
  if kind != "missing":
    # The good file before it is complete and listed in the manifest.
    assert (tree / "out" / "0_good.png").exists()
    manifest = json.loads((tree / "out" / "etcjax-manifest.json").read_text())
    assert list(manifest["files"]) == ["0_good.png"]


@pytest.mark.parametrize("command", ["encrypt", "decrypt"])
def test_a_failure_before_any_output_leaves_no_output_folder(tmp_path, keyfile, capsys, command):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image")
  rc, _, err = run(capsys, command, "--key", keyfile, bad, "--out", tmp_path / "out")
  line = error_line(err)
  assert rc == 2 and "bad.jpg: not a readable image" in line and "BytesIO" not in line
  assert not (tmp_path / "out").exists()


def test_unwritable_output(tree, keyfile, capsys):
  blocker = tree / "afile"
  blocker.write_text("x")
  rc, _, err = run(capsys, "encrypt", "--key", keyfile, tree / "in", "--out", blocker)
  assert rc == 2 and "afile" in error_line(err)
  rc, _, err = run(capsys, "encrypt", "--key", keyfile, tree / "in", "--out", blocker / "sub")
  assert rc == 2 and "cannot create output folder" in error_line(err)


def test_name_collisions_and_empty_folders(tree, keyfile, capsys):
  Image.fromarray(samples.load("chelsea", size=(16, 16))).save(tree / "in" / "a.jpg")
  rc, _, err = run(capsys, "encrypt", "--key", keyfile, tree / "in", "--out", tree / "o")
  assert rc == 2 and "both be written" in error_line(err)
  (tree / "empty").mkdir()
  rc, _, err = run(capsys, "encrypt", "--key", keyfile, tree / "empty", "--out", tree / "o")
  assert rc == 2 and "no image files" in error_line(err)


def test_compress_stats_writes_csv_and_json(tree, keyfile, capsys):
  folder = tree / "photos"
  folder.mkdir()
  for name in ("astronaut", "chelsea"):
    Image.fromarray(samples.load(name, size=(64, 64))).save(folder / f"{name}.png")
  rc, out, err = run(capsys, "compress-stats", folder, "--key", keyfile, "--csv",
                     tree / "t.csv", "--json", tree / "t.json")
  assert rc == 0, err
  assert "JPEG QF=85" in out and "JPEG 2000" in out and "Uncompressed" in out
  with open(tree / "t.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["setting"] for r in rows][:2] == ["JPEG QF=85", "JPEG QF=80"]
  doc = json.loads((tree / "t.json").read_text())
  assert doc["num_images"] == 2 and len(doc["rows"]) == len(rows) == 6
  assert int(rows[-1]["plain_bytes"]) == 2 * 64 * 64 * 3
  assert json.loads(keyfile.read_text())["key"] not in (out + err + (tree / "t.json").read_text())


def test_errors_through_a_real_subprocess(tree, keyfile):
  bad = tree / "in" / "broken.png"
  bad.write_bytes(b"not an image at all")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  r = subprocess.run([sys.executable, "-m", "etcjax.cli", "encrypt", "--key", str(keyfile),
                      str(tree / "in"), "--out", str(tree / "enc")], capture_output=True,
                     text=True, env=env, timeout=120)
  assert r.returncode == 2
  assert "Traceback" not in r.stderr
  assert "etcjax: error:" in r.stderr and "broken.png" in r.stderr
  r = subprocess.run([sys.executable, "-m", "etcjax.cli", "decrypt", "--key",
                      str(tree / "missing.key"), str(tree / "in"), "--out", str(tree / "d")],
                     capture_output=True, text=True, env=env, timeout=120)
  assert r.returncode == 2 and "missing.key does not exist" in r.stderr
  assert r.stderr.strip().count("\n") == 0


def test_manifest_reader_rejects_foreign_files(tmp_path):
  (tmp_path / owner.MANIFEST_NAME).write_text('{"format": "something-else"}')
  with pytest.raises(Exception, match="not an etcjax manifest"):
    owner.read_manifest(str(tmp_path))
  assert owner.read_manifest(str(tmp_path / "nothing")) is None
