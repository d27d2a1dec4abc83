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
    """Too many failed Verify attempts for one subject within the window (``matching.verify_max_failures``):
    Verify of that subject is refused, before any work, for ``retry_after_s`` more seconds."""

    def __init__(self, max_failures: int, window_s: float, retry_after_s: float) -> None:
        super().__init__(
            f"too many failed Verify attempts for this subject ({max_failures} in {window_s:g} s); "
            f"retry in {math.ceil(retry_after_s)} s"
        )
        self.max_failures = max_failures
        self.window_s = window_s
        self.retry_after_s = retry_after_s


class DeadlineExceededError(AdvfaceError):
    """The caller's deadline passed before a stage started; the stage (and every later one) did not run."""


class ClosedError(AdvfaceError):
    """An object (a store, a service) was used after it was closed."""


class IntegrityError(AdvfaceError):
    """Encrypted data failed authentication: tampered, truncated, under an unknown key, or with the wrong context."""


class DatabaseUnavailableError(AdvfaceError):
    """A database could not be reached (connection lost or refused) even after retries."""
