"""Preemption safety: on SIGTERM a run saves a checkpoint, then exits with 143.

The multi-process case (SIGTERM to one of two processes, both save at the same step) is
in test_multihost.py, which shares that run with the multi-host equality check.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
from _runs import (
  make_run_files,
  restore_state,
  saved_steps,
  start_main,
  tail,
  wait_all,
  wait_for_text,
)

from etcjax import preemption


def test_watch_single_process_sees_sigterm():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionWatch() as watch:
    assert not watch.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)  # Would end pytest without the watch's handler.
    assert watch.reached(2)
    assert watch.reached(3)  # It stays set: the loop saves and stops at the first one.
  assert signal.getsignal(signal.SIGTERM) is previous


def test_preempted_exit_code_is_what_the_launch_scripts_expect():
  # launch/worker.sh reports exit code 143 as PREEMPTED and supervise.sh restarts it.
  assert preemption.PREEMPTED_EXIT_CODE == 128 + signal.SIGTERM == 143


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
  """One process: the SIGTERM handler path (a single-host TPU VM, a GPU box). Resuming from
  such a checkpoint is checked on two processes in test_multihost.py."""
  config = make_run_files(tmp_path)
  workdir = tmp_path / "run"
  log = tmp_path / "run.log"
  # Far more steps than it will get to: only the signal stops it.
  proc = start_main(config, workdir, "--config.num_train_steps=100000", devices=1, log=log)
  wait_for_text(log, r"(\[2\] |step 2/)", [proc])
  proc.send_signal(signal.SIGTERM)
  (code,) = wait_all([proc], [log])
  assert code == preemption.PREEMPTED_EXIT_CODE, tail(log)
  (step,) = saved_steps(workdir)
  assert 2 <= step < 100000
  assert f"saving at step {step}" in log.read_text()
  assert int(restore_state(workdir, step)["step"]) == step
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["preempted"] is True
