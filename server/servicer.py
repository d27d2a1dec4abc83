"""The ``advface.v1.AdvFace`` servicer (grpc.aio).

The encoder, face detector, protector and template store are created once, with the servicer. CPU-heavy work
(decoding and embedding images, AdvFace protection) runs in a thread pool of ``server.workers`` threads; store
calls run in their own single thread (SQLite connections and faiss indexes are not shared across threads), so the
event loop only parses, validates and answers.

Every RPC validates its whole request before it changes anything (a rejected request stores nothing):

- embeddings: the encoder's dimension, finite, not all zero (INVALID_ARGUMENT);
- ids (tenant, subject, template): 1-128 characters, no control characters (INVALID_ARGUMENT); an empty tenant
  means ``"default"``;
- metadata: at most 64 entries, keys 1-128 characters, values at most 1024 characters;
- batches: at most ``server.max_batch`` items (INVALID_ARGUMENT), distinct subject ids in EnrollBatch;
- images: undecodable, no face, or (policy ``all``) several faces: INVALID_ARGUMENT with the reason;
- unknown subjects or templates: NOT_FOUND; an unknown tenant has no subjects (empty lists, NOT_FOUND);
- deadlines: DEADLINE_EXCEEDED before embedding, protecting or writing when the client's deadline has passed, so a
  request that timed out on the client is not stored after the fact.

Protection: with ``protection.enabled``, every enrolled embedding is replaced by its protected version
(``protection.method``: ``advface``, or identity-aware ``advface-id`` with the ``protection.shadows`` ensemble; one
:class:`~advface.protect.TemplateProtector` built by :func:`build_protector`) before it reaches the store; raw
embeddings live only in memory for the duration of the call. Probes (Verify, Identify) are used raw and never
stored: matching compares protected templates with raw probes. Info reports the method; its threshold is calibrated
for plain AdvFace only (advface-id: source ``uncalibrated`` unless ``matching.threshold`` is set).

Keyed transform (``keyed_transform.enabled``, :mod:`advface.protect.tenant_transform`): after AdvFace, every
template is mapped through its tenant's secret orthogonal transform (with norm equalisation, by default) before it
is stored, and every Verify/Identify probe through the same tenant's transform before matching, so the store holds
only ``T_tenant(AdvFace(z))``; templates of one person in two tenants (or two key versions) are unlinkable. The
stateless ``Protect`` RPC then returns ``T_tenant(AdvFace(z))`` for the request's tenant (checked like any tenant):
a caller who may call Protect with faces it knows can estimate that tenant's matrix (the insider of
docs/threat-model.md), so grant Protect to trusted clients only. With norm equalisation the threshold reported by
Info is the one measured for it (``benchmarks/keyed_threshold.py``). Deletion is unaffected.

Image protection (``ProtectImage``, :mod:`server.image_protection`): a photo in, the protected PNG and a report out,
stateless; the encoder ensemble is loaded on the first call (never when ``image_protection.enabled`` is false) and
calls run one at a time in the worker pool.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
from google.protobuf.timestamp_pb2 import Timestamp

from advface import __version__
from advface.api.v1 import SERVICE_NAME
from advface.api.v1 import advface_pb2 as pb
from advface.api.v1 import advface_pb2_grpc as pb_grpc
from advface.config import section_value
from advface.encoders import FaceEncoder, create_encoder, validate_embeddings
from advface.errors import (
    AdvfaceError,
    AlreadyExistsError,
    ConfigError,
    DatabaseUnavailableError,
    EmbeddingError,
    ImageError,
    NotFoundError,
)
from advface.faces import FaceChipper, create_detector
from advface.hashing import file_sha256
from advface.images import load_image
from advface.protect import TemplateProtector, load_protector, spec_from_config
from advface.protect.tenant_transform import (
    check_db_store_marker,
    check_store_marker,
    keyed_threshold,
    transforms_from_config,
)
from advface.store import base as store_base
from server.image_protection import ImageProtection, ImageProtectionFailure
from server.interceptors import Authenticator, AuthError, Principal
from server.logs import LOGGER_NAME, log

T = TypeVar("T")

# Decision thresholds for AdvFace-protected templates matched against raw probes, per encoder, on the score scale
# (higher = more similar; dlib scores are minus the Euclidean distance).
# Value: budget_sweep[rel_l2=0.1].utility.protected.threshold_at_far_1e-3 of benchmarks/results/advface_lfw_steps3.json
# (LFW View-2, 3,000 impostor pairs, protected template of photo a vs raw probe of photo b, default protection:
# shipped shadow, rel_l2 0.1, 3 steps), rounded to 4 decimals; recompute with benchmarks/advface_lfw.py --budgets 0.1.
CALIBRATED_THRESHOLDS: dict[str, float] = {
    "dlib": -0.5710,
    "dlib-torch": -0.5710,
}
#: How each value of CALIBRATED_THRESHOLDS was obtained: (Info.threshold.source, Info.threshold.description).
#: Update together with CALIBRATED_THRESHOLDS.
THRESHOLD_PROVENANCE: dict[str, tuple[str, str]] = {
    name: (
        "calibrated",
        (
            "FAR 0.1% on LFW View-2 impostor pairs, AdvFace-protected template (shipped shadow, rel_l2 0.1, 3 steps) "
            "vs raw probe: Euclidean distance 0.5710 (benchmarks/results/advface_lfw_steps3.json, 2026-11-23); "
            "at this threshold TAR was 91.9%"
        ),
    )
    for name in ("dlib", "dlib-torch")
}

DEFAULT_TENANT = "default"
MAX_ID_CHARS = store_base.MAX_ID_CHARS
DEFAULT_PAGE_SIZE = 100
#: Most templates protected per worker job (the deadline is checked between a request's chunks; concurrent
#: requests are coalesced into jobs of up to this many rows).
PROTECT_CHUNK = 32
MAX_PAGE_SIZE = store_base.MAX_PAGE_SIZE

_logger = logging.getLogger(LOGGER_NAME)
_access = logging.getLogger(LOGGER_NAME + ".access")


class RpcFailure(Exception):
    """Ends an RPC with ``code`` and ``details`` (no request data in ``details`` beyond what the client sent)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _invalid(details: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, details)


