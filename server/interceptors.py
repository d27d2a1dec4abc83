"""Token authentication for the sidecar.

Clients send ``authorization: Bearer <token>`` metadata. Tokens come from the config (``auth.tokens``: token ->
``{tenants: [..] | "*", role: "admin" | "client"}``). :class:`AuthInterceptor` answers UNAUTHENTICATED for a missing,
malformed or unknown token before any advface handler runs; the health and reflection services are exempt. The
tenant check (PERMISSION_DENIED) needs the request, so the servicer makes it with :meth:`Authenticator.principal`
and :meth:`Principal.check_tenant`.

Roles: ``client`` tokens use the tenants they list; ``admin`` tokens also see the server-wide template count in
``Info``. ``tenants: "*"`` allows every tenant. With auth disabled every caller is :data:`ANONYMOUS` (all tenants,
admin). Tokens are kept only as SHA-256 digests and never logged.

:class:`DecodeGuard` answers a request that is not a valid protobuf message of its RPC's request type with
INVALID_ARGUMENT and the fixed details :data:`MALFORMED_DETAILS` (grpc would answer UNKNOWN with the parser's
exception and log a traceback), writes its access-log line and counts it. Calls of methods the server does not have
(UNIMPLEMENTED) are logged and counted too. Logs and metrics name a call by :func:`rpc_label`: a method path is
chosen by the client, so anything but an advface, health or reflection method is ``other``.

:class:`RequestLimiter` bounds what one caller (one token; every anonymous caller together when auth is off) may ask
of the advface service: ``auth.rate_per_second`` requests per second (a token bucket holding one second's worth) and
``auth.max_in_flight`` calls being handled at once. The servicer admits each call before any work and answers
RESOURCE_EXHAUSTED over either limit (health and reflection are not limited).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import unknown_fields

from advface.api.v1 import SERVICE_NAME
from advface.api.v1 import advface_pb2 as pb
from advface.config import AuthConfig, TokenGrant
from server.logs import ACCESS_LOGGER_NAME, log
from server.status import RpcFailure

#: Services reachable without a token (load balancers and tooling need them).
EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
#: RPCs of ``advface.v1.AdvFace``, by name: the names logs and metrics use for them.
ADVFACE_METHODS = frozenset(pb.DESCRIPTOR.services_by_name[SERVICE_NAME.rsplit(".", 1)[-1]].methods_by_name)
#: Methods of the health and reflection services (logged and counted by path, without the leading ``/``).
OTHER_KNOWN_METHODS = frozenset(
    [f"{prefix}{name}" for prefix in EXEMPT_PREFIXES[:1] for name in ("Check", "List", "Watch")]
    + [f"{prefix}ServerReflectionInfo" for prefix in EXEMPT_PREFIXES[1:]]
)
#: Label of every method path that is not an advface, health or reflection method.
OTHER = "other"
#: Details of the INVALID_ARGUMENT status of a request that does not decode (fixed: nothing of the parser's error).
MALFORMED_DETAILS = "malformed request: not a valid protobuf message of this RPC's request type"

_access = logging.getLogger(ACCESS_LOGGER_NAME)
_PREFIX = f"/{SERVICE_NAME}/"


def rpc_label(method: str) -> str:
    """The name logs and metrics give a call of ``method`` (a full path, ``/advface.v1.AdvFace/Enroll``, or an
    advface RPC name): the RPC name for advface methods, the path without its leading ``/`` for health and
    reflection methods, :data:`OTHER` for anything else (the path is the client's choice: never logged as sent)."""
    if method.startswith(_PREFIX):
        name = method[len(_PREFIX) :]
        return name if name in ADVFACE_METHODS else OTHER
    if method in OTHER_KNOWN_METHODS:
        return method[1:]
    return method if method in ADVFACE_METHODS else OTHER


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenants a token may use (None = all) and its role; ``key_id`` names it in logs."""

    tenants: frozenset[str] | None
    role: str
    key_id: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_use(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    def check_tenant(self, tenant: str) -> None:
        """Raise RpcFailure(PERMISSION_DENIED) unless this principal may use ``tenant``."""
        if not self.may_use(tenant):
            raise RpcFailure(grpc.StatusCode.PERMISSION_DENIED, "this token may not use the requested tenant")


#: The caller when authentication is disabled.
ANONYMOUS = Principal(tenants=None, role="admin", key_id="anonymous")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Authenticator:
    """Maps bearer tokens to principals. ``enabled=False`` lets every call through as :data:`ANONYMOUS`.

    Tokens and their grants come validated from :mod:`advface.config` (roles, tenants, non-empty when enabled).
    """

    def __init__(self, enabled: bool, tokens: Mapping[str, TokenGrant] | None = None) -> None:
        self.enabled = bool(enabled)
        self._principals: dict[str, Principal] = {}
        for token, grant in (tokens or {}).items():
            digest = _digest(token)
            tenants = None if grant.tenants == "*" else frozenset(grant.tenants)
            self._principals[digest] = Principal(tenants=tenants, role=grant.role, key_id=digest[:8])

    @classmethod
    def from_config(cls, auth_config: AuthConfig | None) -> Authenticator:
        """From the config's ``auth`` section."""
        if auth_config is None:
            return cls(False)
        return cls(auth_config.enabled, auth_config.tokens)

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal:
        """The principal of a call's metadata; RpcFailure(UNAUTHENTICATED) when auth is on and the token is
        missing, malformed or unknown."""
        if not self.enabled:
            return ANONYMOUS
        value = None
        for key, val in metadata or ():
            if key.lower() == "authorization":
                value = val.decode("utf-8", "replace") if isinstance(val, bytes) else str(val)
                break
        if value is None:
            raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'")
        principal = self._principals.get(_digest(token.strip()))
        if principal is None:
            raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        return principal

    def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        """The principal of the call behind ``context`` (RpcFailure as :meth:`authenticate`)."""
        if not self.enabled:
            return ANONYMOUS
        return self.authenticate(context.invocation_metadata())


class RequestLimiter:
    """Per-caller limits (module docs): :meth:`admit` a call under a caller's key (:attr:`Principal.key_id`) before
    any work, :meth:`release` it when it ends. ``rate_per_second``: a token bucket refilled at that rate and holding
    one second's worth (at least one request), so a caller may burst that many requests at once; ``max_in_flight``:
    calls admitted and not yet released. 0 turns a limit off. Thread-safe; ``clock`` is for tests."""

    def __init__(self, rate_per_second: float, max_in_flight: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_second = float(rate_per_second)
        self.max_in_flight = int(max_in_flight)
        self.burst = max(1.0, self.rate_per_second)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens left, when counted)
        self._in_flight: dict[str, int] = {}

    @classmethod
    def from_config(cls, auth_config: AuthConfig) -> RequestLimiter:
        """From the config's ``auth`` section (``rate_per_second``, ``max_in_flight``)."""
        return cls(auth_config.rate_per_second, auth_config.max_in_flight)

    def admit(self, key: str) -> None:
        """Count a call of caller ``key``; RpcFailure(RESOURCE_EXHAUSTED) (and nothing counted) over a limit."""
        with self._lock:
            running = self._in_flight.get(key, 0)
            if self.max_in_flight and running >= self.max_in_flight:
                raise RpcFailure(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many concurrent requests from this caller (at most {self.max_in_flight}, "
                    "auth.max_in_flight); retry when one has finished",
                )
            if self.rate_per_second:
                now = self._clock()
                tokens, then = self._buckets.get(key, (self.burst, now))
                tokens = min(self.burst, tokens + max(0.0, now - then) * self.rate_per_second)
                if tokens < 1.0:
                    self._buckets[key] = (tokens, now)
                    wait = (1.0 - tokens) / self.rate_per_second
                    raise RpcFailure(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"request rate over this caller's limit of {self.rate_per_second:g} per second "
                        f"(auth.rate_per_second); retry in {wait:.2g} s",
                    )
                self._buckets[key] = (tokens - 1.0, now)
            self._in_flight[key] = running + 1

    def release(self, key: str) -> None:
        """End a call :meth:`admit` counted."""
        with self._lock:
            running = self._in_flight.get(key, 0) - 1
            if running > 0:
                self._in_flight[key] = running
            else:
                self._in_flight.pop(key, None)

    def in_flight(self, key: str) -> int:
        """Calls of caller ``key`` admitted and not yet released."""
        with self._lock:
            return self._in_flight.get(key, 0)


def _denier(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    return grpc.unary_unary_rpc_method_handler(deny)


def record_refusal(method: str, code: grpc.StatusCode, on_refused: Callable[[str, str], None] | None) -> None:
    """A call an interceptor answers itself, before any handler: one access-log line and ``on_refused`` (metrics)."""
    log(_access, logging.INFO, "rpc", rpc=rpc_label(method), code=code.name, latency_ms=0.0)
    if on_refused is not None:
        on_refused(method, code.name)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid bearer token (UNAUTHENTICATED) before they reach a handler."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator
        #: called with (full method path, status code name) for each refused call (metrics)
        self.on_refused: Callable[[str, str], None] | None = None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if not self.authenticator.enabled or method.startswith(EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        try:
            self.authenticator.authenticate(handler_call_details.invocation_metadata)
        except RpcFailure as exc:
            record_refusal(method, exc.code, self.on_refused)
            return _denier(exc.code, exc.details)
        return await continuation(handler_call_details)


class _Malformed:
    """What a guarded deserializer returns for bytes that do not decode (:data:`MALFORMED`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MALFORMED"


#: The request value of a call whose bytes did not decode.
MALFORMED = _Malformed()


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            message = deserializer(data)
            if data and _field_zero(message):
                return MALFORMED
            return message
        except Exception:  # noqa: BLE001 - DecodeError, or whatever else the parser raises on hostile bytes
            return MALFORMED

    return deserialize


def _field_zero(message: Any) -> bool:
    """Whether a request of a message type without fields (``EraseNowRequest``...) holds field number 0, which
    protobuf forbids: upb's parser keeps such bytes as an unknown field there instead of failing, as it does for
    every other request type."""
    descriptor = getattr(message, "DESCRIPTOR", None)
    if descriptor is None or descriptor.fields:
        return False
    return any(field.field_number == 0 for field in unknown_fields.UnknownFieldSet(message))


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Answers undecodable requests INVALID_ARGUMENT (:data:`MALFORMED_DETAILS`) with one access-log line, and logs
    calls of unknown methods (UNIMPLEMENTED); ``on_refused(path, code name)`` counts both (metrics).

    It wraps the request deserializer of every handler so that a parse error yields :data:`MALFORMED` instead of
    raising inside grpc, and the handler so that a :data:`MALFORMED` request (or a streamed message) aborts the call.
    Handlers that are not coroutines or async generators (none in this server) are left as they are.
    """

    def __init__(self) -> None:
        #: called with (full method path, status code name) for each call it answers itself (metrics)
        self.on_refused: Callable[[str, str], None] | None = None

    def _refuse(self, method: str, code: grpc.StatusCode) -> None:
        record_refusal(method, code, self.on_refused)

    async def _reject(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self._refuse(method, grpc.StatusCode.INVALID_ARGUMENT)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_DETAILS)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        handler = await continuation(handler_call_details)
        if handler is None:
            self._refuse(method, grpc.StatusCode.UNIMPLEMENTED)
            return handler
        if handler.request_deserializer is None:
            return handler
        return self._guard(method, handler)

    def _guard(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        deserializer = _tolerant(handler.request_deserializer)
        serializer = handler.response_serializer
        reject = self._reject
        if handler.request_streaming:

            async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for request in requests:
                    if request is MALFORMED:
                        await reject(method, context)
                    yield request

            behavior = handler.stream_stream if handler.response_streaming else handler.stream_unary
            if inspect.isasyncgenfunction(behavior):

                async def stream_gen(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    async for response in behavior(checked(requests, context), context):
                        yield response

                wrapped: Callable[..., Any] = stream_gen
            elif inspect.iscoroutinefunction(behavior):

                async def stream_call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                    return await behavior(checked(requests, context), context)

                wrapped = stream_call
            else:
                return handler
            if handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(wrapped, deserializer, serializer)
            return grpc.stream_unary_rpc_method_handler(wrapped, deserializer, serializer)

        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if inspect.isasyncgenfunction(behavior):

            async def unary_gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if request is MALFORMED:
                    await reject(method, context)
                async for response in behavior(request, context):
                    yield response

            wrapped = unary_gen
        elif inspect.iscoroutinefunction(behavior):

            async def unary_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if request is MALFORMED:
                    await reject(method, context)
                return await behavior(request, context)

            wrapped = unary_call
        else:
            return handler
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(wrapped, deserializer, serializer)
        return grpc.unary_unary_rpc_method_handler(wrapped, deserializer, serializer)
