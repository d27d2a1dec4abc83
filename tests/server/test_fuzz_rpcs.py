"""Property-based fuzzing (hypothesis) of every ``advface.v1.AdvFace`` RPC on a REAL sidecar (issue #19).

Requests are *well-formed but hostile* protobuf messages, sent with the raw generated stubs (no client-side
validation): tenants and ids that are empty, huge, padded, unicode, full of control characters; metadata maps with
many keys and long values; embeddings of the wrong dimension, with NaN/Inf, zero, tiny or huge norms, or empty;
``top_k`` / ``page_size`` extremes; forged page tokens; image bytes that are empty, random, truncated or mutated
encodings, decompression bombs, odd modes and EXIF orientations; ``ProtectImage`` options out of range. Strings the
protobuf runtime cannot hold (lone surrogates, invalid UTF-8) are put on the wire by hand
(:func:`test_invalid_utf8_strings_on_the_wire`); test_hostile_input.py covers malformed message bytes.

Every call is checked for:

- a status code among :data:`ALLOWED` (never UNKNOWN or INTERNAL), details without a Python class repr or traceback;
- the code an independent oracle expects from the API's documented rules (proto/advface/v1/advface.proto,
  docs/serve.md): ids of 1-128 printable characters without surrounding whitespace, metadata of at most 32 keys of
  1-64 such characters and values of at most 1024, finite non-zero embeddings of the encoder's dimension with a
  norm of at most 1000, top_k within the server's limit, page tokens the server issued, ProtectImage options in
  range ...;
- the store against :class:`Model`, a plain-Python model of every subject, updated after each accepted write only:
  a rejected Enroll / EnrollBatch / Delete changes nothing (Info's total counts and the targeted subjects are
  compared with the model after every write), reads return what the model holds, tenants never see each other;
- a healthy server after each test (health SERVING, Info OK, no error or warning logged).

Each example makes one field hostile (or all, or none) and draws the others from valid values, so that deep paths
(protection, storing, merging, searching) are reached as often as the checks in front of them. Also: metadata merged
past 32 keys (:func:`test_metadata_merges`), a token restricted to one tenant (:func:`test_restricted_token`), and
paging past the longest id (:func:`test_pagination_past_a_long_unicode_id`: a bug the fuzzing found, fixed).

The examples are derandomized (the same on every run, as CI needs) and the hypothesis database is off (hypothesis
still keeps a self-ignored cache in ``.hypothesis/``). ``ProtectImage`` is only sent photos that are refused before
its encoder ensemble loads (``image_protection.max_pixels`` is 4096 and every decodable photo sent to it is larger);
the test asserts the ensemble stayed unloaded.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from sidecar_harness import ACME_TOKEN, DIM, ServerThread, make_config

from advface.api.v1 import SERVICE_NAME
from advface.api.v1 import advface_pb2 as pb
from advface.api.v1 import advface_pb2_grpc as pb_grpc
from advface.store.base import encode_page_token

pytestmark = [
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),  # hypothesis, on 100k-character ids
    pytest.mark.filterwarnings("ignore:Corrupt EXIF data"),  # Pillow, in the server, on truncated TIFFs
]

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED
#: The only codes a request may end with (the server has no auth here, but the set is the issue's).
ALLOWED = frozenset(
    {
        OK,
        INVALID,
        NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        TOO_BIG,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)
#: What the details of a status must never contain (a Python repr of a class, a traceback, a parser's message).
LEAKS = ("<class ", "Traceback", 'File "', "Error parsing")

# The documented limits (proto/advface/v1/advface.proto, docs/serve.md), written out rather than imported: the
# oracle must not share the server's code.
MAX_ID = 128
MAX_KEYS = 32
MAX_KEY = 64
MAX_VALUE = 1024
MAX_NORM = 1e3  # of an embedding in a request (docs/serve.md, "Embedding values")
MIN_REQUEST_NORM = 1e-12  # below it a vector counts as zero (advface/service/validation.py)
MAX_BATCH = 5  # server.max_batch of make_config
TOP_K_MAX = 10  # matching.top_k_max of make_config
MAX_PAGE = 1000
DEFAULT_PAGE = 100
IMAGE_MAX_PIXELS = 4096  # image_protection.max_pixels of the fuzzed server
IMAGE_MAX_STEPS = 500  # image_protection.max_steps (default)
MAX_RECEIVE = 4 * 1024 * 1024  # server.max_receive_mb (default 4)

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    # no explain phase: once a property fails the model may be out of step, and explaining would replay hundreds
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

# ------------------------------------------------------------------------------------------------------ oracle


def valid_id(value: str, max_chars: int = MAX_ID) -> bool:
    """An id by the API's rules: 1..max_chars printable characters without leading or trailing whitespace."""
    return 0 < len(value) <= max_chars and value.isprintable() and value == value.strip()


def tenant_of(value: str) -> str | None:
    """The tenant a request's field names (empty: "default"); None when it is not a valid tenant."""
    value = value or "default"
    return value if valid_id(value) else None


def valid_metadata(metadata: dict[str, str]) -> bool:
    return len(metadata) <= MAX_KEYS and all(valid_id(k, MAX_KEY) and len(v) <= MAX_VALUE for k, v in metadata.items())


def embedding_verdict(values: list[float]) -> str:
    """The API's rule on the float32 values the server receives (the dimension, finite, norm in [1e-12, 1000]: a
    vector whose norm underflows in float32 arithmetic counts as zero, for every RPC alike): "ok" or "bad"."""
    if len(values) != DIM:
        return "bad"
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        x32 = np.asarray(values, dtype=np.float32)
        x = x32.astype(np.float64)
        if not np.isfinite(x).all():
            return "bad"
        norm = float(np.linalg.norm(x))
        if not MIN_REQUEST_NORM <= norm <= MAX_NORM:  # a norm that underflows in float32 is refused as zero
            return "bad"
        return "ok"


def expected_codes(valid: bool, verdicts: Any = ()) -> tuple[grpc.StatusCode, ...]:
    """The codes of a request whose other fields are ``valid`` and whose faces / embeddings have ``verdicts``."""
    verdicts = set(verdicts)
    if not valid or verdicts & {"bad", "photo"}:
        return (INVALID,)
    return (OK, INVALID) if "tiny" in verdicts else (OK,)


