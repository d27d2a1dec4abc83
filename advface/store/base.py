"""The template-store interface: where the sidecar keeps enrolled (protected) templates.

A store only ever receives **protected** templates (AdvFace features, never raw embeddings): the sidecar protects a
vector before it calls :meth:`TemplateStore.add`, and probes are compared against those protected templates. The
store itself cannot tell the difference -- it is a durable, tenant-isolated vector database -- so nothing here may be
used to keep raw embeddings.

Data model: a *tenant* (one customer or application; tenants never see each other's data) holds *subjects* (a
person, named by the caller's ``subject_id``, with string metadata) and each subject holds one or more *templates*
(one vector each, named by a store-made ``template_id``: 32 lowercase hex characters of a random UUID4).

Errors (all subclasses of :class:`advface.errors.AdvfaceError`), raised before anything is changed:

- :class:`~advface.errors.EmbeddingError` -- vectors of the wrong shape or dimension, NaN/Inf, zero vectors, or
  vectors too large to compare in float32 (norm above :data:`MAX_VECTOR_NORM`);
- :class:`~advface.errors.ValidationError` -- invalid ids, metadata, ``k``, page size or page token;
- :class:`~advface.errors.ClosedError` -- a closed store;
- :class:`~advface.errors.ConfigError` -- a database made for another dimension or metric (when opening it);
- :class:`~advface.errors.NotFoundError` -- an unknown subject or template (in the tenant given).

Identifiers (tenant, subject id, metadata keys) must be strings of 1 to 128 (keys: 64) printable characters
(``str.isprintable``: no control, format or line-break characters) without leading or trailing whitespace.
Metadata is a ``dict[str, str]`` of at most 32 keys with values of at most 1024 characters.
"""

from __future__ import annotations

import abc
import base64
import binascii
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self

import numpy as np

from advface.encoders.base import validate_embeddings
from advface.errors import ConfigError, EmbeddingError, ValidationError

StoreMetric = Literal["euclidean", "cosine"]
METRICS = ("euclidean", "cosine")

MAX_ID_CHARS = 128
MAX_METADATA_KEYS = 32
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 1024
MAX_PAGE_SIZE = 1000
#: Largest ``k`` of a search.
MAX_SEARCH_K = 10_000_000
MAX_DIM = 65536
#: Largest accepted vector norm: squared distances between such vectors still fit in float32.
MAX_VECTOR_NORM = 1e15

