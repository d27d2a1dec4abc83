"""The template service: a validated :class:`~advface.config.Config` in, enrol / verify / identify / delete out.

:class:`TemplateService` builds, once, everything the pipeline needs (image -> detect/align -> encoder -> raw
embedding, in memory only -> protect -> keyed transform -> store -> match): the encoder and face chipper, the
protector of the ``protection`` section, the tenant transforms of ``keyed_transform``, the store of ``store`` and
``encryption`` (its keyed-transform marker checked, whatever the backend) and the decision threshold. Its methods
take arrays, photo bytes and ids, validate the whole request before changing anything, and return plain values
(:class:`Verification`, :class:`Candidate`, :class:`~advface.store.base.SubjectInfo`...). Errors are advface's own
(:mod:`advface.errors`): ValidationError, NotFoundError, AlreadyExistsError, PreconditionError,
DeadlineExceededError, AttemptsExhaustedError (Verify of a subject, or Identify of a caller, over its budget of
failed attempts; AttemptsCappedError past the cap, until :meth:`TemplateService.reset_attempts` or re-enrolment); a
transport maps each to its status (the gRPC sidecar: ``server/status.py``).

Concurrency (methods are coroutines): CPU-heavy work (decoding and embedding photos, protection) runs in a pool of
``server.workers`` threads, with concurrent protections coalesced into shared shadow calls
(:class:`~advface.service.batcher.ProtectionBatcher`); store calls run in their own threads, so searches never queue
behind protection. ``deadline`` arguments are ``time.monotonic()`` values: a stage (embedding, protecting, storing,
deleting) that would start after it raises DeadlineExceededError, so a request the caller gave up on is not stored
after the fact.

Photos: a photo over ``server.max_image_pixels`` is refused from its header before any work is queued (ProtectImage:
also over ``image_protection.max_pixels``; ProtectImage calls take turns before they take a worker thread). Each
worker thread detects faces with a detector of its own (a pool of ``server.workers`` detectors: dlib's detector is
not thread-safe, and one slow photo must not hold up the others); only the encoder, fast on its fixed-size chip, is
shared under :attr:`TemplateService.face_lock`. Large photos are searched for faces downscaled
(:data:`~advface.faces.detect.DETECT_MAX_SIDE`) and cut from the full image. A photo is checked against its
request's deadline, and whether the request was abandoned (the client cancelled, its deadline passed, another photo
of the request failed), before each stage: decoding, detection, embedding; a photo whose request's deadline passed
while it waited for a worker is never decoded.

Protection: every enrolled embedding is replaced by ``T_tenant(AdvFace(z))`` (AdvFace when ``protection.enabled``;
the tenant's keyed transform when ``keyed_transform.enabled``) before it reaches the store; raw embeddings live
only in memory for the duration of the call. Probes are used raw (through the tenant's transform when it is on) and
never stored: matching compares protected templates with raw probes.

Memory (``store.matching: encrypted``): the service zeroes its own plaintext buffers once a call is done: the
face chip cut from a photo, the raw embedding, the protected template and the probe
(:attr:`TemplateService.encrypted_matching`, :mod:`advface.encrypted.memory`), so a memory dump of the sidecar taken
between calls finds none of them in those buffers; as the last step on each thread that handled them it also zeroes
the vector registers memmove copied them through (a thread's register file lands on its stack when it exits). Not
reached: the request's own objects made by gRPC (protobuf
floats, photo bytes), the decoded photo (Pillow's read-only buffer) and the intermediate tensors of the encoder and
of AdvFace's shadow calls (docs/encrypted-matching.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from advface.config import Config
from advface.encoders import FaceEncoder, create_encoder, validate_embeddings
from advface.encrypted.memory import clear_vector_registers, scrub_caches, wipe
from advface.errors import (
    ConfigError,
    DeadlineExceededError,
    ImageError,
    NotFoundError,
    PreconditionError,
    ValidationError,
)
from advface.faces import FaceChipper, align_face, create_detector
from advface.hashing import file_sha256
from advface.images import image_size, load_image
from advface.protect import TemplateProtector
from advface.service.attempts import ANONYMOUS_CALLER, IdentifyAttempts, VerifyAttempts
from advface.service.batcher import ProtectionBatcher
from advface.service.image_protection import ImageProtectionService, ProtectedImage
from advface.service.key_folder import resolve_key_folder
from advface.service.keys import transforms_from_config
from advface.service.protection import build_protector, protection_parallelism
from advface.service.stores import open_checked_store
from advface.service.thresholds import Threshold, resolve_threshold
from advface.service.validation import check_batch, check_embeddings, check_id, check_metadata
from advface.store.base import MAX_PAGE_SIZE, Match, SubjectInfo, TemplateStore, decode_page_token

if TYPE_CHECKING:
    from advface.protect.image import ProtectConfig

T = TypeVar("T")

#: Most templates protected per worker job (the deadline is checked between waves of chunks; concurrent requests
#: are coalesced into jobs of up to this many rows).
PROTECT_CHUNK = 32
#: Subjects per ListSubjects page when the request gives no page size.
DEFAULT_PAGE_SIZE = 100

#: One face of a request: an embedding (a sequence of floats, validated against the encoder's dimension) or the
#: encoded bytes of a photo holding exactly one face.
Face = Sequence[float] | np.ndarray | bytes


@dataclass(frozen=True)
class Verification:
    """The outcome of a 1:1 comparison: the best score over the subject's templates and whether it matches."""

    match: bool
    score: float
    threshold: float
    template_id: str