def _section(config: Any, name: str) -> Any:
    return getattr(config, name, None)


# --------------------------------------------------------------------------------------------------- validation


def check_id(value: str, what: str) -> str:
    """``value`` if it is a usable id (the store's rules: 1-128 printable characters, no leading or trailing
    whitespace); RpcFailure(INVALID_ARGUMENT) otherwise."""
    try:
        return store_base.check_id(value, what)
    except ConfigError as exc:
        raise _invalid(str(exc)) from None


def check_tenant(value: str) -> str:
    """The request's tenant (empty -> ``"default"``), validated like an id."""
    return check_id(value or DEFAULT_TENANT, "tenant")


def check_metadata(metadata: Mapping[str, str], what: str = "metadata") -> dict[str, str]:
    """A plain dict copy of a metadata map within the store's limits (32 keys of 1-64 printable characters,
    values of at most 1024 characters); RpcFailure(INVALID_ARGUMENT) otherwise."""
    try:
        return store_base.check_metadata(dict(metadata), what)
    except ConfigError as exc:
        raise _invalid(str(exc)) from None


def embedding_array(messages: Sequence[pb.Embedding], dim: int, what: str = "embedding") -> np.ndarray:
    """``N x dim`` float32 from Embedding messages; RpcFailure for a wrong dimension, NaN/Inf or zero rows."""
    if not messages:
        return np.zeros((0, dim), np.float32)
    for i, msg in enumerate(messages):
        if len(msg.values) != dim:
            where = f"{what} {i}" if len(messages) > 1 else what
            raise _invalid(f"{where} has dimension {len(msg.values)}, expected {dim}")
    x = np.array([msg.values for msg in messages], dtype=np.float32).reshape(len(messages), dim)
    if not np.isfinite(x).all():
        rows = np.flatnonzero(~np.isfinite(x).all(axis=1))[:10].tolist()
        raise _invalid(f"{what} rows {rows} contain NaN or Inf" if len(messages) > 1 else f"{what} contains NaN or Inf")
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    if (norms == 0).any():
        rows = np.flatnonzero(norms == 0)[:10].tolist()
        raise _invalid(f"{what} rows {rows} are zero vectors" if len(messages) > 1 else f"{what} is a zero vector")
    if (norms > store_base.MAX_VECTOR_NORM).any():
        rows = np.flatnonzero(norms > store_base.MAX_VECTOR_NORM)[:10].tolist()
        raise _invalid(f"{what} rows {rows} have a norm above {store_base.MAX_VECTOR_NORM:g}")
    try:
        return validate_embeddings(x, dim)
    except EmbeddingError as exc:  # pragma: no cover - the checks above are stricter
        raise _invalid(f"{what}: {exc}") from None


def _timestamp(value: Any) -> Timestamp | None:
    ts = Timestamp()
    if value is None:
        return None
    if isinstance(value, datetime):
        ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    elif isinstance(value, (int, float)):
        ts.FromNanoseconds(round(float(value) * 1e9))
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        ts.FromDatetime(parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC))
    else:
        return None
    return ts


def _subject_message(info: Any) -> pb.Subject:
    msg = pb.Subject(
        subject_id=str(info.subject_id),
        metadata={str(k): str(v) for k, v in (info.metadata or {}).items()},
        template_ids=[str(t) for t in info.template_ids],
    )
    ts = _timestamp(getattr(info, "created_at", None))
    if ts is not None:
        msg.created_at.CopyFrom(ts)
    return msg


# --------------------------------------------------------------------------------------------------- the servicer


class _Call:
    """What a request log line says about one call (never request data)."""

    __slots__ = ("items", "tenant")

    def __init__(self) -> None:
        self.tenant: str | None = None
        self.items: int | None = None


