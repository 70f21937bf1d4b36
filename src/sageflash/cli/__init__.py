"""The ``sageflash`` command: ``run`` (the test-sageflash tool, the default), ``dump``, ``compare``, ``bench``.

Each subcommand module has ``register(subparsers)``, which adds its parser and sets ``func``
(called with the parsed namespace, returning the exit code).
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import bench
from . import compare, dump, run

SUBCOMMANDS = [run, dump, compare, bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sageflash", description=(__doc__ or "").partition("\n")[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]  # bare `sageflash [flags]` is `sageflash run [flags]`
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit, where a closed pipe would escape the handler below
        return code
    except BrokenPipeError:  # the reader left (`sageflash run --list | head -1`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the exit's flush fails again
        return 1
    except (ValueError, OSError) as err:  # bad input, dump or file (DumpError is a ValueError)
        print(f"sageflash: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
