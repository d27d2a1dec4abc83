"""Budgets of failed matching attempts: per subject for Verify, per caller for Identify (the ``matching.*`` keys).

:class:`AttemptBudget` counts, per key, the failed attempts (a probe compared and not accepted) in a window that
starts at the key's first failure. Once ``max_failures`` have failed in it, :meth:`AttemptBudget.admit` raises
:class:`~advface.errors.AttemptsExhaustedError` for that key until the window ends (a *lockout*), before any store
call or probe work. Lockouts escalate: the n-th consecutive lockout of a key (no match in between) comes from a
window of ``window_s * growth ** (n - 1)`` seconds, at most ``max_lockout_s`` (with the defaults 15 min, 30 min,
1 h, ... 1 day). A hard cap bounds the total: after ``max_consecutive`` failed attempts since the key's last match
(NIST SP 800-63B 5.2.2: at most 100), the key is *capped*: :class:`~advface.errors.AttemptsCappedError` (an
AttemptsExhaustedError) until an operator clears it with :meth:`AttemptBudget.reset` (the service does on
re-enrolment and deletion of the subject). A match ends the streak (count, escalation and progress to the cap: the
usual PIN practice); a call that ends without a decision (invalid probe, unknown subject, deadline, store error)
counts neither way. Attempts in flight count against the budget and the cap, so concurrent calls cannot overshoot.

Memory is bounded. At most ``max_tracked`` keys with a streak are tracked (an LRU map; a streak outlives its
window). At that cap, tracking a new key drops the least recently used key that is neither locked nor in flight
(its streak -- escalation and progress to the cap -- is forgotten: :attr:`AttemptBudget.dropped_streaks`), else the
least recently used locked one (its lock ends early: :attr:`AttemptBudget.dropped_locked`); with neither escalation
nor the cap on, every key whose window has ended goes first. Capped keys are held apart and never dropped that way:
at most ``max_capped`` of them; a new cap past that releases the oldest capped key
(:attr:`AttemptBudget.released_capped`, logged). The counts live in this process only: each sidecar replica counts
on its own, and a restart clears every lock and cap.

:class:`VerifyAttempts` is the budget keyed by ``(tenant, subject)``; :class:`IdentifyAttempts` the one keyed by the
caller (a plain string: the sidecar passes its token's key id, every anonymous caller sharing one).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from advface.errors import AttemptsCappedError, AttemptsExhaustedError

Key = tuple[str, ...]

#: Most callers whose failed Identify calls are tracked (the sidecar's callers are its configured tokens).
MAX_IDENTIFY_CALLERS = 10_000
#: The caller of an Identify that names none (the sidecar's callers when auth is off: all of them together).
ANONYMOUS_CALLER = "anonymous"

_logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    start: float  # monotonic time of the window's first failure
    window: float  # this window's length, seconds (escalated)
    failures: int = 0  # in this window
    consecutive: int = 0  # since the last match (the streak)
    lockouts: int = 0  # consecutive lockouts since the last match
    in_flight: int = 0

    def locked(self, now: float, max_failures: int) -> bool:
        return max_failures > 0 and self.failures >= max_failures and now < self.start + self.window


class AttemptBudget:
    """Thread-safe counts of failed attempts per key (module docs). ``max_failures`` 0 turns the budget off;
    ``max_consecutive`` 0 turns the cap off; ``growth`` 1 turns escalation off. ``what`` names the attempts in
    errors and logs ("Verify attempts", "of one subject"). Callbacks (metrics): ``on_lockout()`` when a key becomes
    locked, ``on_refused()`` for each attempt refused (locked or capped), ``on_capped()`` when a key reaches the cap;
    ``clock`` is a monotonic clock in seconds (tests)."""

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        max_tracked: int,
        *,
        growth: float = 1.0,
        max_lockout_s: float | None = None,
        max_consecutive: int = 0,
        max_capped: int = 1,
        what: tuple[str, str] = ("attempts", "of one key"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        max_lockout = window_s if max_lockout_s is None else max_lockout_s
        if (
            max_failures < 0
            or not (math.isfinite(window_s) and window_s > 0)
            or max_tracked < 1
            or not (math.isfinite(growth) and growth >= 1.0)
            or not (math.isfinite(max_lockout) and max_lockout >= window_s)
            or max_consecutive < 0
            or max_capped < 1
        ):
            raise ValueError(
                "max_failures >= 0, window_s > 0, max_tracked >= 1, growth >= 1, max_lockout_s >= window_s, "
                "max_consecutive >= 0 and max_capped >= 1 are required"
            )
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_tracked = max_tracked
        self.growth = growth
        self.max_lockout_s = max_lockout
        self.max_consecutive = max_consecutive
        self.max_capped = max_capped
        self.what = what
        self.clock = clock
        self.on_lockout: Callable[[], None] | None = None
        self.on_refused: Callable[[], None] | None = None
        self.on_capped: Callable[[], None] | None = None
        #: keys locked so far, attempts refused (locked or capped), keys capped so far
        self.lockouts = 0
        self.refused = 0
        self.capped = 0
        #: locked entries dropped at the tracking cap, streaks forgotten there, capped keys released past max_capped
        self.dropped_locked = 0
        self.dropped_streaks = 0
        self.released_capped = 0
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._capped: OrderedDict[Key, None] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether failed attempts are counted at all (a budget per window, or the cap)."""
        return self.max_failures > 0 or self.max_consecutive > 0

    def tracked(self) -> int:
        """Keys with a streak tracked now (at most ``max_tracked``; capped keys not included)."""
        with self._lock:
            return len(self._entries)

    def capped_now(self) -> int:
        """Keys capped now (at most ``max_capped``)."""
        with self._lock:
            return len(self._capped)

    def window_for(self, lockouts: int) -> float:
        """The window (and so the lockout) that follows ``lockouts`` consecutive lockouts, in seconds."""
        if self.growth == 1.0:
            return self.window_s
        exponent = min(lockouts, 1 + math.ceil(math.log(self.max_lockout_s / self.window_s, self.growth)))
        return min(self.window_s * self.growth**exponent, self.max_lockout_s)

    def _make_room(self, now: float) -> None:
        if self.growth == 1.0 and self.max_consecutive == 0:  # no streak to keep: ended windows go first
            ended = [k for k, e in self._entries.items() if e.in_flight == 0 and now >= e.start + e.window]
            for key in ended:
                del self._entries[key]
            if ended:
                return
        for key, entry in self._entries.items():  # least recently used first
            if entry.in_flight == 0 and not entry.locked(now, self.max_failures):
                del self._entries[key]
                self.dropped_streaks += 1
                return
        for key, entry in self._entries.items():
            if entry.in_flight == 0:
                del self._entries[key]
                self.dropped_locked += 1
                return
        self._entries.popitem(last=False)  # every entry in flight: the attempts ending later are not counted
        self.dropped_locked += 1

    def admit(self, key: Key) -> None:
        """Admit one attempt of ``key``, or raise AttemptsExhaustedError / AttemptsCappedError (nothing else is
        done). Every admitted attempt must be closed with :meth:`close`."""
        if not self.enabled:
            return
        error: AttemptsExhaustedError | None = None
        with self._lock:
            if key in self._capped:
                self.refused += 1
                error = AttemptsCappedError(self.max_consecutive, self.what[0], self.what[1])
            else:
                error = self._admit(key)
        if error is not None:
            if self.on_refused is not None:
                self.on_refused()
            raise error

    def _admit(self, key: Key) -> AttemptsExhaustedError | None:
        now = self.clock()
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.max_tracked:
                self._make_room(now)
            entry = self._entries[key] = _Entry(start=now, window=self.window_for(0))
        self._entries.move_to_end(key)
        if entry.failures and now >= entry.start + entry.window:
            entry.failures = 0  # the window has ended; the streak goes on
        budget_full = self.max_failures > 0 and entry.failures + entry.in_flight >= self.max_failures
        cap_full = self.max_consecutive > 0 and entry.consecutive + entry.in_flight >= self.max_consecutive
        if not (budget_full or cap_full):
            entry.in_flight += 1
            return None
        self.refused += 1
        retry_after = 0.0  # full of attempts in flight: retry at once
        if self.max_failures > 0 and entry.failures >= self.max_failures:
            retry_after = max(entry.start + entry.window - now, 0.0)
        return AttemptsExhaustedError(self.max_failures, entry.window, retry_after, self.what[0], self.what[1])

    def close(self, key: Key, matched: bool | None) -> None:
        """Close an attempt admitted by :meth:`admit`: ``matched`` True (ends the streak), False (one failure) or
        None (no decision: counts neither way)."""
        if not self.enabled:
            return
        lockout: float | None = None
        capped = released = False
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:  # dropped at the tracking cap while in flight, or reset meanwhile
                return
            entry.in_flight = max(entry.in_flight - 1, 0)
            if matched is True:
                entry.failures = entry.consecutive = entry.lockouts = 0
            elif matched is False:
                now = self.clock()
                if entry.failures == 0 or now >= entry.start + entry.window:  # a new window starts here
                    entry.failures, entry.start, entry.window = 0, now, self.window_for(entry.lockouts)
                entry.failures += 1
                entry.consecutive += 1
                if self.max_consecutive > 0 and entry.consecutive >= self.max_consecutive:
                    del self._entries[key]  # no attempt of it is in flight (they count against the cap)
                    self._capped[key] = None
                    self.capped += 1
                    capped = True
                    if len(self._capped) > self.max_capped:
                        self._capped.popitem(last=False)
                        self.released_capped += 1
                        released = True
                elif entry.failures == self.max_failures:
                    entry.lockouts += 1
                    self.lockouts += 1
                    lockout = entry.window
            if not capped and entry.consecutive == 0 and entry.in_flight == 0:
                del self._entries[key]
        # a lock may be an attack on the key, or one on its owner (denial of service): say so, without ids
        attempts, owner = self.what
        if capped:
            _logger.warning(
                "%s cap: %d consecutive failed %s %s since its last match; refused until an operator resets it",
                attempts.split()[0].lower(),
                self.max_consecutive,
                attempts,
                owner,
            )
            if released:
                _logger.warning(
                    "%s cap: more than %d capped at once; the oldest capped one is released",
                    attempts.split()[0].lower(),
                    self.max_capped,
                )
            if self.on_capped is not None:
                self.on_capped()
        if lockout is not None:
            _logger.warning(
                "%s lockout: %d failed %s %s; refused for %g s",
                attempts.split()[0].lower(),
                self.max_failures,
                attempts,
                owner,
                lockout,
            )
            if self.on_lockout is not None:
                self.on_lockout()

    def reset(self, key: Key) -> bool:
        """Clear ``key``'s streak, lock and cap (an operator's decision); whether there was anything to clear.
        Attempts of it in flight end uncounted."""
        with self._lock:
            found = self._entries.pop(key, None) is not None
            if key in self._capped:
                del self._capped[key]
                found = True
        return found


