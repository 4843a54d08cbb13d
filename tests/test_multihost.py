"""Multi-host on one machine: 2 CPU processes x 2 fake devices, as on a TPU pod.

Each process runs the unmodified `python -m etcjax.main` with --coordinator_address /
--num_processes / --process_id, i.e. `jax.distributed.initialize` with gloo collectives.
The data (`_runs.CONFIG`: 21 training images in batches of 4, random crops, flips, mixup /
CutMix; 9 test images, 5 / 4 per process) make the order of examples and their random
draws matter, so the runs below are equal only if the global batch of every step, and the
randomness of every example in it, do not depend on the process / device layout.

One run covers three claims:
  * preemption on several hosts: SIGTERM goes to process 1 only, and both processes
    save at the same step k and stop;
  * 2 processes x 2 devices train exactly as 1 process x 4 devices: the 2x2 checkpoint at
    step k and its evaluations equal those of an uninterrupted 1x4 run;
  * a run preempted on 2 processes and resumed on 1 process (another slice) continues
    the same run: it ends where the uninterrupted 1x4 run ends.
"Equal" is up to the order of float sums (all-reduce over gloo vs within one process):
|a - b| <= ATOL + RTOL |b| elementwise (float32 parameters of magnitude ~0.01-1). The
largest parameter difference measured is 7e-7, 14x below ATOL; a run whose batches depend
on the layout (each process drawing from its own shard, as before) misses by orders of
magnitude (docs/reliability.md).
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

# Float tolerance of the layout comparisons (module docstring).
RTOL, ATOL = 1e-5, 1e-5


def start_two(config, workdir, tmp_path, tag, *overrides):
  port = free_port()
  logs = [tmp_path / f"{tag}{i}.log" for i in range(2)]
  procs = [start_main(config, workdir, *overrides, devices=2, log=logs[i],
                      process=(port, 2, i), cache=tmp_path / "cache") for i in range(2)]
  return procs, logs


def assert_states_close(a: dict, b: dict, what: str) -> float:
  """Asserts two saved train states are equal within RTOL / ATOL.

  Returns:
    (largest |a - b|, largest |a - b| / (ATOL + RTOL |b|): the share of the tolerance used).
  """
  assert jax.tree.structure(a) == jax.tree.structure(b)
  worst, used = 0.0, 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    diff = np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))
    worst = max(worst, float(np.max(diff, initial=0.0)))
    used = max(used, float(np.max(diff / (ATOL + RTOL * np.abs(y)), initial=0.0)))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL, err_msg=what)
  return worst, used


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_one(tmp_path):
  config = make_run_files(tmp_path)
  multi, single = tmp_path / "multi", tmp_path / "single"
  evals = "--config.eval_every_steps=2"

  # 1. Two processes, far more steps than they will get to; only process 1 is told to stop.
  procs, logs = start_two(config, multi, tmp_path, "first", "--config.num_train_steps=100000",
                          evals)
  wait_for_text(logs[0], r"(\[2\] |step 2/)", procs)
  procs[1].send_signal(signal.SIGTERM)
  codes = wait_all(procs, logs)
  assert codes == [PREEMPTED_EXIT_CODE] * 2, "\n".join(tail(log) for log in logs)
  (step,) = saved_steps(multi)
  for log in logs:  # Both agreed on the step (the checkpoint needs both to be written).
    assert re.findall(r"saving at step (\d+)", log.read_text()) == [str(step)]
  text = logs[1].read_text()
  assert "JAX process 1 of 2, 2 local / 4 global devices" in text
  assert "21 train examples, 4 eval examples on process 1" in text
  end = step + 3

  # 2. Resume on one process with four devices and, at the same time, train from scratch
  #    on one process with four devices (saving at `step` too), both to the same end.
  resume_log, single_log = tmp_path / "resume.log", tmp_path / "single.log"
  procs = [start_main(config, multi, f"--config.num_train_steps={end}", evals, devices=4,
                      log=resume_log, cache=tmp_path / "cache"),
           start_main(config, single, f"--config.num_train_steps={end}", evals,
                      f"--config.checkpoint_every_steps={step}", devices=4, log=single_log,
                      cache=tmp_path / "cache")]
  logs = [resume_log, single_log]
  assert wait_all(procs, logs) == [0, 0], "\n".join(tail(log) for log in logs)
  assert f"resumed from the checkpoint at step {step}" in resume_log.read_text()
  assert "JAX process 0 of 1, 4 local / 4 global devices" in resume_log.read_text()

  # The 2x2 run up to `step` is the 1x4 run up to `step`.
  at_step = assert_states_close(restore_state(multi, step), restore_state(single, step),
                                f"2x2 vs 1x4 at step {step}")
  # Its evaluations (on 2 processes, 5 + 4 test images) too, and the resumed run's.
  h_multi = json.loads((multi / "metrics.json").read_text())["history"]
  h_single = json.loads((single / "metrics.json").read_text())["history"]
  assert [h["step"] for h in h_multi] == [h["step"] for h in h_single]
  assert h_multi[0]["step"] == 2 <= step  # Evaluated on two processes.
  for a, b in zip(h_multi, h_single, strict=True):
    assert a["eval_examples"] == b["eval_examples"] == 9
    for k in ("eval_loss", "eval_accuracy", "train_loss"):
      np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL,
                                 err_msg=f"{k} at step {a['step']}")
  # Preempted on 2 processes, resumed on 1: the same run as the uninterrupted one.
  s_multi, s_single = restore_state(multi, end), restore_state(single, end)
  assert int(s_multi["step"]) == int(s_single["step"]) == end
  at_end = assert_states_close(s_multi, s_single, f"resumed vs uninterrupted at {end}")
  print(f"max |param difference| (share of the tolerance): {at_step[0]:.2e} "
        f"({at_step[1]:.2f}) at step {step}, 2x2 vs 1x4; {at_end[0]:.2e} ({at_end[1]:.2f}) "
        f"at step {end}, 2x2 then 1x4 vs 1x4")
  # Training moved the parameters (the comparison is not between two initialisations).
  first = restore_state(multi, step)
  moved = [not np.allclose(a, b, rtol=RTOL, atol=ATOL)
           for a, b in zip(jax.tree.leaves(first["params"]),
                           jax.tree.leaves(s_multi["params"]), strict=True)]
  assert any(moved)