@dataclass(frozen=True)
class FaceSpec:
    """A generated face field: ``kind`` "unset" (no field), "empty" (a Face without input), "embedding", "image"."""

    kind: str
    embedding: tuple[float, ...] = ()
    image: bytes = b""

    def message(self) -> pb.Face | None:
        if self.kind == "unset":
            return None
        if self.kind == "empty":
            return pb.Face()
        if self.kind == "embedding":
            return pb.Face(embedding=pb.Embedding(values=list(self.embedding)))
        return pb.Face(image=self.image)

    @property
    def verdict(self) -> str:
        """:func:`embedding_verdict` of an embedding; "photo" for a non-empty photo (no generated photo has a face:
        refused, but a server may look the subject up first); "bad" for no input or an empty photo."""
        if self.kind == "embedding":
            return embedding_verdict(list(self.embedding))
        return "photo" if self.kind == "image" and self.image else "bad"

    def __repr__(self) -> str:  # short reprs in hypothesis' falsifying examples
        if self.kind == "embedding":
            head = ", ".join(f"{v:g}" for v in self.embedding[:4])
            return f"FaceSpec(embedding[{len(self.embedding)}]=[{head}{', ...' if len(self.embedding) > 4 else ''}])"
        if self.kind == "image":
            return f"FaceSpec(image={self.image[:24]!r}{'...' if len(self.image) > 24 else ''} ({len(self.image)} B))"
        return f"FaceSpec({self.kind})"


@dataclass
class SubjectState:
    metadata: dict[str, str]
    templates: list[str] = field(default_factory=list)


class Model:
    """Every subject of the server's store, keyed by (tenant, subject_id); updated after accepted writes only."""

    def __init__(self) -> None:
        self.subjects: dict[tuple[str, str], SubjectState] = {}

    def get(self, tenant: str | None, subject_id: str) -> SubjectState | None:
        return None if tenant is None else self.subjects.get((tenant, subject_id))

    def tenant_subjects(self, tenant: str) -> dict[str, SubjectState]:
        return {sid: s for (t, sid), s in self.subjects.items() if t == tenant}

    def owner(self, tenant: str, template_id: str) -> str | None:
        for (t, sid), s in self.subjects.items():
            if t == tenant and template_id in s.templates:
                return sid
        return None

    def enrol(self, tenant: str, subject_id: str, metadata: dict[str, str], ids: list[str], replace: bool) -> None:
        old = self.subjects.get((tenant, subject_id))
        if old is None or replace:
            self.subjects[(tenant, subject_id)] = SubjectState(dict(metadata), list(ids))
        else:
            old.metadata.update(metadata)
            old.templates.extend(ids)

    def totals(self) -> tuple[int, int]:
        return sum(len(s.templates) for s in self.subjects.values()), len(self.subjects)


# ------------------------------------------------------------------------------------------------ strategies

TENANTS = ["default", "acme", "Ωmega テナント"]
SUBJECTS = ["alice", "bob", "é" * MAX_ID]
WEIRD = [
    " ", " x", "x ", "\tx", "x\n", "\x00", "a\x00b", "\x7f", "\x1b[2J", "\u200e", "\u2028", "\ufeff", "\u00a0",
    "\u3000x", "\ue000", "\U0010ffff", "\U0001f600", "e\u0301", "ß", "İ", "ﬀ", "%s%n", "{0}", "\\", '"', "'",
    "'; DROP TABLE subjects; --", "../../etc/passwd", "*", "default ", "Default", "DEFAULT", "acme\r\n", "ACME",
]  # fmt: skip


#: Any character a protobuf string can hold (no surrogates: see test_invalid_utf8_strings_on_the_wire).
UTF8 = st.characters(codec="utf-8")


def ids(pool: list[str]) -> st.SearchStrategy[str]:
    """Ids: half from ``pool``, the rest hostile (any text, control and format characters, padding, lengths around
    the limit in 1-4 UTF-8 bytes per character, 10k and 100k characters)."""
    return st.one_of(
        st.sampled_from(pool),
        st.one_of(
            st.sampled_from(WEIRD),
            st.text(UTF8, max_size=12),
            st.text(st.characters(codec="utf-8", min_codepoint=0x80), min_size=1, max_size=140),
            st.tuples(st.integers(MAX_ID - 2, MAX_ID + 3), st.sampled_from(["x", "é", "テ", "\U0001f600"])).map(
                lambda p: p[1] * p[0]
            ),
            st.sampled_from([10_000, 100_000]).map(lambda n: "z" * n),
            st.lists(st.sampled_from(WEIRD + ["a", "é"]), min_size=1, max_size=5).map("".join),
        ),
    )


tenants = st.one_of(st.sampled_from(["", *TENANTS]), ids(TENANTS))
subject_ids = ids(SUBJECTS)

_short_keys = st.text("abcdefghij", min_size=1, max_size=3)
_keys = st.one_of(_short_keys, ids(["k"]), st.integers(MAX_KEY - 2, MAX_KEY + 2).map(lambda n: "k" * n))
_values = st.one_of(
    st.text(UTF8, max_size=16),
    st.sampled_from(WEIRD + ["", "\x00" * 8]),
    st.integers(MAX_VALUE - 2, MAX_VALUE + 2).map(lambda n: "v" * n),
    st.just("é" * MAX_VALUE),
    st.just("\U0001f600" * MAX_VALUE),
    st.just("w" * 100_000),
)
metadata_maps = st.one_of(
    st.just({}),
    st.dictionaries(_keys, _values, max_size=5),
    # many small keys: crosses the 32-key limit alone or when merged into an existing subject's metadata
    st.dictionaries(_short_keys, st.text(UTF8, max_size=3), min_size=12, max_size=MAX_KEYS + 3),
)


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIM)
    return v / np.linalg.norm(v)


def _vector(seed: int, scale: float = 1.0) -> tuple[float, ...]:
    with np.errstate(over="ignore"):
        return tuple(float(x) for x in (_unit(seed) * scale).astype(np.float32))


def _poisoned(args: tuple[int, int, float]) -> tuple[float, ...]:
    seed, at, bad = args
    v = list(_vector(seed))
    v[at % DIM] = bad
    return tuple(v)


