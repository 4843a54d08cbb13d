"""Faults a long run meets (docs/reliability.md): SIGKILL at any moment, a disk filling up.

SIGTERM (a preemption notice) is in test_preemption.py and, on one host of two, in
test_multihost.py; a NaN loss, a damaged checkpoint and wrong keys in test_train.py.
"""

from __future__ import annotations

import random
import re
import signal
import time

import jax
import numpy as np
import pytest
from _runs import make_run_files, restore_state, saved_steps, start_main, tail, wait_all

END = 8
STEPS = (f"--config.num_train_steps={END}", "--config.checkpoint_every_steps=2",
         "--config.eval_every_steps=4")
TIMEOUT = 900  # Seconds per run: a few on a quiet 2-core CPU, more under load.


def logged_step(log) -> int:
  """The last step a run has logged ("[step] train_loss=...")."""
  steps = re.findall(r"\[(\d+)\] ", log.read_text(errors="replace"))
  return int(steps[-1]) if steps else 0


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_is_exact(tmp_path):
  """Killed (SIGKILL: no handler, no cleanup, async saves cut off) at random moments and
  started again each time, a run ends bit-identical to an uninterrupted one."""
  config = make_run_files(tmp_path)
  cache = tmp_path / "cache"
  ref, killed = tmp_path / "ref", tmp_path / "killed"
  proc = start_main(config, ref, *STEPS, devices=1, log=tmp_path / "ref.log", cache=cache)
  assert wait_all([proc], [tmp_path / "ref.log"], TIMEOUT) == [0], tail(tmp_path / "ref.log")
  rng = random.Random(1)
  kills = []
  for attempt in range(3):  # Two kills, then a run to the end.
    log = tmp_path / f"killed{attempt}.log"
    proc = start_main(config, killed, *STEPS, devices=1, log=log, cache=cache)
    if attempt == 2:
      break
    target = min(max(saved_steps(killed) or [0]) + rng.randint(1, 3), END - 1)
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and logged_step(log) < target and time.monotonic() < deadline:
      time.sleep(0.02)
    assert proc.poll() is None, tail(log)
    time.sleep(rng.uniform(0.0, 0.3))  # Anywhere in a step, a save, an evaluation.
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    kills.append(logged_step(log))
  assert wait_all([proc], [log], TIMEOUT) == [0], tail(log)
  assert len(kills) == 2 and max(kills) < END, kills
  print(f"killed after logging steps {kills}; checkpoints {saved_steps(killed)}")
  assert saved_steps(killed)[-1] == END
  a, b = restore_state(ref, END), restore_state(killed, END)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
