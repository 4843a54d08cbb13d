"""bench_models.py and bench_train.py run end to end (tiny sizes; timings are not checked)."""

import json
import os
import subprocess
import sys

import pytest

from etcjax.models import depthwise_cpu

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_models.py")


@pytest.mark.slow
def test_model_benchmark_runs_every_requested_formulation():
  r = subprocess.run(
      [sys.executable, SCRIPT, "--steps", "1", "--convmixer-batch", "1", "--vit-batch", "1",
       "--depthwise", "auto,shift", "--attention", "auto", "--mlp", "auto,dense", "--no-torch"],
      capture_output=True, text=True, timeout=900, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  cpu_impl = "ffi" if depthwise_cpu.available() else "shift"
  for label in (f"ConvMixer-256/8 [{cpu_impl},CNHW]", "ConvMixer-256/8 [shift,CNHW]",
                "ViT-S/16 [heads,cpu]", "ViT-S/16 [heads,dense]"):
    assert label in out, out
  assert "model GFLOP/step" in out and out.count("page faults/step") == 4


@pytest.mark.slow
def test_train_benchmark_quick_run_writes_every_case(tmp_path):
  script = os.path.join(os.path.dirname(SCRIPT), "bench_train.py")
  out = tmp_path / "bench_train.json"
  r = subprocess.run([sys.executable, script, "--quick", "--steps", "1", "--only", "steps",
                      "--out", str(out)], capture_output=True, text=True, timeout=900,
                     check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  doc = json.loads(out.read_text())
  cases = doc["steps_results"]
  assert len(cases) == 3 and "pipeline_results" not in doc
  assert all(c["plain_images_per_sec"] > 0 and c["etc_images_per_sec"] > 0 for c in cases)