_seeds = st.integers(0, 2**32 - 1)
embeddings = st.one_of(
    _seeds.map(_vector),  # valid
    st.tuples(
        _seeds,
        st.sampled_from([1e-44, 1e-40, 1e-30, 1e-20, 1e-6, 999.9, 1000.1, 1e6, 9e14, 1.0001e15, 1e18, 1e30, 3e38]),
    ).map(lambda p: _vector(*p)),
    st.tuples(_seeds, st.integers(0, DIM - 1), st.sampled_from([math.nan, math.inf, -math.inf])).map(_poisoned),
    st.sampled_from([0.0, -0.0, 1e-46]).map(lambda z: (z,) * DIM),  # zero vectors (1e-46 is 0 in float32)
    st.lists(st.floats(width=32), min_size=DIM, max_size=DIM).map(tuple),
    st.lists(st.floats(-1, 1, width=32), max_size=2 * DIM + 2).map(tuple),  # mostly the wrong dimension
    st.sampled_from([0, 1, DIM - 1, DIM + 1, 4 * DIM, 65_537, 1_100_000]).map(lambda n: (0.1,) * n),
)

# ----------------------------------------------------------------------------------------------------- images

PNG_SIG = b"\x89PNG\r\n\x1a\n"
HEADERS = [PNG_SIG, b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"II*\x00", b"MM\x00*"]
MODES = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "BMP": ["1", "L", "P", "RGB"],
    "GIF": ["L", "P"],
    "TIFF": ["1", "L", "RGB", "RGBA", "CMYK", "I;16", "I", "F"],
    "WEBP": ["RGB", "RGBA"],
}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, with one tiny IDAT: a decompression bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return PNG_SIG + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@st.composite
def encoded_images(draw: Any, min_side: int = 1, max_side: int = 40) -> bytes:
    """A decodable image: any format and mode, noise or flat, 1x1 and up, NaN/Inf in float TIFFs, odd EXIF
    orientations."""
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    width, height = draw(st.integers(min_side, max_side)), draw(st.integers(min_side, max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    flat = draw(st.booleans())
    orientation = draw(st.sampled_from([None, 0, 2, 5, 6, 8, 9, 65535]))
    nan_count = draw(st.integers(0, 3))
    poison = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    f_scale = draw(st.sampled_from([1.0, 1e6, 3e38]))
    try:
        if mode == "F":
            arr = rng.normal(size=(height, width)).astype(np.float32) * np.float32(f_scale)
            arr.flat[:nan_count] = poison
            image = Image.fromarray(arr, mode="F")
        else:
            shape = (height, width, 3)
            rgb = np.full(shape, 128, np.uint8) if flat else rng.integers(0, 256, shape, np.uint8)
            image = Image.fromarray(rgb, mode="RGB").convert("L" if mode in ("I;16", "I") else mode)
            if mode in ("I;16", "I"):
                image = image.convert("I").point(lambda v: v * 257) if mode == "I" else image.convert("I;16")
        kwargs: dict[str, Any] = {}
        if orientation is not None and fmt in ("JPEG", "PNG", "TIFF", "WEBP"):
            exif = Image.Exif()
            exif[0x0112] = orientation
            kwargs["exif"] = exif.tobytes()
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kwargs)
    except (OSError, ValueError, KeyError, TypeError):  # a combination Pillow refuses: a plain RGB PNG
        buf = io.BytesIO()
        Image.new("RGB", (width, height), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def _truncated(data: bytes) -> st.SearchStrategy[bytes]:
    return st.integers(0, len(data) - 1).map(lambda n: data[:n])


def _flipped(data: bytes) -> st.SearchStrategy[bytes]:
    return st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)).map(
        lambda p: data[: p[0]] + bytes([data[p[0]] ^ p[1]]) + data[p[0] + 1 :]
    )


_bombs = st.sampled_from([(0, 0), (1, 1), (5000, 9000), (30_000, 30_000), (2**31 - 1, 1), (1, 2**31 - 1)]).map(
    lambda wh: png_claiming(*wh)
)
_garbage = st.one_of(
    st.binary(min_size=1, max_size=256),
    st.tuples(st.sampled_from(HEADERS), st.binary(max_size=128)).map(lambda p: p[0] + p[1]),
)
#: Photo bytes for Enroll / EnrollBatch / Verify / Identify (any of them may decode; none holds a face).
images = st.one_of(
    st.just(b""),
    _garbage,
    _bombs,
    encoded_images(),
    encoded_images().flatmap(_truncated),
    encoded_images().flatmap(_flipped),
)
#: Photo bytes for ProtectImage: never a decodable photo within image_protection.max_pixels (65x65 = 4225 > 4096,
#: truncation keeps the header's size or cuts it), so no call loads the encoder ensemble.
protect_images = st.one_of(
    st.just(b""),
    _garbage,
    _bombs,
    encoded_images(min_side=65, max_side=72),
    encoded_images(min_side=65, max_side=72).flatmap(_truncated),
)

