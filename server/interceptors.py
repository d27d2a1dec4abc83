"""Token authentication for the sidecar.

Clients send ``authorization: Bearer <token>`` metadata. Tokens come from the config (``auth.tokens``: token ->
``{tenants: [..] | "*", role: "admin" | "client"}``). :class:`AuthInterceptor` answers UNAUTHENTICATED for a missing,
malformed or unknown token before any advface handler runs; the health and reflection services are exempt. The
tenant check (PERMISSION_DENIED) needs the request, so the servicer makes it with :meth:`Authenticator.principal`
and :meth:`Principal.check_tenant`.

Roles: ``client`` tokens use the tenants they list; ``admin`` tokens also see the server-wide template count in
``Info``. ``tenants: "*"`` allows every tenant. With auth disabled every caller is :data:`ANONYMOUS` (all tenants,
admin). Tokens are kept only as SHA-256 digests and never logged.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from advface.config import AuthConfig, TokenGrant
from server.logs import LOGGER_NAME, log
from server.status import RpcFailure

#: Services reachable without a token (load balancers and tooling need them).
EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_access = logging.getLogger(LOGGER_NAME + ".access")


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


def _denier(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    return grpc.unary_unary_rpc_method_handler(deny)


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
            log(_access, logging.INFO, "rpc", rpc=method.rsplit("/", 1)[-1], code=exc.code.name, latency_ms=0.0)
            if self.on_refused is not None:
                self.on_refused(method, exc.code.name)
            return _denier(exc.code, exc.details)
        return await continuation(handler_call_details)