class VerifyAttempts(AttemptBudget):
    """Failed Verify attempts per ``(tenant, subject)`` (module docs)."""

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        max_tracked: int,
        *,
        growth: float = 1.0,
        max_lockout_s: float | None = None,
        max_consecutive: int = 0,
        max_capped: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            max_failures,
            window_s,
            max_tracked,
            growth=growth,
            max_lockout_s=max_lockout_s,
            max_consecutive=max_consecutive,
            max_capped=max_capped,
            what=("Verify attempts", "for this subject"),
            clock=clock,
        )

    def begin(self, tenant: str, subject_id: str) -> None:
        """:meth:`admit` for ``subject_id`` of ``tenant``."""
        self.admit((tenant, subject_id))

    def end(self, tenant: str, subject_id: str, matched: bool | None) -> None:
        """:meth:`close` for ``subject_id`` of ``tenant``."""
        self.close((tenant, subject_id), matched)

    def reset_subject(self, tenant: str, subject_id: str) -> bool:
        """:meth:`reset` for ``subject_id`` of ``tenant``."""
        return self.reset((tenant, subject_id))


class IdentifyAttempts(AttemptBudget):
    """Failed Identify calls (no candidate accepted) per caller (module docs)."""

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        *,
        growth: float = 1.0,
        max_lockout_s: float | None = None,
        max_consecutive: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            max_failures,
            window_s,
            MAX_IDENTIFY_CALLERS,
            growth=growth,
            max_lockout_s=max_lockout_s,
            max_consecutive=max_consecutive,
            max_capped=MAX_IDENTIFY_CALLERS,
            what=("Identify calls", "for this caller"),
            clock=clock,
        )


__all__ = ["ANONYMOUS_CALLER", "MAX_IDENTIFY_CALLERS", "AttemptBudget", "IdentifyAttempts", "VerifyAttempts"]