faces = st.one_of(
    st.sampled_from([FaceSpec("unset"), FaceSpec("empty")]),
    embeddings.map(lambda v: FaceSpec("embedding", embedding=v)),
    images.map(lambda b: FaceSpec("image", image=b)),
)
_u32 = st.one_of(
    st.integers(0, 12), st.sampled_from([999, 1000, 1001, 2**31 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)
)

# What the fields of an example that are not its focus are drawn from: valid values (known and new subjects).
good_tenants = st.sampled_from(["", *TENANTS, "brand-new tenant"])
good_subjects = st.sampled_from([*SUBJECTS, "carol", "Ωscar 😀"])
good_faces = st.one_of(
    _seeds.map(lambda seed: FaceSpec("embedding", embedding=_vector(seed))),
    st.tuples(_seeds, st.sampled_from([1e-30, 1e-6, 10.0, 100.0, 999.0])).map(
        lambda p: FaceSpec("embedding", embedding=_vector(*p))
    ),
)
good_metadata = st.dictionaries(_short_keys, st.text(UTF8, max_size=8), max_size=4)


def focus(*fields: str) -> st.SearchStrategy[str]:
    """Which fields of an example are hostile: one of ``fields``, "all" of them, or "none"."""
    return st.sampled_from(["none", "all", *fields])


def pick(data: st.DataObject, chosen: str, name: str, good: st.SearchStrategy, hostile: st.SearchStrategy) -> Any:
    """Draw field ``name``: from ``hostile`` (which also yields valid values) when it is in focus, else ``good``."""
    return data.draw(hostile if chosen in (name, "all") else good, label=name)


# ------------------------------------------------------------------------------------------------ the server


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    response: Any


class Fuzz:
    """The fuzzed server, a channel with the raw stubs, and the model of its store."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(server.address)
        self.stub = pb_grpc.AdvFaceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.model = Model()

    def call(self, name: str, request: Any) -> Outcome:
        """Call RPC ``name``; check the code is allowed and the details leak nothing (also for huge requests:
        RESOURCE_EXHAUSTED, from the transport)."""
        try:
            response = getattr(self.stub, name)(request, timeout=60)
            out = Outcome(OK, "", response)
        except grpc.RpcError as err:
            out = Outcome(err.code(), err.details() or "", None)
        if currently_in_test_context():  # the codes seen: pytest --hypothesis-show-statistics
            event(f"{name}: {out.code.name}")
        assert out.code in ALLOWED, (name, out.code, out.details)
        assert not any(leak in out.details for leak in LEAKS), (name, out.code, out.details)
        if request.ByteSize() > MAX_RECEIVE:
            assert out.code == TOO_BIG, (name, out.code, out.details)
        return out

    def expect(self, name: str, request: Any, *codes: grpc.StatusCode) -> Outcome:
        out = self.call(name, request)
        if request.ByteSize() <= MAX_RECEIVE:
            assert out.code in codes, (name, f"expected {[c.name for c in codes]}", out.code, out.details)
        return out

    # ------------------------------------------------------------------ the store against the model

    def subject(self, tenant: str, subject_id: str) -> SubjectState | None:
        out = self.call("GetSubject", pb.GetSubjectRequest(tenant=tenant, subject_id=subject_id))
        if out.code == NOT_FOUND:
            return None
        assert out.code == OK, (out.code, out.details)
        assert out.response.subject_id == subject_id
        return SubjectState(dict(out.response.metadata), list(out.response.template_ids))

    def check_subject(self, tenant: str | None, subject_id: str) -> None:
        """The server's view of one subject is the model's (skipped for invalid ids)."""
        if tenant is None or not valid_id(subject_id):
            return
        assert self.subject(tenant, subject_id) == self.model.get(tenant, subject_id), (tenant, subject_id)

    def check_totals(self) -> None:
        counts = self.stub.Info(pb.InfoRequest(), timeout=60).counts
        assert (counts.total_templates, counts.total_subjects) == self.model.totals()

    def ensure(self, tenant: str, subject_id: str, seed: int = 0) -> SubjectState:
        """``subject_id`` enrolled in ``tenant`` (enrolled now when absent)."""
        state = self.model.get(tenant, subject_id)
        if state is None:
            face = pb.Face(embedding=pb.Embedding(values=list(_vector(seed))))
            request = pb.EnrollRequest(tenant=tenant, subject_id=subject_id, face=face, metadata={"seeded": "1"})
            out = self.expect("Enroll", request, OK)
            self.model.enrol(tenant, subject_id, {"seeded": "1"}, list(out.response.template_ids), False)
            state = self.model.get(tenant, subject_id)
            assert state is not None
        return state

    def healthy(self) -> None:
        response = self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        self.check_totals()

    def close(self) -> None:
        self.channel.close()


class _Loud(logging.Handler):
    """Records of WARNING and above (or with a traceback) from any logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    config = make_config(tmp_path_factory.mktemp("fuzz"), image_protection={"max_pixels": IMAGE_MAX_PIXELS})
    server = ServerThread(config)
    fz = Fuzz(server)
    try:
        for i, tenant in enumerate(TENANTS):
            for j, subject_id in enumerate(SUBJECTS):
                fz.ensure(tenant, subject_id, seed=10 * i + j)
        fz.check_totals()
        yield fz
    finally:
        fz.close()
        server.stop()


@pytest.fixture
def fz(fuzz: Fuzz) -> Iterator[Fuzz]:
    """The module's Fuzz; after the test: still serving, counts as modelled, nothing logged at WARNING or above."""
    loud = _Loud()
    root = logging.getLogger()
    root.addHandler(loud)
    try:
        yield fuzz
        fuzz.healthy()
        assert not loud.records, [(r.name, r.levelname, r.getMessage()) for r in loud.records]
    finally:
        root.removeHandler(loud)


# ---------------------------------------------------------------------------------------------------- writes


@pytest.mark.slow
@FUZZ
@given(chosen=focus("tenant", "subject_id", "face", "metadata"), replace=st.booleans(), data=st.data())
def test_enroll(fz: Fuzz, chosen: str, replace: bool, data: st.DataObject) -> None:
    tenant = pick(data, chosen, "tenant", good_tenants, tenants)
    subject_id = pick(data, chosen, "subject_id", good_subjects, subject_ids)
    face = pick(data, chosen, "face", good_faces, faces)
    metadata = pick(data, chosen, "metadata", good_metadata, metadata_maps)
    t = tenant_of(tenant)
    before = fz.model.get(t, subject_id)
    merged = metadata if before is None or replace else {**before.metadata, **metadata}
    ok = t is not None and valid_id(subject_id) and valid_metadata(metadata)
    ok = ok and len(merged) <= MAX_KEYS  # the merged metadata is within the limit too
    request = pb.EnrollRequest(
        tenant=tenant, subject_id=subject_id, face=face.message(), metadata=metadata, replace=replace
    )
    event(f"face: {face.verdict}")
    if valid_metadata(metadata) and len(merged) > MAX_KEYS:
        event("metadata over the limit once merged")
    out = fz.expect("Enroll", request, *expected_codes(ok, [face.verdict]))
    if out.code == OK:
        assert t is not None
        fz.model.enrol(t, subject_id, metadata, list(out.response.template_ids), replace)
        assert out.response.subject_id == subject_id and len(out.response.template_ids) == 1
        assert out.response.protected
    fz.check_subject(t, subject_id)  # a rejected Enroll changed nothing; an accepted one what it should
    fz.check_totals()


def _batch_items(subjects: st.SearchStrategy[str], face: st.SearchStrategy, metadata: st.SearchStrategy, size: int):
    return st.lists(st.tuples(subjects, face, metadata), max_size=size)


@pytest.mark.slow
@FUZZ
@given(chosen=focus("tenant", "size", "items"), data=st.data())
def test_enroll_batch(fz: Fuzz, chosen: str, data: st.DataObject) -> None:
    tenant = pick(data, chosen, "tenant", good_tenants, tenants)
    size = MAX_BATCH + 2 if chosen in ("size", "all") else MAX_BATCH
    items = pick(
        data,
        chosen,
        "items",
        st.lists(st.tuples(good_subjects, good_faces, good_metadata), max_size=size, unique_by=lambda i: i[0]),
        _batch_items(st.one_of(good_subjects, subject_ids), faces, metadata_maps, size),
    )
    t = tenant_of(tenant)
    ok = t is not None and len(items) <= MAX_BATCH
    seen: set[str] = set()
    for subject_id, _, metadata in items:
        before = fz.model.get(t, subject_id)
        merged = metadata if before is None else {**before.metadata, **metadata}
        ok = ok and valid_id(subject_id) and subject_id not in seen and valid_metadata(metadata)
        ok = ok and len(merged) <= MAX_KEYS
        seen.add(subject_id)
    request = pb.EnrollBatchRequest(
        tenant=tenant,
        items=[pb.EnrollItem(subject_id=s, face=f.message(), metadata=m) for s, f, m in items],
    )
    out = fz.expect("EnrollBatch", request, *expected_codes(ok, [f.verdict for _, f, _ in items]))
    if out.code == OK:
        assert t is not None
        results = list(out.response.results)
        assert len(results) == len(items)
        for (subject_id, _, metadata), result in zip(items, results):
            fz.model.enrol(t, subject_id, metadata, list(result.template_ids), False)
            assert result.subject_id == subject_id and len(result.template_ids) == 1
    for subject_id, _, _ in items:  # all or nothing
        fz.check_subject(t, subject_id)
    fz.check_totals()


@pytest.mark.slow
@settings(FUZZ, max_examples=40)
@given(
    rpc=st.sampled_from(["Enroll", "EnrollBatch"]),
    subject_id=st.sampled_from(["m1", "m2"]),
    metadata=st.dictionaries(_short_keys, st.text("xyz", max_size=2), min_size=1, max_size=MAX_KEYS),
    replace=st.booleans(),
)
def test_metadata_merges(fz: Fuzz, rpc: str, subject_id: str, metadata: dict[str, str], replace: bool) -> None:
    """Valid metadata maps merged into two subjects again and again: an Enroll (without replace) or EnrollBatch
    whose merged metadata would exceed 32 keys is INVALID_ARGUMENT and changes nothing -- for EnrollBatch also the
    batch's other, valid item (all or nothing)."""
    tenant = "merges"
    before = fz.model.get(tenant, subject_id)
    replace = replace and rpc == "Enroll"
    merged = metadata if before is None or replace else {**before.metadata, **metadata}
    face = pb.Face(embedding=pb.Embedding(values=list(_vector(len(metadata)))))
    if rpc == "Enroll":
        request: Any = pb.EnrollRequest(
            tenant=tenant, subject_id=subject_id, face=face, metadata=metadata, replace=replace
        )
    else:
        other = pb.EnrollItem(subject_id="other", face=face, metadata={"k": "v"})
        request = pb.EnrollBatchRequest(
            tenant=tenant, items=[other, pb.EnrollItem(subject_id=subject_id, face=face, metadata=metadata)]
        )
    if len(merged) > MAX_KEYS:
        event("metadata over the limit once merged")
    out = fz.expect(rpc, request, OK if len(merged) <= MAX_KEYS else INVALID)
    if out.code == OK:
        if rpc == "Enroll":
            fz.model.enrol(tenant, subject_id, metadata, list(out.response.template_ids), replace)
        else:
            first, second = out.response.results
            fz.model.enrol(tenant, "other", {"k": "v"}, list(first.template_ids), False)
            fz.model.enrol(tenant, subject_id, metadata, list(second.template_ids), False)
    for sid in ("m1", "m2", "other"):
        fz.check_subject(tenant, sid)
    fz.check_totals()


_template_ids = st.one_of(ids(["0" * 32]), st.binary(min_size=16, max_size=16).map(bytes.hex))


@FUZZ
@given(
    chosen=focus("tenant", "subject_id", "template_id"),
    target=st.sampled_from(["none", "subject", "template", "real-template", "real-template"]),
    owner_tenant=st.sampled_from(TENANTS),
    pick_at=st.integers(0, 100),
    data=st.data(),
)
def test_delete(fz: Fuzz, chosen: str, target: str, owner_tenant: str, pick_at: int, data: st.DataObject) -> None:
    """Delete by subject, by template id (random, or a real template of a subject of ``owner_tenant``, which may
    not be the request's tenant: NOT_FOUND then), or with no target."""
    tenant = pick(data, chosen, "tenant", good_tenants, tenants)
    t = tenant_of(tenant)
    request = pb.DeleteRequest(tenant=tenant)
    expected = INVALID
    owner = template_id = subject_id = None
    if target == "subject":
        subject_id = pick(data, chosen, "subject_id", good_subjects, subject_ids)
        if t is not None and subject_id in SUBJECTS:
            fz.ensure(t, subject_id)  # something to delete
        request.subject_id = subject_id
        if t is not None and valid_id(subject_id):
            expected = OK if fz.model.get(t, subject_id) is not None else NOT_FOUND
    elif target in ("template", "real-template"):
        if target == "real-template" and chosen not in ("template_id", "all"):
            state = fz.ensure(owner_tenant, SUBJECTS[pick_at % len(SUBJECTS)])
            template_id = state.templates[pick_at % len(state.templates)]
        else:
            template_id = pick(data, chosen, "template_id", _template_ids, _template_ids)
        request.template_id = template_id
        if t is not None and valid_id(template_id):
            owner = fz.model.owner(t, template_id)
            expected = OK if owner is not None else NOT_FOUND
    out = fz.expect("Delete", request, expected)
    if out.code == OK:
        assert t is not None
        if target == "subject":
            assert subject_id is not None
            state = fz.model.subjects.pop((t, subject_id))
            assert (out.response.deleted, out.response.subject_id) == (len(state.templates), subject_id)
        else:
            assert owner is not None and template_id is not None
            state = fz.model.subjects[(t, owner)]
            state.templates.remove(template_id)
            if not state.templates:
                del fz.model.subjects[(t, owner)]
            assert (out.response.deleted, out.response.subject_id) == (1, owner)
    for sid in (subject_id, owner, SUBJECTS[pick_at % len(SUBJECTS)]):
        if sid is not None:
            fz.check_subject(t, sid)
    fz.check_subject(owner_tenant, SUBJECTS[pick_at % len(SUBJECTS)])
    fz.check_totals()


# ----------------------------------------------------------------------------------------------------- reads


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


@FUZZ
@given(chosen=focus("tenant", "subject_id", "probe"), data=st.data())
def test_verify(fz: Fuzz, chosen: str, data: st.DataObject) -> None:
    tenant = pick(data, chosen, "tenant", good_tenants, tenants)
    subject_id = pick(data, chosen, "subject_id", good_subjects, subject_ids)
    probe = pick(data, chosen, "probe", good_faces, faces)
    t = tenant_of(tenant)
    state = fz.model.get(t, subject_id)
    verdict = probe.verdict
    if t is None or not valid_id(subject_id) or verdict == "bad":
        expected: tuple[grpc.StatusCode, ...] = (INVALID,)
    elif verdict in ("photo", "tiny"):  # a photo without a face, a float32-zero probe: the subject may come first
        expected = (INVALID, OK) if state is not None else (INVALID, NOT_FOUND)
        if verdict == "photo" and state is not None:
            expected = (INVALID,)
    else:
        expected = (OK,) if state is not None else (NOT_FOUND,)
    out = fz.expect("Verify", pb.VerifyRequest(tenant=tenant, subject_id=subject_id, probe=probe.message()), *expected)
    if out.code == OK:
        assert state is not None
        r = out.response
        assert r.template_id in state.templates
        assert _finite(r.score, r.threshold) and r.match == (r.score >= r.threshold)
    fz.check_totals()


@FUZZ
@given(chosen=focus("tenant", "probe", "top_k"), data=st.data())
def test_identify(fz: Fuzz, chosen: str, data: st.DataObject) -> None:
    tenant = pick(data, chosen, "tenant", good_tenants, tenants)
    probe = pick(data, chosen, "probe", good_faces, faces)
    top_k = pick(data, chosen, "top_k", st.integers(0, TOP_K_MAX), _u32)
    t = tenant_of(tenant)
    k = top_k or 1
    ok = t is not None and k <= TOP_K_MAX
    request = pb.IdentifyRequest(tenant=tenant, probe=probe.message(), top_k=top_k)
    out = fz.expect("Identify", request, *expected_codes(ok, [probe.verdict]))
    if out.code == OK:
        assert t is not None
        subjects = fz.model.tenant_subjects(t)
        matches = list(out.response.matches)
        assert len(matches) == min(k, len(subjects))
        assert len({m.subject_id for m in matches}) == len(matches)  # one entry per subject
        scores = [m.score for m in matches]
        assert scores == sorted(scores, reverse=True) and _finite(*scores, out.response.threshold)
        for m in matches:
            assert m.template_id in subjects[m.subject_id].templates  # the request's tenant's subjects only
            assert m.match == (m.score >= out.response.threshold)
    fz.check_totals()


@FUZZ
@given(chosen=focus("tenant", "subject_id"), data=st.data())
def test_get_subject(fz: Fuzz, chosen: str, data: st.DataObject) -> None:
    tenant = pick(data, chosen, "tenant", good_tenants, tenants)
    subject_id = pick(data, chosen, "subject_id", good_subjects, subject_ids)
    t = tenant_of(tenant)
    state = fz.model.get(t, subject_id)
    ok = t is not None and valid_id(subject_id)
    expected = (OK if state is not None else NOT_FOUND) if ok else INVALID
    out = fz.expect("GetSubject", pb.GetSubjectRequest(tenant=tenant, subject_id=subject_id), expected)
    if out.code == OK:
        assert state is not None
        assert out.response.subject_id == subject_id
        assert dict(out.response.metadata) == state.metadata and list(out.response.template_ids) == state.templates


_TOKEN_KINDS = ["empty", "issued", "issued", "forged-id", "no-prefix", "bad-utf8", "non-ascii", "long", "text"]


@st.composite
def page_tokens(draw: Any, kinds: tuple[str, ...] = tuple(_TOKEN_KINDS)) -> tuple[str, bool | None]:
    """(token, valid): True for "" and tokens of valid ids in the server's format, False for tokens built to be
    invalid, None for random text (either)."""
    kind = draw(st.sampled_from(kinds))
    if kind == "empty":
        return "", True
    if kind == "issued":
        after = draw(st.sampled_from([*SUBJECTS, "a", "bob2", "zzz", "\U0001f600" * 100, "\U0001f600" * MAX_ID]))
        return encode_page_token(after), True
    if kind == "forged-id":
        after = draw(subject_ids)[:300]
        return encode_page_token(after), valid_id(after)
    if kind == "no-prefix":
        return _b64(draw(st.binary(min_size=1, max_size=40))), False
    if kind == "bad-utf8":
        return _b64(b"advface.page.v1\x00" + draw(st.sampled_from([b"\xff", b"\xed\xa0\x80", b"a\xc0\xaf"]))), False
    if kind == "non-ascii":
        return encode_page_token("alice") + draw(st.sampled_from(["é", "\x00é", "テ"])), False
    if kind == "long":
        return encode_page_token("x" * MAX_ID) + "A" * draw(st.integers(1, 4000)), False
    return draw(st.text(UTF8, max_size=40)), None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _token_after(token: str) -> str:
    """The subject id a page token of the server's format continues after."""
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))[len(b"advface.page.v1\x00") :].decode()


