"""`etcjax reproduce`: the paper's CIFAR-10 tables on real data (`etcjax.reproduce`).

    etcjax reproduce --data DIR --budget cpu --out results/cifar10-cpu [--rows convmixer]
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
  from etcjax import reproduce  # Standard library only at import: `etcjax --help` stays quick.
  p = subparsers.add_parser(
      "reproduce", help="run the paper's CIFAR-10 rows and write results beside its figures",
      description="Runs the paper's CIFAR-10 rows (Tables II-IV) at a budget and writes "
      "OUT/results.{json,md} and OUT/curves.png; resumes an interrupted run. See "
      "docs/reproduction.md.")
  reproduce.add_arguments(p)
  p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
  from etcjax import reproduce, xla_cpu
  xla_cpu.keep_freed_memory()  # Before JAX starts (see etcjax.xla_cpu).
  return reproduce.run_from_args(args)
