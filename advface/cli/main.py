"""Entry point of the ``advface`` command: builds the parser from the subcommand modules and runs one."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from advface import __version__
from advface.cli import (
    audit,
    embed,
    generate,
    keygen,
    keyservice,
    maintenance,
    persguard,
    protect,
    protect_image,
    reencode,
    rotate_key,
    rotate_transform,
    serve,
    train_generator,
    train_shadow,
)
from advface.errors import AdvfaceError

#: Subcommand modules; each has ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
SUBCOMMANDS = [
    embed,
    protect,
    train_shadow,
    train_generator,
    generate,
    serve,
    keygen,
    rotate_key,
    reencode,
    protect_image,
    audit,
    rotate_transform,
    keyservice,
    maintenance,
    persguard,
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (used by ``main`` and by the docs)."""
    parser = argparse.ArgumentParser(prog="advface", description="Template protection for face-recognition systems.")
    parser.add_argument("--version", action="version", version=f"advface {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        sp = sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__)
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``advface`` with ``argv``; returns the exit status (2 for usage or configuration errors)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args._run(args))
    except AdvfaceError as exc:
        print(f"advface {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
