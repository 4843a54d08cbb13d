"""The entry points: `python -m etcjax.main` and `etcjax train` / `etcjax eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from etcjax import cli, main
from etcjax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.py")


def run_main(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  return subprocess.run([sys.executable, "-m", "etcjax.main", *args], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=300)


def test_etcjax_train_then_eval(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  assert cli.main(["train", "--config", f"{DEMO}:tiny", "--workdir", workdir,
                   "--config.num_train_steps=2", "--config.model_overrides.dim=16"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["step"] == 2 and summary["key_fingerprint"] is None
  doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert doc["config"]["num_train_steps"] == 2 and doc["config"]["model_overrides"]["dim"] == 16
  assert cli.main(["eval", "--config", f"{DEMO}:tiny", "--workdir", workdir,
                   "--config.model_overrides.dim=16"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["eval_accuracy"] == pytest.approx(doc["eval_accuracy"])
  assert json.loads((tmp_path / "run" / "eval.json").read_text())["step"] == 2
  # Again into the same workdir: the finished run is resumed at its end, and stays as it was.
  assert cli.main(["train", "--config", f"{DEMO}:tiny", "--workdir", workdir,
                   "--config.num_train_steps=2", "--config.model_overrides.dim=16"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
  assert json.loads((tmp_path / "run" / "metrics.json").read_text())["history"] == \
      doc["history"]


def test_etcjax_train_errors_are_one_line(tmp_path, capsys):
  assert cli.main(["train", "--workdir", str(tmp_path)]) == 2
  assert capsys.readouterr().err.strip() == "etcjax: error: --config is required (e.g. --config " \
      "configs/demo.py)"
  assert cli.main(["eval", "--config", f"{DEMO}:tiny", "--workdir", str(tmp_path)]) == 2
  assert "holds no checkpoint" in capsys.readouterr().err
  assert cli.main(["train", "--help"]) == 0
  assert "--coordinator_address" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    ([f"--config={DEMO}:tiny,bogus"], "unknown config variant 'bogus'; valid: plain, etc"),
    ([f"--config={DEMO}:tiny", "--config.foo=1"], "unknown config option 'foo'"),
    ([f"--config={DEMO}:tiny", "--config.batch_size=abc"], "--config.batch_size=abc"),
    ([f"--config={DEMO}:tiny", "--config.model=ResNet-99"], "ConvMixer-256_8"),
    ([f"--config={DEMO}:tiny", "--config.dataset=tfds"], "tfds:NAME, folder:PATH"),
    ([f"--config={DEMO}:tiny", "--bogus_flag=1"], "Unknown command line flag 'bogus_flag'"),
])
def test_python_m_main_bad_input_exits_2_with_one_line(tmp_path, args, message):
  proc = run_main(*args, f"--workdir={tmp_path}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("etcjax: error:")]
  assert len(errors) == 1 and message in errors[0]
  assert "Traceback" not in proc.stderr


def test_multi_host_flags_must_come_together():
  with pytest.raises(UserError, match="--coordinator_address, --num_processes"):
    main.initialize_distributed("localhost:1234", None, None)
  main.initialize_distributed(None, None, None)  # A single process: nothing to do.


@pytest.mark.slow
def test_python_m_main_trains(tmp_path):
  proc = run_main(f"--config={DEMO}:tiny", f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ETA" in proc.stderr and "train_loss=" in proc.stderr
  doc = json.loads((tmp_path / "metrics.json").read_text())
  assert doc["step"] == 4
  # Run again into the same workdir: resumes the finished run, trains no further step.
  proc = run_main(f"--config={DEMO}:tiny", f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from the checkpoint at step 4" in proc.stderr
  assert "train_loss=" not in proc.stderr
  assert json.loads((tmp_path / "metrics.json").read_text())["history"] == doc["history"]
