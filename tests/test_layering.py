"""The layering rule: the library ``advface/`` imports neither ``server/`` (the gRPC layer) nor ``shadow_training/``
(the shadow pipeline); both build on it and add their ``advface`` subcommands through entry points."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: packages that build on the library, which it must not import
OUTER = ("server", "shadow_training")
#: callables that import the module named by their first argument
DYNAMIC_IMPORTS = ("__import__", "import_module")


def outer_imports(source: str, filename: str = "<source>") -> list[str]:
    """``"file:line: module"`` for every import of an :data:`OUTER` package in ``source``: ``import``, ``from ...
    import`` (at any depth: inside functions too) and ``import_module("...")`` / ``__import__("...")`` with a
    literal name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if called in DYNAMIC_IMPORTS and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        line = getattr(node, "lineno", 0)
        found += [f"{filename}:{line}: {name}" for name in names if name.split(".")[0] in OUTER]
    return found


def test_the_library_imports_no_outer_layer() -> None:
    files = sorted((ROOT / "advface").rglob("*.py"))
    assert len(files) > 50  # the walk found the library
    found = [hit for path in files for hit in outer_imports(path.read_text(encoding="utf-8"), str(path))]
    assert found == [], "advface/ must not import server/ or shadow_training/:\n" + "\n".join(found)


def test_the_check_finds_every_kind_of_import() -> None:
    source = """
import os, server.app
from shadow_training.pipeline import train_shadow
from . import server
from advface.server_side import x
import serverless

def run():
    from server.keyservice import serve_keyservice
    import shadow_training as st
    importlib.import_module("server.cli.serve")
    __import__("shadow_training.cli")
    importlib.import_module(name)
"""
    modules = sorted(hit.split(": ")[1] for hit in outer_imports(source))
    assert modules == [
        "server.app",
        "server.cli.serve",
        "server.keyservice",
        "shadow_training",
        "shadow_training.cli",
        "shadow_training.pipeline",
    ]
