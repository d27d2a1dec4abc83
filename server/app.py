"""The sidecar server: the AdvFace servicer plus the standard health service and server reflection, token auth,
TLS / mTLS, explicit message-size limits and graceful shutdown, on grpc.aio.

- :func:`build_server` -- a configured, bound (not started) ``grpc.aio.Server``; call it inside a running event
  loop. Its :class:`Sidecar` (servicer, health, port) is ``server.sidecar``.
- :class:`Sidecar` -- the same, with ``start()`` / ``stop()`` (health SERVING once started, NOT_SERVING when
  stopping; the store is closed after the last call finished).
- :func:`serve` -- run until SIGTERM or SIGINT, then stop gracefully within ``server.grace_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from advface.api.v1 import SERVICE_NAME
from advface.api.v1 import advface_pb2 as pb
from advface.api.v1 import advface_pb2_grpc as pb_grpc
from advface.config import Config, TLSConfig
from advface.errors import ConfigError
from server.interceptors import AuthInterceptor, DecodeGuard
from server.logs import LOGGER_NAME, configure_logging, log
from server.metrics import MetricsServer, SidecarMetrics, build_labels, store_counter
from server.servicer import AdvFaceServicer

_logger = logging.getLogger(LOGGER_NAME)

#: Services reflection lists.
REFLECTED_SERVICES = (
    SERVICE_NAME,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)


def _read(path: Any, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"tls.{what}: cannot read {path} ({exc.strerror or exc})") from None


def server_credentials(tls_config: TLSConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the ``tls`` section: ``cert_file`` + ``key_file`` (PEM) enable TLS; ``client_ca_file``
    also requires and verifies client certificates (mTLS). None when no certificate is configured."""
    cert, key, client_ca = tls_config.cert_file, tls_config.key_file, tls_config.client_ca_file
    if not cert and not key:
        if client_ca:
            raise ConfigError("tls.client_ca_file needs tls.cert_file and tls.key_file")
        return None
    if not cert or not key:
        raise ConfigError("TLS needs both tls.cert_file and tls.key_file")
    root = _read(client_ca, "client_ca_file") if client_ca else None
    return grpc.ssl_server_credentials(
        [(_read(key, "key_file"), _read(cert, "cert_file"))],
        root_certificates=root,
        require_client_auth=root is not None,
    )


def score_convention(metric: str, threshold: float) -> dict[str, str]:
    """How to read scores and the threshold (fields of the ``serving`` log line): ``score`` says what a score is,
    ``match`` when a probe matches. Scores are "higher = more similar"; with the Euclidean metric that makes them
    minus the distance, so thresholds are negative."""
    if metric == "euclidean":
        return {
            "score": "minus the Euclidean distance (higher = more similar)",
            "match": f"score >= {threshold:g}, i.e. Euclidean distance <= {-threshold:g}",
        }
    return {"score": f"{metric} similarity (higher = more similar)", "match": f"score >= {threshold:g}"}


