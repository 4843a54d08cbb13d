"""Multi-host on one machine: 2 CPU processes x 2 fake devices, as on a TPU pod.

Each process runs the unmodified `python -m etcjax.main` with --coordinator_address /
--num_processes / --process_id, i.e. `jax.distributed.initialize` with gloo collectives;
each loads only its own half of the data and the orbax checkpoints are written by both.
The test also covers preemption on several hosts: SIGTERM goes to process 1 only, and
both must save at the same step and stop; the run then resumes on 2 processes and must
end where an uninterrupted single-process run on 4 devices ends.
"""

from __future__ import annotations

import json
import re
import signal

import jax
import numpy as np
import pytest
from _runs import (
  free_port,
  make_run_files,
  restore_state,
  saved_steps,
  start_main,
  tail,
  wait_all,
  wait_for_text,
)

from etcjax.preemption import PREEMPTED_EXIT_CODE


def start_two(config, workdir, tmp_path, tag, *overrides):
  port = free_port()
  logs = [tmp_path / f"{tag}{i}.log" for i in range(2)]
  procs = [start_main(config, workdir, *overrides, devices=2, log=logs[i],
                      process=(port, 2, i), cache=tmp_path / "cache") for i in range(2)]
  return procs, logs


@pytest.mark.slow
def test_two_processes_preempt_resume_and_match_one_process(tmp_path):
  config = make_run_files(tmp_path)
  multi, single = tmp_path / "multi", tmp_path / "single"

  # 1. Two processes, far more steps than they will get to; only process 1 is told to stop.
  procs, logs = start_two(config, multi, tmp_path, "first", "--config.num_train_steps=100000")
  wait_for_text(logs[0], r"(\[2\] |step 2/)", procs)
  procs[1].send_signal(signal.SIGTERM)
  codes = wait_all(procs, logs)
  assert codes == [PREEMPTED_EXIT_CODE] * 2, "\n".join(tail(log) for log in logs)
  (step,) = saved_steps(multi)
  for log in logs:  # Both agreed on the step (the checkpoint needs both to be written).
    assert re.findall(r"saving at step (\d+)", log.read_text()) == [str(step)]
  assert "JAX process 1 of 2, 2 local / 4 global devices" in logs[1].read_text()
  assert "8 train / 4 eval examples on process 1" in logs[1].read_text()
  end = step + 2

  # 2. Resume on two processes, and (at the same time) train from scratch on one process
  #    with four devices, both to the same final step.
  procs, logs = start_two(config, multi, tmp_path, "resume", f"--config.num_train_steps={end}")
  single_log = tmp_path / "single.log"
  procs.append(start_main(config, single, f"--config.num_train_steps={end}", devices=4,
                          log=single_log))
  logs.append(single_log)
  assert wait_all(procs, logs) == [0, 0, 0], "\n".join(tail(log) for log in logs)
  for log in logs[:2]:
    assert f"resumed from the checkpoint at step {step}" in log.read_text()
  assert "16 train / 8 eval examples on process 0" in single_log.read_text()

  # Same metrics and parameters; only the order of float sums differs.
  m_multi = json.loads((multi / "metrics.json").read_text())
  m_single = json.loads((single / "metrics.json").read_text())
  assert m_multi["step"] == m_single["step"] == end
  for k in ("eval_loss", "eval_accuracy", "train_loss"):
    np.testing.assert_allclose(m_multi["history"][-1][k], m_single["history"][-1][k],
                               rtol=1e-4, err_msg=k)
  s_multi, s_single = restore_state(multi, end), restore_state(single, end)
  assert int(s_multi["step"]) == int(s_single["step"]) == end
  assert jax.tree.structure(s_multi) == jax.tree.structure(s_single)
  for a, b in zip(jax.tree.leaves(s_multi), jax.tree.leaves(s_single), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Training moved the parameters (the comparison is not between two initialisations).
  first = restore_state(multi, step)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(first["params"]),
                                                   jax.tree.leaves(s_multi["params"]),
                                                   strict=True)]
  assert any(moved)