def _rpc(name: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Wrap an RPC body ``fn(self, request, context, call)``: status mapping, access log, aborts."""

    def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def handler(self: AdvFaceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await self._handle(name, fn, request, context)

        return handler

    return wrap


def _uncalibrated_note(fallback: str) -> str:
    return ("protection.method advface-id has no calibrated threshold (plain AdvFace's calibration does not apply); "
            "using the one for unprotected templates -- measure one for your shadows and budget "
            f"(benchmarks/identity_aware.py) and set matching.threshold. Fallback: {fallback}")


def resolve_threshold(
    matching_threshold: float | None, encoder: FaceEncoder, protected: bool, method: str = "advface"
) -> tuple[float, str, str]:
    """The decision threshold and its provenance: ``(value, source, description)``.

    ``matching.threshold`` from the config wins; then, for templates protected with plain AdvFace (``method``),
    :data:`CALIBRATED_THRESHOLDS`; then the encoder's published threshold for raw embeddings (for ``advface-id``
    with source ``uncalibrated``: no threshold was calibrated for it). ConfigError when none is known.
    """
    if matching_threshold is not None:
        value = float(matching_threshold)
        if not math.isfinite(value):
            raise ConfigError(f"matching.threshold must be a finite number, got {matching_threshold!r}")
        return value, "config", "matching.threshold from the server configuration"
    if protected and method == "advface" and encoder.name in CALIBRATED_THRESHOLDS:
        source, note = THRESHOLD_PROVENANCE.get(
            encoder.name, ("calibrated", "calibrated on protected LFW templates (benchmarks/results/advface_lfw.json)")
        )
        return float(CALIBRATED_THRESHOLDS[encoder.name]), source, note
    if encoder.default_threshold is not None:
        note = f"the published threshold of encoder {encoder.name} for raw embeddings"
        if protected and method != "advface":
            return float(encoder.default_threshold), "uncalibrated", _uncalibrated_note(note)
        return float(encoder.default_threshold), "encoder-default", note
    raise ConfigError(f"no decision threshold is known for encoder {encoder.name}: set matching.threshold")


def open_store(config: Any, dim: int, metric: str) -> Any:
    """The template store the config's ``store`` section names: ``sqlite`` (SQLite + faiss) or ``postgresql``
    (PostgreSQL + pgvector at ``store.dsn``); encrypted at rest when the ``encryption`` section names a key."""
    section = _section(config, "store")
    backend = str(section_value(section, "backend", "sqlite"))
    if backend == "postgresql":
        from advface.crypto import cipher_from_config
        from advface.store.postgres import PostgresStore

        dsn = section_value(section, "dsn", None)
        if not dsn:
            raise ConfigError("store.backend is postgresql but store.dsn is not set (or ADVFACE_STORE_DSN)")
        return PostgresStore(str(dsn), dim, metric, cipher=cipher_from_config(_section(config, "encryption")))
    if backend != "sqlite":
        raise ConfigError(f"store backend {backend!r} is not supported by this server (use 'sqlite' or 'postgresql')")
    from advface.store.sqlite_faiss import IndexOptions, SQLiteFaissStore

    data_dir = section_value(section, "data_dir", None)
    if not data_dir:
        raise ConfigError("store.data_dir is not set")
    path = getattr(section, "database_path", None) or Path(data_dir).expanduser() / "templates.sqlite3"
    index = IndexOptions(
        kind=str(section_value(section, "index", "ivf")),
        min_rows=int(section_value(section, "ivf_min_rows", 100_000)),
        nlist=int(section_value(section, "ivf_nlist", 0)),
        nprobe=int(section_value(section, "ivf_nprobe", 128)),
    )
    from advface.crypto import cipher_from_config

    cipher = cipher_from_config(_section(config, "encryption"))  # None: templates at rest are not encrypted
    return SQLiteFaissStore(path, dim, metric, use_gpu=section_value(section, "use_gpu", "auto"), index=index, cipher=cipher)


def build_protector(config: Any, encoder: FaceEncoder) -> TemplateProtector | None:
    """The protector of the config's ``protection`` section (None when disabled), for either method
    (:func:`advface.protect.load_protector`); ConfigError at start for a bad shadow or, with advface-id, an
    encoder without a differentiable torch module."""
    spec = spec_from_config(_section(config, "protection"), encoder.name)
    return None if spec is None else load_protector(spec, encoder=encoder)


class ProtectionBatcher:
    """Runs AdvFace protection for concurrent requests, coalescing them into shared shadow calls.

    AdvFace always runs the shadow on ``lanes`` rows (padding short calls), so one template costs as much as
    ``lanes`` of them, and each template's result depends only on that template and the parameters. Requests that
    arrive while ``slots`` protections are already running are therefore queued and protected together (up to
    ``max_rows`` rows per call): same results, up to ``lanes`` times the throughput under load. A call takes its
    share of the queue -- the queued rows divided among all ``slots``, rounded up to whole ``lanes`` -- so that
    work spreads over the slots (8 queued rows, 2 slots, lanes 4: two calls of 4, not one of 8 beside an idle or
    soon-free slot); a request is never split. Under load (another call running), a free slot waits up to
    ``linger_s`` for a part-filled lane to fill before it starts: clients answered by one call send their next
    requests a few milliseconds apart, and without the wait each would start its own padded call. Runs on the
    event loop; the protection itself runs in ``executor``.
    """

    def __init__(
        self, protect: Callable[[np.ndarray], np.ndarray], executor: ThreadPoolExecutor, slots: int, max_rows: int,
        lanes: int = 1, linger_s: float = 0.015,
    ) -> None:
        self._protect = protect
        self._executor = executor
        self._slots = max(1, int(slots))
        self._max_rows = max(1, int(max_rows))
        self._lanes = max(1, int(lanes))
        self._linger_s = max(0.0, float(linger_s))
        self._linger: asyncio.TimerHandle | None = None
        self._queue: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: calls made to the protector and rows protected (for tests and metrics)
        self.calls = 0
        self.rows = 0
        #: called with (rows, seconds) after each protection call (metrics)
        self.on_batch: Callable[[int, float], None] | None = None

    @property
    def slots(self) -> int:
        """Protection calls that may run at once."""
        return self._slots

    @property
    def queued(self) -> int:
        """Requests waiting for a protection slot."""
        return len(self._queue)

    async def protect(self, x: np.ndarray) -> np.ndarray:
        """The protected version of ``x`` (``N x D``)."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append((x, future))
        self._start()
        return await future

    def _call_rows(self, queued: int) -> int:
        """Rows the next call takes: its share of ``queued`` rows over all slots, rounded up to whole lanes."""
        share = -(-queued // self._slots)  # ceil
        return max(self._lanes, min(self._max_rows, -(-share // self._lanes) * self._lanes))

    def _linger_over(self) -> None:
        self._linger = None
        self._start(linger=False)

    def _start(self, *, linger: bool = True) -> None:
        while self._queue and self._running < self._slots:
            queued = sum(len(x) for x, _ in self._queue)
            if self._linger is not None:
                if queued < self._lanes:
                    return  # still filling; _linger_over starts the call
                self._linger.cancel()
                self._linger = None
            elif linger and self._linger_s > 0 and self._running > 0 and queued < self._lanes:
                self._linger = asyncio.get_running_loop().call_later(self._linger_s, self._linger_over)
                return
            limit = self._call_rows(queued)
            batch = [self._queue.pop(0)]
            rows = len(batch[0][0])
            while self._queue and rows + len(self._queue[0][0]) <= limit:
                rows += len(self._queue[0][0])
                batch.append(self._queue.pop(0))
            batch = [(x, f) for x, f in batch if not f.cancelled()]
            if not batch:
                continue
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)  # asyncio keeps only weak references to tasks
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]) -> None:
        try:
            x = np.concatenate([b[0] for b in batch]) if len(batch) > 1 else batch[0][0]
            self.calls += 1
            self.rows += len(x)
            started = time.perf_counter()
            out = await asyncio.get_running_loop().run_in_executor(self._executor, self._protect, x)
            if self.on_batch is not None:
                self.on_batch(len(x), time.perf_counter() - started)
        except BaseException as exc:  # handed to every waiting request
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("protection cancelled"))
            if not isinstance(exc, Exception):
                raise
        else:
            start = 0
            for xi, future in batch:
                if not future.done():
                    future.set_result(out[start : start + len(xi)])
                start += len(xi)
        finally:
            self._running -= 1
            self._start()


