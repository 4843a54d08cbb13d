"""`etcjax attack` and `etcjax privacy-report`: outputs and input errors."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from etcjax import cli
from etcjax.attacks import photos
from etcjax.keys import EtcKey


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  folder = tmp_path_factory.mktemp("plain")
  for name, img in zip(photos.VICTIM_PHOTOS, photos.victim_images(64), strict=True):
    Image.fromarray(img).save(folder / f"{name}.png")
  return folder


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("key") / "k.json"
  EtcKey.insecure_from_seed(4).save(path)
  return str(path)


def _run(argv, capsys):
  code = cli.main(argv)
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_attack_fr_writes_reconstructions_and_summary(inputs, key_file, tmp_path, capsys):
  out = tmp_path / "fr"
  code, stdout, _ = _run(["attack", "--scheme", "pe", "--attack", "fr", str(inputs),
                          "--key", key_file, "--out", str(out)], capsys)
  assert code == 0 and "mean SSIM" in stdout
  summary = json.loads((out / "summary.json").read_text())
  assert [im["name"] for im in summary["images"]] == sorted(photos.VICTIM_PHOTOS)
  assert summary["key_fingerprint"] == EtcKey.insecure_from_seed(4).fingerprint
  assert 0.1 < summary["mean_ssim"] < 1
  assert sorted(os.listdir(out / "reconstructed")) == sorted(
      f"{n}.png" for n in photos.VICTIM_PHOTOS)
  enc = np.asarray(Image.open(out / "encrypted" / "astronaut.png"))
  assert enc.shape == (64, 64, 3)
  assert EtcKey.insecure_from_seed(4).to_bytes().hex() not in (out / "summary.json").read_text()


def test_attack_kpa_recovers_victims_exactly(inputs, tmp_path, capsys):
  out = tmp_path / "kpa"
  files = [str(inputs / f"{n}.png") for n in photos.VICTIM_PHOTOS]
  code, stdout, err = _run(["attack", "--scheme", "etc", "--attack", "kpa", *files,
                            "--random-key", "--out", str(out)], capsys)
  assert code == 0, err
  summary = json.loads((out / "summary.json").read_text())
  assert summary["known_pair"] == "astronaut"
  assert summary["exact"] == 2 and summary["info"]["schedule_exact"]
  assert all(im["psnr"] is None and im["ssim"] > 0.999 for im in summary["images"])


def test_attack_jigsaw_resize(inputs, tmp_path, capsys):
  out = tmp_path / "jig"
  code, _, err = _run(["attack", "--scheme", "etc", "--attack", "jigsaw",
                       str(inputs / "chelsea.png"), "--random-key", "--size", "96",
                       "--out", str(out)], capsys)
  assert code == 0, err
  summary = json.loads((out / "summary.json").read_text())
  assert summary["height"] == 96 and len(summary["info"]["accuracy"]) == 1
  assert "36 blocks" in summary["keyspace"]


@pytest.mark.parametrize("argv, message", [
    (["--scheme", "le", "--attack", "jigsaw"], "use --scheme etc"),
    (["--scheme", "etc", "--attack", "kpa", "--size", "64"], "at least two inputs"),
    (["--scheme", "etc", "--attack", "fr", "--size", "40"], "multiple of the block size 16"),
    (["--scheme", "etc", "--attack", "fr", "--key", "/nonexistent/k.json"], "does not exist"),
])
def test_attack_errors(inputs, tmp_path, capsys, argv, message):
  src = [str(inputs / "chelsea.png")]
  if "--key" not in argv:
    argv = [*argv, "--random-key"]
  code, _, err = _run(["attack", *src, *argv, "--out", str(tmp_path / "o")], capsys)
  assert code == 2 and message in err and err.startswith("etcjax: error:")


def test_attack_input_errors(inputs, tmp_path, capsys):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not an image")
  code, _, err = _run(["attack", "--scheme", "pe", "--attack", "fr", str(bad), "--random-key",
                       "--out", str(tmp_path / "o")], capsys)
  assert code == 2 and "bad.png" in err
  small = tmp_path / "small.png"
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(small)
  code, _, err = _run(["attack", "--scheme", "pe", "--attack", "fr", str(small),
                       str(inputs / "chelsea.png"), "--random-key", "--out",
                       str(tmp_path / "o")], capsys)
  assert code == 2 and "pass --size" in err
  with pytest.raises(SystemExit):  # argparse: --key or --random-key is required
    cli.main(["attack", "--scheme", "pe", "--attack", "fr", str(small), "--out", "o"])


def test_privacy_report(inputs, tmp_path, capsys):
  out = tmp_path / "report"
  code, stdout, err = _run(["privacy-report", str(inputs), "--size", "32", "--attacks",
                            "fr-basic,kpa,jigsaw", "--random-key", "--out", str(out)], capsys)
  assert code == 0, err
  assert "key space" in err and "brute-forced" in err  # 32x32 EtC: ~31 bits
  text = (out / "report.md").read_text()
  for fig in ("fig6_restored.png", "fig8_ssim.png", "fig7_encrypted.png"):
    assert fig in text and (out / fig).stat().st_size > 1000
  assert "| 32x32 | 4 | 30.9 ⚠ |" in text
  summary = json.loads((out / "summary.json").read_text())
  assert summary["schemes"]["etc"]["attacks"]["kpa"]["info"]["schedule_exact"]
  assert "skipped" in summary["schemes"]["le"]["attacks"]["jigsaw"]
  code, _, err = _run(["privacy-report", "--attacks", "fr,nope", "--out", str(out)], capsys)
  assert code == 2 and "nope" in err
