"""Entry point for training and evaluation (flax-examples style).

    python -m etcjax.main --config configs/vit_imagenette.py:etc --workdir DIR \\
        [--config.batch_size=64 ...] [--mode eval]

`--config` names a config file with `get_config(arg)` (the part after ":" is `arg`);
`--config.FIELD=VALUE` overrides one field (`etcjax.config` lists them all). The same
flags work after `etcjax train` / `etcjax eval`.

Multi-host: pass `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` on
every process (JAX's gloo/NCCL/TPU collectives), or nothing on a Cloud TPU pod slice,
where `jax.distributed.initialize()` finds the other hosts itself. Every process runs the
same command; only process 0 writes metrics and reports.

Errors a user can fix (bad config, missing data or key, a key that does not match the
checkpoint) print one line `etcjax: error: ...` and exit with status 2.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from etcjax.errors import UserError

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this entry point's flags on `flag_values`."""
  config_flags.DEFINE_config_file(
      "config", None, "Config file, optionally PATH:ARG (ARG is passed to get_config).",
      flag_values=flag_values, lock_config=True)
  flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and TensorBoard logs.",
                      flag_values=flag_values)
  flags.DEFINE_enum("mode", "train", ["train", "eval"],
                    "train (resumes from workdir's checkpoints) or eval (latest checkpoint).",
                    flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None,
                      "Multi-host: HOST:PORT of process 0's coordinator.",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0-based.",
                       flag_values=flag_values)


define_flags(FLAGS)

# Environment variables that Cloud TPU VMs of multi-host slices set.
_TPU_POD_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Joins a multi-process job, if this is one.

  Explicit flags win; otherwise a multi-host Cloud TPU slice (several worker hostnames)
  is auto-detected by `jax.distributed.initialize()`. A single process does nothing.
  """
  import jax
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given):
    if not all(given):
      raise UserError("multi-host runs need all of --coordinator_address, --num_processes "
                      "and --process_id (or none of them on a Cloud TPU pod)")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif "," in os.environ.get(_TPU_POD_ENV[0], "") or os.environ.get(_TPU_POD_ENV[1]):
    jax.distributed.initialize()


class _QuietLibraries(py_logging.Filter):
  """Drops INFO chatter of orbax (a dozen lines per checkpoint); keeps its warnings and
  errors, without their tracebacks (a failed save reaches the user as one error line)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= py_logging.WARNING


def setup_logging() -> None:
  """absl logging at INFO, without orbax's per-checkpoint chatter."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def run(config: Any, workdir: str, mode: str = "train") -> dict[str, Any]:
  """Runs training or evaluation of `config` in `workdir`; returns the metrics document."""
  from etcjax import config as config_lib
  config_lib.validate(config)  # Before the heavy imports: bad configs fail at once.
  import jax

  from etcjax import train
  logging.info("JAX process %d of %d, %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())
  if mode == "eval":
    return train.evaluate(config, workdir)
  return train.train_and_evaluate(config, workdir)


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues | None = None
                ) -> flags.FlagValues:
  """Parses `argv` (argv[0] is the program name) into `flag_values`.

  Args:
    argv: the command line.
    flag_values: where to parse to; None = a fresh set (`define_flags`), so that one
      process can parse several command lines (`etcjax train` called from Python).

  Raises:
    UserError: an unknown flag, a config file that fails (bad variant, syntax), a bad
      `--config.x=y` override, or a missing --config / --workdir.
  """
  if flag_values is None:
    flag_values = flags.FlagValues()
    define_flags(flag_values)
  argv = list(argv)
  saved, sys.argv = sys.argv, argv  # config_flags reads --config.x overrides from sys.argv.
  try:
    flag_values(argv)
  except UserError:
    raise
  except flags.Error as e:
    # Errors raised by get_config arrive wrapped; show the original.
    cause = e.__cause__ or e.__context__
    raise UserError(" ".join(str(cause if isinstance(cause, UserError) else e).split())
                    ) from None
  except (KeyError, AttributeError) as e:
    # ml_collections: an override of a field the config does not have.
    from etcjax.config import base_config
    name = str(e).strip("\"'")
    raise UserError(f"unknown config option {name!r} in a --config.{name} override; valid "
                    f"options: {', '.join(sorted(base_config().keys()))}") from None
  except (ValueError, TypeError) as e:
    raise UserError(f"bad --config override: {' '.join(str(e).split())}") from None
  finally:
    sys.argv = saved
  if flag_values.config is None:
    raise UserError("--config is required (e.g. --config configs/demo.py)")
  if not flag_values.workdir:
    raise UserError("--workdir is required")
  return flag_values


def _print_error(e: BaseException) -> None:
  print(f"etcjax: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)


def _parse_or_exit(argv: list[str]) -> list[str]:
  """absl `flags_parser` for `python -m etcjax.main`: bad flags exit 2 with one line."""
  try:
    parse_flags(argv, FLAGS)
    return argv[:1]
  except UserError as e:
    _print_error(e)
    sys.exit(2)


def run_from_flags(flag_values: flags.FlagValues) -> dict[str, Any]:
  """Runs with parsed flags (`parse_flags`); returns the metrics document."""
  setup_logging()
  from etcjax import xla_cpu
  # Before JAX starts its CPU client: its threads must not own arenas yet.
  if xla_cpu.keep_freed_memory():
    logging.info("glibc malloc keeps freed memory and CPU dispatch is synchronous (faster "
                 "XLA:CPU steps; %s=0 turns it off; see etcjax.xla_cpu)", xla_cpu.ENV_VAR)
  fv = flag_values
  initialize_distributed(fv.coordinator_address, fv.num_processes, fv.process_id)
  return run(fv.config, fv.workdir, fv.mode)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    doc = run_from_flags(FLAGS)
  except (UserError, ValueError, OSError) as e:
    _print_error(e)
    sys.exit(2)
  if doc.get("preempted"):
    # Saved a checkpoint at a preemption notice (SIGTERM) before the last step: tell the
    # scheduler (or launch/supervise.sh) that this run is to be started again.
    from etcjax.preemption import PREEMPTED_EXIT_CODE
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_or_exit)
