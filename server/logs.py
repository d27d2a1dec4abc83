"""Structured (JSON-lines) logs for the sidecar.

Nothing biometric is ever logged: no vectors, no images, no subject or template ids, no metadata values. Request
logs carry the RPC name, tenant, status code, latency and item count only. Fields are passed with
``logger.info(msg, extra={"fields": {...}})``.

Some values are chosen by clients (the tenant; the RPC is logged by its name from a fixed set, see
:func:`server.interceptors.rpc_label`), so both formats keep every record on one line with the fields the server
wrote: non-printable characters (control, line and paragraph separators, format characters) are written as
``\\n``, ``\\r``, ``\\xNN``, ``\\uNNNN`` escapes, string values are cut at :data:`MAX_FIELD_CHARS` characters
(:data:`MAX_SERVER_FIELD_CHARS` outside the access log) with a trailing ``…``, and the text format quotes values that
are empty or hold a space, ``=``, ``"`` or ``\\`` (logfmt style), so a value can never forge a second ``key=``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

#: Logger of the sidecar; request logs go to ``advface.server.access``.
LOGGER_NAME = "advface.server"
#: The access log: one line per call, with values clients chose.
ACCESS_LOGGER_NAME = LOGGER_NAME + ".access"
#: Loggers the sidecar's handler serves: its own and the service layer's (:mod:`advface.service`).
LOGGER_NAMES = (LOGGER_NAME, "advface.service")
#: Longest string value of an access-log line, in characters after escaping (longer ones end in ``…``).
MAX_FIELD_CHARS = 128
#: Longest string value of the other lines (server-side messages, e.g. why a model could not be loaded).
MAX_SERVER_FIELD_CHARS = 2048

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` with every non-printable character (``str.isprintable``: controls, line and paragraph separators,
    format characters) written as an escape (``\\n``, ``\\r``, ``\\t``, ``\\xNN``, ``\\uNNNN``, ``\\UNNNNNNNN``)."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def bounded(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``text`` cut to ``limit`` characters, the last one ``…`` when it was longer."""
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def clean_value(value: Any, limit: int = MAX_FIELD_CHARS) -> Any:
    """A field value safe to log: strings escaped (:func:`printable`) and bounded; numbers, booleans and None as
    they are; lists and tuples item by item; anything else as its escaped, bounded ``str``."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [clean_value(v, limit) for v in value]
    return bounded(printable(value if isinstance(value, str) else str(value)), limit)


def _limit(record: logging.LogRecord) -> int:
    return MAX_FIELD_CHARS if record.name == ACCESS_LOGGER_NAME else MAX_SERVER_FIELD_CHARS


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    if not isinstance(fields, dict):
        return {}
    limit = _limit(record)
    return {printable(str(k)): clean_value(v, limit) for k, v in fields.items()}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg`` and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": bounded(printable(record.getMessage()), MAX_SERVER_FIELD_CHARS),
        }
        for key, value in _fields(record).items():
            out.setdefault(key, value)  # a field never replaces ts, level, logger or msg
        if record.exc_info and record.exc_info[0] is not None:
            # The exception class and where it was raised; never its message (it could quote request data).
            out["exc_type"] = record.exc_info[0].__name__
            frames = traceback.extract_tb(record.exc_info[2])[-8:]
            out["exc_at"] = [f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in frames]
        return json.dumps(out, default=str, ensure_ascii=False)


def text_value(value: Any) -> str:
    """A cleaned value (:func:`clean_value`) as it appears after ``key=`` in the text format: quoted and
    backslash-escaped when empty or holding a space, ``=``, ``"`` or ``\\``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        value = ",".join(text_value(v) for v in value)
    text = str(value)
    if text and not any(c in text for c in ' ="\\'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class TextFormatter(logging.Formatter):
    """``LEVEL logger msg key=value ...`` for humans (same fields as the JSON formatter, values escaped and quoted as
    :func:`text_value` says)."""

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={text_value(v)}" for k, v in _fields(record).items())
        exc = f" exc_type={record.exc_info[0].__name__}" if record.exc_info and record.exc_info[0] else ""
        msg = bounded(printable(record.getMessage()), MAX_SERVER_FIELD_CHARS)
        return f"{record.levelname} {record.name} {msg} {extra}{exc}".rstrip()


def configure_logging(level: str | int = "info", json_lines: bool = True, stream: Any = None) -> None:
    """Send the sidecar's logs (:data:`LOGGER_NAMES`) to ``stream`` (stderr) as JSON lines or text."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler._advface = True  # type: ignore[attr-defined]
    for name in LOGGER_NAMES:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if getattr(old, "_advface", False):
                logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level.upper() if isinstance(level, str) else level)
        logger.propagate = False


def log(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    """Log ``msg`` with structured ``fields``."""
    logger.log(level, msg, extra={"fields": fields})
