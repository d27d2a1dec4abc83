"""``advface`` itself: the library's subcommands, then those the outer layers add through the ``advface.commands``
entry points; a broken or colliding plugin is left out with one warning and the other commands still work."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import metadata
from pathlib import Path

import pytest

from advface.cli import main as cli
from advface.cli import protect

#: the outer layers' commands and their modules (pyproject.toml)
PLUGINS = {
    "keyservice": "server.cli.keyservice",
    "serve": "server.cli.serve",
    "train-shadow": "shadow_training.cli.train_shadow",
}


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers of ``parser``, in their order."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


@pytest.fixture
def extra_entry_points(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """``extra_entry_points(*(name, value))``: the installed ``advface.commands`` entry points plus these; the
    once-only warnings start afresh."""
    monkeypatch.setattr(cli, "_warned", set())
    real = metadata.entry_points

    def add(*extra: tuple[str, str]) -> None:
        def entry_points(*, group: str) -> list[metadata.EntryPoint]:
            found = list(real(group=group))
            return (
                found + [metadata.EntryPoint(n, v, group) for n, v in extra] if group == cli.COMMANDS_GROUP else found
            )

        monkeypatch.setattr(metadata, "entry_points", entry_points)

    return add


def left_out(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "left out" in r.getMessage()]


def test_outer_layers_register_their_commands() -> None:
    installed = {e.name: e.value for e in metadata.entry_points(group=cli.COMMANDS_GROUP)}
    assert PLUGINS.items() <= installed.items()
    assert not {m.__name__ for m in cli.SUBCOMMANDS} & set(PLUGINS.values())  # the library does not list them


def test_plugin_commands_appear_after_the_library_s_with_their_flags() -> None:
    found = commands(cli.build_parser())
    names = list(found)
    library = [m.NAME for m in cli.SUBCOMMANDS]
    assert names[: len(library)] == library and names[len(library) :] == sorted(names[len(library) :])
    assert set(PLUGINS) <= set(names[len(library) :])
    assert {"--config", "-c", "--host", "--port", "--data-dir", "--metrics-port"} == flags(found["serve"]) - {
        "-h",
        "--help",
    }
    assert {"--dataset", "--lfw", "--lfw-dir", "--out", "--encoder", "--epochs", "--group", "--work-dir"} <= flags(
        found["train-shadow"]
    )
    actions = commands(found["keyservice"])
    assert list(actions) == ["keygen", "serve", "rotate-store", "rotate-binding", "erase"]
    assert {"--dir", "--metric", "--threshold", "--port", "--next-dir", "--tls-client-ca"} <= flags(actions["serve"])
    for name, module in PLUGINS.items():
        assert found[name].get_default("_run") is sys.modules[module].run
        assert found[name].description == sys.modules[module].__doc__


def test_a_plugin_that_fails_to_import_is_left_out_once(
    extra_entry_points, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    extra_entry_points(("broken", "advface_tests_no_such_module.cli"))
    with caplog.at_level(logging.WARNING, logger=cli.__name__):
        for _ in range(2):
            found = commands(cli.build_parser())
            assert "broken" not in found and set(PLUGINS) <= set(found)
    (message,) = left_out(caplog)
    assert "'broken'" in message and "advface_tests_no_such_module.cli" in message
    assert "ModuleNotFoundError" in message
    # the other commands still parse and run
    args = cli.build_parser().parse_args(["serve", "--port", "0"])
    assert args.port == 0
    with pytest.raises(SystemExit) as exit_:
        cli.main(["keyservice", "--help"])
    assert exit_.value.code == 0 and "keygen" in capsys.readouterr().out


def test_a_name_collision_is_ignored_with_a_warning(extra_entry_points, caplog: pytest.LogCaptureFixture) -> None:
    """A plugin named like a library command (or an earlier plugin) is left out, never imported; the first keeps it."""
    extra_entry_points(("protect", "advface_tests_hijack"), ("serve", "zz_advface_tests.serve"))
    with caplog.at_level(logging.WARNING, logger=cli.__name__):
        found = commands(cli.build_parser())
    assert found["protect"].get_default("_run") is protect.run
    assert found["serve"].get_default("_run") is sys.modules["server.cli.serve"].run
    messages = left_out(caplog)
    assert len(messages) == 2
    assert "'protect'" in messages[0] and "the library already has a command of this name" in messages[0]
    assert "'serve'" in messages[1] and "server.cli.serve already has a command of this name" in messages[1]
    assert "advface_tests_hijack" not in sys.modules and "zz_advface_tests" not in sys.modules


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("NAME = 'odd'\nHELP = 'h'\ndef add_arguments(p): pass\n", "run wanted"),
        ("NAME = 'other'\nHELP = 'h'\ndef add_arguments(p): pass\ndef run(a): return 0\n", "NAME is 'other'"),
        ("NAME = 'odd'\nHELP = 'h'\ndef add_arguments(p): raise ImportError('no torch')\ndef run(a): return 0\n", ""),
    ],
)
def test_a_plugin_that_breaks_the_contract_is_left_out(
    source: str, why: str, extra_entry_points, caplog: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch
) -> None:
    module = f"advface_tests_plugin_{len(why)}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    extra_entry_points(("odd", module))
    with caplog.at_level(logging.WARNING, logger=cli.__name__):
        found = commands(cli.build_parser())
    assert "odd" not in found and set(PLUGINS) <= set(found)
    (message,) = left_out(caplog)
    assert (why or "add_arguments failed: ImportError: no torch") in message