@dataclass(frozen=True)
class Candidate:
    """One identification result: a subject, its best template, the score and whether it passes the threshold."""

    subject_id: str
    template_id: str
    score: float
    match: bool


@dataclass(frozen=True)
class EnrolItem:
    """One subject of a batch enrolment."""

    subject_id: str
    face: Face
    metadata: dict[str, str]


@dataclass(frozen=True)
class ProtectionSummary:
    """What protects the stored templates (no secret): the method and its parameters, the shadow model(s) and,
    when the keyed transform is on, its version, norm and the tenant's public key id."""

    enabled: bool
    method: str
    rel_l2: float = 0.0
    steps: int = 0
    seed: int = 0
    lanes: int = 0
    linf: float = 0.0
    shadow_model: str = ""
    shadow_sha256: str = ""
    keyed_transform: bool = False
    transform_version: int = 0
    transform_norm: float = 0.0
    transform_key_id: str = ""


def _check_deadline(deadline: float | None, before: str, abandoned: threading.Event | None = None) -> None:
    """DeadlineExceededError when ``deadline`` has passed or the request was ``abandoned`` (set when its client
    cancelled, or another part of it failed), so the stage ``before`` is not started."""
    if abandoned is not None and abandoned.is_set():
        raise DeadlineExceededError(f"request abandoned before {before}")
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceededError(f"deadline exceeded before {before}")


