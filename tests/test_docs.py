"""The documentation agrees with the code: the configuration reference (docs/configuration.md) against the
dataclasses of advface.config, the example configuration file, and every relative link of README.md and docs/*.md.

The checks are functions that return a list of problems, so that the last tests can show that each of them
catches a removed key, a wrong default, an unknown key and a broken link."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from advface import config as cfg

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CONFIG_MD = DOCS / "configuration.md"
EXAMPLE = DOCS / "advface.example.yaml"

COLUMNS = ["key", "default", "allowed values", "meaning", "environment variable"]
SECTION_HEADING = re.compile(r"^##\s+`([^`]*)`\s*$")
CODE = re.compile(r"^`([^`]*)`$")


# ----------------------------------------------------------------------------------------------- the code's keys


def code_keys() -> dict[str, dict[str, Any]]:
    """section -> key -> default, from the dataclasses (``Config``'s fields are the sections)."""
    out: dict[str, dict[str, Any]] = {}
    for section in dataclasses.fields(cfg.Config):
        cls = section.default_factory  # type: ignore[misc]
        keys = {}
        for f in dataclasses.fields(cls):
            keys[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[section.name] = keys
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def test_the_code_agrees_with_itself() -> None:
    """SECTIONS and the validators (_KEYS) name the same sections and keys as the dataclasses."""
    keys = code_keys()
    assert set(cfg.SECTIONS) == set(keys)
    assert {s: set(k) for s, k in cfg._KEYS.items()} == {s: set(k) for s, k in keys.items()}


# ----------------------------------------------------------------------------------------- configuration.md


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def parse_reference(text: str) -> tuple[dict[str, dict[str, dict[str, str]]], list[str]]:
    """The tables of the reference: section -> key -> column -> cell text, and the problems of the format itself.
    A section is a ``## `name` `` heading followed by one table with the columns :data:`COLUMNS`."""
    tables: dict[str, dict[str, dict[str, str]]] = {}
    problems: list[str] = []
    section: str | None = None
    header: list[str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        heading = SECTION_HEADING.match(line)
        if heading:
            section, header = heading.group(1), None
            if section in tables:
                problems.append(f"line {number}: section {section} documented twice")
            tables[section] = {}
            continue
        if line.startswith("#"):
            section = None
            continue
        if section is None or not line.startswith("|"):
            continue
        cells = _cells(line)
        if header is None:
            header = cells
            if header != COLUMNS:
                problems.append(f"line {number}: section {section}: columns {header}, expected {COLUMNS}")
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue  # the separator row
        if len(cells) != len(COLUMNS):
            problems.append(f"line {number}: {len(cells)} cells, expected {len(COLUMNS)}")
            continue
        key = CODE.match(cells[0])
        if not key:
            problems.append(f"line {number}: the key cell {cells[0]!r} is not one code span")
            continue
        if key.group(1) in tables[section]:
            problems.append(f"line {number}: {section}.{key.group(1)} documented twice")
        tables[section][key.group(1)] = dict(zip(COLUMNS, cells))
    return tables, problems


def check_reference(text: str) -> list[str]:
    """Every section and key of the code is documented, nothing else is, and every default and environment
    variable name is the code's."""
    tables, problems = parse_reference(text)
    keys = code_keys()
    for section in sorted(set(tables) - set(keys)):
        problems.append(f"unknown section documented: {section}")
    for section in sorted(set(keys) - set(tables)):
        problems.append(f"section not documented: {section}")
    for section in sorted(set(keys) & set(tables)):
        documented = tables[section]
        for key in sorted(set(documented) - set(keys[section])):
            problems.append(f"unknown key documented: {section}.{key}")
        for key in sorted(set(keys[section]) - set(documented)):
            problems.append(f"key not documented: {section}.{key}")
        for key in sorted(set(keys[section]) & set(documented)):
            row = documented[key]
            problems += _check_default(section, key, row["default"], keys[section][key])
            problems += _check_env(section, key, row["environment variable"])
    return problems


def _check_default(section: str, key: str, cell: str, default: Any) -> list[str]:
    code = CODE.match(cell)
    if not code:
        return [f"{section}.{key}: the default {cell!r} is not one code span"]
    written = code.group(1)
    if (section, key) == ("store", "data_dir"):
        # computed when the dataclass is built: DEFAULT_DATA_DIR with ~ expanded
        if written != cfg.DEFAULT_DATA_DIR or str(Path(written).expanduser()) != default:
            return [f"store.data_dir: documented default {written!r}, code {cfg.DEFAULT_DATA_DIR!r} -> {default!r}"]
        return []
    if (section, key) == ("keys", "dir"):
        # computed when the dataclass is built: $XDG_CONFIG_HOME (else ~/.config) / DEFAULT_KEYS_SUBDIR
        if written != f"$XDG_CONFIG_HOME/{cfg.DEFAULT_KEYS_SUBDIR}" or not default.endswith(cfg.DEFAULT_KEYS_SUBDIR):
            return [f"keys.dir: documented default {written!r}, code {default!r}"]
        return []
    try:
        value = yaml.safe_load(written)
    except yaml.YAMLError as exc:
        return [f"{section}.{key}: the default {written!r} is not YAML: {exc}"]
    expected = _plain(default)
    if type(value) is not type(expected) or value != expected:
        return [f"{section}.{key}: documented default {value!r}, the dataclass says {expected!r}"]
    return []


def _check_env(section: str, key: str, cell: str) -> list[str]:
    name = f"{cfg.ENV_PREFIX}{section.upper()}_{key.upper()}"
    if cfg._KEYS[section][key] is cfg._no_env:  # auth.tokens: not settable from the environment
        if name in cell.replace("`", "").split() or "ADVFACE_AUTH_TOKENS_FILE" not in cell:
            return [f"{section}.{key}: cannot be set from the environment; the cell should point to the tokens file"]
        return []
    if cell != f"`{name}`":
        return [f"{section}.{key}: environment variable {cell!r}, expected `{name}`"]
    if cfg._env_overrides({name: "x"}) != {section: {key: (name, "x")}}:
        return [f"{section}.{key}: {name} is not read as an override of {section}.{key}"]
    return []


def test_configuration_reference_documents_every_key_with_its_default() -> None:
    assert check_reference(CONFIG_MD.read_text(encoding="utf-8")) == []


# ------------------------------------------------------------------------------------------------ example file


def check_example(text: str) -> list[str]:
    """The example names every section and key (and nothing else)."""
    data = yaml.safe_load(text) or {}
    keys = code_keys()
    problems = [f"unknown section in the example: {s}" for s in sorted(set(data) - set(keys))]
    for section, section_keys in keys.items():
        if section not in data:
            problems.append(f"section missing from the example: {section}")
            continue
        values = data[section] or {}
        problems += [f"key missing from the example: {section}.{k}" for k in sorted(set(section_keys) - set(values))]
        problems += [f"unknown key in the example: {section}.{k}" for k in sorted(set(values) - set(section_keys))]
    return problems


def test_example_file_loads_and_names_every_key() -> None:
    loaded = cfg.load_config(EXAMPLE, env={})  # every file key is null there, so nothing needs to exist
    assert loaded == cfg.default_config(env={}), "the example sets every key to its default"
    assert check_example(EXAMPLE.read_text(encoding="utf-8")) == []


# ------------------------------------------------------------------------------------------------------- links

LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors of a page (duplicates get -1, -2, ...)."""
    out: set[str] = set()
    for line in FENCE.sub("", markdown).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).replace("`", "").lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in out:
            n += 1
            candidate = f"{slug}-{n}"
        out.add(candidate)
    return out


def links(markdown: str) -> list[str]:
    """The link targets of a page, outside code blocks and code spans."""
    return LINK.findall(INLINE_CODE.sub("", FENCE.sub("", markdown)))


def check_links(page: Path, markdown: str) -> list[str]:
    problems = []
    for target in links(markdown):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # https:, mailto:, ...
        path, _, fragment = target.partition("#")
        file = page.parent / path
        if path and not file.exists():
            problems.append(f"{page.relative_to(ROOT)}: link to {target}: {path} does not exist")
            continue
        if fragment and (not path or file.suffix == ".md"):
            text = markdown if not path else file.read_text(encoding="utf-8")  # "#x": a heading of this page
            if fragment not in anchors(text):
                problems.append(f"{page.relative_to(ROOT)}: link to {target}: no heading #{fragment} there")
    return problems


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page: Path) -> None:
    assert check_links(page, page.read_text(encoding="utf-8")) == []


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README.read_text(encoding="utf-8"))}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert missing == [], f"docs pages not linked from README.md: {missing}"


# ------------------------------------------------------------------------------------- the checks can fail


def test_reference_check_catches_mistakes() -> None:
    text = CONFIG_MD.read_text(encoding="utf-8")
    removed = re.sub(r"^\| `ivf_nprobe` .*\n", "", text, flags=re.M)
    assert removed != text and "key not documented: store.ivf_nprobe" in check_reference(removed)
    changed = text.replace("| `port` | `50051` |", "| `port` | `50052` |")
    assert changed != text and any(p.startswith("server.port: documented default") for p in check_reference(changed))
    typed = text.replace("| `grace_seconds` | `5.0` |", '| `grace_seconds` | `"5.0"` |')
    assert typed != text and any(p.startswith("server.grace_seconds") for p in check_reference(typed))
    data_dir = text.replace("`~/.local/share/advface`", "`~/.local/share/other`")
    assert data_dir != text and any(p.startswith("store.data_dir") for p in check_reference(data_dir))
    unknown = text.replace("| `top_k_max` |", "| `top_k_min` |")
    problems = check_reference(unknown)
    assert (
        "unknown key documented: matching.top_k_min" in problems
        and "key not documented: matching.top_k_max" in problems
    )
    env = text.replace("`ADVFACE_METRICS_PORT`", "`ADVFACE_METRIC_PORT`")
    assert env != text and any(p.startswith("metrics.port: environment variable") for p in check_reference(env))
    gone = text.replace("## `logging`", "## Logging")
    assert "section not documented: logging" in check_reference(gone)


def test_example_check_catches_a_missing_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    removed = re.sub(r"^  ivf_nlist: .*\n", "", text, flags=re.M)
    assert removed != text and check_example(removed) == ["key missing from the example: store.ivf_nlist"]


def test_link_check_catches_broken_links() -> None:
    page = DOCS / "configuration.md"
    assert check_links(page, "[a](serve.md) [b](../README.md) [c](https://example.org/x.md) `[d](nope.md)`") == []
    assert len(check_links(page, "[a](nope.md)")) == 1
    assert len(check_links(page, "[a](serve.md#no-such-heading)")) == 1
    assert check_links(page, "# A `code` heading: yes\n[a](#a-code-heading-yes)") == []


# ------------------------------------------------------------------------------------ every command line option


def cli_options() -> dict[str, list[tuple[str, ...]]]:
    """``"advface CMD [ACTION ...]"`` -> the option strings of each of its options (``--help`` left out), from the
    real parser."""
    import argparse

    from advface.cli.main import build_parser

    out: dict[str, list[tuple[str, ...]]] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        out[name] = [tuple(a.option_strings) for a in parser._actions if a.option_strings and a.dest != "help"]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child, sub in action.choices.items():
                    walk(sub, f"{name} {child}")

    walk(build_parser(), "advface")
    out.pop("advface")  # --version / --verbose: README
    return out


def check_cli_docs(pages: Mapping[str, str], options: Mapping[str, list[tuple[str, ...]]]) -> list[str]:
    """Each option of each command must appear (one of its spellings, as a whole word) on a page that names the
    command (``advface CMD``: its first word after ``advface``)."""
    problems = []
    for command, spellings in sorted(options.items()):
        top = " ".join(command.split()[:2])
        texts = [t for t in pages.values() if re.search(re.escape(top) + r"(?![\w-])", t)]
        if not texts:
            problems.append(f"{command}: no docs page names it")
            continue
        for names in spellings:
            patterns = [re.compile(r"(?<![\w-])" + re.escape(n) + r"(?![\w-])") for n in names]
            if not any(p.search(t) for p in patterns for t in texts):
                problems.append(f"{command}: {'/'.join(names)} not documented")
    return problems


def _pages() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in [README, *sorted(DOCS.glob("*.md"))]}


def test_every_cli_option_is_documented() -> None:
    assert check_cli_docs(_pages(), cli_options()) == []


def test_cli_docs_check_catches_a_missing_option() -> None:
    pages = {"serve.md": "advface serve --config PATH, --port N"}
    options: dict[str, list[tuple[str, ...]]] = {
        "advface serve": [("--config",), ("-p", "--port"), ("--portal",), ("-q", "--quiet")],
        "advface nothing": [("--x",)],
    }
    assert check_cli_docs(pages, options) == [
        "advface nothing: no docs page names it",
        "advface serve: --portal not documented",
        "advface serve: -q/--quiet not documented",
    ]
