"""gRPC status codes: the one exception type of the server side, and advface's errors mapped to codes.

:class:`RpcFailure` ends a call with ``(code, details)`` (authentication, authorisation, limits of the transport);
:func:`status_of` maps any exception raised while handling a call to its ``(code, details)``: advface's request
errors (:mod:`advface.errors`) to INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION,
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (a subject's budget of failed Verify attempts or a caller's of failed Identify
calls, the hard caps included), UNAVAILABLE; anything else
to INTERNAL with the exception's class name only (its message could quote request data).
"""

from __future__ import annotations

import grpc

from advface.encrypted.errors import KeyServiceUnavailableError, RateLimitedError, RefusedError
from advface.errors import (
    AdvfaceError,
    AlreadyExistsError,
    AttemptsExhaustedError,
    ClosedError,
    DatabaseUnavailableError,
    DeadlineExceededError,
    NotFoundError,
    PreconditionError,
    ValidationError,
)


class RpcFailure(Exception):
    """Ends an RPC with ``code`` and ``details`` (no request data in ``details`` beyond what the client sent)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


#: advface's error classes and their status codes, most specific first.
_CODES: tuple[tuple[type[AdvfaceError], grpc.StatusCode], ...] = (
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),  # ImageError and EmbeddingError included
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    # a quota that refills when the window ends (retry later), not a grant the caller lacks (PERMISSION_DENIED);
    # its hard cap (AttemptsCappedError, refilled only by an operator) too: the same quota, used up, and the details
    # say that waiting will not help
    (AttemptsExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The ``(code, details)`` a call that raised ``exc`` ends with."""
    if isinstance(exc, RpcFailure):
        return exc.code, exc.details
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc)
    if isinstance(exc, (DatabaseUnavailableError, ClosedError)):  # the store lost its server, or is shutting down
        return grpc.StatusCode.UNAVAILABLE, "template database unavailable, retry later"
    if isinstance(exc, KeyServiceUnavailableError):  # encrypted matching: nothing was decided or changed
        return grpc.StatusCode.UNAVAILABLE, "key service unavailable, retry later"
    if isinstance(exc, RateLimitedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "key service rate limit reached, retry later"
    if isinstance(exc, RefusedError):  # e.g. top_k above the key service's limit, or sidecar and key service disagree
        return grpc.StatusCode.FAILED_PRECONDITION, f"the key service refused the request ({exc})"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"
