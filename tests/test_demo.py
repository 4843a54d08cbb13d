"""The demo at toy size (`python -m etcjax.demo --tiny`) and the report it writes."""

from __future__ import annotations

import json

import pytest

from etcjax import demo, report
from etcjax.errors import UserError


@pytest.mark.slow  # about a minute on 2 cores: runs in `make test-slow`
def test_tiny_demo_trains_evaluates_and_reports(tmp_path, capsys):
  assert demo.main(["--out", str(tmp_path), "--tiny"]) == 0
  out = capsys.readouterr().out
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