_TOKEN_PREFIX = b"advface.page.v1\x00"
#: Longest page token: base64 of the prefix and the longest id (MAX_ID_CHARS characters of up to 4 UTF-8 bytes).
_MAX_TOKEN_CHARS = 4 * ((len(_TOKEN_PREFIX) + 4 * MAX_ID_CHARS + 2) // 3)


@dataclass(frozen=True)
class Match:
    """One search result: the subject, its best-matching template and the score (higher = more similar)."""

    subject_id: str
    template_id: str
    score: float


@dataclass(frozen=True)
class SubjectInfo:
    """An enrolled subject: its metadata, template ids (in enrolment order) and creation time (Unix seconds)."""

    subject_id: str
    metadata: dict[str, str] = field(default_factory=dict)
    template_ids: list[str] = field(default_factory=list)
    created_at: float = 0.0


# --------------------------------------------------------------------------------------------------- validation


def check_id(value: Any, what: str, max_chars: int = MAX_ID_CHARS) -> str:
    """``value`` if it is a valid identifier (see module docs), else ValidationError naming ``what``."""
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise ValidationError(f"{what} must not be empty")
    if len(value) > max_chars:
        raise ValidationError(f"{what} is {len(value)} characters long; at most {max_chars} are allowed")
    if not value.isprintable():
        raise ValidationError(f"{what} {value[:40]!r} contains control or other non-printable characters")
    if value != value.strip():
        raise ValidationError(f"{what} {value[:40]!r} has leading or trailing whitespace")
    _check_utf8(value, what)
    return value


def _check_utf8(value: str, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{what} is not valid Unicode text (lone surrogate)") from None


def check_metadata(metadata: Mapping[str, str] | None, what: str = "metadata") -> dict[str, str]:
    """A copy of ``metadata`` (None -> ``{}``) after checking keys, values and sizes; ValidationError otherwise."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValidationError(f"{what} must be a mapping of strings to strings, got {type(metadata).__name__}")
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValidationError(f"{what} has {len(metadata)} keys; at most {MAX_METADATA_KEYS} are allowed")
    out: dict[str, str] = {}
    for key, value in metadata.items():
        check_id(key, f"{what} key", MAX_METADATA_KEY_CHARS)
        if not isinstance(value, str):
            raise ValidationError(f"{what}[{key!r}] must be a string, got {type(value).__name__}")
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise ValidationError(
                f"{what}[{key!r}] is {len(value)} characters long; at most {MAX_METADATA_VALUE_CHARS} are allowed"
            )
        _check_utf8(value, f"{what}[{key!r}]")
        out[key] = value
    return out


def check_vectors(vectors: Any, dim: int, what: str = "vectors") -> np.ndarray:
    """``vectors`` (``N x dim`` or one ``dim`` vector, N >= 1) as a C-contiguous float32 array; EmbeddingError
    for a wrong shape or dtype, NaN/Inf, zero rows or rows with a norm above :data:`MAX_VECTOR_NORM`."""
    with np.errstate(over="ignore", under="ignore"):  # too large or small values are reported below
        try:
            x = validate_embeddings(vectors, dim)
        except EmbeddingError as exc:
            raise EmbeddingError(f"{what}: {exc}") from None
        if len(x) == 0:
            raise EmbeddingError(f"{what}: at least one vector is needed")
        norms = np.linalg.norm(np.asarray(vectors, np.float64).reshape(len(x), dim), axis=1)
        big = norms > MAX_VECTOR_NORM
        if big.any():
            rows = np.flatnonzero(big)[:10].tolist()
            raise EmbeddingError(f"{what}: rows {rows} have a norm above {MAX_VECTOR_NORM:g}")
        # float64 input can underflow to zero rows in float32: check the converted values too
        try:
            x = validate_embeddings(x, dim)
        except EmbeddingError as exc:
            raise EmbeddingError(f"{what} (as float32): {exc}") from None
    return np.ascontiguousarray(x, dtype=np.float32)


def check_probe(probe: Any, dim: int) -> np.ndarray:
    """One probe vector (shape ``(dim,)`` or ``(1, dim)``) as a ``1 x dim`` float32 array."""
    x = np.asarray(probe)
    if x.ndim == 2 and x.shape[0] != 1:
        raise EmbeddingError(f"probe: expected one vector of dimension {dim}, got shape {x.shape}")
    return check_vectors(x, dim, "probe")


def check_positive_int(value: Any, what: str, maximum: int | None = None) -> int:
    """``value`` as an int in ``[1, maximum]``; ValidationError otherwise (bools are not integers)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValidationError(f"{what} must be an integer, got {value!r}")
    number = int(value)
    if number < 1 or (maximum is not None and number > maximum):
        bound = f"in [1, {maximum}]" if maximum is not None else ">= 1"
        raise ValidationError(f"{what} must be {bound}, got {value}")
    return number


def check_config_int(value: Any, what: str, maximum: int) -> int:
    """:func:`check_positive_int` for an opening parameter (dimension, pool size...): ConfigError otherwise."""
    try:
        return check_positive_int(value, what, maximum)
    except ValidationError as exc:
        raise ConfigError(str(exc)) from None


def check_dim_metric(dim: Any, metric: Any) -> tuple[int, StoreMetric]:
    """Validated ``(dim, metric)`` of a store."""
    dim = check_config_int(dim, "store dim", MAX_DIM)
    if metric not in METRICS:
        raise ConfigError(f"store metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return dim, metric


def encode_page_token(last_subject_id: str) -> str:
    """The opaque page token that continues a listing after ``last_subject_id``."""
    raw = _TOKEN_PREFIX + last_subject_id.encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_page_token(token: Any) -> str:
    """The subject id a page token continues after (``""`` for the first page); ValidationError if malformed."""
    if not isinstance(token, str):
        raise ValidationError(f"page_token must be a string, got {type(token).__name__}")
    if token == "":
        return ""
    try:
        if len(token) > _MAX_TOKEN_CHARS or not token.isascii():
            raise ValueError
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        if not raw.startswith(_TOKEN_PREFIX):
            raise ValueError
        after = raw[len(_TOKEN_PREFIX) :].decode("utf-8")
        check_id(after, "page token subject")
    except (ValueError, binascii.Error, UnicodeDecodeError, ValidationError):
        raise ValidationError(f"invalid page_token {token[:40]!r}") from None
    return after


def check_items(items: Any, dim: int, replace: bool) -> list[tuple[str, np.ndarray, dict[str, str] | None]]:
    """Validate the items of :meth:`TemplateStore.add_many`: ``(subject_id, vectors[, metadata])`` tuples."""
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise ValidationError(
            f"items must be a list of (subject_id, vectors, metadata) tuples, got {type(items).__name__}"
        )
    out: list[tuple[str, np.ndarray, dict[str, str] | None]] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, Sequence) or isinstance(item, (str, bytes)) or len(item) not in (2, 3):
            raise ValidationError(f"items[{i}] must be a (subject_id, vectors, metadata) tuple")
        subject_id = check_id(item[0], f"items[{i}] subject_id")
        vectors = check_vectors(item[1], dim, f"items[{i}] ({subject_id!r}) vectors")
        metadata = item[2] if len(item) == 3 else None
        checked = None if metadata is None else check_metadata(metadata, f"items[{i}] ({subject_id!r}) metadata")
        if replace and subject_id in seen:
            raise ValidationError(f"items[{i}]: subject {subject_id!r} appears twice in one replacing add")
        seen.add(subject_id)
        out.append((subject_id, vectors, checked))
    return out


def check_add_many(
    tenant: Any, items: Any, dim: int, replace: Any
) -> list[tuple[str, np.ndarray, dict[str, str] | None]]:
    """Validate all arguments of :meth:`TemplateStore.add_many`; returns the checked items."""
    check_id(tenant, "tenant")
    if not isinstance(replace, bool):
        raise ValidationError(f"replace must be a bool, got {replace!r}")
    return check_items(items, dim, replace)


# --------------------------------------------------------------------------------------------------- interface


class TemplateStore(abc.ABC):
    """Durable, tenant-isolated storage and search of (protected) templates.

    Implementations are thread-safe. ``dim`` and ``metric`` are fixed for the life of a store; scores follow
    :func:`advface.encoders.base.pair_scores` (higher = more similar: cosine similarity, or minus the Euclidean
    distance). Every method validates its inputs first and changes nothing when it raises.
    """

    dim: int
    metric: StoreMetric

    def add(
        self,
        tenant: str,
        subject_id: str,
        vectors: np.ndarray,
        metadata: Mapping[str, str] | None = None,
        *,
        replace: bool = False,
    ) -> list[str]:
        """Enrol ``vectors`` (``N x D``, or one ``D`` vector) for a subject; returns their new template ids.

        A new subject is created with ``metadata``. For an existing subject the templates are appended and
        ``metadata`` is merged into its metadata (its keys win), unless ``replace`` is true: then its old templates
        are removed and its metadata replaced (None: emptied), in the same transaction. Atomic: all or nothing.
        """
        return self.add_many(tenant, [(subject_id, vectors, metadata)], replace=replace)[0]

    @abc.abstractmethod
    def add_many(
        self,
        tenant: str,
        items: Sequence[tuple[str, np.ndarray, Mapping[str, str] | None]],
        *,
        replace: bool = False,
    ) -> list[list[str]]:
        """:meth:`add` for several ``(subject_id, vectors, metadata)`` items in one transaction (all or nothing);
        returns the template ids of each item. With ``replace`` a subject may appear only once."""

    @abc.abstractmethod
    def delete_subject(self, tenant: str, subject_id: str) -> int:
        """Remove a subject and all its templates; returns how many templates were removed (NotFoundError)."""

    @abc.abstractmethod
    def delete_template(self, tenant: str, template_id: str) -> str:
        """Remove one template; returns its subject id (NotFoundError). Removing a subject's last template
        removes the subject."""

    @abc.abstractmethod
    def get_subject(self, tenant: str, subject_id: str) -> SubjectInfo:
        """The subject's metadata, template ids and creation time (NotFoundError)."""

    @abc.abstractmethod
    def list_subjects(self, tenant: str, page_size: int = 100, page_token: str = "") -> tuple[list[SubjectInfo], str]:
        """One page of the tenant's subjects, ordered by subject id (stores that seal subject ids at rest: by their
        keyed hash, a fixed order), and the token of the next page (``""`` at the end). ``page_size`` is in
        ``[1, 1000]``."""

    @abc.abstractmethod
    def subject_vectors(self, tenant: str, subject_id: str) -> np.ndarray:
        """The subject's templates as an ``N x D`` float32 array, in the order of its template ids (for 1:1
        verification; NotFoundError)."""

    @abc.abstractmethod
    def search(self, tenant: str, probe: np.ndarray, k: int) -> list[Match]:
        """The ``k`` subjects of ``tenant`` most similar to ``probe`` (a ``D`` vector), best first, each with its
        best template; fewer when the tenant has fewer subjects."""

    @abc.abstractmethod
    def count(self, tenant: str | None = None, *, subjects: bool = False) -> int:
        """Number of templates (or of subjects, with ``subjects=True``) in ``tenant``, or in the whole store."""

    @abc.abstractmethod
    def tenants(self) -> list[str]:
        """Tenants that hold at least one subject, sorted."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release files and memory; later calls raise ClosedError. Calling it twice is harmless."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