class TemplateService:
    """The pipeline of one deployment (see the module docs). ``encoder``, ``store`` and ``protector`` may be
    given (tests, benchmarks); otherwise they are built from ``config``. A given protector is used only when
    ``protection.enabled``. The service owns the store and closes it in :meth:`close`."""

    def __init__(
        self,
        config: Config,
        *,
        encoder: FaceEncoder | None = None,
        store: TemplateStore | None = None,
        protector: TemplateProtector | None = None,
    ) -> None:
        config = resolve_key_folder(config)  # the key folder's secrets (first start: creates them)
        self.config = config
        self.max_batch = config.server.max_batch
        self.max_image_pixels = config.server.max_image_pixels
        self.top_k_max = config.matching.top_k_max
        #: failed Verify attempts per (tenant, subject) and failed Identify calls per caller, in this process
        #: (advface.service.attempts)
        matching = config.matching
        self.verify_attempts = VerifyAttempts(
            matching.verify_max_failures,
            matching.verify_window_s,
            matching.verify_max_tracked,
            growth=matching.lockout_growth,
            max_lockout_s=matching.lockout_max_s,
            max_consecutive=matching.verify_max_consecutive_failures,
            max_capped=matching.verify_max_capped,
        )
        self.identify_attempts = IdentifyAttempts(
            matching.identify_max_failures,
            matching.identify_window_s,
            growth=matching.lockout_growth,
            max_lockout_s=matching.lockout_max_s,
            max_consecutive=matching.identify_max_consecutive_failures,
        )
        self.encoder = encoder if encoder is not None else create_encoder(config.encoder.name)
        self.dim = int(self.encoder.dim)
        self.metric = str(self.encoder.metric)
        self.detector_name = config.encoder.detector
        self.face_policy = config.encoder.face_policy
        #: a chipper for direct use (tests, tools), with the encoder under face_lock; requests use :attr:`chippers`
        self.chipper = FaceChipper(create_detector(self.detector_name), self.encoder.chip, self.face_policy)

        self.protector: TemplateProtector | None = None
        if config.protection.enabled:
            self.protector = protector if protector is not None else build_protector(config.protection, self.encoder)
            assert self.protector is not None
            if self.protector.dim != self.dim:
                raise ConfigError(f"protector takes dimension {self.protector.dim}, encoder gives {self.dim}")
        #: "advface", "advface-id", or "none" (protection off)
        self.protection_method = str(self.protector.method) if self.protector is not None else "none"
        # keyed per-tenant transform (None: off); a missing or bad secret is a ConfigError here, at start
        self.transforms = transforms_from_config(config.keyed_transform, self.dim, self.encoder.name)
        self.threshold: Threshold = resolve_threshold(
            config.matching.threshold, self.encoder, self.protection_method, self.transforms
        )
        # last: the store locks its files (SQLite); the keyed-transform marker is checked for every backend
        self.store: TemplateStore = (
            store if store is not None else open_checked_store(config, self.dim, self.metric, self.transforms)
        )
        #: ``store.matching: encrypted``: Verify / Identify decided through the key service, and each call zeroes its
        #: plaintext chip, embedding, template and probe buffers when done (module docs)
        self.encrypted_matching = getattr(self.store, "matching", "plain") == "encrypted"

        workers = config.server.workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="advface-worker")
        self._store_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="advface-store")
        self.face_lock = threading.Lock()  # guards the encoder (dlib's is not thread-safe)
        #: one detector per worker thread (dlib's detector is not thread-safe); a photo borrows a free one
        self.chippers = tuple(
            FaceChipper(create_detector(self.detector_name), self.encoder.chip, self.face_policy)
            for _ in range(workers)
        )
        self._free_chippers: queue.SimpleQueue[FaceChipper] = queue.SimpleQueue()
        for chipper in self.chippers:
            self._free_chippers.put(chipper)
        parallel = protection_parallelism(config.protection, workers, torch.get_num_threads())
        #: torch threads per protection call (0: protection off)
        self.protection_threads = 0
        if self.protector is not None:
            self.protection_threads = parallel.threads
            torch.set_num_threads(self.protection_threads)
        self.batcher = ProtectionBatcher(
            self._protect_sync,
            self.pool,
            slots=parallel.slots,
            max_rows=PROTECT_CHUNK,
            lanes=self.protector.config.lanes if self.protector else 1,
        )
        self.image_protection = ImageProtectionService(config.image_protection, self.detector_name, self.face_policy)
        # ProtectImage calls run one at a time; the others wait on the event loop, not on a worker thread
        self._image_turn: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._protection = self._describe_protection()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle and plumbing

    def close(self) -> None:
        """Stop the worker threads and close the store (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._store_pool.submit(self.store.close).result()
        self._store_pool.shutdown(wait=True)

    async def _work(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    async def _stored(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._store_pool, functools.partial(fn, *args, **kwargs)
        )

    def _forget(self, *buffers: np.ndarray | None, scrub: bool = False) -> None:
        """Zero this call's own plaintext buffers under :attr:`encrypted_matching` (module docs), and the calling
        thread's memmove registers (:func:`~advface.encrypted.memory.clear_vector_registers`); ``scrub``: also its
        allocator caches (:func:`~advface.encrypted.memory.scrub_caches`), after work on a worker thread freed
        temporaries of its own."""
        if self.encrypted_matching:
            wipe(*buffers)
            if scrub:
                scrub_caches((4 * self.dim, 8 * self.dim))
            else:
                clear_vector_registers()

    async def _with_query(self, tenant: str, probe: Face, deadline: float | None, call: Callable[[np.ndarray], T]) -> T:
        """``call(query)`` on a store thread, ``query`` being ``probe``'s raw embedding through ``tenant``'s keyed
        transform; the call's plaintext copies of it are zeroed afterwards (:meth:`_forget`)."""
        raw = await self.raw_vectors([probe], deadline, "probe")
        queries = None
        try:
            queries = self.keyed(tenant, raw)
            return await self._stored(call, queries[0])
        finally:
            self._forget(raw, queries)

    # ------------------------------------------------------------------ faces and protection

    def check_face(self, face: Face, what: str) -> None:
        """Validate a face's cheap parts before any work: an embedding's values; a photo's presence and, from its
        header alone, its size (over ``server.max_image_pixels``: ImageError, nothing decoded)."""
        if isinstance(face, bytes):
            if not face:
                raise ValidationError(f"{what}: the image is empty")
            image_size(face, max_pixels=self.max_image_pixels, name=what)
        else:
            check_embeddings([face], self.dim, f"{what} embedding")

    def _embed_image_sync(
        self, data: bytes, deadline: float | None = None, abandoned: threading.Event | None = None
    ) -> np.ndarray:
        """The raw embedding of the one face of a photo; each stage starts only while the request is live. A
        failure sets ``abandoned`` here, in the worker, so the request's photos queued behind it are dropped."""
        try:
            _check_deadline(deadline, "decoding the image", abandoned)  # queued past the deadline: never started
            image = load_image(data, max_pixels=self.max_image_pixels)
            chipper = self._free_chippers.get()  # never waits while photos run only on the worker threads
            try:
                _check_deadline(deadline, "detecting faces", abandoned)
                faces = chipper.select(image, "image")
            finally:
                self._free_chippers.put(chipper)
            if len(faces) != 1:
                raise ImageError("image", f"{len(faces)} faces found, expected one")
            _check_deadline(deadline, "embedding the face", abandoned)
            chip = align_face(image, faces[0], self.encoder.chip)
            del image  # read-only (Pillow's buffer): not wiped (module docs)
            with self.face_lock:
                vector = self.encoder.embed(chip)
            self._forget(chip)
            checked = validate_embeddings(vector, self.dim)
            self._forget(None if checked is vector else vector, scrub=True)
            return checked
        except BaseException:
            if abandoned is not None:
                abandoned.set()
            raise

    async def raw_vectors(self, faces: Sequence[Face], deadline: float | None, what: str) -> np.ndarray:
        """Raw ``N x D`` embeddings of checked faces (photos embedded in the worker pool). When the call ends early
        (cancelled, or one photo failed) the request's other photos are abandoned between stages."""
        out = np.zeros((len(faces), self.dim), np.float32)
        photos = []
        for i, face in enumerate(faces):
            if isinstance(face, bytes):
                photos.append(i)
            else:
                checked = check_embeddings([face], self.dim, what)
                out[i] = checked[0]
                self._forget(checked)
        if photos:
            _check_deadline(deadline, "embedding images")
            abandoned = threading.Event()

            async def one(i: int) -> None:
                try:
                    vector = await self._work(self._embed_image_sync, faces[i], deadline, abandoned)
                    out[i] = vector
                    self._forget(vector)
                except ImageError as exc:
                    where = f"{what} {i}" if len(faces) > 1 else what
                    raise ImageError(where, exc.reason) from None

            try:
                await asyncio.gather(*(one(i) for i in photos))
            except BaseException:  # CancelledError included: the client is gone
                abandoned.set()
                raise
        return out

    def _protect_sync(self, x: np.ndarray) -> np.ndarray:
        assert self.protector is not None
        try:
            out = np.ascontiguousarray(self.protector.protect(x), dtype=np.float32)
            if out.shape != x.shape or not np.isfinite(out).all():
                raise RuntimeError("protection produced an unusable result")
            return out
        finally:  # last on this thread: the rows of this call (its own copy, or views of the call's raw rows)
            self._forget(x, scrub=True)

    async def _advface(self, raw: np.ndarray, deadline: float | None) -> np.ndarray:
        """AdvFace of ``raw`` (unchanged when protection is off), in chunks of :data:`PROTECT_CHUNK` rows, one wave
        of as many chunks as the batcher has slots at a time (a large batch uses every core), the deadline checked
        before each wave; chunks of concurrent calls share shadow calls."""
        if self.protector is None or len(raw) == 0:
            return raw
        out = np.empty_like(raw)

        async def chunk(start: int) -> None:
            stop = min(start + PROTECT_CHUNK, len(raw))
            protected = await self.batcher.protect(raw[start:stop])
            out[start:stop] = protected
            self._forget(protected)

        starts = list(range(0, len(raw), PROTECT_CHUNK))
        for wave in range(0, len(starts), self.batcher.slots):
            _check_deadline(deadline, "protecting")
            await asyncio.gather(*(chunk(start) for start in starts[wave : wave + self.batcher.slots]))
        return out

    def keyed(self, tenant: str, vectors: np.ndarray) -> np.ndarray:
        """``vectors`` through ``tenant``'s keyed transform (unchanged when the transform is off)."""
        return vectors if self.transforms is None else self.transforms.apply(tenant, vectors)

    async def templates(self, tenant: str, raw: np.ndarray, deadline: float | None) -> np.ndarray:
        """What gets stored for ``raw`` embeddings of ``tenant``: ``T_tenant(AdvFace(raw))``."""
        return self.keyed(tenant, await self._advface(raw, deadline))

    # ------------------------------------------------------------------ operations

    async def protect(
        self, embeddings: Sequence[Sequence[float]] | np.ndarray, tenant: str | None, deadline: float | None = None
    ) -> np.ndarray:
        """Stateless protection: ``AdvFace(z)``, then ``T_tenant`` when ``tenant`` is given and the keyed transform
        is on. PreconditionError when protection is disabled."""
        if self.protector is None:
            raise PreconditionError("protection is disabled on this server")
        check_batch(len(embeddings), self.max_batch, "embeddings")
        raw = check_embeddings(embeddings, self.dim)
        protected = await self._advface(raw, deadline)
        return protected if tenant is None else self.keyed(tenant, protected)

    async def enroll(
        self,
        tenant: str,
        subject_id: str,
        face: Face,
        metadata: dict[str, str],
        *,
        replace: bool = False,
        deadline: float | None = None,
    ) -> list[str]:
        """Store the protected template of ``face`` for ``subject_id`` (a new subject, or one more template;
        ``replace``: its templates and metadata replaced); returns the new template ids. Enrolment resets the
        subject's budget of failed Verify attempts (its lock and cap: :meth:`reset_attempts`)."""
        subject_id = check_id(subject_id, "subject_id")
        metadata = check_metadata(metadata)
        self.check_face(face, "face")
        raw = await self.raw_vectors([face], deadline, "face")
        templates = None
        try:
            templates = await self.templates(tenant, raw, deadline)
            _check_deadline(deadline, "storing")
            ids = list(await self._stored(self.store.add, tenant, subject_id, templates, metadata, replace=replace))
            self.verify_attempts.reset_subject(tenant, subject_id)
            return ids
        finally:
            self._forget(raw, templates)

    async def enroll_batch(
        self, tenant: str, items: Sequence[EnrolItem], deadline: float | None = None
    ) -> list[list[str]]:
        """Enrol several new subjects in one transaction (distinct subject ids); template ids per item."""
        check_batch(len(items), self.max_batch, "items")
        seen: set[str] = set()
        metadata = []
        for i, item in enumerate(items):
            subject_id = check_id(item.subject_id, f"items[{i}].subject_id")
            if subject_id in seen:
                raise ValidationError(f"items[{i}].subject_id repeats an earlier item's")
            seen.add(subject_id)
            metadata.append(check_metadata(item.metadata, f"items[{i}].metadata"))
            self.check_face(item.face, f"items[{i}].face")
        if not items:
            return []
        raw = await self.raw_vectors([item.face for item in items], deadline, "items face")
        templates = None
        try:
            templates = await self.templates(tenant, raw, deadline)
            _check_deadline(deadline, "storing")
            entries = [(item.subject_id, templates[i : i + 1], metadata[i]) for i, item in enumerate(items)]
            added = [list(ids) for ids in await self._stored(self.store.add_many, tenant, entries)]
            for item in items:
                self.verify_attempts.reset_subject(tenant, item.subject_id)
            return added
        finally:
            self._forget(raw, templates)

    def _subject_templates(self, tenant: str, subject_id: str) -> tuple[np.ndarray, list[str]]:
        ids = [str(t) for t in self.store.get_subject(tenant, subject_id).template_ids]
        vectors = np.asarray(self.store.subject_vectors(tenant, subject_id), dtype=np.float32).reshape(-1, self.dim)
        if len(ids) != len(vectors):  # pragma: no cover - a store bug
            raise RuntimeError("store returned vectors and template ids of different lengths")
        return vectors, ids

    async def verify(self, tenant: str, subject_id: str, probe: Face, deadline: float | None = None) -> Verification:
        """1:1: the raw probe against ``subject_id``'s protected templates (NOT_FOUND before the costly probe).
        AttemptsExhaustedError, before any store call or probe work, while the subject is over its budget of failed
        attempts (``matching.verify_max_failures`` per ``verify_window_s``, escalating), AttemptsCappedError past
        ``matching.verify_max_consecutive_failures`` in a row (:mod:`advface.service.attempts`)."""
        subject_id = check_id(subject_id, "subject_id")
        self.check_face(probe, "probe")
        self.verify_attempts.begin(tenant, subject_id)
        matched: bool | None = None
        try:
            result = await self._verify(tenant, subject_id, probe, deadline)
            matched = result.match
            return result
        finally:
            self.verify_attempts.end(tenant, subject_id, matched)

    async def _verify(self, tenant: str, subject_id: str, probe: Face, deadline: float | None) -> Verification:
        if self.encrypted_matching:  # decided by the key service (encrypted/store.py)
            store: Any = self.store
            await self._stored(store.get_subject, tenant, subject_id)  # NOT_FOUND before the costly probe
            match, template_id, released = await self._with_query(
                tenant, probe, deadline, lambda query: store.verify_encrypted(tenant, subject_id, query)
            )
            return Verification(match, float("nan") if released is None else released, float("nan"), template_id)
        vectors, template_ids = await self._stored(self._subject_templates, tenant, subject_id)
        query = self.keyed(tenant, await self.raw_vectors([probe], deadline, "probe"))[0]
        if len(vectors) == 0:
            raise NotFoundError("the subject has no templates")
        scores = self.encoder.score(np.repeat(query[None], len(vectors), axis=0), vectors)
        best = int(np.argmax(scores))
        score = float(scores[best])
        return Verification(score >= self.threshold.value, score, self.threshold.value, template_ids[best])

    async def identify(
        self,
        tenant: str,
        probe: Face,
        top_k: int,
        deadline: float | None = None,
        caller: str = ANONYMOUS_CALLER,
    ) -> list[Candidate]:
        """1:N: the ``top_k`` best subjects of ``tenant`` for the raw probe (``top_k`` 0 means 1).
        AttemptsExhaustedError, before any work, while ``caller`` (a name of the client: the sidecar passes its
        token's key id) is over its budget of failed Identify calls, those with no candidate accepted
        (``matching.identify_max_failures`` per ``identify_window_s``, escalating: :mod:`advface.service.attempts`)."""
        top_k = int(top_k) or 1
        if top_k > self.top_k_max:
            raise ValidationError(f"top_k {top_k} is over the limit of {self.top_k_max}")
        self.check_face(probe, "probe")
        key = (caller,)
        self.identify_attempts.admit(key)
        matched: bool | None = None
        try:
            found = await self._identify(tenant, probe, top_k, deadline)
            matched = any(c.match for c in found)
            return found
        finally:
            self.identify_attempts.close(key, matched)

    async def _identify(self, tenant: str, probe: Face, top_k: int, deadline: float | None) -> list[Candidate]:
        if self.encrypted_matching:  # only candidates above the key service's threshold
            encrypted: Any = self.store
            found = await self._with_query(
                tenant, probe, deadline, lambda query: encrypted.identify_encrypted(tenant, query, top_k)
            )
            return [Candidate(m.subject_id, m.template_id, m.score, True) for m in found]
        matches: list[Match] = await self._with_query(
            tenant, probe, deadline, lambda query: self.store.search(tenant, query, top_k)
        )
        return [Candidate(m.subject_id, m.template_id, m.score, m.score >= self.threshold.value) for m in matches]

    async def delete_subject(self, tenant: str, subject_id: str, deadline: float | None = None) -> int:
        """Delete a subject and all its templates from the database and the index; the number deleted. Resets the
        subject's budget of failed Verify attempts (a new subject of the same id starts afresh)."""
        subject_id = check_id(subject_id, "subject_id")
        _check_deadline(deadline, "deleting")
        deleted = int(await self._stored(self.store.delete_subject, tenant, subject_id))
        self.verify_attempts.reset_subject(tenant, subject_id)
        return deleted

    def reset_attempts(self, tenant: str, subject_id: str | None = None, caller: str | None = None) -> bool:
        """An operator's reset: clear the lock, escalation and cap of ``subject_id``'s failed Verify attempts
        and/or of ``caller``'s failed Identify calls (in this process); whether there was anything to clear."""
        if subject_id is None and caller is None:
            raise ValidationError("reset_attempts: name a subject_id or a caller")
        cleared = False
        if subject_id is not None:
            cleared |= self.verify_attempts.reset_subject(tenant, check_id(subject_id, "subject_id"))
        if caller is not None:
            cleared |= self.identify_attempts.reset((check_id(caller, "caller"),))
        return cleared

    async def delete_template(self, tenant: str, template_id: str, deadline: float | None = None) -> str:
        """Delete one template; the subject it belonged to."""
        template_id = check_id(template_id, "template_id")
        _check_deadline(deadline, "deleting")
        return str(await self._stored(self.store.delete_template, tenant, template_id))

    async def get_subject(self, tenant: str, subject_id: str) -> SubjectInfo:
        """A subject's metadata and template ids (never vectors)."""
        return await self._stored(self.store.get_subject, tenant, check_id(subject_id, "subject_id"))

    async def list_subjects(
        self, tenant: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[SubjectInfo], str]:
        """One page of subjects in id order and the token of the next page ("" at the end)."""
        page_size = min(int(page_size) or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        try:
            decode_page_token(page_token)
        except ValidationError:
            raise ValidationError("page_token is not one this server issued") from None
        subjects, token = await self._stored(self.store.list_subjects, tenant, page_size, page_token)
        return list(subjects), token or ""

    async def count(self, tenant: str | None = None, *, subjects: bool = False) -> int:
        """Templates (or ``subjects``) of ``tenant``; of every tenant when None."""
        return int(await self._stored(self.store.count, tenant, subjects=subjects))

    async def protect_image(
        self,
        image: bytes,
        epsilon: float | None = None,
        steps: int | None = None,
        seed: int = 0,
        target_similarity: float | None = None,
        deadline: float | None = None,
        guidance: Sequence[str] | None = None,
    ) -> ProtectedImage:
        """Protect the face of a photo against identity extraction (stateless; see
        :class:`~advface.service.image_protection.ImageProtectionService`)."""
        service = self.image_protection
        options = service.options(image, epsilon, steps, seed, target_similarity, guidance)
        image_size(image, max_pixels=min(self.max_image_pixels, service.config.max_pixels), name="image")
        _check_deadline(deadline, "protecting the image")
        async with self._image_protection_turn():  # waiting ones hold no worker: photos of other RPCs go on
            _check_deadline(deadline, "protecting the image")
            abandoned = threading.Event()
            try:
                return await self._work(self._protect_image_sync, image, options, deadline, abandoned)
            except BaseException:  # CancelledError included: the client is gone, so the optimisation stops
                abandoned.set()
                raise

    def _image_protection_turn(self) -> asyncio.Lock:
        """The lock ProtectImage calls take turns on (one per event loop: a service may outlive a loop)."""
        loop = asyncio.get_running_loop()
        if self._image_turn is None or self._image_turn[0] is not loop:
            self._image_turn = (loop, asyncio.Lock())
        return self._image_turn[1]

    def _protect_image_sync(
        self, image: bytes, options: ProtectConfig, deadline: float | None, abandoned: threading.Event
    ) -> ProtectedImage:
        _check_deadline(deadline, "protecting the image", abandoned)  # queued past the deadline: never started
        return self.image_protection.protect(image, options, deadline, abandoned)

    # ------------------------------------------------------------------ description

    def protection(self, tenant: str | None = None) -> ProtectionSummary:
        """What protects stored templates, with ``tenant``'s public transform key id when the transform is on."""
        if self.transforms is None or tenant is None:
            return self._protection
        return dataclasses.replace(self._protection, transform_key_id=self.transforms.key_id(tenant))

    def _describe_protection(self) -> ProtectionSummary:
        keyed: dict[str, Any] = {}
        if self.transforms is not None:
            keyed = {
                "keyed_transform": True,
                "transform_version": self.transforms.version,
                "transform_norm": float(self.transforms.norm or 0.0),
            }
        if self.protector is None:
            return ProtectionSummary(enabled=False, method="none", **keyed)
        cfg = self.protector.config
        paths = tuple(Path(p) for p in (getattr(self.protector, "shadow_paths", ()) or ()))
        if paths:  # every shadow file (advface-id: the ensemble), comma-separated, in configuration order
            model, sha = ",".join(p.name for p in paths), ",".join(file_sha256(p) for p in paths)
        else:
            model, sha = str(getattr(self.protector, "metadata", {}).get("name", "custom")), ""
        return ProtectionSummary(
            enabled=True,
            method=self.protection_method,
            rel_l2=float(cfg.rel_l2),
            steps=int(cfg.steps),
            seed=int(cfg.seed),
            lanes=int(cfg.lanes),
            linf=float(cfg.linf or 0.0),
            shadow_model=model,
            shadow_sha256=sha,
            **keyed,
        )
