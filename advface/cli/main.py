"""Entry point of the ``advface`` command: builds the parser from the subcommand modules and runs one.

The library's own subcommands are :data:`SUBCOMMANDS`. The outer layers, which build on the library and which it
never imports (``server/``: ``serve``, ``keyservice``; ``shadow_training/``: ``train-shadow``), add theirs as
entry points of the group :data:`COMMANDS_GROUP` (pyproject.toml), each naming a module with the same contract.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib import metadata
from types import ModuleType

from advface import __version__
from advface.cli import (
    audit,
    embed,
    generate,
    keygen,
    maintenance,
    persguard,
    protect,
    protect_image,
    reencode,
    rotate_key,
    rotate_transform,
    train_generator,
)
from advface.errors import AdvfaceError

log = logging.getLogger(__name__)

#: Subcommand modules; each has ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
SUBCOMMANDS = [
    embed,
    protect,
    train_generator,
    generate,
    keygen,
    rotate_key,
    reencode,
    protect_image,
    audit,
    rotate_transform,
    maintenance,
    persguard,
]

#: Entry-point group of the subcommands of other packages; each entry point is ``NAME = "package.module"``.
COMMANDS_GROUP = "advface.commands"

#: What a subcommand module must define.
_CONTRACT = ("NAME", "HELP", "add_arguments", "run")

#: The warnings logged so far in this process: each is logged once, however often the parser is built.
_warned: set[str] = set()


def _leave_out(entry: metadata.EntryPoint, why: str) -> None:
    """Log once that the command of ``entry`` is left out, and why."""
    message = f"advface: command {entry.name!r} ({COMMANDS_GROUP}: {entry.value}) left out: {why}"
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def plugin_commands(taken: Sequence[str] = ()) -> list[ModuleType]:
    """The subcommand modules of :data:`COMMANDS_GROUP`, sorted by name; those that fail to import, break the
    contract or reuse a name in ``taken`` (or an earlier plugin's) are left out with a warning."""
    owners = dict.fromkeys(taken, "the library")
    modules = []
    for entry in sorted(metadata.entry_points(group=COMMANDS_GROUP), key=lambda e: (e.name, e.value)):
        if entry.name in owners:
            _leave_out(entry, f"{owners[entry.name]} already has a command of this name")
            continue
        try:
            module = entry.load()
        except Exception as exc:  # a plugin's import may fail in any way; the other commands must still work
            _leave_out(entry, f"{type(exc).__name__}: {exc}")
            continue
        missing = [attr for attr in _CONTRACT if not hasattr(module, attr)]
        if not isinstance(module, ModuleType) or missing:
            _leave_out(entry, f"not a subcommand module ({', '.join(missing) or 'a module'} wanted)")
            continue
        if module.NAME != entry.name:
            _leave_out(entry, f"the module's NAME is {module.NAME!r}")
            continue
        try:  # on a throwaway parser: a failure here must not leave a half-built command in the real one
            module.add_arguments(argparse.ArgumentParser())
        except Exception as exc:
            _leave_out(entry, f"add_arguments failed: {type(exc).__name__}: {exc}")
            continue
        owners[entry.name] = entry.value
        modules.append(module)
    return modules


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (used by ``main`` and by the docs): the library's subcommands, then the plugins'."""
    parser = argparse.ArgumentParser(prog="advface", description="Template protection for face-recognition systems.")
    parser.add_argument("--version", action="version", version=f"advface {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in [*SUBCOMMANDS, *plugin_commands([m.NAME for m in SUBCOMMANDS])]:
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
