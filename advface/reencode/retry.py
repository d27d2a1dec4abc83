"""Retries with exponential backoff for database calls that lose their connection."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from advface.errors import DatabaseUnavailableError

T = TypeVar("T")
log = logging.getLogger(__name__)


def transient_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the connection went away; try again" (psycopg's only when installed)."""
    types: list[type[BaseException]] = [sqlite3.OperationalError, ConnectionError]
    try:
        import psycopg

        types.append(psycopg.OperationalError)
    except ImportError:  # pragma: no cover - psycopg is optional
        pass
    return tuple(types)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all, sleeping ``base_delay * 2**k`` (capped at ``max_delay``) between them."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 10.0

    def call(self, fn: Callable[[], T], what: str, on_retry: Callable[[], None] | None = None) -> T:
        """``fn()``; on a transient error, ``on_retry()`` (reconnect) and again; DatabaseUnavailableError at the end."""
        errors = transient_errors()
        for attempt in range(self.attempts):
            try:
                return fn()
            except errors as exc:
                if isinstance(exc, sqlite3.OperationalError) and not _sqlite_transient(exc):
                    raise
                if attempt == self.attempts - 1:
                    raise DatabaseUnavailableError(
                        f"{what}: {exc} (gave up after {self.attempts} attempts); progress so far is saved -- "
                        "rerun the same command to resume"
                    ) from exc
                delay = min(self.base_delay * 2**attempt, self.max_delay)
                log.warning("%s: %s; retrying in %.1f s (attempt %d/%d)", what, exc, delay, attempt + 2, self.attempts)
                time.sleep(delay)
                if on_retry is not None:
                    try:
                        on_retry()
                    except errors as again:  # reconnect failed: count it as this attempt's failure
                        log.warning("%s: reconnect failed: %s", what, again)
        raise AssertionError("unreachable")  # pragma: no cover


def _sqlite_transient(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("locked", "busy", "disk i/o", "unable to open"))
