"""Tests of the reproduction harness (etcjax.reproduce) on a tiny CIFAR-10-shaped folder.

The `smoke` budget runs every stage for a few steps; the real figures come from the
`cpu` / `gpu` / `paper` budgets on real data and live in `results/`, never here.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
from PIL import Image

from etcjax import reproduce
from etcjax.data import sources
from etcjax.errors import UserError

ROWS = "convmixer-plain,convmixer-etc,convmixer-etc-jpeg85,resnet18-etc,vit,sizes"


def write_cifar_like(root, n_train=4, n_test=2, classes=reproduce.CIFAR10_CLASSES, seed=0):
  """`root/{train,test}/<class>/*.jpg`: 32x32 images whose colour depends on the class."""
  rng = np.random.default_rng(seed)
  for split, n in (("train", n_train), ("test", n_test)):
    for c, name in enumerate(classes):
      folder = root / split / name
      folder.mkdir(parents=True)
      for j in range(n):
        base = np.array([25 * c, 255 - 25 * c, 128], np.float64)
        img = np.clip(base + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{j}.jpg", quality=90)
  return root


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """One smoke reproduction shared by the tests that read its outputs."""
  tmp = tmp_path_factory.mktemp("repro")
  data = write_cifar_like(tmp / "cifar")
  out = tmp / "out"
  assert reproduce.main(["--data", str(data), "--budget", "smoke", "--rows", ROWS,
                         "--out", str(out)]) == 0
  with open(out / "results.json") as f:
    return data, out, json.load(f)


def test_smoke_reproduction_writes_rows_beside_the_paper(smoke):
  _, out, doc = smoke
  assert doc["budget"] == "smoke" and doc["num_train"] == 40 and doc["num_test"] == 20
  assert set(doc["rows"]) == {"convmixer-plain", "convmixer-etc", "convmixer-etc-jpeg85",
                              "resnet18-etc"}
  row = doc["rows"]["convmixer-etc"]
  assert row["table"] == "II" and row["scheme"] == "etc" and row["paper"] == 92.72
  assert row["steps"] == 4 and row["epochs"] == pytest.approx(4 * 16 / 40)
  assert 0.0 <= row["top1"] <= 100.0
  assert row["difference"] == pytest.approx(row["top1"] - 92.72, abs=0.01)
  assert [h["step"] for h in row["history"]] == [2, 4]
  assert row["history"][-1]["top1"] == row["top1"]
  assert row["key_fingerprint"] == doc["key_fingerprint"]
  for field in ("device", "jax_version", "commit", "date", "wall_time_s", "parameters"):
    assert row[field], field
  assert doc["rows"]["convmixer-plain"]["key_fingerprint"] is None
  jpeg = doc["rows"]["convmixer-etc-jpeg85"]
  assert jpeg["table"] == "III" and jpeg["jpeg_quality"] == 85 and jpeg["paper"] == 90.43
  assert doc["rows"]["resnet18-etc"]["paper"] is None
  # ViT rows without weights are listed with the reason, not dropped.
  assert set(doc["skipped"]) == {"vit-plain", "vit-etc", "vit-etc-jpeg85", "vit-etc-jpeg80"}
  assert "ImageNet-21k" in doc["skipped"]["vit-etc"]
  md = (out / "results.md").read_text()
  assert "| convmixer-etc | ConvMixer-256/8 |" in md and "92.72" in md
  assert "vit-etc | ViT-B/16 | not run: needs ImageNet-21k" in md
  assert (out / "curves.png").stat().st_size > 1000


def test_smoke_table_iv_counts_every_image(smoke):
  data, _, doc = smoke
  sizes = doc["sizes"]
  assert sizes["num_images"] == 60  # Both splits.
  by = {r["setting"]: r for r in sizes["rows"]}
  assert by["Uncompressed"]["plain_bytes"] == by["Uncompressed"]["etc_bytes"] == 60 * 3072
  assert by["JPEG QF=85"]["paper_overhead_pct"] == pytest.approx(0.44, abs=0.01)
  for r in sizes["rows"]:
    assert r["etc_overhead_pct"] == pytest.approx(100 * (r["etc_bytes"] / r["plain_bytes"] - 1),
                                                  abs=1e-3)


def test_key_stays_in_its_file(smoke):
  _, out, doc = smoke
  key_path = out / "owner.key"
  assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
  secret = json.loads(key_path.read_text())["key"]
  for name in ("results.json", "results.md"):
    assert secret not in (out / name).read_text()
  for root, _, files in os.walk(out / "runs"):
    for f in files:
      if f.endswith((".json", ".txt")):
        assert secret not in open(os.path.join(root, f), errors="replace").read()


def test_killed_reproduction_resumes_the_unfinished_row_exactly(smoke, tmp_path):
  data, out, doc = smoke
  again = tmp_path / "out"
  shutil.copytree(out, again)
  # The state a SIGKILL between the step-2 and step-4 checkpoints of one row leaves: its
  # checkpoint 2 on disk, no step 4, no entry in results.json.
  shutil.rmtree(again / "runs" / "convmixer-etc" / "checkpoints" / "4")
  partial = json.loads((again / "results.json").read_text())
  del partial["rows"]["convmixer-etc"]
  (again / "results.json").write_text(json.dumps(partial))
  finished = again / "runs" / "convmixer-plain" / "metrics.json"
  before = finished.stat().st_mtime_ns
  assert reproduce.main(["--data", str(data), "--budget", "smoke", "--rows",
                         "convmixer-plain,convmixer-etc", "--out", str(again)]) == 0
  assert finished.stat().st_mtime_ns == before  # Finished rows are skipped.
  resumed = json.loads((again / "runs" / "convmixer-etc" / "metrics.json").read_text())
  original = json.loads((out / "runs" / "convmixer-etc" / "metrics.json").read_text())
  assert resumed["step"] == original["step"] == 4
  # Exact resume: the same evaluation, to the last bit, as the uninterrupted run.
  assert resumed["eval_loss"] == original["eval_loss"]
  assert resumed["history"] == original["history"]
  redone = json.loads((again / "results.json").read_text())["rows"]["convmixer-etc"]
  assert redone["top1"] == doc["rows"]["convmixer-etc"]["top1"]


def test_folder_cache_is_keyed_by_file_contents(tmp_path):
  data = write_cifar_like(tmp_path / "cifar", n_train=1, n_test=1)
  files, labels, _ = sources.list_labelled_files(str(data / "train"))
  cache = tmp_path / "cache"
  first = sources.decode_folder_split(files, labels, 32, str(cache))
  assert len(os.listdir(cache)) == 1
  np.testing.assert_array_equal(first.array, sources.decode_folder_split(files, labels, 32).array)
  hit = sources.decode_folder_split(files, labels, 32, str(cache))
  np.testing.assert_array_equal(hit.array, first.array)
  assert len(os.listdir(cache)) == 1
  # Same names and sizes, other pixels: a new entry, never the stale one.
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(files[0], quality=90)
  changed = sources.decode_folder_split(files, labels, 32, str(cache))
  assert len(os.listdir(cache)) == 2
  assert not np.array_equal(changed.array[0], first.array[0])
  np.testing.assert_array_equal(changed.array[1:], first.array[1:])


def _error(capsys, argv):
  assert reproduce.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("etcjax: error: "), err
  return err[0]


def test_one_line_errors(tmp_path, capsys):
  data = write_cifar_like(tmp_path / "cifar", n_train=1, n_test=1)
  out = ["--out", str(tmp_path / "out")]
  assert "no such folder" in _error(capsys, ["--data", str(tmp_path / "nope"), *out])
  (tmp_path / "empty").mkdir()
  assert "no train folder" in _error(capsys, ["--data", str(tmp_path / "empty"), *out])
  (tmp_path / "hollow" / "train" / "cat").mkdir(parents=True)
  (tmp_path / "hollow" / "test").mkdir()
  assert "holds no images" in _error(capsys, ["--data", str(tmp_path / "hollow"), *out])
  other = write_cifar_like(tmp_path / "other", n_train=1, n_test=1, classes=("a", "b"))
  msg = _error(capsys, ["--data", str(other), *out])
  assert "has classes a, b" in msg and "airplane" in msg
  assert "unknown row 'convmixer-pe'" in _error(
      capsys, ["--data", str(data), "--rows", "convmixer-pe", *out])
  assert "'fast' is not a budget" in _error(capsys, ["--data", str(data), "--budget", "fast",
                                                      *out])
  assert not (tmp_path / "out").exists()  # Nothing written before the checks pass.
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "results.json").write_text(json.dumps({"budget": "cpu", "rows": {}}))
  msg = _error(capsys, ["--data", str(data), "--budget", "smoke", "--rows", "sizes", *out])
  assert "budget 'cpu'" in msg


def test_row_selection():
  rows, sizes = reproduce.select_rows("table3")
  assert {r.id for r in rows} == {"convmixer-etc-jpeg85", "convmixer-etc-jpeg80",
                                  "vit-etc-jpeg85", "vit-etc-jpeg80", "shakedrop-ele-jpeg85",
                                  "shakedrop-ele-jpeg80"} and not sizes
  rows, sizes = reproduce.select_rows("resnet,table4")
  assert [r.id for r in rows] == ["resnet18-plain", "resnet18-etc", "resnet18-pe"] and sizes
  with pytest.raises(UserError, match="selects nothing"):
    reproduce.select_rows(" , ")


def test_reduced_budgets_change_plain_and_encrypted_rows_alike(tmp_path):
  data = str(write_cifar_like(tmp_path / "cifar", n_train=1, n_test=1))
  kw = dict(data=data, out=str(tmp_path), key_file="k", init_from="", num_train=50_000)
  by_id = {r.id: r for r in reproduce.ROWS}
  for budget in ("cpu", "gpu"):
    for model in ("convmixer", "resnet18"):
      plain = reproduce.row_config(by_id[f"{model}-plain"], budget, **kw)
      enc = reproduce.row_config(by_id[f"{model}-etc"], budget, **kw)
      for field in ("model", "batch_size", "num_train_steps", "optimizer", "learning_rate",
                    "schedule", "mixup_alpha", "cutmix_alpha", "dtype"):
        assert plain[field] == enc[field], (budget, model, field)
      assert plain.model_overrides.to_dict() == enc.model_overrides.to_dict()
      assert plain.augment == "flip_crop" and enc.augment == "none"
      assert plain.encryption == "none" and enc.encryption == "etc" and enc.key_file == "k"
  paper = reproduce.row_config(by_id["convmixer-etc"], "paper", **kw)
  assert paper.num_train_steps == 300 * 50_000 // 64 and paper.model == "ConvMixer-256_8"
  assert paper.mixup_alpha == paper.cutmix_alpha == 0.5
  gpu = reproduce.row_config(by_id["convmixer-etc"], "gpu", **kw)
  assert gpu.model == "ConvMixer-256_8" and not gpu.model_overrides.to_dict()
  assert gpu.num_train_steps == 3 * (50_000 // 128) and gpu.dtype == "bfloat16"
  assert isinstance(reproduce.row_config(by_id["vit-etc"], "paper", **kw), str)


def test_etcjax_reproduce_command(tmp_path, capsys):
  from etcjax import cli
  assert cli.main(["reproduce", "--data", str(tmp_path / "nope"), "--out",
                   str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"etcjax: error: --data {tmp_path / 'nope'}: no such folder"]
