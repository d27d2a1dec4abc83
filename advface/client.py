"""Python client of the advface sidecar (``advface serve``): plain Python and numpy in, plain values out.

```python
from advface.client import AdvFaceClient

with AdvFaceClient("127.0.0.1:50051", token=None) as client:
    client.enroll("alice", image="alice.jpg", metadata={"badge": "1234"})
    result = client.verify("alice", image="alice_today.jpg")       # VerifyResult(match, score, threshold, ...)
    best = client.identify(image="someone.jpg", top_k=5)            # [IdentifyMatch(subject_id, score, ...), ...]
    client.delete(subject_id="alice")
```

Errors: every failed call raises :class:`AdvFaceRpcError`, a ``grpc.RpcError`` with the usual ``code()`` and
``details()`` methods (so ``except grpc.RpcError`` works too); ``str(error)`` is ``"NOT_FOUND: ..."``.

Needs ``grpcio`` (a dependency of advface); the rest of the library does not import it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any, Self

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor

from advface.api.v1 import advface_pb2 as pb
from advface.api.v1 import advface_pb2_grpc as pb_grpc

DEFAULT_TENANT = "default"
#: Largest response the client accepts (the server's own send limit is what normally binds).
MAX_RECEIVE_BYTES = 256 * 1024 * 1024

ImageInput = str | os.PathLike[str] | bytes
#: Default deadline of :meth:`AdvFaceClient.protect_image`, seconds (image protection takes seconds to minutes).
PROTECT_IMAGE_TIMEOUT = 300.0


class AdvFaceRpcError(grpc.RpcError):
    """A failed advface call: ``code()`` (a ``grpc.StatusCode``) and ``details()`` (the server's reason)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}"


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :meth:`AdvFaceClient.verify`."""

    match: bool
    score: float
    threshold: float
    template_id: str


@dataclass(frozen=True)
class IdentifyMatch:
    """One subject returned by :meth:`AdvFaceClient.identify` (its best template and score)."""

    subject_id: str
    template_id: str
    score: float
    match: bool


@dataclass(frozen=True)
class Subject:
    """A subject's metadata and template ids (the server never returns vectors)."""

    subject_id: str
    metadata: dict[str, str] = field(default_factory=dict)
    template_ids: list[str] = field(default_factory=list)
    created_at: datetime | None = None


@dataclass(frozen=True)
class TlsOptions:
    """TLS settings of a client: ``ca_file`` (PEM roots that sign the server's certificate; None: system roots),
    ``cert_file`` + ``key_file`` (client certificate for mTLS), ``server_name`` (override the name checked against
    the server certificate, e.g. when connecting by IP)."""

    ca_file: str | os.PathLike[str] | None = None
    cert_file: str | os.PathLike[str] | None = None
    key_file: str | os.PathLike[str] | None = None
    server_name: str | None = None


def _read(path: str | os.PathLike[str] | None) -> bytes | None:
    return None if path is None else Path(path).expanduser().read_bytes()


def _embedding(vector: Any) -> pb.Embedding:
    x = np.asarray(vector, dtype=np.float32)
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1:
        raise ValueError(f"expected one embedding vector, got shape {x.shape}")
    return pb.Embedding(values=x.tolist())


def _image_bytes(image: ImageInput) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return Path(image).expanduser().read_bytes()


def _face(embedding: Any = None, image: ImageInput | None = None) -> pb.Face:
    if (embedding is None) == (image is None):
        raise ValueError("give exactly one of embedding= or image=")
    if embedding is not None:
        return pb.Face(embedding=_embedding(embedding))
    return pb.Face(image=_image_bytes(image))  # type: ignore[arg-type]


def _subject(msg: pb.Subject) -> Subject:
    return Subject(
        subject_id=msg.subject_id,
        metadata=dict(msg.metadata),
        template_ids=list(msg.template_ids),
        created_at=_timestamp(msg, "created_at"),
    )


def _timestamp(msg: Any, name: str) -> datetime | None:
    return datetime.fromtimestamp(getattr(msg, name).ToNanoseconds() / 1e9, tz=UTC) if msg.HasField(name) else None


def _maintenance_job(msg: pb.MaintenanceJob) -> dict[str, Any]:
    """A ``MaintenanceJob`` as a dict (field names as in the proto; times as aware datetimes or None)."""
    out = _to_dict(msg)
    for name in ("started_at", "finished_at"):
        out[name] = _timestamp(msg, name)
    return out


def _f32(value: float) -> float:
    """A proto float (float32) as the shortest Python float that prints like it (-0.6, not -0.6000000238)."""
    return float(f"{value:.7g}")


def _to_dict(msg: Any) -> dict[str, Any]:
    """Every field of a message as plain Python values (floats rounded to float32 precision)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.type == FieldDescriptor.TYPE_MESSAGE and not f.message_type.GetOptions().map_entry:
            out[f.name] = [_to_dict(v) for v in value] if _is_repeated(f) else _to_dict(value)
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            out[f.name] = dict(value)
        elif f.type == FieldDescriptor.TYPE_FLOAT:
            out[f.name] = [_f32(v) for v in value] if _is_repeated(f) else _f32(value)
        else:
            out[f.name] = list(value) if _is_repeated(f) else value
    return out


def _is_repeated(f: FieldDescriptor) -> bool:
    is_repeated = getattr(f, "is_repeated", None)
    if is_repeated is not None:
        return bool(is_repeated)
    return f.label == FieldDescriptor.LABEL_REPEATED  # older protobuf


class AdvFaceClient:
    """Synchronous client of the ``advface.v1.AdvFace`` service.

    ``target``: ``host:port``. ``token``: bearer token sent as ``authorization`` metadata. ``tls``: None / False
    (plain-text channel), True (TLS with the system roots), a :class:`TlsOptions` or a mapping of its fields, or
    ready ``grpc.ChannelCredentials``. ``timeout``: default deadline of every call, in seconds (each method also
    takes ``timeout=``). Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls: bool | TlsOptions | Mapping[str, Any] | grpc.ChannelCredentials | None = None,
        timeout: float | None = 10.0,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
        if tls is None or tls is False:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            if isinstance(tls, grpc.ChannelCredentials):
                credentials = tls
            else:
                opts = TlsOptions() if tls is True else tls if isinstance(tls, TlsOptions) else TlsOptions(**tls)
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=_read(opts.ca_file),
                    private_key=_read(opts.key_file),
                    certificate_chain=_read(opts.cert_file),
                )
                if opts.server_name:
                    options.append(("grpc.ssl_target_name_override", opts.server_name))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.AdvFaceStub(self._channel)

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        try:
            return getattr(self._stub, method)(
                request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise AdvFaceRpcError(code, details or "") from exc

    # ------------------------------------------------------------------ API

    def protect(self, embeddings: Any, *, tenant: str = "", timeout: float | None = None) -> np.ndarray:
        """Protected versions of ``embeddings`` (``N x D`` or one ``D`` vector; same shape back, float32).
        Stateless: nothing is stored. With the server's keyed transform on, they come back through ``tenant``'s
        transform (empty: the default tenant), as the tenant's store would hold them."""
        x = np.asarray(embeddings, dtype=np.float32)
        rows = x[None] if x.ndim == 1 else x
        if rows.ndim != 2:
            raise ValueError(f"expected N x D embeddings, got shape {x.shape}")
        response = self._call(
            "Protect", pb.ProtectRequest(embeddings=[_embedding(r) for r in rows], tenant=tenant), timeout
        )
        out = np.array([list(e.values) for e in response.embeddings], dtype=np.float32).reshape(rows.shape)
        return out[0] if x.ndim == 1 else out

    def protect_image(
        self,
        image: ImageInput,
        *,
        epsilon: float | str | None = None,
        steps: int | None = None,
        seed: int | None = None,
        target_similarity: float | None = None,
        guidance: Sequence[str] | None = None,
        timeout: float | None = PROTECT_IMAGE_TIMEOUT,
    ) -> tuple[bytes, dict[str, Any]]:
        """Protect an enrolment photo (bytes of an encoded image, or a path): ``(png_bytes, report)``.

        The server perturbs the photo (L-inf budget ``epsilon`` on the 0..1 scale, a float or a fraction like
        ``"8/255"``; default: the server's budget shape's, 12/255 for the default ssim budget, 8/255 for uniform) so
        that face encoders no longer recognise the person, and returns a lossless PNG without the input's metadata,
        plus a report dict (``similarity`` per encoder: ``cosine_after``,
        ``cosine_random``...; ``psnr``, ``ssim``, ``linf_levels``, ``steps``, ``seconds``, ``notes``). Options left
        None take the server's defaults; ``guidance`` names the terms (e.g. ``["encoders", "deflection",
        "antipure"]``; the report's ``guidance`` lists those that ran). Slow on CPUs: ``timeout`` defaults to
        PROTECT_IMAGE_TIMEOUT seconds. Stateless: nothing is stored.
        """
        request = pb.ProtectImageRequest(image=_image_bytes(image))
        if epsilon is not None:
            request.epsilon = float(Fraction(epsilon.strip())) if isinstance(epsilon, str) else float(epsilon)
        if steps is not None:
            request.steps = int(steps)
        if seed is not None:
            request.seed = int(seed)
        if target_similarity is not None:
            request.target_similarity = float(target_similarity)
        if guidance:
            request.guidance.extend(str(g) for g in guidance)
        response = self._call("ProtectImage", request, timeout)
        return bytes(response.image), _to_dict(response.report)

    def enroll(
        self,
        subject_id: str,
        embedding: Any = None,
        image: ImageInput | None = None,
        metadata: Mapping[str, str] | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        replace: bool = False,
        timeout: float | None = None,
    ) -> list[str]:
        """Enrol one template (a raw ``embedding``, or a face ``image``: path or encoded bytes); returns the new
        template ids. ``replace`` drops the subject's previous templates and metadata."""
        request = pb.EnrollRequest(
            tenant=tenant,
            subject_id=subject_id,
            face=_face(embedding, image),
            metadata=dict(metadata or {}),
            replace=replace,
        )
        return list(self._call("Enroll", request, timeout).template_ids)

    def enroll_batch(
        self, items: Iterable[Any], tenant: str = DEFAULT_TENANT, *, timeout: float | None = None
    ) -> list[list[str]]:
        """Enrol many subjects at once, all or nothing. Each item is a mapping with ``subject_id``, ``embedding`` or
        ``image``, and optional ``metadata``; or a tuple ``(subject_id, face[, metadata])`` where ``face`` is an
        embedding (array / list of floats) or an image (path or bytes). Returns the template ids per item."""
        messages = []
        for item in items:
            if isinstance(item, Mapping):
                subject_id = item["subject_id"]
                face = _face(item.get("embedding"), item.get("image"))
                metadata = item.get("metadata")
            else:
                subject_id, value, *rest = item
                is_image = isinstance(value, (bytes, bytearray, memoryview, str, os.PathLike))
                face = _face(None, value) if is_image else _face(value, None)
                metadata = rest[0] if rest else None
            messages.append(pb.EnrollItem(subject_id=subject_id, face=face, metadata=dict(metadata or {})))
        response = self._call("EnrollBatch", pb.EnrollBatchRequest(tenant=tenant, items=messages), timeout)
        return [list(r.template_ids) for r in response.results]

    def verify(
        self,
        subject_id: str,
        embedding: Any = None,
        image: ImageInput | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        timeout: float | None = None,
    ) -> VerifyResult:
        """1:1: compare a probe (embedding or image) with a subject's templates."""
        request = pb.VerifyRequest(tenant=tenant, subject_id=subject_id, probe=_face(embedding, image))
        r = self._call("Verify", request, timeout)
        return VerifyResult(match=r.match, score=_f32(r.score), threshold=_f32(r.threshold), template_id=r.template_id)

    def identify(
        self,
        embedding: Any = None,
        image: ImageInput | None = None,
        top_k: int = 5,
        tenant: str = DEFAULT_TENANT,
        *,
        timeout: float | None = None,
    ) -> list[IdentifyMatch]:
        """1:N: the ``top_k`` most similar subjects, best first."""
        request = pb.IdentifyRequest(tenant=tenant, probe=_face(embedding, image), top_k=top_k)
        r = self._call("Identify", request, timeout)
        return [
            IdentifyMatch(subject_id=m.subject_id, template_id=m.template_id, score=_f32(m.score), match=m.match)
            for m in r.matches
        ]

    def delete(
        self,
        subject_id: str | None = None,
        template_id: str | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        timeout: float | None = None,
    ) -> int:
        """Erase a subject (all its templates) or one template; returns the number of templates erased."""
        if (subject_id is None) == (template_id is None):
            raise ValueError("give exactly one of subject_id= or template_id=")
        if subject_id is not None:
            request = pb.DeleteRequest(tenant=tenant, subject_id=subject_id)
        else:
            request = pb.DeleteRequest(tenant=tenant, template_id=template_id)
        return int(self._call("Delete", request, timeout).deleted)

    def get_subject(self, subject_id: str, tenant: str = DEFAULT_TENANT, *, timeout: float | None = None) -> Subject:
        """A subject's metadata and template ids."""
        return _subject(self._call("GetSubject", pb.GetSubjectRequest(tenant=tenant, subject_id=subject_id), timeout))

    def list_subjects(
        self,
        tenant: str = DEFAULT_TENANT,
        page_size: int = 100,
        page_token: str = "",
        *,
        timeout: float | None = None,
    ) -> tuple[list[Subject], str]:
        """One page of subjects and the token of the next page (``""`` after the last)."""
        request = pb.ListSubjectsRequest(tenant=tenant, page_size=page_size, page_token=page_token)
        r = self._call("ListSubjects", request, timeout)
        return [_subject(s) for s in r.subjects], r.next_page_token

    def iter_subjects(self, tenant: str = DEFAULT_TENANT, page_size: int = 100) -> Iterator[Subject]:
        """Every subject of ``tenant``, page after page."""
        token = ""
        while True:
            subjects, token = self.list_subjects(tenant, page_size, token)
            yield from subjects
            if not token:
                return

    def info(self, tenant: str | None = None, *, timeout: float | None = None) -> dict[str, Any]:
        """Server information as a nested dict (``encoder``, ``protection``, ``threshold``, ``versions``,
        ``counts``, ``limits``; field names as in the proto, every field present). ``counts`` are those of
        ``tenant`` (None: ``"default"`` when the token may use it, else zero) and, for admin tokens, of the server.
        ``limits`` are those the server enforces: batch size, top k, message bytes, id length, photo pixels
        (``max_image_pixels``, ``max_protect_image_pixels``), metadata keys and characters, embedding norms, and this
        caller's ``rate_per_second`` / ``max_in_flight`` (0: no limit)."""
        r = self._call("Info", pb.InfoRequest(tenant=tenant or ""), timeout)
        return _to_dict(r)

    def rotate_key_pair(
        self, new_keys_dir: str, *, blocks_per_second: float = 0.0, timeout: float | None = None
    ) -> dict[str, Any]:
        """Admin: start (or resume) re-encrypting an encrypted store under the key pair of the sidecar folder
        ``new_keys_dir`` (a path on the sidecar host) while the sidecar serves; ``blocks_per_second`` 0: the server's
        default pace. Returns the job (:meth:`maintenance_status`); the same request while it runs returns it too."""
        request = pb.RotateKeyPairRequest(new_keys_dir=new_keys_dir, blocks_per_second=blocks_per_second)
        return _maintenance_job(self._call("RotateKeyPair", request, timeout))

    def erase_now(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Admin: start erasing every removed template of an encrypted store now (and rewriting its database)."""
        return _maintenance_job(self._call("EraseNow", pb.EraseNowRequest(), timeout))

    def maintenance_status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Admin: the current or last maintenance job of an encrypted store: ``operation``, ``state`` (``idle``,
        ``running``, ``done``, ``failed``, ``stopped``), ``blocks_done`` / ``blocks_total``, ``last_error``, ...
        (fields of the proto's ``MaintenanceJob``; ``started_at`` / ``finished_at`` as datetimes or None)."""
        return _maintenance_job(self._call("MaintenanceStatus", pb.MaintenanceStatusRequest(), timeout))

    def reset_attempts(
        self,
        subject_id: str = "",
        *,
        caller: str = "",
        tenant: str = DEFAULT_TENANT,
        timeout: float | None = None,
    ) -> bool:
        """Admin: clear ``subject_id``'s lock, escalation and cap of failed Verify attempts and/or ``caller``'s
        (a token's key id: the first 8 hex digits of its SHA-256) budget of failed Identify calls, in the sidecar
        process answering; whether anything was cleared."""
        request = pb.ResetAttemptsRequest(tenant=tenant, subject_id=subject_id, caller=caller)
        return bool(self._call("ResetAttempts", request, timeout).cleared)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard health service's status of ``service`` (``""``: the server), e.g. ``"SERVING"``."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            r = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.timeout if timeout is None else timeout
            )
        except grpc.RpcError as exc:
            raise AdvFaceRpcError(exc.code(), exc.details() or "") from exc
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


__all__ = [
    "AdvFaceClient",
    "AdvFaceRpcError",
    "IdentifyMatch",
    "ImageInput",
    "Subject",
    "TlsOptions",
    "VerifyResult",
]