@FUZZ
@given(chosen=focus("tenant", "page_size", "page_token"), data=st.data())
def test_list_subjects(fz: Fuzz, chosen: str, data: st.DataObject) -> None:
    tenant = pick(data, chosen, "tenant", good_tenants, tenants)
    page_size = pick(data, chosen, "page_size", st.integers(0, 4), _u32)
    page_token, token_ok = pick(data, chosen, "page_token", page_tokens(("empty", "issued")), page_tokens())
    t = tenant_of(tenant)
    if t is None or token_ok is False:
        expected: tuple[grpc.StatusCode, ...] = (INVALID,)
    elif token_ok is None:
        expected = (OK, INVALID)
    else:
        expected = (OK, INVALID) if page_size > MAX_PAGE else (OK,)  # the proto says 1..1000; the server clamps
    request = pb.ListSubjectsRequest(tenant=tenant, page_size=page_size, page_token=page_token)
    out = fz.expect("ListSubjects", request, *expected)
    if out.code != OK:
        return
    assert t is not None
    size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
    got = [s.subject_id for s in out.response.subjects]
    assert len(got) <= size and got == sorted(got) and len(set(got)) == len(got)
    model = fz.model.tenant_subjects(t)
    for s in out.response.subjects:  # only the tenant's subjects, as stored
        assert s.subject_id in model, (t, s.subject_id)
        state = model[s.subject_id]
        assert dict(s.metadata) == state.metadata and list(s.template_ids) == state.templates
    if token_ok:
        after = _token_after(page_token) if page_token else ""
        rest = sorted(sid for sid in model if sid > after)
        assert got == rest[:size], (t, after)
        if len(rest) > size:
            assert out.response.next_page_token
    if out.response.next_page_token:  # a token the server issued is accepted and continues after the page
        follow = pb.ListSubjectsRequest(tenant=tenant, page_size=page_size, page_token=out.response.next_page_token)
        nxt = fz.expect("ListSubjects", follow, OK)
        assert all(s.subject_id > got[-1] for s in nxt.response.subjects)


