"""Tests for etcjax.demo: the owner-side round trip on bundled photos."""

import json
import os
import stat

import pytest

from etcjax import demo


def test_owner_roundtrip_small(tmp_path):
  r = demo.run_owner_roundtrip(str(tmp_path), photos=["chelsea", "coffee"], size=(64, 96))
  assert [x["name"] for x in r["images"]] == ["chelsea", "coffee"]
  for x in r["images"]:
    assert x["lossless_roundtrip"]
    assert (x["height"], x["width"]) == (64, 96)
    assert x["raw_bytes"] == 64 * 96 * 3
    assert 0.8 < x["etc_jpeg_bytes"] / x["plain_jpeg_bytes"] < 1.25
    assert x["etc_jpeg_psnr"] > 25
    if r["jpeg_decoder"] == "nofancy":
      assert abs(x["etc_jpeg_psnr"] - x["plain_jpeg_psnr"]) < 1.0
  for name in ("report", "figure", "json", "key"):
    assert os.path.getsize(r[name]) > 0
  assert stat.S_IMODE(os.stat(r["key"]).st_mode) == 0o600
  report = open(r["report"]).read()
  assert "chelsea" in report and r["key_fingerprint"] in report
  secret = json.load(open(r["key"]))["key"]
  assert secret not in report and secret not in open(r["json"]).read()
  assert json.load(open(r["json"]))["totals"]["raw_bytes"] == 2 * 64 * 96 * 3


def test_demo_main_prints_report_path(tmp_path, capsys):
  pytest.importorskip("matplotlib")
  rc = demo.main(["--out", str(tmp_path / "d"), "--owner-only", "--quality", "80",
                  "--photos", "astronaut", "flower", "--size", "64", "64"])
  assert rc == 0
  out = capsys.readouterr().out
  assert f"report: {tmp_path / 'd' / 'owner_roundtrip.md'}" in out
  assert "2 photos" in out and "QF80" in out
