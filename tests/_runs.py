"""Helpers for tests that run Python in subprocesses: `python -m etcjax.main` (multi-host,
SIGTERM) and scripts on several fake CPU devices.

Each run gets its own environment: `XLA_FLAGS=--xla_force_host_platform_device_count=N`
must be set before JAX starts, which the pytest process has already done with 1 device.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# A config small enough to compile in seconds, on data where the order of examples matters:
# 21 training images (an odd count) in batches of 4, so each epoch has 5.25 batches and
# batches straddle epochs; random crops, flips and mixup / CutMix, so each example's
# augmentation randomness matters too; 9 test images, split 5 / 4 over two processes.
# A run must give the same batches and the same random draws for any process / device
# layout; losses and parameters then differ only by the order of float sums.
CONFIG = '''\
from etcjax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.dataset = "folder:{data}"
  c.image_size = 16
  c.block_size = 4
  c.encryption = "etc"
  c.key_file = "{key}"
  c.model = "ConvMixer-tiny-test"
  c.optimizer = "adamw"
  c.schedule = "constant"
  c.learning_rate = 0.01
  c.batch_size = 4
  c.augment = "flip_crop"
  c.mixup_alpha = 0.5
  c.cutmix_alpha = 0.5
  c.num_train_steps = 4
  c.log_every_steps = 1
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 10
  return c
'''

# Training / test images per class (3 classes) of `make_run_files`.
RUN_TRAIN_PER_CLASS, RUN_TEST_PER_CLASS = 7, 3


def make_run_files(tmp: Path) -> Path:
  """Writes a 3-class image folder (21 train, 9 test images), a key and CONFIG under
  `tmp`; returns the config file's path."""
  from PIL import Image

  from etcjax.data.sources import digits_arrays
  from etcjax.keys import EtcKey
  xtr, ytr, xte, yte = digits_arrays()
  for split, x, y, n in (("train", xtr, ytr, RUN_TRAIN_PER_CLASS),
                         ("test", xte, yte, RUN_TEST_PER_CLASS)):
    for c in (0, 1, 2):
      folder = tmp / "data" / split / str(c)
      folder.mkdir(parents=True)
      for j, i in enumerate(np.flatnonzero(y == c)[:n]):
        Image.fromarray(x[i]).save(folder / f"{j:02d}.png")
  key = tmp / "run.key"
  EtcKey.insecure_from_seed(6).save(key)
  config = tmp / "tiny_config.py"
  config.write_text(CONFIG.format(data=tmp / "data", key=key))
  return config


def run_on_fake_devices(code: str, devices: int = 8, timeout: float = 300,
                        unset: tuple[str, ...] = ()) -> str:
  """Runs `code` in a fresh Python on `devices` fake CPU devices; returns its stdout.

  Fails the test (with the end of stderr) when the script exits non-zero. `unset` names
  environment variables the script must not inherit.
  """
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  for name in unset:
    env.pop(name, None)
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     timeout=timeout, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_main(config: Path, workdir: Path, *overrides: str, devices: int, log: Path,
               process: tuple[int, int, int] | None = None,
               cache: Path | None = None) -> subprocess.Popen:
  """Starts `python -m etcjax.main` on `devices` fake CPU devices, output to `log`.

  Args:
    process: (port, num_processes, process_id) for a multi-process run, else None.
  """
  cmd = [sys.executable, "-m", "etcjax.main", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  if process is not None:
    port, n, i = process
    cmd += [f"--coordinator_address=localhost:{port}", f"--num_processes={n}",
            f"--process_id={i}"]
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
  if cache is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  with open(log, "wb") as out:
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300
             ) -> list[int]:
  """Waits for every process; kills all of them if one takes too long. Exit codes."""
  deadline = time.monotonic() + timeout
  try:
    return [p.wait(max(1.0, deadline - time.monotonic())) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    raise AssertionError("run timed out:\n" + "\n".join(tail(log) for log in logs)) from None


def wait_for_text(log: Path, pattern: str, procs: list[subprocess.Popen],
                  timeout: float = 300) -> re.Match:
  """Waits until `pattern` (a regex) appears in `log`; fails if a process exits first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    match = re.search(pattern, log.read_text(errors="replace"))
    if match:
      return match
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.2)
  for p in procs:
    p.kill()
  raise AssertionError(f"{pattern!r} never appeared in {log}:\n{tail(log)}")


def tail(log: Path, lines: int = 40) -> str:
  return f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def restore_state(workdir: Path, step: int) -> dict:
  """The train state saved at `step` in `workdir`, as a tree of NumPy arrays."""
  import jax
  import orbax.checkpoint as ocp
  path = workdir / "checkpoints" / str(step) / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, restore_args=restore_args)


def saved_steps(workdir: Path) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() \
      else []