def test_pagination_past_a_long_unicode_id(fz: Fuzz) -> None:
    """The server accepts every next_page_token it issues, whatever the last subject id of the page."""
    long_id, after = "\U0001f600" * MAX_ID, "\U0001f98a fox"
    for subject_id in (long_id, after):
        fz.ensure("paging", subject_id)
    first = fz.expect("ListSubjects", pb.ListSubjectsRequest(tenant="paging", page_size=1), OK)
    assert [s.subject_id for s in first.response.subjects] == [long_id]
    token = first.response.next_page_token
    assert token
    second = fz.call("ListSubjects", pb.ListSubjectsRequest(tenant="paging", page_size=1, page_token=token))
    assert (second.code, second.details) == (OK, "")
    assert [s.subject_id for s in second.response.subjects] == [after]


@FUZZ
@given(tenant=st.one_of(good_tenants, tenants))
def test_info(fz: Fuzz, tenant: str) -> None:
    t = tenant_of(tenant)
    out = fz.expect("Info", pb.InfoRequest(tenant=tenant), OK if t is not None else INVALID)
    if out.code == OK:
        assert t is not None
        counts = out.response.counts
        model = fz.model.tenant_subjects(t)
        assert counts.tenant_subjects == len(model)
        assert counts.tenant_templates == sum(len(s.templates) for s in model.values())
        assert (counts.total_templates, counts.total_subjects) == fz.model.totals()
        assert out.response.encoder.dim == DIM and out.response.limits.max_batch == MAX_BATCH


