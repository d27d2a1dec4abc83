"""Prometheus metrics of the sidecar, served over HTTP (``GET /metrics``) on their own port.

Every server has its own :class:`~prometheus_client.CollectorRegistry` (several servers can run in one process).
Metrics (labels never carry request data: no subject, template or tenant ids, no vectors):

- ``advface_rpc_requests_total{method, code}`` -- RPCs finished, by method (``Enroll``...) and gRPC status code
  name (``OK``, ``INVALID_ARGUMENT``, ``UNAUTHENTICATED``...); calls refused by the auth interceptor, requests that
  did not decode (INVALID_ARGUMENT) and calls of unknown methods (UNIMPLEMENTED, method ``other``) included;
- ``advface_rpc_duration_seconds{method}`` -- latency histogram, 1 ms to 10 s;
- ``advface_rpc_in_flight{method}`` -- RPCs being handled now;
- ``advface_store_templates`` / ``advface_store_subjects`` -- templates and subjects stored, all tenants
  together (read when scraped; tenants are client-chosen, so they are not used as labels);
- ``advface_protection_batch_rows`` / ``advface_protection_batch_duration_seconds`` -- rows per AdvFace shadow
  call of the protection batcher (concurrent requests coalesced) and its duration;
  ``advface_protection_queue_requests`` -- requests waiting for protection;
- ``advface_verify_lockouts_total`` -- subjects locked for too many failed Verify attempts
  (``matching.verify_max_failures``); ``advface_verify_refused_locked_total`` -- Verify calls refused while their
  subject was locked (they are also RESOURCE_EXHAUSTED in ``advface_rpc_requests_total``);
  ``advface_verify_tracked_subjects`` -- subjects whose failed attempts are tracked now (at most
  ``matching.verify_max_tracked``); ``advface_verify_capped_total`` -- subjects that reached the hard cap
  (``matching.verify_max_consecutive_failures``), ``advface_verify_capped_subjects`` -- subjects capped now;
- ``advface_identify_lockouts_total`` -- callers locked for too many failed Identify calls
  (``matching.identify_max_failures``), ``advface_identify_refused_locked_total`` -- Identify calls refused while
  their caller was locked or capped, ``advface_identify_capped_total`` -- callers that reached the Identify cap;
- ``advface_build_info{service, version, api, grpc, encoder, protection, store_backend}`` -- constant 1.

Config section ``metrics`` (``enabled``, ``host``, ``port``: docs/configuration.md); port 0 picks a free one,
reported in the ``metrics serving`` log line and :attr:`MetricsServer.port`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from advface.errors import ConfigError
from server.interceptors import OTHER, OTHER_KNOWN_METHODS, rpc_label
from server.logs import LOGGER_NAME, log

if TYPE_CHECKING:
    from advface.service import TemplateService

_logger = logging.getLogger(LOGGER_NAME)

#: Labels of the health and reflection methods (counted only when the server answers them itself, e.g. malformed).
OTHER_KNOWN_LABELS = frozenset(path[1:] for path in OTHER_KNOWN_METHODS)
#: RPC latency buckets, seconds: 1 ms .. 10 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Rows per protection call (the batcher's calls are at most ``PROTECT_CHUNK`` rows).
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: Duration of one protection call, seconds.
PROTECTION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SidecarMetrics:
    """The sidecar's metrics in a private registry. ``store_counts()`` -> ``(templates, subjects)`` and
    ``queue_length()`` are read at scrape time (errors there make the gauge report NaN, never fail a scrape)."""

    def __init__(
        self,
        build: dict[str, str],
        store_counts: Callable[[], tuple[int, int]] | None = None,
        queue_length: Callable[[], int] | None = None,
        methods: tuple[str, ...] = (),
        tracked_subjects: Callable[[], int] | None = None,
        capped_subjects: Callable[[], int] | None = None,
    ) -> None:
        #: RPC names used as labels; anything else a client sends is counted as "other" (bounded labels)
        self.methods = frozenset(methods)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "advface_rpc_requests", "RPCs finished, by method and gRPC status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "advface_rpc_duration_seconds",
            "RPC latency in seconds, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("advface_rpc_in_flight", "RPCs being handled, by method", ["method"], registry=r)
        self.batch_rows = Histogram(
            "advface_protection_batch_rows",
            "Templates protected per AdvFace shadow call (concurrent requests coalesced)",
            buckets=BATCH_ROW_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "advface_protection_batch_duration_seconds",
            "Duration of one AdvFace protection call in seconds",
            buckets=PROTECTION_BUCKETS,
            registry=r,
        )
        self._counts_lock = threading.Lock()
        self._store_counts = store_counts
        templates = Gauge("advface_store_templates", "Templates stored, all tenants", registry=r)
        subjects = Gauge("advface_store_subjects", "Subjects stored, all tenants", registry=r)
        if store_counts is not None:
            templates.set_function(lambda: self._count(0))
            subjects.set_function(lambda: self._count(1))
        queue = Gauge("advface_protection_queue_requests", "Requests waiting for protection", registry=r)
        if queue_length is not None:
            queue.set_function(lambda: float(queue_length()))
        self.verify_lockouts = Counter(
            "advface_verify_lockouts", "Subjects locked for too many failed Verify attempts", registry=r
        )
        self.verify_refused_locked = Counter(
            "advface_verify_refused_locked", "Verify calls refused while their subject was locked", registry=r
        )
        tracked = Gauge(
            "advface_verify_tracked_subjects", "Subjects whose failed Verify attempts are tracked", registry=r
        )
        if tracked_subjects is not None:
            tracked.set_function(lambda: float(tracked_subjects()))
        self.verify_capped = Counter(
            "advface_verify_capped", "Subjects that reached the cap of consecutive failed Verify attempts", registry=r
        )
        capped = Gauge("advface_verify_capped_subjects", "Subjects refused until an operator resets them", registry=r)
        if capped_subjects is not None:
            capped.set_function(lambda: float(capped_subjects()))
        self.identify_lockouts = Counter(
            "advface_identify_lockouts", "Callers locked for too many failed Identify calls", registry=r
        )
        self.identify_refused_locked = Counter(
            "advface_identify_refused_locked", "Identify calls refused while their caller was locked", registry=r
        )
        self.identify_capped = Counter(
            "advface_identify_capped", "Callers that reached the cap of consecutive failed Identify calls", registry=r
        )
        Info("advface_build", "Versions and configuration of this sidecar", registry=r).info(
            {k: str(v) for k, v in build.items()}
        )
        self._last_counts: tuple[int, int] | None = None

    def _count(self, which: int) -> float:
        # Scrapes read templates then subjects: one store query serves both.
        with self._counts_lock:
            try:
                if which == 0 or self._last_counts is None:
                    assert self._store_counts is not None
                    self._last_counts = self._store_counts()
                return float(self._last_counts[which])
            except Exception as exc:  # noqa: BLE001 - a closed store must not break the scrape
                log(_logger, logging.DEBUG, "store count failed", exc=type(exc).__name__)
                return float("nan")

    def rpc_started(self, method: str) -> None:
        """An RPC began."""
        self.in_flight.labels(method).inc()

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        """An RPC that :meth:`rpc_started` ended with status ``code`` after ``seconds``."""
        self.in_flight.labels(method).dec()
        self.rpc_refused(method, code, seconds)

    def rpc_refused(self, method: str, code: str, seconds: float = 0.0) -> None:
        """Count an RPC (one refused before it started, e.g. by the auth interceptor, or one whose request did not
        decode). ``method`` is an RPC name or a full path (``/advface.v1.AdvFace/Enroll``), labelled as
        :func:`server.interceptors.rpc_label` says; names outside ``methods`` are counted as ``other``."""
        name = rpc_label(method)
        if self.methods and name not in self.methods and name not in OTHER_KNOWN_LABELS:
            name = OTHER
        self.requests.labels(name, code).inc()
        self.latency.labels(name).observe(max(seconds, 0.0))

    def protection_batch(self, rows: int, seconds: float) -> None:
        """One protection call of ``rows`` templates took ``seconds``."""
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)


class MetricsServer:
    """The HTTP endpoint of a registry, on ``host:port`` (0: any free port), in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ConfigError(
                f"metrics: cannot listen on {host}:{port} ({exc.strerror or exc}); set metrics.port "
                "(0: any free port) or metrics.enabled: false"
            ) from None
        self.host = host
        self.port = int(self._httpd.server_port)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(5)
            self._thread = None  # type: ignore[assignment]


def build_labels(service: TemplateService) -> dict[str, str]:
    """``advface_build_info`` labels of a service (versions and configuration, nothing biometric)."""
    import grpc

    from advface import __version__
    from advface.api.v1 import SERVICE_NAME

    return {
        "service": SERVICE_NAME,
        "version": __version__,
        "api": SERVICE_NAME.rsplit(".", 1)[0],
        "grpc": grpc.__version__,
        "encoder": str(service.encoder.name),
        "protection": service.protection_method,
        "store_backend": type(service.store).__name__,
    }


def store_counter(service: TemplateService) -> Callable[[], tuple[int, int]]:
    """``() -> (templates, subjects)`` of a service's store, all tenants."""
    store = service.store

    def counts() -> tuple[int, int]:
        templates = store.index_size() if hasattr(store, "index_size") else store.count()
        return int(templates), int(store.count(None, subjects=True))

    return counts


__all__ = ["LATENCY_BUCKETS", "MetricsServer", "SidecarMetrics", "build_labels", "store_counter"]
