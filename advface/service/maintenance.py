"""Maintenance of an encrypted store while the sidecar serves: key-pair rotation and forced erasure as background
jobs, one at a time, with their progress (the admin RPCs ``RotateKeyPair``, ``EraseNow`` and ``MaintenanceStatus``).

:class:`MaintenanceService` checks a request, then runs the store's own resumable operation in a thread:
:meth:`~advface.encrypted.store.EncryptedStore.rotate_key_pair` (paced at ``blocks_per_second``) or
:meth:`~advface.encrypted.store.EncryptedStore.compact`. The store releases its lock while the key service works
on a block, so Enroll / Verify / Identify / Delete are answered meanwhile; blocks changed meanwhile are done again.
A key service at its rate limit is waited for (:data:`RATE_LIMIT_WAIT_S`), not failed on; one that is unavailable
(down, or past its deadline) is tried again :data:`UNAVAILABLE_RETRIES` times, waiting twice as long each time; any
other error, or an outage longer than that, ends the job as ``failed`` with its message, and the same call
resumes it (so does a call after a killed sidecar: the store keeps what was done). See docs/encrypted-matching.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advface.errors import AdvfaceError, AlreadyExistsError, ConfigError, PreconditionError, ValidationError
from advface.store.base import TemplateStore

__all__ = [
    "DEFAULT_BLOCKS_PER_SECOND",
    "MAX_BLOCKS_PER_SECOND",
    "RATE_LIMIT_WAIT_S",
    "UNAVAILABLE_RETRIES",
    "MaintenanceJob",
    "MaintenanceService",
]

log = logging.getLogger("advface.maintenance")

#: blocks a rotation sends to the key service per second when the request gives none (the key service's own
#: ``--rotate-rate`` default)
DEFAULT_BLOCKS_PER_SECOND = 10.0
#: the most a request may ask for
MAX_BLOCKS_PER_SECOND = 1000.0
#: seconds waited before trying again when the key service answers with its rate limit
RATE_LIMIT_WAIT_S = 1.0
#: tries again after the key service was unavailable, waiting 1, 2, 4, 8, 16 s (about 30 s) before failing the job
UNAVAILABLE_RETRIES = 5

ROTATE = "rotate_key_pair"
ERASE = "erase"


class _Stopped(Exception):
    """The job was asked to stop (raised between blocks)."""


@dataclass(frozen=True)
class MaintenanceJob:
    """The state of the current or last job (``state`` ``idle`` when none ran since the start)."""

    operation: str = ""
    state: str = "idle"
    blocks_done: int = 0
    blocks_total: int = 0
    blocks_this_job: int = 0
    last_error: str = ""
    target_fingerprint: str = ""
    new_keys_dir: str = ""
    fingerprint: str = ""
    erased: int = 0
    pending: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    already_running: bool = False
    unfinished_rotation: str = ""


class MaintenanceService:
    """Background maintenance of ``store`` (an :class:`~advface.encrypted.store.EncryptedStore`; any other store
    refuses every job with PreconditionError). Thread-safe; :meth:`close` stops a running job."""

    def __init__(self, store: TemplateStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._job = MaintenanceJob()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ requests

    def rotate_key_pair(self, new_keys_dir: str, blocks_per_second: float = 0.0) -> MaintenanceJob:
        """Start re-encrypting the store under the key pair of the sidecar folder ``new_keys_dir``, at most
        ``blocks_per_second`` blocks per second (0: :data:`DEFAULT_BLOCKS_PER_SECOND`). ValidationError for a
        missing or unusable folder or rate; PreconditionError when the key service cannot decide under the new
        key pair (it must be serving with ``--next-dir`` set to that pair's key-service folder)."""
        store = self._encrypted()
        rate = _check_rate(blocks_per_second)
        if not isinstance(new_keys_dir, str) or not new_keys_dir.strip():
            raise ValidationError("new_keys_dir: give the new key pair's sidecar folder")
        folder = str(Path(new_keys_dir).expanduser().resolve())
        running = self._running(ROTATE, folder)
        if running is not None:
            return running
        new_keys = _load_next_keys(store, folder)
        self._check_keyservice_holds(store, new_keys.fingerprint)
        job = MaintenanceJob(ROTATE, "running", target_fingerprint=new_keys.fingerprint, new_keys_dir=folder)
        return self._start(job, lambda: self._rotate(store, new_keys, rate))

    def erase_now(self) -> MaintenanceJob:
        """Start erasing every removed template now and rewriting the database (the store's ``compact``)."""
        store = self._encrypted()
        running = self._running(ERASE, "")
        if running is not None:
            return running
        return self._start(MaintenanceJob(ERASE, "running"), lambda: self._erase(store))

    def status(self) -> MaintenanceJob:
        """The current or last job, the store's key pair and any unfinished rotation recorded in it."""
        with self._lock:
            job = self._job
        store: Any = self.store
        if getattr(store, "matching", "plain") != "encrypted":
            return job
        return dataclasses.replace(
            job, fingerprint=store.keys.fingerprint, unfinished_rotation=store.unfinished_rotation() or ""
        )

    def stop(self, timeout_s: float | None = 60.0) -> MaintenanceJob:
        """Stop a running job after its current block (it ends ``stopped``; a later call resumes it) and wait for
        its thread at most ``timeout_s`` seconds."""
        self._stop.set()
        self.wait(timeout_s)
        return self.status()

    def wait(self, timeout_s: float | None = None) -> MaintenanceJob:
        """Wait at most ``timeout_s`` seconds for the running job to end; the job then."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        with self._lock:
            return self._job

    def close(self) -> None:
        """Stop a running job (idempotent)."""
        self.stop()
        if self._thread is not None and self._thread.is_alive():
            log.warning("maintenance job still running at close: %s", self._job.operation)

    # ------------------------------------------------------------------ jobs

    def _encrypted(self) -> Any:
        if getattr(self.store, "matching", "plain") != "encrypted":
            raise PreconditionError("maintenance jobs need an encrypted store (store.matching: encrypted)")
        return self.store

    def _running(self, operation: str, target: str) -> MaintenanceJob | None:
        """The running job when it is this request's (already_running); AlreadyExistsError when another runs."""
        with self._lock:
            job = self._job
            if job.state != "running":
                return None
            if job.operation == operation and job.new_keys_dir == target:
                return dataclasses.replace(job, already_running=True)
        raise AlreadyExistsError(f"a maintenance job ({job.operation}) is running; see MaintenanceStatus")

    def _start(self, job: MaintenanceJob, work: Callable[[], None]) -> MaintenanceJob:
        with self._lock:
            if self._job.state == "running":  # another request started one since the check
                raise AlreadyExistsError(f"a maintenance job ({self._job.operation}) is running; see MaintenanceStatus")
            self._stop.clear()
            self._job = dataclasses.replace(job, started_at=self._clock())
            self._thread = threading.Thread(target=self._run, args=(work,), name="advface-maintenance", daemon=True)
            self._thread.start()
            return self._job

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._job = dataclasses.replace(self._job, **changes)

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except _Stopped:
            self._update(state="stopped", finished_at=self._clock())
            log.info("maintenance job %s stopped", self._job.operation)
        except Exception as exc:  # noqa: BLE001 - the job's outcome, reported by MaintenanceStatus
            message = str(exc) if isinstance(exc, AdvfaceError) else f"internal error ({type(exc).__name__})"
            if not isinstance(exc, AdvfaceError):
                log.exception("maintenance job %s failed", self._job.operation)
            else:
                log.warning("maintenance job %s failed: %s", self._job.operation, message)
            self._update(state="failed", last_error=message, finished_at=self._clock())
        else:
            self._update(state="done", last_error="", finished_at=self._clock())

    def _wait_or_stop(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped

    def _retrying(self, work: Callable[[], None]) -> None:
        """Run ``work`` until it ends without the key service's rate limit in the way, trying again after a short
        outage of the key service (module docs); ``work`` resumes where the last try stopped."""
        from advface.encrypted.errors import KeyServiceUnavailableError, RateLimitedError

        unavailable = 0
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                work()
                return
            except RateLimitedError as exc:
                self._update(last_error=str(exc))
                self._wait_or_stop(RATE_LIMIT_WAIT_S)
            except KeyServiceUnavailableError as exc:
                unavailable += 1
                if unavailable > UNAVAILABLE_RETRIES:
                    raise
                self._update(last_error=str(exc))
                log.warning("maintenance job %s: %s; trying again (%d)", self._job.operation, exc, unavailable)
                self._wait_or_stop(RATE_LIMIT_WAIT_S * 2 ** (unavailable - 1))

    def _rotate(self, store: Any, new_keys: Any, rate: float) -> None:
        interval, last = 1.0 / rate, [-math.inf]
        earlier = [0]  # blocks written by earlier tries of this job (after a rate limit)

        def pause() -> None:
            if self._stop.is_set():
                raise _Stopped
            self._wait_or_stop(max(0.0, last[0] + interval - time.monotonic()))
            last[0] = time.monotonic()

        def progress(done: int, total: int, written: int) -> None:
            self._update(blocks_done=done, blocks_total=total, blocks_this_job=earlier[0] + written)

        def once() -> None:
            written = store.rotate_key_pair(new_keys, progress=progress, pause=pause)
            earlier[0] += written

        self._retrying(once)
        self._update(fingerprint=store.keys.fingerprint)
        log.info(
            "encrypted store rotated to key pair %s: set store.encrypted_keys_dir to %s before the next restart",
            new_keys.fingerprint,
            self._job.new_keys_dir,
        )

    def _erase(self, store: Any) -> None:
        earlier = [0]  # blocks refreshed by earlier passes of this job (each ended by the key service's rate limit)

        def once() -> None:
            done = [0]

            def progress(blocks: int, total: int) -> None:
                done[0] = blocks
                base = earlier[0]
                self._update(blocks_done=base + blocks, blocks_total=base + total, blocks_this_job=base + blocks)

            try:
                report = store.compact(progress=progress)
            finally:
                earlier[0] += done[0]
            self._update(erased=int(report["erased"]), pending=int(report["pending"]))

        self._retrying(once)

    def _check_keyservice_holds(self, store: Any, fingerprint: str) -> None:
        """PreconditionError unless the store's key service will decide under ``fingerprint`` after the swap."""
        keyservice = store.keyservice
        if keyservice is None:
            raise PreconditionError("this encrypted store has no key service configured")
        handshake, holds = getattr(keyservice, "handshake", None), getattr(keyservice, "holds", None)
        try:
            if callable(handshake):
                handshake(fingerprint)  # ConfigError when it answers for another key pair
            elif callable(holds) and not holds(fingerprint):
                raise ConfigError(f"the key service does not hold key pair {fingerprint}")
        except ConfigError as exc:
            raise PreconditionError(
                f"{exc}: to rotate while serving, run the key service with --next-dir set to the new key pair's "
                "key-service folder, so that it decides under both key pairs until it is restarted on the new one"
            ) from None


def _check_rate(blocks_per_second: float) -> float:
    """The pace of a rotation (0: the default); ValidationError when negative, not finite or too high."""
    rate = float(blocks_per_second)
    if not math.isfinite(rate) or rate < 0 or rate > MAX_BLOCKS_PER_SECOND:
        raise ValidationError(f"blocks_per_second must be in [0, {MAX_BLOCKS_PER_SECOND:g}], got {blocks_per_second}")
    return rate or DEFAULT_BLOCKS_PER_SECOND


def _load_next_keys(store: Any, folder: str) -> Any:
    """The public keys of the sidecar folder ``folder``, checked against the store (ValidationError otherwise)."""
    from advface.encrypted.binding import binding_fingerprint
    from advface.encrypted.keys import load_binding_key, load_sidecar_folder

    try:
        new_keys = load_sidecar_folder(folder)
        binding = load_binding_key(folder)
    except ConfigError as exc:
        raise ValidationError(f"new_keys_dir: {exc}") from None
    if binding_fingerprint(binding) != store.binding_fingerprint:
        raise ValidationError(f"new_keys_dir {folder} has another binding key: make it with `keygen --next-of`")
    if new_keys.params != store.keys.params:
        raise ValidationError("new_keys_dir: the new key pair must have the same CKKS parameters")
    if new_keys.fingerprint == store.keys.fingerprint:
        raise ValidationError(f"the store is already under key pair {new_keys.fingerprint}")
    target = store.unfinished_rotation()
    if target not in (None, new_keys.fingerprint):
        raise ValidationError(f"a rotation to key pair {target} is unfinished; finish it first (its folder)")
    return new_keys