# ---------------------------------------------------------------------------------------------- stateless RPCs


@pytest.mark.slow
@FUZZ
@given(chosen=focus("tenant", "size", "rows"), data=st.data())
def test_protect(fz: Fuzz, chosen: str, data: st.DataObject) -> None:
    """Protect ignores the tenant here (no keyed transform): only the batch size and the embeddings decide."""
    tenant = pick(data, chosen, "tenant", good_tenants, tenants)
    size = MAX_BATCH + 2 if chosen in ("size", "all") else MAX_BATCH
    good_rows = good_faces.map(lambda f: f.embedding)
    rows = pick(data, chosen, "rows", st.lists(good_rows, max_size=size), st.lists(embeddings, max_size=size))
    ok = len(rows) <= MAX_BATCH
    request = pb.ProtectRequest(tenant=tenant, embeddings=[pb.Embedding(values=list(r)) for r in rows])
    out = fz.expect("Protect", request, *expected_codes(ok, [embedding_verdict(list(r)) for r in rows]))
    if out.code == OK:
        got = list(out.response.embeddings)
        assert len(got) == len(rows) and out.response.protection.enabled
        for e in got:
            assert len(e.values) == DIM and _finite(*e.values)
    fz.check_totals()


_epsilons = st.one_of(
    st.sampled_from([1 / 255, 8 / 255, 32 / 255, 0.99 / 255, 32.01 / 255, 0.0, -0.0, -1.0, 1.0, 5e-324, 1e308]),
    st.floats(),
)
_steps = st.one_of(st.sampled_from([0, 1, IMAGE_MAX_STEPS, IMAGE_MAX_STEPS + 1]), _u32)
_targets = st.one_of(st.sampled_from([-1.0, 1.0, -1.0000001, 1.0000001, 0.0]), st.floats())


@FUZZ
@given(chosen=focus("epsilon", "steps", "target_similarity"), seed=_u32, data=st.data())
def test_protect_image(fz: Fuzz, chosen: str, seed: int, data: st.DataObject) -> None:
    """Every generated request is refused with INVALID_ARGUMENT (no photo is usable); an out-of-range option of a
    non-empty photo is named in the details. The image is always hostile."""
    image = data.draw(protect_images, label="image")
    epsilon = pick(data, chosen, "epsilon", st.none() | st.floats(1 / 255, 32 / 255), st.none() | _epsilons)
    steps = pick(data, chosen, "steps", st.none() | st.integers(1, 10), st.none() | _steps)
    target = pick(data, chosen, "target_similarity", st.none() | st.floats(-1, 1), st.none() | _targets)
    request = pb.ProtectImageRequest(image=image, seed=seed)
    if epsilon is not None:
        request.epsilon = epsilon
    if steps is not None:
        request.steps = steps
    if target is not None:
        request.target_similarity = target
    out = fz.expect("ProtectImage", request, INVALID)
    eps_ok = epsilon is None or (math.isfinite(epsilon) and 1 / 255 - 1e-9 <= epsilon <= 32 / 255 + 1e-9)
    steps_ok = steps is None or 1 <= steps <= IMAGE_MAX_STEPS
    target_ok = target is None or (math.isfinite(target) and -1 <= target <= 1)
    if image and not (eps_ok and steps_ok and target_ok):
        options = (("epsilon", eps_ok), ("steps", steps_ok), ("target_similarity", target_ok))
        named = [name for name, good in options if not good]
        assert any(name in out.details for name in named), (named, out.details)
    assert not fz.server.servicer.service.image_protection.loaded  # every photo was refused before loading


# ------------------------------------------------------------------------------------------------ wire strings

