"""``python -m statemachine``: the command line (argparse)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from . import bench, bench_ray, demo, inspect_cmd, simulate

__all__ = ["main"]

#: Each command module has ``add_parser(subparsers)`` (which sets ``func``) and its own ``run``.
COMMANDS = (demo, simulate, bench, bench_ray, inspect_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m statemachine", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code: int = args.func(args)
    return code
