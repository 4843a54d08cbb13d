"""The demo at toy size (`python -m etcjax.demo --tiny`) and the report it writes."""

from __future__ import annotations

import json

import pytest

from etcjax import demo, keys, report
from etcjax.errors import UserError


@pytest.mark.slow  # about a minute on 2 cores: runs in `make test-slow`
def test_tiny_demo_trains_evaluates_and_reports_and_runs_again(tmp_path, capsys):
  assert demo.main(["--out", str(tmp_path), "--tiny"]) == 0
  out = capsys.readouterr().out
  check_tiny_demo(tmp_path, out)
  first = {folder: json.loads((tmp_path / "runs" / folder / "metrics.json").read_text())
           for _, folder, _ in demo.DEMO_RUNS}
  key = (tmp_path / "owner.key").read_bytes()

  # Again into the same folder (`make demo` twice): the key is reused and the finished
  # runs resume at their last step, except one whose recorded settings differ (as after
  # a run with other options), which starts again from scratch.
  record = tmp_path / "runs" / "resnet_etc" / "config.json"
  doc = json.loads(record.read_text())
  doc["config"]["num_train_steps"] = 3
  record.write_text(json.dumps(doc))
  assert demo.main(["--out", str(tmp_path), "--tiny"]) == 0
  out = capsys.readouterr().out
  check_tiny_demo(tmp_path, out)
  assert (tmp_path / "owner.key").read_bytes() == key
  assert out.count("(resuming at step 4)") == 2
  assert "resnet_etc holds a run of other settings: starting it again" in out
  for _, folder, _ in demo.DEMO_RUNS:
    again = json.loads((tmp_path / "runs" / folder / "metrics.json").read_text())
    assert again["history"] == first[folder]["history"], folder  # Exact resume / rerun.


def test_second_run_reuses_the_key_and_resumes_only_runs_of_the_same_settings(tmp_path):
  """What `make demo` twice relies on, without training (the slow test above trains)."""
  small = {"photos": ["chelsea"], "size": (64, 64)}
  first = demo.run_owner_roundtrip(str(tmp_path), **small)
  again = demo.run_owner_roundtrip(str(tmp_path), **small)
  assert again["key_fingerprint"] == first["key_fingerprint"]
  tokens = demo.DEMO_RUNS[1][2]
  config = demo._demo_config(tokens, first["key"], tiny=True)
  workdir = tmp_path / "runs" / "convmixer_etc"
  assert demo._prepare_workdir(str(workdir), config, first["key_fingerprint"]) == 0
  # A run of these settings, with checkpoints 2 and 4 (and an unfinished save): resumed.
  (workdir / "checkpoints" / "2").mkdir(parents=True)
  (workdir / "checkpoints" / "4").mkdir()
  (workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()
  record = {"config": json.loads(config.to_json()), "encryption": "etc",
            "key_fingerprint": first["key_fingerprint"]}
  record["config"]["key_file"] = "/elsewhere/owner.key"  # A moved folder: still the same.
  (workdir / "config.json").write_text(json.dumps(record))
  assert demo._prepare_workdir(str(workdir), config, first["key_fingerprint"]) == 4
  # Another key, or other settings (--tiny or not): removed, started again.
  assert demo._prepare_workdir(str(workdir), config, "0123456789abcdef") == 0
  assert not workdir.exists()
  for other in (demo._demo_config(tokens, first["key"], tiny=False), config):
    (workdir / "checkpoints" / "2").mkdir(parents=True)
    record["config"] = json.loads(other.to_json())
    (workdir / "config.json").write_text(json.dumps(record))
    want = 2 if other is config else 0
    assert demo._prepare_workdir(str(workdir), config, first["key_fingerprint"]) == want


def test_demo_errors_are_one_line(tmp_path, capsys):
  (tmp_path / "file").write_text("")
  assert demo.main(["--out", str(tmp_path / "file"), "--tiny"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("etcjax: error: cannot make the output folder") and err.count("\n") == 1
  keyfile = tmp_path / "out" / "owner.key"
  keyfile.parent.mkdir()
  keys.EtcKey.insecure_from_seed(3).save(keyfile)
  keyfile.chmod(0o644)
  assert demo.main(["--out", str(keyfile.parent), "--owner-only"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"etcjax: error: key file {keyfile} has mode 0644") \
      and err.count("\n") == 1
  keyfile.write_text("not a key")
  keyfile.chmod(0o600)
  assert demo.main(["--out", str(keyfile.parent), "--owner-only"]) == 2
  assert "is not an etcjax key file" in capsys.readouterr().err


def check_tiny_demo(tmp_path, out):
  """The outputs of `python -m etcjax.demo --tiny --out tmp_path`."""
  assert f"report: {tmp_path / 'report.md'}" in out
  text = (tmp_path / "report.md").read_text()
  for figure in ("examples.png", "accuracy.png", "patch_embeddings.png",
                 "owner_roundtrip.png"):
    assert (tmp_path / figure).stat().st_size > 1000, figure
    assert f"({figure})" in text
  for label, folder, _ in demo.DEMO_RUNS:
    metrics = json.loads((tmp_path / "runs" / folder / "metrics.json").read_text())
    assert metrics["step"] == 4 and 0 <= metrics["eval_accuracy"] <= 1
    assert f"| {label} |" in text
  fingerprint = json.loads((tmp_path / "owner_roundtrip.json").read_text())["key_fingerprint"]
  etc_metrics = json.loads((tmp_path / "runs" / "convmixer_etc" / "metrics.json").read_text())
  assert etc_metrics["key_fingerprint"] == fingerprint
  assert "is refused: `etcjax: error:" in text and fingerprint in text
  # The key is in owner.key (and other.key) and nowhere else.
  secret = json.loads((tmp_path / "owner.key").read_text())["key"]
  for path in tmp_path.rglob("*"):
    if path.is_file() and path.suffix != ".key":
      assert secret.encode() not in path.read_bytes(), path


def test_report_of_missing_run_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="no metrics.json"):
    report.Run.load(str(tmp_path))
  assert report.main(["--out", str(tmp_path / "r"), str(tmp_path)]) == 2
