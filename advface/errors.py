"""Exceptions raised by advface. Every error names what was wrong, and where.

Two families of "bad value" errors, kept apart so that a caller can tell whose mistake it is:

- :class:`ConfigError`: the operator's setup (a configuration key, a path, a model file, a key or secret, an
  encoder specification, a command-line flag) is missing or invalid; raised before work starts.
- :class:`ValidationError`: one request's input (an id, metadata, a vector, ``k``, a page size or token, a photo)
  is invalid; nothing was changed. :class:`EmbeddingError` and :class:`ImageError` are the vector and photo cases.

The service layer (:mod:`advface.service`) raises the others for request outcomes; the gRPC layer maps each class
to one status code (``server/status.py``).
"""

from __future__ import annotations

import math


class AdvfaceError(Exception):
    """Base class of every error advface raises on purpose."""


class ConfigError(AdvfaceError):
    """A configuration value, path, model, key or encoder specification is missing or invalid."""


class ValidationError(AdvfaceError):
    """A request value (id, metadata, vector, k, page size or token, option) is invalid; nothing was changed."""


class ImageError(ValidationError):
    """An image could not be used (unreadable, truncated, not an image, too large, no face...)."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class NoFaceError(ImageError):
    """No face was found in an image."""

    def __init__(self, source: str) -> None:
        super().__init__(source, "no face found")


class EmbeddingError(ValidationError):
    """An embedding is invalid (wrong shape, NaN/Inf, zero vector)."""


class NotFoundError(AdvfaceError):
    """A subject, template or other named record does not exist (in the tenant asked about)."""


class AlreadyExistsError(AdvfaceError):
    """A record that must be new already exists."""


class PreconditionError(AdvfaceError):
    """The request is valid but this deployment cannot serve it (a feature is disabled or unavailable)."""


class AttemptsExhaustedError(AdvfaceError):
    """Too many failed attempts within the window: Verify of one subject (``matching.verify_max_failures``) or
    Identify of one caller (``matching.identify_max_failures``) is refused, before any work, for ``retry_after_s``
    more seconds (0: the budget is full of attempts in flight)."""

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        retry_after_s: float,
        attempts: str = "Verify attempts",
        owner: str = "for this subject",
    ) -> None:
        super().__init__(
            f"too many failed {attempts} {owner} ({max_failures} in {window_s:g} s); "
            f"retry in {math.ceil(retry_after_s)} s"
        )
        self.max_failures = max_failures
        self.window_s = window_s
        self.retry_after_s = retry_after_s


class AttemptsCappedError(AttemptsExhaustedError):
    """The hard cap: ``max_consecutive`` failed attempts since the last match (``matching.*_max_consecutive_failures``).
    Refused until an operator resets the subject (re-enrolment, deletion, ``TemplateService.reset_attempts``) or
    caller; ``retry_after_s`` is infinite."""

    def __init__(
        self, max_consecutive: int, attempts: str = "Verify attempts", owner: str = "for this subject"
    ) -> None:
        AdvfaceError.__init__(
            self,
            f"too many failed {attempts} {owner}: {max_consecutive} in a row since the last match; refused until "
            "an operator resets it",
        )
        self.max_failures = max_consecutive
        self.max_consecutive = max_consecutive
        self.window_s = math.inf
        self.retry_after_s = math.inf


class DeadlineExceededError(AdvfaceError):
    """The caller's deadline passed before a stage started; the stage (and every later one) did not run."""


class ClosedError(AdvfaceError):
    """An object (a store, a service) was used after it was closed."""


class IntegrityError(AdvfaceError):
    """Encrypted data failed authentication: tampered, truncated, under an unknown key, or with the wrong context."""


class DatabaseUnavailableError(AdvfaceError):
    """A database could not be reached (connection lost or refused) even after retries."""