class Sidecar:
    """A configured AdvFace server: servicer, health, reflection, auth, TLS, limits; bound to its port.

    Build it inside a running event loop. ``servicer`` may be given (tests, benchmarks: to share loaded models);
    its store is closed by :meth:`stop` all the same.
    """

    def __init__(self, config: Config, *, servicer: AdvFaceServicer | None = None) -> None:
        self.config = config
        self.host = config.server.host
        requested_port = config.server.port
        self.grace_seconds = config.server.grace_seconds

        self.servicer = servicer if servicer is not None else AdvFaceServicer(config)
        max_receive, max_send = self.servicer.max_receive_bytes, self.servicer.max_send_bytes
        authenticator = self.servicer.auth
        auth_interceptor = AuthInterceptor(authenticator)
        decode_guard = DecodeGuard()  # after auth: a refused call is never decoded
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[auth_interceptor, decode_guard],
            options=[
                ("grpc.max_receive_message_length", max_receive),
                ("grpc.max_send_message_length", max_send),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_AdvFaceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(REFLECTED_SERVICES, self.server)

        address = f"{self.host}:{requested_port}"
        credentials = server_credentials(config.tls)
        self.tls = credentials is not None
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
            self.servicer.close()
            raise ConfigError(f"cannot listen on {address}: {exc}") from None
        if not self.port:
            self.servicer.close()
            raise ConfigError(f"cannot listen on {address}")
        self.metrics: SidecarMetrics | None = None
        self.metrics_server: MetricsServer | None = None
        metrics_cfg = config.metrics
        service = self.servicer.service
        if metrics_cfg.enabled:
            self.metrics = SidecarMetrics(
                build_labels(service),
                store_counter(service),
                lambda: service.batcher.queued,
                methods=tuple(pb.DESCRIPTOR.services_by_name[SERVICE_NAME.rsplit(".", 1)[-1]].methods_by_name),
                tracked_subjects=service.verify_attempts.tracked,
                capped_subjects=service.verify_attempts.capped_now,
            )
            self.servicer.metrics = self.metrics
            service.batcher.on_batch = self.metrics.protection_batch
            service.verify_attempts.on_lockout = self.metrics.verify_lockouts.inc
            service.verify_attempts.on_refused = self.metrics.verify_refused_locked.inc
            service.verify_attempts.on_capped = self.metrics.verify_capped.inc
            service.identify_attempts.on_lockout = self.metrics.identify_lockouts.inc
            service.identify_attempts.on_refused = self.metrics.identify_refused_locked.inc
            service.identify_attempts.on_capped = self.metrics.identify_capped.inc
            auth_interceptor.on_refused = self.metrics.rpc_refused
            decode_guard.on_refused = self.metrics.rpc_refused
            try:
                self.metrics_server = MetricsServer(self.metrics.registry, metrics_cfg.host, metrics_cfg.port)
            except ConfigError:
                self.servicer.close()
                raise
        self.server.sidecar = self
        self._stopped = False

    @property
    def address(self) -> str:
        """``host:port`` actually bound (the port is resolved when 0 was asked for)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Start serving; health reports SERVING for the server ("") and the AdvFace service."""
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        service = self.servicer.service
        log(
            _logger,
            logging.INFO,
            "serving",
            address=self.address,
            tls=self.tls,
            auth=self.servicer.auth.enabled,
            encoder=service.encoder.name,
            protection=service.protector is not None,
            protection_method=service.protection_method,
            threshold=service.threshold.value,
            threshold_source=service.threshold.source,
            **score_convention(service.metric, service.threshold.value),
            metrics=self.metrics_server.address if self.metrics_server is not None else None,
        )
        if self.metrics_server is not None:
            log(
                _logger,
                logging.INFO,
                "metrics serving",
                address=self.metrics_server.address,
                url=self.metrics_server.url,
            )

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let running ones finish within ``grace`` seconds (default
        ``server.grace_seconds``), then close the store. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        log(_logger, logging.INFO, "stopping", grace_seconds=grace)
        await self.server.stop(grace)
        if self.metrics_server is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.metrics_server.close)
        await asyncio.get_running_loop().run_in_executor(None, self.servicer.close)
        log(_logger, logging.INFO, "stopped")


def build_server(config: Config, *, servicer: AdvFaceServicer | None = None) -> grpc.aio.Server:
    """A configured, bound, not yet started ``grpc.aio.Server`` (see :class:`Sidecar`; it is ``.sidecar``)."""
    return Sidecar(config, servicer=servicer).server


async def serve_async(config: Config, *, ready: Callable[[Sidecar], None] | None = None) -> None:
    """Serve until SIGTERM / SIGINT (or cancellation), then stop gracefully. ``ready(sidecar)`` is called once the
    server accepts requests."""
    sidecar = Sidecar(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await sidecar.start()
        if ready is not None:
            ready(sidecar)
        await stop.wait()
        log(_logger, logging.INFO, "signal received")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await sidecar.stop()


def serve(config: Config, *, ready: Callable[[Sidecar], None] | None = None) -> None:
    """Configure logging from the config's ``logging`` section and run :func:`serve_async` to completion."""
    configure_logging(config.logging.level, config.logging.json)
    asyncio.run(serve_async(config, ready=ready))


__all__ = [
    "REFLECTED_SERVICES",
    "Sidecar",
    "build_server",
    "score_convention",
    "serve",
    "serve_async",
    "server_credentials",
]
