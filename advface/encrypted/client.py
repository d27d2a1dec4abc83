"""The sidecar's client of the key service (gRPC, ``advface.keyservice.v1.KeyService``).

Every call has a deadline (``timeout_s``) and fails fast: an unreachable, timed-out or failing key service raises
:class:`~advface.encrypted.errors.KeyServiceUnavailableError` (the caller answers UNAVAILABLE and changes nothing);
a refusal raises :class:`~advface.encrypted.errors.RefusedError`, its rate limit
:class:`~advface.encrypted.errors.RateLimitedError`, and a token it does not accept
:class:`~advface.errors.ConfigError` (the operator's setup is wrong).
"""

from __future__ import annotations

from typing import Any

import grpc

from advface.api.keyservice.v1 import keyservice_pb2 as pb
from advface.api.keyservice.v1 import keyservice_pb2_grpc as pb_grpc
from advface.encrypted.binding import BoundRequest
from advface.encrypted.errors import KeyServiceUnavailableError, RateLimitedError, RefusedError
from advface.encrypted.keyservice import Decision, VerifyDecision
from advface.encrypted.wire import decision_from_message, request_to_message, verify_from_message
from advface.errors import ConfigError

__all__ = ["MAX_MESSAGE_BYTES", "KeyServiceClient"]

#: largest message either side accepts: an Identify over 1M templates carries ~32 MB of score ciphertexts
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class KeyServiceClient:
    """Calls a key service at ``address`` with ``token``; TLS when ``root_certificates`` is given (mTLS with
    ``client_cert``: a ``(private key PEM, certificate chain PEM)`` pair)."""

    def __init__(
        self,
        address: str,
        token: str,
        *,
        timeout_s: float = 5.0,
        root_certificates: bytes | None = None,
        client_cert: tuple[bytes, bytes] | None = None,
    ) -> None:
        if not token:
            raise ConfigError("the key service token must not be empty")
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # a restarted key service is found again within a second (gRPC's default backoff grows to 2 minutes)
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if root_certificates is not None:
            key, chain = client_cert if client_cert is not None else (None, None)
            credentials = grpc.ssl_channel_credentials(root_certificates, key, chain)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.KeyServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.address = address
        self.timeout_s = float(timeout_s)

    def _call(self, method: Any, message: Any) -> Any:
        try:
            return method(message, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = (exc.details() if hasattr(exc, "details") else "") or ""
            if code == grpc.StatusCode.PERMISSION_DENIED or code == grpc.StatusCode.INVALID_ARGUMENT:
                raise RefusedError(f"key service refused the request: {details}") from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise RateLimitedError(f"key service: {details}") from None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise ConfigError(f"key service at {self.address} does not accept this token: {details}") from None
            name = code.name if code is not None else "error"
            raise KeyServiceUnavailableError(f"key service at {self.address} unavailable ({name}: {details})") from None

    def wait_ready(self, timeout_s: float) -> bool:
        """Whether the connection to the key service is up within ``timeout_s`` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            return False
        return True

    def handshake(self, fingerprint: str) -> pb.HandshakeReply:
        """The key service's description; ConfigError when it holds another key pair than ``fingerprint``."""
        reply = self._call(self._stub.Handshake, pb.HandshakeRequest(fingerprint=fingerprint))
        if reply.fingerprint != fingerprint:
            raise ConfigError(
                f"key service at {self.address} holds key pair {reply.fingerprint}, the sidecar's is {fingerprint}: "
                "wrong key pair"
            )
        return reply

    def verify(self, request: BoundRequest) -> VerifyDecision:
        return verify_from_message(self._call(self._stub.Verify, request_to_message(request)))

    def identify(self, request: BoundRequest) -> list[Decision]:
        reply = self._call(self._stub.Identify, request_to_message(request))
        return [decision_from_message(d) for d in reply.candidates]

    def refresh(self, request: BoundRequest) -> list[bytes]:
        return [bytes(c) for c in self._call(self._stub.Refresh, request_to_message(request)).columns]

    def rotate(self, request: BoundRequest) -> list[bytes]:
        """Key-pair rotation of one block (the key service's next key pair; see KeyServiceCore.rotate)."""
        return [bytes(c) for c in self._call(self._stub.Rotate, request_to_message(request)).columns]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KeyServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
