"""The key-service process of encrypted matching: ``advface.keyservice.v1.KeyService`` over gRPC.

A thin transport around :class:`advface.encrypted.keyservice.KeyServiceCore`, which does every check and keeps the
audit log. Here: the bearer token (compared by SHA-256 digest in constant time, before any decryption), TLS or mTLS
(``server.app.server_credentials``), message size limits, and the mapping of errors to status codes
(``proto/advface/keyservice/v1/keyservice.proto``). Synchronous gRPC on a small thread pool: SEAL calls hold the
GIL, so more threads would not decrypt faster.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from advface.api.keyservice.v1 import keyservice_pb2 as pb
from advface.api.keyservice.v1 import keyservice_pb2_grpc as pb_grpc
from advface.config import TLSConfig
from advface.encrypted.client import MAX_MESSAGE_BYTES
from advface.encrypted.errors import RateLimitedError, RefusedError
from advface.encrypted.keyservice import KeyServiceCore
from advface.encrypted.wire import decision_to_message, request_from_message, verify_to_message
from advface.errors import ConfigError
from server.app import server_credentials

__all__ = ["KeyServiceServicer", "build_keyservice_server", "serve_keyservice"]

log = logging.getLogger("advface.keyservice")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class KeyServiceServicer(pb_grpc.KeyServiceServicer):
    """Authenticates each call, converts messages and maps the core's errors to status codes."""

    def __init__(self, core: KeyServiceCore, token: str) -> None:
        if len(token) < 16:
            raise ConfigError("the key service token must be at least 16 characters")
        self.core = core
        self._token = _digest(token)

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        value = ""
        for key, item in context.invocation_metadata() or ():
            if key == "authorization":
                value = item if isinstance(item, str) else item.decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(_digest(token.strip()), self._token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown key service token")

    def _run(self, context: grpc.ServicerContext, work: Callable[[], Any]) -> Any:
        self._authenticate(context)
        try:
            return work()
        except RefusedError as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except RateLimitedError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Exception:  # the core already audited it; never echo internals to the caller
            log.exception("key service request failed")
            context.abort(grpc.StatusCode.INTERNAL, "key service error")

    def Handshake(self, request: pb.HandshakeRequest, context: grpc.ServicerContext) -> pb.HandshakeReply:  # noqa: N802
        def work() -> pb.HandshakeReply:
            held = request.fingerprint if self.core.holds(request.fingerprint) else self.core.fingerprint
            return pb.HandshakeReply(
                fingerprint=held,
                metric=self.core.policy.metric,
                top_k_max=self.core.policy.top_k_max,
                slots=self.core.params.slots,
            )

        return self._run(context, work)

    def Verify(self, request: pb.BoundRequest, context: grpc.ServicerContext) -> pb.VerifyReply:  # noqa: N802
        return self._run(context, lambda: verify_to_message(self.core.verify(request_from_message(request))))

    def Identify(self, request: pb.BoundRequest, context: grpc.ServicerContext) -> pb.IdentifyReply:  # noqa: N802
        def work() -> pb.IdentifyReply:
            found = self.core.identify(request_from_message(request))
            return pb.IdentifyReply(candidates=[decision_to_message(d) for d in found])

        return self._run(context, work)

    def Refresh(self, request: pb.BoundRequest, context: grpc.ServicerContext) -> pb.RefreshReply:  # noqa: N802
        return self._run(context, lambda: pb.RefreshReply(columns=self.core.refresh(request_from_message(request))))

    def Rotate(self, request: pb.BoundRequest, context: grpc.ServicerContext) -> pb.RefreshReply:  # noqa: N802
        return self._run(context, lambda: pb.RefreshReply(columns=self.core.rotate(request_from_message(request))))


def build_keyservice_server(
    core: KeyServiceCore,
    token: str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tls: TLSConfig | None = None,
    workers: int = 4,
) -> tuple[grpc.Server, int]:
    """A started-but-not-yet-started server and the port it bound (``port`` 0: any free one)."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="keyservice"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    pb_grpc.add_KeyServiceServicer_to_server(KeyServiceServicer(core, token), server)
    credentials = server_credentials(tls) if tls is not None else None
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise ConfigError(f"key service cannot listen on {address}")
    return server, bound


def serve_keyservice(
    core: KeyServiceCore,
    token: str,
    host: str,
    port: int,
    *,
    tls: TLSConfig | None = None,
    ready: Callable[[str], None] | None = None,
    grace_s: float = 5.0,
) -> None:
    """Serve until SIGTERM or SIGINT; ``ready(address)`` once requests are accepted."""
    server, bound = build_keyservice_server(core, token, host, port, tls=tls)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    if ready is not None:
        ready(f"{host}:{bound}")
    stop.wait()
    server.stop(grace_s).wait()
    core.audit.close()