#: The RPCs whose requests have string fields.
STRING_RPCS = ["Enroll", "EnrollBatch", "Verify", "Identify", "Delete", "GetSubject", "ListSubjects", "Info", "Protect"]
#: A 3-byte UTF-8 character the test puts in a string field, then swaps for 3 bytes that are not UTF-8 on the wire.
MARK = "\u2603"
NOT_UTF8 = [b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xff\xfe\xfd", b"\xc0\xaf\x80", b"\xf8\x88\x80"]


def _with_mark(name: str, field_name: str, text: str) -> Any:
    face = pb.Face(embedding=pb.Embedding(values=list(_vector(1))))
    s = {field_name: text}
    tenant, sid = s.get("tenant", "acme"), s.get("id", "alice")
    metadata = {s.get("key", "k"): s.get("value", "v")}
    builders = {
        "Enroll": lambda: pb.EnrollRequest(tenant=tenant, subject_id=sid, face=face, metadata=metadata),
        "EnrollBatch": lambda: pb.EnrollBatchRequest(
            tenant=tenant, items=[pb.EnrollItem(subject_id=sid, face=face, metadata=metadata)]
        ),
        "Verify": lambda: pb.VerifyRequest(tenant=tenant, subject_id=sid, probe=face),
        "Identify": lambda: pb.IdentifyRequest(tenant=tenant, probe=face),
        "Delete": lambda: pb.DeleteRequest(tenant=tenant, subject_id=sid),
        "GetSubject": lambda: pb.GetSubjectRequest(tenant=tenant, subject_id=sid),
        "ListSubjects": lambda: pb.ListSubjectsRequest(tenant=tenant, page_token=s.get("id", "")),
        "Info": lambda: pb.InfoRequest(tenant=tenant),
        "Protect": lambda: pb.ProtectRequest(tenant=tenant, embeddings=[face.embedding]),
    }
    return builders[name]()


@settings(FUZZ, max_examples=40)
@given(
    name=st.sampled_from(STRING_RPCS),
    field_name=st.sampled_from(["tenant", "id", "key", "value"]),
    prefix=st.sampled_from(["", "a", "é"]),
    bad=st.sampled_from(NOT_UTF8),
)
def test_invalid_utf8_strings_on_the_wire(fz: Fuzz, name: str, field_name: str, prefix: str, bad: bytes) -> None:
    """Lone surrogates and other non-UTF-8 bytes in any string field (the protobuf runtime refuses to build such
    messages, so the bytes are swapped in after serialisation): INVALID_ARGUMENT, nothing stored."""
    payload = _with_mark(name, field_name, prefix + MARK).SerializeToString()
    marked = MARK.encode("utf-8")
    if marked not in payload:  # the RPC has no such field
        return
    payload = payload.replace(marked, bad)
    call = fz.channel.unary_unary(f"/{SERVICE_NAME}/{name}", request_serializer=None, response_deserializer=None)
    try:
        call(payload, timeout=60)
        code, details = OK, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    event(f"{name}: {code.name}")
    assert code == INVALID, (name, field_name, bad, code, details)
    assert not any(leak in details for leak in LEAKS), details
    fz.check_totals()
    for tenant in TENANTS:
        fz.check_subject(tenant, "alice")


# ----------------------------------------------------------------------------------------- a restricted token

#: Requests valid but for their tenant, of every RPC with a tenant field.
_TENANT_RPCS = {
    "Enroll": lambda t: pb.EnrollRequest(tenant=t, subject_id="pd", face=_face(), metadata={"k": "v"}),
    "EnrollBatch": lambda t: pb.EnrollBatchRequest(tenant=t, items=[pb.EnrollItem(subject_id="pd", face=_face())]),
    "Verify": lambda t: pb.VerifyRequest(tenant=t, subject_id="pd", probe=_face()),
    "Identify": lambda t: pb.IdentifyRequest(tenant=t, probe=_face(), top_k=3),
    "Delete": lambda t: pb.DeleteRequest(tenant=t, subject_id="nobody"),
    "GetSubject": lambda t: pb.GetSubjectRequest(tenant=t, subject_id="nobody"),
    "ListSubjects": lambda t: pb.ListSubjectsRequest(tenant=t),
    "Info": lambda t: pb.InfoRequest(tenant=t),
    "Protect": lambda t: pb.ProtectRequest(tenant=t, embeddings=[_face().embedding]),
}


def _face() -> pb.Face:
    return pb.Face(embedding=pb.Embedding(values=list(_vector(7))))


@pytest.fixture(scope="module")
def acme_stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.AdvFaceStub]:
    """A server with auth on and a stub whose token may use tenant "acme" only."""
    tokens = {ACME_TOKEN: {"tenants": ["acme"], "role": "client"}}
    server = ServerThread(make_config(tmp_path_factory.mktemp("fuzz-auth"), auth={"enabled": True, "tokens": tokens}))
    channel = grpc.intercept_channel(grpc.insecure_channel(server.address), _BearerInterceptor(ACME_TOKEN))
    try:
        yield pb_grpc.AdvFaceStub(channel)
    finally:
        channel.close()
        server.stop()


class _BearerInterceptor(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        details = details._replace(metadata=tuple(details.metadata or ()) + self.metadata)
        return continuation(details, request)


@pytest.mark.slow
@settings(FUZZ, max_examples=50)
@given(rpc=st.sampled_from(sorted(_TENANT_RPCS)), tenant=st.one_of(st.sampled_from(["", *TENANTS]), tenants))
def test_restricted_token(acme_stub: pb_grpc.AdvFaceStub, rpc: str, tenant: str) -> None:
    """A token of tenant "acme": PERMISSION_DENIED for every other valid tenant (Protect ignores the tenant without a
    keyed transform; Info without a tenant answers with no tenant counts), INVALID_ARGUMENT or PERMISSION_DENIED for
    an invalid one; never a tenant's data across the boundary."""
    t = tenant_of(tenant)
    try:
        response = getattr(acme_stub, rpc)(_TENANT_RPCS[rpc](tenant), timeout=60)
        code, details = OK, ""
    except grpc.RpcError as err:
        response, code, details = None, err.code(), err.details() or ""
    event(f"{rpc}: {code.name}")
    assert code in ALLOWED and not any(leak in details for leak in LEAKS), (rpc, code, details)
    if rpc == "Protect" or (rpc == "Info" and tenant == ""):
        assert code == OK, (rpc, code, details)
    elif t is None:
        assert code in (INVALID, grpc.StatusCode.PERMISSION_DENIED), (rpc, code, details)
    elif t != "acme":
        assert code == grpc.StatusCode.PERMISSION_DENIED, (rpc, code, details)
    else:
        assert code != grpc.StatusCode.PERMISSION_DENIED, (rpc, code, details)
    if rpc == "Info" and code == OK:
        counts = response.counts
        assert (counts.total_templates, counts.total_subjects) == (0, 0)  # a client token sees no totals
        if t != "acme":
            assert (counts.tenant_templates, counts.tenant_subjects) == (0, 0)