class AdvFaceServicer(pb_grpc.AdvFaceServicer):
    """Implements ``advface.v1.AdvFace`` on grpc.aio. See the module docs for validation and protection.

    ``encoder``, ``store`` and ``protector`` may be given (tests, benchmarks); otherwise they are built from
    ``config``. A given protector is used only when ``protection.enabled``. The servicer owns the store and closes
    it in :meth:`close`.
    """

    def __init__(
        self,
        config: Any,
        *,
        encoder: FaceEncoder | None = None,
        store: Any = None,
        protector: TemplateProtector | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.config = config
        server_cfg = _section(config, "server")
        enc_cfg = _section(config, "encoder")
        prot_cfg = _section(config, "protection")
        match_cfg = _section(config, "matching")
        self.max_batch = int(section_value(server_cfg, "max_batch", 1000))
        self.top_k_max = int(section_value(match_cfg, "top_k_max", 100))
        self.max_receive_bytes = int(float(section_value(server_cfg, "max_receive_mb", 4)) * 1024 * 1024)
        self.max_send_bytes = int(float(section_value(server_cfg, "max_send_mb", 4)) * 1024 * 1024)
        workers = int(section_value(server_cfg, "workers", 4))
        if workers < 1:
            raise ConfigError(f"server.workers must be >= 1, got {workers}")

        self.encoder = encoder if encoder is not None else create_encoder(section_value(enc_cfg, "name", "dlib"))
        self.dim = int(self.encoder.dim)
        self.metric = str(self.encoder.metric)
        self.detector_name = str(section_value(enc_cfg, "detector", "dlib"))
        self.face_policy = str(section_value(enc_cfg, "face_policy", "largest"))
        self.chipper = FaceChipper(create_detector(self.detector_name), self.encoder.chip, self.face_policy)

        self.protection_enabled = bool(section_value(prot_cfg, "enabled", True))
        if self.protection_enabled:
            if protector is None:
                protector = build_protector(config, self.encoder)
            assert protector is not None
            if protector.dim != self.dim:
                raise ConfigError(f"protector takes dimension {protector.dim}, encoder gives {self.dim}")
        self.protector = protector if self.protection_enabled else None
        #: "advface", "advface-id", or "none" (protection off)
        self.protection_method = str(getattr(self.protector, "method", "advface")) if self.protector else "none"
        # keyed per-tenant transform (None: off); a missing or bad secret is a ConfigError here, at start
        self.transforms = transforms_from_config(_section(config, "keyed_transform"), self.dim, self.encoder.name)

        self.threshold, self.threshold_source, self.threshold_note = resolve_threshold(
            section_value(match_cfg, "threshold", None), self.encoder, self.protection_enabled, self.protection_method
        )
        if section_value(match_cfg, "threshold", None) is None and self.transforms is not None:
            # measured for plain AdvFace (or none): advface-id gets the unprotected one, flagged as such
            calibrated_for = self.protection_method == "advface"
            keyed = keyed_threshold(self.transforms, self.encoder.name, calibrated_for)
            if keyed is not None:  # norm equalisation changes scores: its own calibrated threshold
                self.threshold, self.threshold_source, self.threshold_note = keyed
                if self.protection_method == "advface-id":
                    self.threshold_source, self.threshold_note = "uncalibrated", _uncalibrated_note(keyed[2])
        auth_cfg = _section(config, "auth")
        self.auth = authenticator if authenticator is not None else Authenticator.from_config(auth_cfg)
        self.store = store if store is not None else open_store(config, self.dim, self.metric)  # last: it locks
        store_cfg = _section(config, "store")
        if store is None:
            try:  # the templates must have been issued under this transform configuration (or none)
                if str(section_value(store_cfg, "backend", "sqlite")) == "sqlite":
                    check_store_marker(section_value(store_cfg, "data_dir", ""), self.transforms, int(self.store.count()))
                else:  # PostgreSQL: the marker is kept in the database, shared by every replica
                    check_db_store_marker(self.store, self.transforms, int(self.store.count()))
            except BaseException:
                self.store.close()
                raise

        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="advface-worker")
        # Store calls get their own threads (the store is thread-safe), so searches never queue behind protection.
        self._store_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="advface-store")
        self._face_lock = threading.Lock()  # dlib's detector and encoder are not thread-safe
        # at most one protection per core at a time: later requests queue and share shadow calls
        cores = os.cpu_count() or 1
        slots = int(section_value(prot_cfg, "slots", 0)) or min(workers, cores)
        self.protection_threads = 0
        if self.protector is not None:
            # concurrent protection calls each start their own OpenMP team: keep slots x threads <= cores
            auto_threads = max(1, min(torch.get_num_threads(), cores // slots))
            self.protection_threads = int(section_value(prot_cfg, "threads", 0)) or auto_threads
            torch.set_num_threads(self.protection_threads)
        self._batcher = ProtectionBatcher(self._protect_sync, self._pool, slots=slots, max_rows=PROTECT_CHUNK,
                                          lanes=self.protector.config.lanes if self.protector else 1)
        self._protection_info = self._make_protection_info()
        # ProtectImage: options and the lazily loaded encoder ensemble (server/image_protection.py)
        self.image_protection = ImageProtection.from_config(
            _section(config, "image_protection"), self.detector_name, self.face_policy
        )
        #: server.metrics.SidecarMetrics, set by the Sidecar when metrics are enabled
        self.metrics: Any = None
        self._closed = False

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Stop the worker threads and close the store (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._store_pool.submit(self.store.close).result()
        self._store_pool.shutdown(wait=True)

    async def _work(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def _stored(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._store_pool, functools.partial(fn, *args, **kwargs)
        )

    @staticmethod
    def _check_deadline(context: grpc.aio.ServicerContext, before: str) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded before {before}")

    def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        return self.auth.principal(context)

    def _tenant(self, request: Any, context: grpc.aio.ServicerContext, call: _Call) -> str:
        tenant = check_tenant(request.tenant)
        call.tenant = tenant
        self._principal(context).check_tenant(tenant)
        return tenant

    async def _handle(
        self, name: str, fn: Callable[..., Awaitable[Any]], request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        start = time.perf_counter()
        call = _Call()
        if self.metrics is not None:
            self.metrics.rpc_started(name)
        code, details, response = grpc.StatusCode.OK, "", None
        try:
            response = await fn(self, request, context, call)
        except (RpcFailure, AuthError) as exc:
            code, details = exc.code, exc.details
        except ImageError as exc:
            code, details = grpc.StatusCode.INVALID_ARGUMENT, f"image: {exc.reason}"
        except EmbeddingError as exc:
            code, details = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except NotFoundError as exc:
            code, details = grpc.StatusCode.NOT_FOUND, str(exc)
        except AlreadyExistsError as exc:
            code, details = grpc.StatusCode.ALREADY_EXISTS, str(exc)
        except ConfigError as exc:  # from the store: invalid ids, metadata, k, page size or token
            code, details = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except DatabaseUnavailableError:  # the PostgreSQL store lost its server: clients may retry
            code, details = grpc.StatusCode.UNAVAILABLE, "template database unavailable, retry later"
        except AdvfaceError as exc:
            code, details = grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"
        except asyncio.CancelledError:
            self._log(name, call, grpc.StatusCode.CANCELLED, start)
            raise
        except Exception as exc:
            _logger.exception("internal error", extra={"fields": {"rpc": name, "exc": type(exc).__name__}})
            code, details = grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"
        self._log(name, call, code, start)
        if code is not grpc.StatusCode.OK:
            await context.abort(code, details)
        return response

    def _log(self, name: str, call: _Call, code: grpc.StatusCode, start: float) -> None:
        """The access log line and the metrics of a finished call (called once per call)."""
        seconds = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.rpc_finished(name, code.name, seconds)
        fields: dict[str, Any] = {"rpc": name, "code": code.name, "latency_ms": round(1000 * seconds, 2)}
        if call.tenant is not None:
            fields["tenant"] = call.tenant
        if call.items is not None:
            fields["items"] = call.items
        log(_access, logging.INFO, "rpc", **fields)

    # ------------------------------------------------------------------ faces and protection (worker threads)

    def _embed_image_sync(self, data: bytes) -> np.ndarray:
        image = load_image(data)
        with self._face_lock:
            chips = self.chipper.chips(image, "image")
            if len(chips) != 1:
                raise ImageError("image", f"{len(chips)} faces found, expected one")
            vector = self.encoder.embed(chips[0][1])
        return validate_embeddings(vector, self.dim)

    def _protect_sync(self, x: np.ndarray) -> np.ndarray:
        assert self.protector is not None
        out = np.ascontiguousarray(self.protector.protect(x), dtype=np.float32)
        if out.shape != x.shape or not np.isfinite(out).all():
            raise RuntimeError("protection produced an unusable result")
        return out

    def _check_face(self, face: pb.Face, what: str) -> str:
        """Validate a Face's cheap parts; returns which input it holds."""
        kind = face.WhichOneof("input")
        if kind is None:
            raise _invalid(f"{what}: give an embedding or an image")
        if kind == "image" and not face.image:
            raise _invalid(f"{what}: the image is empty")
        if kind == "embedding":
            embedding_array([face.embedding], self.dim, f"{what} embedding")
        return kind

    async def _raw_vectors(self, faces: Sequence[pb.Face], context: grpc.aio.ServicerContext, what: str) -> np.ndarray:
        """Raw ``N x D`` embeddings of validated faces (images embedded in the worker pool)."""
        out = np.zeros((len(faces), self.dim), np.float32)
        image_rows = []
        for i, face in enumerate(faces):
            if face.WhichOneof("input") == "embedding":
                out[i] = embedding_array([face.embedding], self.dim, what)[0]
            else:
                image_rows.append(i)
        if image_rows:
            self._check_deadline(context, "embedding images")

            async def one(i: int) -> None:
                try:
                    out[i] = await self._work(self._embed_image_sync, faces[i].image)
                except ImageError as exc:
                    where = f"{what} {i}" if len(faces) > 1 else what
                    raise _invalid(f"{where}: {exc.reason}") from None

            await asyncio.gather(*(one(i) for i in image_rows))
        return out

    async def _templates(self, raw: np.ndarray, context: grpc.aio.ServicerContext) -> np.ndarray:
        """What gets stored for raw embeddings: protected ones when protection is on.

        Protected in chunks of :data:`PROTECT_CHUNK` rows (each row's result does not depend on the others), one
        wave of as many chunks as the batcher has slots at a time (a large batch uses every core), with the deadline
        checked before each wave, so a call the client gave up on stops early; chunks of concurrent calls share
        shadow calls (:class:`ProtectionBatcher`)."""
        if self.protector is None or len(raw) == 0:
            return raw
        out = np.empty_like(raw)

        async def chunk(start: int) -> None:
            stop = min(start + PROTECT_CHUNK, len(raw))
            out[start:stop] = await self._batcher.protect(raw[start:stop])

        starts = list(range(0, len(raw), PROTECT_CHUNK))
        for wave in range(0, len(starts), self._batcher.slots):
            self._check_deadline(context, "protecting")
            await asyncio.gather(*(chunk(start) for start in starts[wave : wave + self._batcher.slots]))
        return out

    # ------------------------------------------------------------------ RPCs

    @_rpc("Protect")
    async def Protect(self, request: pb.ProtectRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        self._principal(context)
        call.items = len(request.embeddings)
        if self.protector is None:
            raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, "protection is disabled on this server")
        if len(request.embeddings) > self.max_batch:
            raise _invalid(f"batch of {len(request.embeddings)} embeddings is over the limit of {self.max_batch}")
        # the tenant matters (and is checked) only when templates go through its keyed transform
        tenant = self._tenant(request, context, call) if self.transforms is not None else None
        raw = embedding_array(request.embeddings, self.dim)
        protected = await self._templates(raw, context)
        if tenant is not None:
            protected = self._keyed(tenant, protected)
        return pb.ProtectResponse(
            embeddings=[pb.Embedding(values=row.tolist()) for row in protected],
            protection=self._protection_info_for(tenant),
        )

    @_rpc("ProtectImage")
    async def ProtectImage(
        self, request: pb.ProtectImageRequest, context: grpc.aio.ServicerContext, call: _Call
    ) -> Any:
        """Photo -> protected PNG + report (server/image_protection.py); stateless, nothing stored or logged."""
        self._principal(context)
        call.items = 1
        service = self.image_protection
        try:
            if not service.enabled:
                raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, "image protection is disabled on this server")
            options = service.options(request)
            self._check_deadline(context, "protecting the image")
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            result = await self._work(service.protect, bytes(request.image), options, deadline)
        except ImageProtectionFailure as exc:
            raise RpcFailure(exc.code, exc.details) from None
        if len(result.png) + 64 * 1024 > self.max_send_bytes:
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the protected PNG ({len(result.png)} bytes) is over the server's response limit "
                f"({self.max_send_bytes} bytes, server.max_send_mb); send a smaller photo",
            )
        return pb.ProtectImageResponse(image=result.png, report=result.report)

    @_rpc("Enroll")
    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        tenant = self._tenant(request, context, call)
        subject_id = check_id(request.subject_id, "subject_id")
        metadata = check_metadata(request.metadata)
        self._check_face(request.face, "face")
        call.items = 1
        raw = await self._raw_vectors([request.face], context, "face")
        templates = self._keyed(tenant, await self._templates(raw, context))
        del raw
        self._check_deadline(context, "storing")
        ids = await self._stored(self.store.add, tenant, subject_id, templates, metadata, replace=bool(request.replace))
        return pb.EnrollResponse(subject_id=subject_id, template_ids=list(ids), protected=self.protector is not None)

    @_rpc("EnrollBatch")
    async def EnrollBatch(self, request: pb.EnrollBatchRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        tenant = self._tenant(request, context, call)
        items = request.items
        call.items = len(items)
        if len(items) > self.max_batch:
            raise _invalid(f"batch of {len(items)} items is over the limit of {self.max_batch}")
        seen: set[str] = set()
        metadata = []
        for i, item in enumerate(items):
            subject_id = check_id(item.subject_id, f"items[{i}].subject_id")
            if subject_id in seen:
                raise _invalid(f"items[{i}].subject_id repeats an earlier item's")
            seen.add(subject_id)
            metadata.append(check_metadata(item.metadata, f"items[{i}].metadata"))
            self._check_face(item.face, f"items[{i}].face")
        if not items:
            return pb.EnrollBatchResponse()
        raw = await self._raw_vectors([item.face for item in items], context, "items face")
        templates = self._keyed(tenant, await self._templates(raw, context))
        del raw
        self._check_deadline(context, "storing")
        entries = [(item.subject_id, templates[i : i + 1], metadata[i]) for i, item in enumerate(items)]
        ids = await self._stored(self.store.add_many, tenant, entries)
        protected = self.protector is not None
        return pb.EnrollBatchResponse(
            results=[
                pb.EnrollResponse(subject_id=item.subject_id, template_ids=list(t), protected=protected)
                for item, t in zip(items, ids)
            ]
        )

    @_rpc("Verify")
    async def Verify(self, request: pb.VerifyRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        tenant = self._tenant(request, context, call)
        subject_id = check_id(request.subject_id, "subject_id")
        self._check_face(request.probe, "probe")
        # NOT_FOUND before the (costly) probe embedding
        vectors, template_ids = await self._stored(self._subject_templates, tenant, subject_id)
        probe = self._keyed(tenant, await self._raw_vectors([request.probe], context, "probe"))[0]
        if len(vectors) == 0:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND, "the subject has no templates")
        scores = self.encoder.score(np.repeat(probe[None], len(vectors), axis=0), vectors)
        best = int(np.argmax(scores))
        score = float(scores[best])
        return pb.VerifyResponse(
            match=score >= self.threshold, score=score, threshold=self.threshold, template_id=template_ids[best]
        )

    def _subject_templates(self, tenant: str, subject_id: str) -> tuple[np.ndarray, list[str]]:
        ids = [str(t) for t in self.store.get_subject(tenant, subject_id).template_ids]
        vectors = np.asarray(self.store.subject_vectors(tenant, subject_id), dtype=np.float32).reshape(-1, self.dim)
        if len(ids) != len(vectors):  # pragma: no cover - a store bug
            raise RuntimeError("store returned vectors and template ids of different lengths")
        return vectors, ids

    @_rpc("Identify")
    async def Identify(self, request: pb.IdentifyRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        tenant = self._tenant(request, context, call)
        top_k = int(request.top_k) or 1
        if top_k > self.top_k_max:
            raise _invalid(f"top_k {top_k} is over the limit of {self.top_k_max}")
        self._check_face(request.probe, "probe")
        probe = self._keyed(tenant, await self._raw_vectors([request.probe], context, "probe"))[0]
        matches = await self._stored(self.store.search, tenant, probe, top_k)
        call.items = len(matches)
        return pb.IdentifyResponse(
            matches=[
                pb.Match(subject_id=m.subject_id, template_id=m.template_id, score=m.score,
                         match=m.score >= self.threshold)
                for m in matches
            ],
            threshold=self.threshold,
        )

    @_rpc("Delete")
    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        tenant = self._tenant(request, context, call)
        target = request.WhichOneof("target")
        if target is None:
            raise _invalid("give a subject_id or a template_id")
        if target == "subject_id":
            subject_id = check_id(request.subject_id, "subject_id")
            self._check_deadline(context, "deleting")
            deleted = await self._stored(self.store.delete_subject, tenant, subject_id)
            call.items = int(deleted)
            return pb.DeleteResponse(deleted=int(deleted), subject_id=subject_id)
        template_id = check_id(request.template_id, "template_id")
        self._check_deadline(context, "deleting")
        subject_id = await self._stored(self.store.delete_template, tenant, template_id)
        call.items = 1
        return pb.DeleteResponse(deleted=1, subject_id=str(subject_id))

    @_rpc("GetSubject")
    async def GetSubject(self, request: pb.GetSubjectRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        tenant = self._tenant(request, context, call)
        subject_id = check_id(request.subject_id, "subject_id")
        info = await self._stored(self.store.get_subject, tenant, subject_id)
        return _subject_message(info)

    @_rpc("ListSubjects")
    async def ListSubjects(
        self, request: pb.ListSubjectsRequest, context: grpc.aio.ServicerContext, call: _Call
    ) -> Any:
        tenant = self._tenant(request, context, call)
        page_size = min(int(request.page_size) or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        try:
            store_base.decode_page_token(request.page_token)
        except ConfigError:
            raise _invalid("page_token is not one this server issued") from None
        subjects, token = await self._stored(self.store.list_subjects, tenant, page_size, request.page_token)
        call.items = len(subjects)
        return pb.ListSubjectsResponse(subjects=[_subject_message(s) for s in subjects], next_page_token=token or "")

    @_rpc("Info")
    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        principal = self._principal(context)
        tenant_templates = tenant_subjects = 0
        tenant: str | None = None
        if request.tenant or principal.may_use(DEFAULT_TENANT):
            tenant = self._tenant(request, context, call)  # PERMISSION_DENIED for a tenant named but not allowed
            tenant_templates = await self._stored(self.store.count, tenant)
            tenant_subjects = await self._stored(self.store.count, tenant, subjects=True)
        total_templates = total_subjects = 0
        if principal.is_admin:
            total_templates = await self._stored(self.store.count)
            total_subjects = await self._stored(self.store.count, None, subjects=True)
        return pb.InfoResponse(
            encoder=pb.EncoderInfo(
                name=self.encoder.name, dim=self.dim, metric=self.metric, fingerprint=self.encoder.fingerprint,
                detector=self.detector_name, face_policy=self.face_policy,
            ),
            protection=self._protection_info_for(tenant),
            threshold=pb.ThresholdInfo(
                value=self.threshold, source=self.threshold_source, description=self.threshold_note
            ),
            versions=pb.Versions(
                advface=__version__, api=SERVICE_NAME.rsplit(".", 1)[0], grpc=grpc.__version__,
                store_backend=type(self.store).__name__,
            ),
            counts=pb.Counts(
                tenant_templates=int(tenant_templates), total_templates=int(total_templates),
                tenant_subjects=int(tenant_subjects), total_subjects=int(total_subjects),
            ),
            limits=pb.Limits(
                max_batch=self.max_batch, top_k_max=self.top_k_max, max_receive_bytes=self.max_receive_bytes,
                max_send_bytes=self.max_send_bytes, max_id_chars=MAX_ID_CHARS,
            ),
        )

    def _keyed(self, tenant: str, vectors: np.ndarray) -> np.ndarray:
        """``vectors`` through ``tenant``'s keyed transform (unchanged when the transform is off)."""
        if self.transforms is None:
            return vectors
        return self.transforms.apply(tenant, vectors)

    def _protection_info_for(self, tenant: str | None) -> pb.ProtectionInfo:
        """The ProtectionInfo with ``tenant``'s public transform key id (when the transform is on)."""
        if self.transforms is None or tenant is None:
            return self._protection_info
        info = pb.ProtectionInfo()
        info.CopyFrom(self._protection_info)
        info.keyed_transform.key_id = self.transforms.key_id(tenant)
        return info

    def _make_protection_info(self) -> pb.ProtectionInfo:
        info = self._make_advface_info()
        if self.transforms is not None:
            info.keyed_transform.CopyFrom(pb.KeyedTransformInfo(
                enabled=True, version=self.transforms.version, norm=float(self.transforms.norm or 0.0)
            ))
        return info

    def _make_advface_info(self) -> pb.ProtectionInfo:
        if self.protector is None:
            return pb.ProtectionInfo(enabled=False, method="none")
        cfg = self.protector.config
        info = pb.ProtectionInfo(
            enabled=True, method=self.protection_method, rel_l2=float(cfg.rel_l2), steps=int(cfg.steps),
            seed=int(cfg.seed), lanes=int(cfg.lanes), linf=float(cfg.linf or 0.0),
        )
        paths = tuple(getattr(self.protector, "shadow_paths", ()) or ())
        if paths:  # advface-id: the ensemble, comma-separated, in configuration order
            info.shadow_model = ",".join(p.name for p in paths)
            info.shadow_sha256 = ",".join(file_sha256(p) for p in paths)
        else:
            info.shadow_model = str(getattr(self.protector, "metadata", {}).get("name", "custom"))
        return info
