"""Tests for `etcjax predict`, `etcjax adapt` and `etcjax attack --attack model-leak`.

The plain ViT run is written directly from random weights (training would only cost
compile time: adaptation is exact for any weights), and `etcjax adapt` makes an EtC run of
it. One slow test trains a ConvMixer on EtC images for real (researcher mode) and checks
`predict` against `etcjax eval` on it.
"""

import csv
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from etcjax import cli, train
from etcjax import config as config_lib
from etcjax.commands import predict
from etcjax.data.sources import digits_arrays, resize_center_crop
from etcjax.keys import EtcKey

SIZE, BLOCK = 16, 4
CLASSES = ("c0", "c1", "c2")


def run(capsys, *argv):
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def _config(tmp: Path, model: str, encryption: str):
  c = config_lib.base_config()
  c.dataset = f"folder:{tmp / 'data'}"
  c.image_size = SIZE
  c.block_size = BLOCK
  c.encryption = encryption
  c.key_file = str(tmp / "run.key") if encryption != "none" else ""
  c.model = model
  c.schedule = "constant"
  c.learning_rate = 0.02
  c.batch_size = 24
  c.num_train_steps = 8
  c.log_every_steps = 8
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Data (3 digit classes at 16x16), keys, a plain ViT run (random weights, saved as
  training would) and the run `etcjax adapt` makes of it."""
  tmp = tmp_path_factory.mktemp("predict")
  xtr, ytr, xte, yte = digits_arrays()
  for split, x, y, n in (("train", xtr, ytr, 8), ("test", xte, yte, 6)):
    for c, name in enumerate(CLASSES):
      folder = tmp / "data" / split / name
      folder.mkdir(parents=True)
      for j, i in enumerate(np.flatnonzero(y == c)[:n]):
        Image.fromarray(resize_center_crop(x[i], SIZE)).save(folder / f"{j:02d}.png")
  EtcKey.insecure_from_seed(16).save(tmp / "run.key")
  EtcKey.insecure_from_seed(17).save(tmp / "other.key")
  plain_config = _config(tmp, "ViT-tiny-test", "none")
  model = train.models.create("ViT-tiny-test", len(CLASSES))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32),
                        shapes["params"])
  meta = {"history": [], "model": "ViT-tiny-test", "dataset": plain_config.dataset,
          "step": 1, "class_names": list(CLASSES),
          "config": json.loads(plain_config.to_json()), "encryption": "none",
          "key_fingerprint": None}
  predict._save_run(str(tmp / "plain_run"), plain_config, params, 1, meta)
  rc = cli.main(["adapt", "--workdir", str(tmp / "plain_run"), "--key", str(tmp / "run.key"),
                 "--out", str(tmp / "adapted")])
  assert rc == 0
  return {"tmp": tmp, "plain_config": plain_config}


@pytest.fixture(scope="module")
def etc_run(runs):
  """A ConvMixer trained on EtC images (researcher mode: the key encrypts on device)."""
  tmp = runs["tmp"]
  config = _config(tmp, "ConvMixer-tiny-test", "etc")
  train.train_and_evaluate(config, str(tmp / "etc_run"))
  return config


def _plain_eval(runs):
  if "plain_eval" not in runs:
    runs["plain_eval"] = train.evaluate(runs["plain_config"], str(runs["tmp"] / "plain_run"))
  return runs["plain_eval"]


def _encrypt(capsys, tmp, src, out, key="run.key", *extra):
  rc, _, err = run(capsys, "encrypt", "--key", tmp / key, src, "--out", out,
                   "--block-size", BLOCK, *extra)
  assert rc == 0, err
  return out


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _accuracy(rows):
  return np.mean([r["prediction"] == Path(r["path"]).parent.name for r in rows])


@pytest.mark.slow  # trains a run: minutes on a busy 2-core CPU
def test_predict_etc_run_matches_eval(runs, etc_run, capsys):
  tmp = runs["tmp"]
  evaluated = train.evaluate(etc_run, str(tmp / "etc_run"))
  enc = _encrypt(capsys, tmp, tmp / "data" / "test", tmp / "enc_test")
  out = tmp / "pred.csv"
  rc, stdout, err = run(capsys, "predict", "--workdir", tmp / "etc_run", enc, "--out", out,
                        "--top-k", 2)
  assert rc == 0, err
  assert "predicted 18 image(s)" in stdout
  rows = _read_csv(out)
  assert len(rows) == 18
  assert list(rows[0]) == ["path", "prediction", "probability", "class_1", "prob_1",
                           "class_2", "prob_2"]
  assert all(r["prediction"] in CLASSES and r["class_1"] == r["prediction"] for r in rows)
  assert all(float(r["prob_1"]) >= float(r["prob_2"]) for r in rows)
  assert _accuracy(rows) == pytest.approx(evaluated["eval_accuracy"])
  assert evaluated["eval_accuracy"] > 1 / 3  # learnt something: the comparison means something
  # JSON, and files given one by one.
  files = sorted(str(p) for p in (enc / "c1").glob("*.png"))
  rc, _, err = run(capsys, "predict", "--workdir", tmp / "etc_run", *files, "--out",
                   tmp / "pred.json", "--json", "--top-k", 10)
  assert rc == 0, err
  doc = json.loads((tmp / "pred.json").read_text())
  assert doc["class_names"] == list(CLASSES) and doc["encryption"] == "etc"
  assert [p["path"] for p in doc["predictions"]] == files
  assert all(len(p["top_k"]) == 3 for p in doc["predictions"])
  assert all(abs(sum(t["probability"] for t in p["top_k"]) - 1) < 1e-5
             for p in doc["predictions"])
  # No exact adaptation of a ConvMixer: one line saying why, nothing written.
  rc, _, err = run(capsys, "adapt", "--workdir", tmp / "etc_run", "--key", tmp / "run.key",
                   "--out", tmp / "never")
  assert rc == 2 and "depthwise" in err and err.count("\n") == 1
  assert not (tmp / "never").exists()


def _refused(capsys, tmp, *inputs, workdir="adapted", match):
  out = tmp / "refused.csv"
  rc, _, err = run(capsys, "predict", "--workdir", tmp / workdir, *inputs, "--out", out)
  assert rc == 2
  assert err.startswith("etcjax: error: ") and err.count("\n") == 1, err
  assert "Traceback" not in err and match in err, err
  key_hex = json.loads((tmp / "run.key").read_text())["key"]
  assert key_hex not in err
  assert not out.exists()
  return err


def test_predict_refuses_bad_etc_inputs(runs, capsys):
  """Against the adapted run (an EtC run of key run.key, block size 4, 16x16 images)."""
  tmp = runs["tmp"]
  src = tmp / "data" / "test" / "c0"
  # Another key: one clear line naming both fingerprints.
  other = _encrypt(capsys, tmp, src, tmp / "enc_other", "other.key")
  err = _refused(capsys, tmp, other, match="fingerprint")
  assert EtcKey.load(tmp / "other.key").fingerprint in err
  # Plain images (no manifest).
  _refused(capsys, tmp, src, match="no etcjax-manifest.json")
  # Another block size.
  rc, _, err = run(capsys, "encrypt", "--key", tmp / "run.key", src, "--out",
                   tmp / "enc_b8", "--block-size", 8)
  assert rc == 0, err
  _refused(capsys, tmp, tmp / "enc_b8", match="block size 8")
  # Another geometry (32x32 images of the right key and block size).
  big = tmp / "big"
  big.mkdir()
  Image.fromarray(digits_arrays()[0][0]).save(big / "x.png")
  _refused(capsys, tmp, _encrypt(capsys, tmp, big, tmp / "enc_big"), match="32x32")
  # A corrupt file listed in its manifest.
  bad = tmp / "enc_bad"
  shutil.copytree(_encrypt(capsys, tmp, src, tmp / "enc_c0"), bad)
  (bad / "00.png").write_bytes(b"not a png at all")
  _refused(capsys, tmp, bad, match="00.png")
  # A file the manifest does not list.
  shutil.copy(src / "00.png", tmp / "enc_c0" / "stray.png")
  _refused(capsys, tmp, tmp / "enc_c0" / "stray.png", match="not listed")
  # EtC images to a plain run.
  _refused(capsys, tmp, tmp / "enc_other", workdir="plain_run", match="trained on plain")
  # No run.
  _refused(capsys, tmp, src, workdir="nothing_here", match="holds no checkpoint")


def test_predict_plain_run_matches_eval(runs, capsys):
  tmp = runs["tmp"]
  evaluated = _plain_eval(runs)
  rc, _, err = run(capsys, "predict", "--workdir", tmp / "plain_run", tmp / "data" / "test",
                   "--out", tmp / "plain.csv", "--batch-size", 5)
  assert rc == 0, err
  assert _accuracy(_read_csv(tmp / "plain.csv")) == pytest.approx(evaluated["eval_accuracy"])


def test_adapt_gives_the_plain_answers_on_etc_images(runs, capsys):
  tmp = runs["tmp"]
  adapted = tmp / "adapted"
  meta = predict.load_run(str(adapted), variables=False).meta
  assert meta["model"] == "ViT-tiny-test-adapted" and meta["encryption"] == "etc"
  key_hex = json.loads((tmp / "run.key").read_text())["key"]
  for f in ("config.json", "config.py"):
    assert key_hex not in (adapted / f).read_text()
  # predict: EtC files through the adapted run == plain files through the plain run.
  enc = tmp / "enc_test" if (tmp / "enc_test").exists() else _encrypt(
      capsys, tmp, tmp / "data" / "test", tmp / "enc_test")
  assert run(capsys, "predict", "--workdir", adapted, enc, "--out", tmp / "a.json",
             "--json")[0] == 0
  assert run(capsys, "predict", "--workdir", tmp / "plain_run", tmp / "data" / "test",
             "--out", tmp / "p.json", "--json")[0] == 0
  a = json.loads((tmp / "a.json").read_text())["predictions"]
  p = json.loads((tmp / "p.json").read_text())["predictions"]
  assert [Path(x["path"]).relative_to(enc) for x in a] == \
      [Path(x["path"]).relative_to(tmp / "data" / "test") for x in p]
  assert [x["prediction"] for x in a] == [x["prediction"] for x in p]
  probs = [x["probability"] for x in p]
  assert np.std(probs) > 1e-3  # the answers depend on the images
  np.testing.assert_allclose([x["probability"] for x in a], [x["probability"] for x in p],
                             atol=1e-5)
  # eval: the adapted run's config.py on the plain data, encrypted on the fly with the key.
  from etcjax import main
  flags = main.parse_flags(["etcjax", f"--config={adapted / 'config.py'}",
                            f"--workdir={adapted}", "--mode=eval"])
  result = main.run_from_flags(flags)
  plain = _plain_eval(runs)
  assert result["eval_accuracy"] == pytest.approx(plain["eval_accuracy"])
  assert result["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)
  assert result["key_fingerprint"] == EtcKey.load(tmp / "run.key").fingerprint
  # Refusals: an existing run; a run trained on EtC images.
  rc, _, err = run(capsys, "adapt", "--workdir", tmp / "plain_run", "--key", tmp / "run.key",
                   "--out", adapted)
  assert rc == 2 and "already holds a run" in err
  rc, _, err = run(capsys, "adapt", "--workdir", adapted, "--key", tmp / "run.key",
                   "--out", tmp / "never")
  assert rc == 2 and "already adapted" in err and err.count("\n") == 1
  assert not (tmp / "never").exists()


def test_model_leak_attack_reads_the_key_back(runs, capsys):
  tmp = runs["tmp"]
  adapted = tmp / "adapted"
  out = tmp / "leak"
  rc, stdout, err = run(capsys, "attack", "--scheme", "etc", "--attack", "model-leak",
                        "--adapted", adapted, "--plain", tmp / "plain_run", "--key",
                        tmp / "run.key", "--out", out, "--noise", "0,0.5")
  assert rc == 0, err
  assert "exact key schedule" in stdout and "100.0% of block states up to one" in stdout
  doc = json.loads((out / "summary.json").read_text())
  assert [r["block_fraction"] for r in doc["results"]] == [1.0, 1.0]
  assert doc["results"][0]["relative_state_fraction_without_plain"] == 1.0
  key_hex = json.loads((tmp / "run.key").read_text())["key"]
  assert key_hex not in (out / "summary.json").read_text() and key_hex not in stdout
  # The wrong key to score with: one line.
  rc, _, err = run(capsys, "attack", "--scheme", "etc", "--attack", "model-leak",
                   "--adapted", adapted, "--plain", tmp / "plain_run", "--key",
                   tmp / "other.key", "--out", out)
  assert rc == 2 and "is not the key of" in err


def test_class_names_fallback_for_old_runs():
  c = config_lib.base_config()
  params = {"head": {"bias": np.zeros(10)}}
  assert predict._class_names({}, c, params) == tuple(str(i) for i in range(10))
  c.dataset = "folder:/nonexistent"
  assert predict._class_names({}, c, {"head": {"bias": np.zeros(4)}}) == ("0", "1", "2", "3")
  assert predict._class_names({"class_names": ["a", "b"]}, c, params) == ("a", "b")
