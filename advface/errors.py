"""Exceptions raised by advface. Every error names what was wrong, and where."""

from __future__ import annotations


class AdvfaceError(Exception):
    """Base class of every error advface raises on purpose."""


class ConfigError(AdvfaceError):
    """A configuration value, path or encoder specification is missing or invalid."""


class ImageError(AdvfaceError):
    """An image could not be used (unreadable, truncated, not an image, too large, no face...)."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class NoFaceError(ImageError):
    """No face was found in an image."""

    def __init__(self, source: str) -> None:
        super().__init__(source, "no face found")


class EmbeddingError(AdvfaceError):
    """An embedding is invalid (wrong shape, NaN/Inf, zero vector)."""


class NotFoundError(AdvfaceError):
    """A subject, template or other named record does not exist (in the tenant asked about)."""


class AlreadyExistsError(AdvfaceError):
    """A record that must be new already exists."""


class IntegrityError(AdvfaceError):
    """Encrypted data failed authentication: tampered, truncated, under an unknown key, or with the wrong context."""


class DatabaseUnavailableError(AdvfaceError):
    """A database could not be reached (connection lost or refused) even after retries."""
