"""A per-subject budget of failed Verify attempts (lockout), the ``matching.verify_*`` keys.

:class:`VerifyAttempts` counts, per ``(tenant, subject)``, the failed Verify attempts (a probe compared and not
accepted) in a fixed window that starts at the first failure and lasts ``window_s`` seconds. Once ``max_failures``
have failed in it, :meth:`VerifyAttempts.begin` raises :class:`~advface.errors.AttemptsExhaustedError` for that
subject until the window ends, before any store call or probe work. A match resets the subject's count (the usual
PIN practice: a card's wrong-PIN count restarts after a correct PIN); a call that ends without a decision (invalid
probe, unknown subject, deadline, store error) counts neither way. Attempts in flight count against the budget, so
concurrent calls cannot overshoot it.

Memory is bounded: at most ``max_tracked`` subjects are tracked (an LRU map). At the cap, tracking a new subject
first drops the entries whose window has ended, then the least recently used entry that is neither locked nor in
flight; when every tracked subject is locked (or in flight), the least recently used one is dropped (its lock ends
early; :attr:`VerifyAttempts.dropped_locked` counts these). The counts live in this process only: each sidecar
replica counts on its own.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from advface.errors import AttemptsExhaustedError

Key = tuple[str, str]

_logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    start: float  # monotonic time of the window's first failure (or of the first attempt in flight)
    failures: int = 0
    in_flight: int = 0

    def locked(self, now: float, max_failures: int, window_s: float) -> bool:
        return self.failures >= max_failures and now < self.start + window_s


class VerifyAttempts:
    """Thread-safe counts of failed Verify attempts per ``(tenant, subject)`` (module docs). ``max_failures`` 0
    turns the budget off. ``on_lockout()`` is called when a subject becomes locked, ``on_refused()`` for each
    attempt refused while locked (metrics); ``clock`` is a monotonic clock in seconds (tests)."""

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        max_tracked: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 0 or not (math.isfinite(window_s) and window_s > 0) or max_tracked < 1:
            raise ValueError("max_failures >= 0, window_s > 0 and max_tracked >= 1 are required")
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_tracked = max_tracked
        self.clock = clock
        self.on_lockout: Callable[[], None] | None = None
        self.on_refused: Callable[[], None] | None = None
        #: subjects locked so far, attempts refused while locked, locked entries dropped at the cap
        self.lockouts = 0
        self.refused = 0
        self.dropped_locked = 0
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether failed attempts are counted at all."""
        return self.max_failures > 0

    def tracked(self) -> int:
        """Subjects tracked now (at most ``max_tracked``)."""
        with self._lock:
            return len(self._entries)

    def _expired(self, entry: _Entry, now: float) -> bool:
        return entry.in_flight == 0 and now >= entry.start + self.window_s

    def _make_room(self, now: float) -> None:
        for key in [k for k, e in self._entries.items() if self._expired(e, now)]:
            del self._entries[key]
        if len(self._entries) < self.max_tracked:
            return
        for key, entry in self._entries.items():  # least recently used first
            if not entry.locked(now, self.max_failures, self.window_s) and entry.in_flight == 0:
                del self._entries[key]
                return
        self._entries.popitem(last=False)
        self.dropped_locked += 1

    def begin(self, tenant: str, subject_id: str) -> None:
        """Admit one Verify attempt of ``subject_id``, or raise AttemptsExhaustedError (nothing else is done).
        Every admitted attempt must be closed with :meth:`end`."""
        if not self.enabled:
            return
        key = (tenant, subject_id)
        refused_for: float | None = None
        with self._lock:
            now = self.clock()
            entry = self._entries.get(key)
            if entry is not None and self._expired(entry, now):
                del self._entries[key]
                entry = None
            if entry is None:
                if len(self._entries) >= self.max_tracked:
                    self._make_room(now)
                entry = self._entries[key] = _Entry(start=now)
            self._entries.move_to_end(key)
            if entry.failures + entry.in_flight >= self.max_failures:
                self.refused += 1
                refused_for = max(entry.start + self.window_s - now, 0.0)
                if entry.failures < self.max_failures:  # full of attempts in flight: retry at once
                    refused_for = 0.0
            else:
                entry.in_flight += 1
        if refused_for is not None:
            if self.on_refused is not None:
                self.on_refused()
            raise AttemptsExhaustedError(self.max_failures, self.window_s, refused_for)

    def end(self, tenant: str, subject_id: str, matched: bool | None) -> None:
        """Close an attempt admitted by :meth:`begin`: ``matched`` True (resets the count), False (one failure)
        or None (no decision: counts neither way)."""
        if not self.enabled:
            return
        key = (tenant, subject_id)
        locked_now = False
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:  # dropped at the cap while in flight (every tracked subject was locked or in flight)
                return
            entry.in_flight = max(entry.in_flight - 1, 0)
            if matched is True:
                entry.failures = 0
                entry.start = self.clock()
            elif matched is False:
                now = self.clock()
                if entry.failures == 0:
                    entry.start = now  # the window starts at the first failure
                entry.failures += 1
                if entry.failures == self.max_failures:
                    self.lockouts += 1
                    locked_now = True
            if entry.failures == 0 and entry.in_flight == 0:
                del self._entries[key]
        if locked_now:
            # a lockout may be an attack on the subject, or one on its owner (denial of service): say so, no ids
            _logger.warning(
                "verify lockout: %d failed attempts for one subject; refused for %g s",
                self.max_failures,
                self.window_s,
            )
            if self.on_lockout is not None:
                self.on_lockout()


__all__ = ["VerifyAttempts"]
