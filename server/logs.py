"""Structured (JSON-lines) logs for the sidecar.

Nothing biometric is ever logged: no vectors, no images, no subject or template ids, no metadata values. Request
logs carry the RPC name, tenant, status code, latency and item count only. Fields are passed with
``logger.info(msg, extra={"fields": {...}})``.
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
#: Loggers the sidecar's handler serves: its own and the service layer's (:mod:`advface.service`).
LOGGER_NAMES = (LOGGER_NAME, "advface.service")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg`` and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # The exception class and where it was raised; never its message (it could quote request data).
            out["exc_type"] = record.exc_info[0].__name__
            frames = traceback.extract_tb(record.exc_info[2])[-8:]
            out["exc_at"] = [f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in frames]
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``LEVEL logger msg key=value ...`` for humans (same fields as the JSON formatter)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        extra = " ".join(f"{k}={v}" for k, v in fields.items()) if isinstance(fields, dict) else ""
        exc = f" exc_type={record.exc_info[0].__name__}" if record.exc_info and record.exc_info[0] else ""
        return f"{record.levelname} {record.name} {record.getMessage()} {extra}{exc}".rstrip()


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
