"""Parsing of source and destination locations: ``SCHEME:REST[?key=value&...]``.

Schemes: ``npz:PATH``, ``npy:PATH[?ids=IDS]``, ``parquet:PATH``, ``sqlite:PATH?table=T``, ``postgresql:DSN`` (the
whole ``postgresql://...`` URL, with ``table=`` among its query parameters), ``advface:DATA_DIR?tenant=T`` (the
sidecar's own template store, opened from ``--config``; see :mod:`advface.reencode.store_io`). Options of advface
itself (``table``,
``id_column``, ``vector_column``, ``vector_format``, ``ids``) are taken out of the query; for PostgreSQL the other
query parameters stay in the DSN (``sslmode=...``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode

from advface.errors import ConfigError

SCHEMES = ("npz", "npy", "parquet", "sqlite", "postgresql", "advface")
#: Query keys advface reads; anything else is an error (files, SQLite) or passed on in the DSN (PostgreSQL).
OPTION_KEYS = ("table", "id_column", "vector_column", "vector_format", "ids")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@dataclass(frozen=True)
class Location:
    """A parsed location: scheme, path (file path or DSN) and advface options."""

    scheme: str
    path: str
    options: dict[str, str] = field(default_factory=dict)
    text: str = ""

    def option(self, key: str, default: str) -> str:
        """An option's value or ``default``."""
        return self.options.get(key, default)

    def display(self) -> str:
        """The location for messages (a PostgreSQL password is masked)."""
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", self.text)


def check_identifier(name: str, what: str, *, allow_schema: bool = False) -> str:
    """``name`` if it is a plain SQL identifier (``[A-Za-z_][A-Za-z0-9_]*``, optionally ``schema.table``)."""
    parts = name.split(".") if allow_schema else [name]
    if len(parts) > 2 or not all(_IDENT.fullmatch(p) for p in parts):
        raise ConfigError(f"{what} {name!r} is not a plain identifier (letters, digits, _; at most 63 characters)")
    return name


def parse_location(text: str) -> Location:
    """Parse ``text``; ConfigError for an unknown scheme, a missing path or an unknown option."""
    if not isinstance(text, str) or ":" not in text:
        raise ConfigError(f"location {text!r} must look like SCHEME:PATH with SCHEME one of {', '.join(SCHEMES)}")
    scheme, rest = text.split(":", 1)
    if scheme == "postgres":
        scheme = "postgresql"
    if scheme not in SCHEMES:
        raise ConfigError(f"location {text!r}: unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    if scheme == "postgresql":
        return _parse_postgresql(text, rest)
    if scheme == "advface":
        from advface.reencode.store_io import parse_store_location

        return parse_store_location(text, rest)
    path, _, query = rest.partition("?")
    if not path:
        raise ConfigError(f"location {text!r} has no path")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False)) if query else {}
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ConfigError(f"location {text!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTION_KEYS)}")
    _check_options(text, options)
    if scheme == "sqlite" and "table" not in options:
        raise ConfigError(f"location {text!r}: sqlite needs ?table=NAME")
    return Location(scheme, path, options, text)


def _parse_postgresql(text: str, rest: str) -> Location:
    dsn = "postgresql:" + rest
    base, _, query = dsn.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True) if query else []
    options = {k: v for k, v in pairs if k in OPTION_KEYS}
    passed = [(k, v) for k, v in pairs if k not in OPTION_KEYS]
    if not rest.startswith("//"):
        raise ConfigError(f"location {text!r}: expected postgresql://USER@HOST:PORT/DATABASE?table=NAME")
    if "table" not in options:
        raise ConfigError(f"location {Location('postgresql', '', {}, text).display()!r}: needs ?table=NAME")
    _check_options(text, options)
    check_identifier(options["table"], "table", allow_schema=True)
    path = base + ("?" + urlencode(passed) if passed else "")
    return Location("postgresql", path, options, text)


def _check_options(text: str, options: dict[str, str]) -> None:
    for key in ("id_column", "vector_column"):
        if key in options:
            check_identifier(options[key], key)
    if "table" in options:
        check_identifier(options["table"], "table", allow_schema=True)
    fmt = options.get("vector_format")
    if fmt is not None and fmt not in ("blob", "json"):
        raise ConfigError(f"location {text!r}: vector_format must be blob or json, got {fmt!r}")
