"""The ``advface.v1.AdvFace`` servicer (grpc.aio): converts messages, checks the caller, calls the service.

Every RPC authorises the caller (bearer token -> tenants, :mod:`server.interceptors`), turns its request into the
service layer's values (:mod:`server.messages`), calls one method of :class:`advface.service.TemplateService` and
turns the result back into a response. The service validates the whole request before it changes anything (ids,
metadata, embeddings, batch sizes, photos: INVALID_ARGUMENT; unknown subjects: NOT_FOUND; a deadline passed before
embedding, protecting, storing or deleting: DEADLINE_EXCEEDED, so a request that timed out on the client is not
stored after the fact); :func:`server.status.status_of` maps its errors to status codes. Before any of that, each
call is admitted under its caller's request-rate and in-flight limits (:class:`server.interceptors.RequestLimiter`:
RESOURCE_EXHAUSTED over either). A call the client cancels, or whose deadline passes, is cancelled here too; the
service then abandons its photos between stages. An empty tenant means
``"default"``. Each call writes one access-log line (RPC, tenant, code, latency, item count; never request data)
and updates the Prometheus metrics when they are on.

``Protect`` is stateless (embeddings in, ``T_tenant(AdvFace(z))`` out for the request's tenant when the keyed
transform is on: a caller who may call Protect with faces it knows can estimate that tenant's matrix, so grant it
to trusted clients only). ``ProtectImage`` is stateless too: a photo in, the protected PNG and a report out; the
encoder ensemble is loaded on the first call (never when ``image_protection.enabled`` is false).

``RotateKeyPair``, ``EraseNow`` and ``MaintenanceStatus`` are admin-only (PERMISSION_DENIED for client tokens) and
call :class:`advface.service.maintenance.MaintenanceService`, which runs the job in the background.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from advface import __version__
from advface.api.v1 import SERVICE_NAME
from advface.api.v1 import advface_pb2 as pb
from advface.api.v1 import advface_pb2_grpc as pb_grpc
from advface.config import Config
from advface.encoders import FaceEncoder
from advface.errors import AdvfaceError, ValidationError
from advface.protect import TemplateProtector
from advface.service import DEFAULT_TENANT, EnrolItem, TemplateService, check_tenant
from advface.service.maintenance import MaintenanceJob, MaintenanceService
from advface.service.validation import MAX_REQUEST_NORM, MIN_REQUEST_NORM
from advface.store.base import (
    MAX_ID_CHARS,
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_CHARS,
    MAX_VECTOR_NORM,
    TemplateStore,
)
from server import messages
from server.interceptors import Authenticator, Principal, RequestLimiter
from server.logs import LOGGER_NAME, log
from server.status import RpcFailure, status_of

_logger = logging.getLogger(LOGGER_NAME)
_access = logging.getLogger(LOGGER_NAME + ".access")
#: Room left in a response for everything but the protected PNG.
_RESPONSE_OVERHEAD = 64 * 1024


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


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a ``time.monotonic()`` value (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class AdvFaceServicer(pb_grpc.AdvFaceServicer):
    """Implements ``advface.v1.AdvFace`` on grpc.aio over one :class:`TemplateService` (built from ``config``
    unless given; ``encoder``, ``store`` and ``protector`` are handed to it). The servicer owns the service and
    closes it in :meth:`close`."""

    def __init__(
        self,
        config: Config,
        *,
        service: TemplateService | None = None,
        encoder: FaceEncoder | None = None,
        store: TemplateStore | None = None,
        protector: TemplateProtector | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.config = config
        self.auth = authenticator if authenticator is not None else Authenticator.from_config(config.auth)
        #: per-caller request rate and in-flight limits (``auth.rate_per_second``, ``auth.max_in_flight``)
        self.limiter = RequestLimiter.from_config(config.auth)
        self.service = (
            service
            if service is not None
            else TemplateService(config, encoder=encoder, store=store, protector=protector)
        )
        self.max_receive_bytes = config.server.max_receive_mb * 1024 * 1024
        self.max_send_bytes = config.server.max_send_mb * 1024 * 1024
        #: maintenance jobs of an encrypted store (the admin RPCs)
        self.maintenance = MaintenanceService(self.service.store)
        #: server.metrics.SidecarMetrics, set by the Sidecar when metrics are enabled
        self.metrics: Any = None

    def close(self) -> None:
        """Stop a running maintenance job, then close the service: its worker threads and its store (idempotent)."""
        self.maintenance.close()
        self.service.close()

    # ------------------------------------------------------------------ plumbing

    def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        return self.auth.principal(context)

    def _admin(self, context: grpc.aio.ServicerContext) -> None:
        if not self._principal(context).is_admin:
            raise RpcFailure(grpc.StatusCode.PERMISSION_DENIED, "this RPC needs an admin token")

    async def _maintenance(self, fn: Callable[..., MaintenanceJob], *args: Any) -> pb.MaintenanceJob:
        """Run a maintenance request off the event loop (it may wait for the store's lock); its job as a message."""
        job = await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
        return messages.maintenance_job(job)

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
        caller: str | None = None
        try:
            key = self._principal(context).key_id
            self.limiter.admit(key)  # RESOURCE_EXHAUSTED over the caller's rate or in-flight limit, before any work
            caller = key
            response = await fn(self, request, context, call)
        except asyncio.CancelledError:
            self._log(name, call, grpc.StatusCode.CANCELLED, start)
            raise
        except Exception as exc:
            code, details = status_of(exc)
            if code is grpc.StatusCode.INTERNAL and not isinstance(exc, AdvfaceError):
                _logger.exception("internal error", extra={"fields": {"rpc": name, "exc": type(exc).__name__}})
        finally:
            if caller is not None:
                self.limiter.release(caller)
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

    # ------------------------------------------------------------------ RPCs

    @_rpc("Protect")
    async def Protect(self, request: pb.ProtectRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        self._principal(context)
        call.items = len(request.embeddings)
        # the tenant matters (and is checked) only when templates go through its keyed transform
        tenant = self._tenant(request, context, call) if self.service.transforms is not None else None
        protected = await self.service.protect(messages.embedding_rows(request.embeddings), tenant, _deadline(context))
        return pb.ProtectResponse(
            embeddings=messages.embeddings(protected),
            protection=messages.protection_info(self.service.protection(tenant)),
        )

    @_rpc("ProtectImage")
    async def ProtectImage(
        self, request: pb.ProtectImageRequest, context: grpc.aio.ServicerContext, call: _Call
    ) -> Any:
        """Photo -> protected PNG + report; stateless, nothing stored or logged."""
        self._principal(context)
        call.items = 1
        result = await self.service.protect_image(
            bytes(request.image),
            epsilon=request.epsilon if request.HasField("epsilon") else None,
            steps=int(request.steps) if request.HasField("steps") else None,
            seed=int(request.seed),
            target_similarity=request.target_similarity if request.HasField("target_similarity") else None,
            deadline=_deadline(context),
            guidance=list(request.guidance),
        )
        if len(result.png) + _RESPONSE_OVERHEAD > self.max_send_bytes:
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the protected PNG ({len(result.png)} bytes) is over the server's response limit "
                f"({self.max_send_bytes} bytes, server.max_send_mb); send a smaller photo",
            )
        return pb.ProtectImageResponse(image=result.png, report=messages.image_report(result))

    @_rpc("Enroll")
    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        tenant = self._tenant(request, context, call)
        call.items = 1
        ids = await self.service.enroll(
            tenant,
            request.subject_id,
            messages.face_input(request.face, "face"),
            dict(request.metadata),
            replace=bool(request.replace),
            deadline=_deadline(context),
        )
        return pb.EnrollResponse(
            subject_id=request.subject_id, template_ids=ids, protected=self.service.protector is not None
        )

    @_rpc("EnrollBatch")
    async def EnrollBatch(self, request: pb.EnrollBatchRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        tenant = self._tenant(request, context, call)
        call.items = len(request.items)
        items = [
            EnrolItem(item.subject_id, messages.face_input(item.face, f"items[{i}].face"), dict(item.metadata))
            for i, item in enumerate(request.items)
        ]
        ids = await self.service.enroll_batch(tenant, items, _deadline(context))
        protected = self.service.protector is not None
        return pb.EnrollBatchResponse(
            results=[
                pb.EnrollResponse(subject_id=item.subject_id, template_ids=t, protected=protected)
                for item, t in zip(items, ids)
            ]
        )

    @_rpc("Verify")
    async def Verify(self, request: pb.VerifyRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        tenant = self._tenant(request, context, call)
        result = await self.service.verify(
            tenant, request.subject_id, messages.face_input(request.probe, "probe"), _deadline(context)
        )
        return pb.VerifyResponse(
            match=result.match, score=result.score, threshold=result.threshold, template_id=result.template_id
        )

    @_rpc("Identify")
    async def Identify(self, request: pb.IdentifyRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        tenant = self._tenant(request, context, call)
        candidates = await self.service.identify(  # failed Identify calls are counted per caller (its token)
            tenant,
            messages.face_input(request.probe, "probe"),
            int(request.top_k),
            _deadline(context),
            caller=self._principal(context).key_id,
        )
        call.items = len(candidates)
        return pb.IdentifyResponse(
            matches=[
                pb.Match(subject_id=c.subject_id, template_id=c.template_id, score=c.score, match=c.match)
                for c in candidates
            ],
            threshold=self.service.threshold.value,
        )

    @_rpc("Delete")
    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        tenant = self._tenant(request, context, call)
        target = request.WhichOneof("target")
        if target is None:
            raise ValidationError("give a subject_id or a template_id")
        if target == "subject_id":
            deleted = await self.service.delete_subject(tenant, request.subject_id, _deadline(context))
            call.items = deleted
            return pb.DeleteResponse(deleted=deleted, subject_id=request.subject_id)
        subject_id = await self.service.delete_template(tenant, request.template_id, _deadline(context))
        call.items = 1
        return pb.DeleteResponse(deleted=1, subject_id=subject_id)

    @_rpc("GetSubject")
    async def GetSubject(self, request: pb.GetSubjectRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        tenant = self._tenant(request, context, call)
        return messages.subject(await self.service.get_subject(tenant, request.subject_id))

    @_rpc("ListSubjects")
    async def ListSubjects(
        self, request: pb.ListSubjectsRequest, context: grpc.aio.ServicerContext, call: _Call
    ) -> Any:
        tenant = self._tenant(request, context, call)
        subjects, token = await self.service.list_subjects(tenant, int(request.page_size), request.page_token)
        call.items = len(subjects)
        return pb.ListSubjectsResponse(subjects=[messages.subject(s) for s in subjects], next_page_token=token)

    @_rpc("Info")
    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        principal = self._principal(context)
        service = self.service
        tenant_templates = tenant_subjects = total_templates = total_subjects = 0
        tenant: str | None = None
        if request.tenant or principal.may_use(DEFAULT_TENANT):
            tenant = self._tenant(request, context, call)  # PERMISSION_DENIED for a tenant named but not allowed
            tenant_templates = await service.count(tenant)
            tenant_subjects = await service.count(tenant, subjects=True)
        if principal.is_admin:
            total_templates = await service.count()
            total_subjects = await service.count(None, subjects=True)
        encoder, threshold = service.encoder, service.threshold
        return pb.InfoResponse(
            encoder=pb.EncoderInfo(
                name=encoder.name,
                dim=service.dim,
                metric=service.metric,
                fingerprint=encoder.fingerprint,
                detector=service.detector_name,
                face_policy=service.face_policy,
            ),
            protection=messages.protection_info(service.protection(tenant)),
            threshold=pb.ThresholdInfo(
                value=threshold.value, source=threshold.source, description=threshold.description
            ),
            versions=pb.Versions(
                advface=__version__,
                api=SERVICE_NAME.rsplit(".", 1)[0],
                grpc=grpc.__version__,
                store_backend=type(service.store).__name__,
            ),
            counts=pb.Counts(
                tenant_templates=tenant_templates,
                total_templates=total_templates,
                tenant_subjects=tenant_subjects,
                total_subjects=total_subjects,
            ),
            limits=self._limits(),
        )

    @_rpc("RotateKeyPair")
    async def RotateKeyPair(
        self, request: pb.RotateKeyPairRequest, context: grpc.aio.ServicerContext, call: _Call
    ) -> Any:
        self._admin(context)
        return await self._maintenance(
            self.maintenance.rotate_key_pair, request.new_keys_dir, float(request.blocks_per_second)
        )

    @_rpc("EraseNow")
    async def EraseNow(self, request: pb.EraseNowRequest, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        self._admin(context)
        return await self._maintenance(self.maintenance.erase_now)

    @_rpc("MaintenanceStatus")
    async def MaintenanceStatus(
        self, request: pb.MaintenanceStatusRequest, context: grpc.aio.ServicerContext, call: _Call
    ) -> Any:
        self._admin(context)
        return await self._maintenance(self.maintenance.status)

    @_rpc("ResetAttempts")
    async def ResetAttempts(
        self, request: pb.ResetAttemptsRequest, context: grpc.aio.ServicerContext, call: _Call
    ) -> Any:
        self._admin(context)
        tenant = self._tenant(request, context, call)
        cleared = self.service.reset_attempts(tenant, request.subject_id or None, request.caller or None)
        return pb.ResetAttemptsResponse(cleared=cleared)

    def _limits(self) -> pb.Limits:
        """The request limits this server enforces (Info's ``limits``)."""
        service, config = self.service, self.config
        protect_pixels = (
            min(config.server.max_image_pixels, config.image_protection.max_pixels)
            if config.image_protection.enabled
            else 0
        )
        return pb.Limits(
            max_batch=service.max_batch,
            top_k_max=service.top_k_max,
            max_receive_bytes=self.max_receive_bytes,
            max_send_bytes=self.max_send_bytes,
            max_id_chars=MAX_ID_CHARS,
            max_image_pixels=service.max_image_pixels,
            max_protect_image_pixels=protect_pixels,
            max_metadata_keys=MAX_METADATA_KEYS,
            max_metadata_key_chars=MAX_METADATA_KEY_CHARS,
            max_metadata_value_chars=MAX_METADATA_VALUE_CHARS,
            min_embedding_norm=MIN_REQUEST_NORM,
            max_embedding_norm=min(MAX_REQUEST_NORM, MAX_VECTOR_NORM),
            rate_per_second=self.limiter.rate_per_second,
            max_in_flight=self.limiter.max_in_flight,
        )
