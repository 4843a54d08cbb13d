"""The `etcjax` command.

Each subcommand lives in its own module under `etcjax.commands` and exposes
`register(subparsers)`, which adds an argparse sub-parser whose `func` default takes
the parsed arguments and returns an exit code. Modules are imported lazily only to
build the parser, so `etcjax --help` stays quick.

Bad input raises `etcjax.errors.UserError` (or `ValueError` / `OSError` from the
library); this module prints it as one line, `etcjax: error: ...`, and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from etcjax.errors import UserError

# Subcommand modules, in the order `etcjax --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "etcjax.commands.owner",
    "etcjax.commands.train",
    "etcjax.commands.privacy",
    "etcjax.commands.predict",
    "etcjax.commands.reproduce",
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="etcjax",
      description="Encryption-then-Compression (EtC) images for privacy-preserving "
      "image classification.")
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for name in COMMAND_MODULES:
    importlib.import_module(name).register(subparsers)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return int(args.func(args) or 0)
  except (UserError, ValueError, OSError) as e:
    msg = " ".join(str(e).split()) or type(e).__name__
    print(f"etcjax: error: {msg}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("etcjax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
