"""Preemption notices: stop training at a step every host agrees on, right after a checkpoint.

Cloud TPU Spot / preemptible VMs, maintenance events, Kubernetes and Slurm all announce the
end of a job by sending SIGTERM to its processes some seconds before killing them; so does
`launch/stop.sh`. On a pod only some hosts may get the signal, and they may be at different
steps when it arrives, yet a checkpoint must be written by every host at the same step.

* Several processes (`jax.distributed.initialize` was called): JAX's preemption sync
  manager catches SIGTERM in any process, tells the others through the coordination
  service, and `multihost_utils.reached_preemption_sync_point(step)` then turns True on
  every host at the same step (one past the largest step any host had reached). It must
  be asked at every step, by every host.
* One process: a SIGTERM handler sets a flag that the next step sees.

    watch = PreemptionWatch()
    for step in range(start, num_steps + 1):
      state = train_step(state, batch)
      if watch.reached(step):
        save(step); break
    watch.close()
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
from absl import logging
from jax.experimental import multihost_utils

# What `python -m etcjax.main` exits with after saving at a preemption notice: 128 + SIGTERM,
# as a shell reports a process ended by SIGTERM, so that schedulers (and launch/worker.sh)
# see a run that stopped early and should be started again to resume.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class PreemptionWatch:
  """Answers "save now and stop?" once per training step; see the module docstring."""

  def __init__(self) -> None:
    self._notified = threading.Event()
    self._previous_handler = None
    self._multihost = jax.process_count() > 1
    # Signal handlers can only be installed from the main thread; elsewhere (a notebook's
    # worker thread) the run simply has no preemption notice.
    if not self._multihost and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
    del signum, frame
    self._notified.set()

  def reached(self, step: int) -> bool:
    """True when the run should save a checkpoint at `step` and stop (the same on all hosts).

    Call it once per step, on every process, with the step just completed.
    """
    if self._multihost:
      reached = multihost_utils.reached_preemption_sync_point(step)
    else:
      reached = self._notified.is_set()
    if reached:
      logging.warning("Preemption notice (SIGTERM): saving at step %d, then stopping.", step)
    return reached

  def close(self) -> None:
    """Restores the SIGTERM handler that was there before (single process only)."""
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def __enter__(self) -> PreemptionWatch:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
