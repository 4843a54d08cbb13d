"""`etcjax train` and `etcjax eval`: the `etcjax.main` entry point as subcommands.

    etcjax train --config configs/demo.py:etc --workdir runs/demo [--config.FIELD=VALUE ...]
    etcjax eval  --config configs/demo.py:etc --workdir runs/demo

Everything after the subcommand is parsed by `etcjax.main`'s absl flags (so
`--config.x=y` overrides work exactly as with `python -m etcjax.main`).
"""

from __future__ import annotations

import argparse
import json
import sys

_HELP = {"train": "train a classifier (resumes from WORKDIR's checkpoints)",
         "eval": "evaluate the latest checkpoint in WORKDIR"}


def register(subparsers: argparse._SubParsersAction) -> None:
  for mode, text in _HELP.items():
    # prefix_chars="+": leave every --flag to absl, which knows --config.x=y.
    p = subparsers.add_parser(
        mode, help=text, prefix_chars="+", add_help=False,
        description=f"{text}. Flags: --config FILE[:ARG] --workdir DIR "
        "[--config.FIELD=VALUE ...] [--coordinator_address HOST:PORT --num_processes N "
        "--process_id I]. See `python -m etcjax.main --helpshort`.")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="etcjax.main flags")
    p.set_defaults(func=lambda args, mode=mode: run(mode, args.flags))


def run(mode: str, argv: list[str]) -> int:
  """Parses `argv` as etcjax.main flags and trains or evaluates; prints the final metrics.

  Returns 0, or 143 when a training run stopped early at a preemption notice (SIGTERM).
  """
  from etcjax import main
  if {"-h", "--help", "--helpshort"} & set(argv):
    print(f"usage: etcjax {mode} --config FILE[:ARG] --workdir DIR [--config.FIELD=VALUE ...]\n"
          f"{_HELP[mode]}; config fields: etcjax/config.py.\n"
          f"{main.FLAGS.module_help(main)}")
    return 0
  flag_values = main.parse_flags([f"etcjax {mode}", *argv, f"--mode={mode}"])
  result = main.run_from_flags(flag_values)
  summary = {k: result.get(k) for k in ("step", "eval_accuracy", "eval_loss",
                                        "key_fingerprint")}
  print(json.dumps(summary), file=sys.stdout)
  if result.get("preempted"):
    from etcjax.preemption import PREEMPTED_EXIT_CODE
    return PREEMPTED_EXIT_CODE  # Saved at a SIGTERM before the last step: start it again.
  return 0
