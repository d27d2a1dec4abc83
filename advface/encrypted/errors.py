"""Errors of encrypted matching (all :class:`~advface.errors.AdvfaceError`)."""

from __future__ import annotations

from advface.errors import AdvfaceError


class RefusedError(AdvfaceError):
    """The key service refused a request: not bound by the sidecar, stale or replayed, for another key pair, or
    not a score result (wrong scale or level, scores out of range). Nothing was decrypted for the caller."""


class RateLimitedError(AdvfaceError):
    """The key service's rate limit for this operation is spent; retry later."""


class KeyServiceUnavailableError(AdvfaceError):
    """The key service could not be reached or did not answer; nothing was stored or changed."""
