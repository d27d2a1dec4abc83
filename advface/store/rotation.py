"""Pieces shared by the stores' key rotation (``rotate``) and template re-issue (``transform_vectors``).

Both :class:`~advface.store.sqlite_faiss.SQLiteFaissStore` and :class:`~advface.store.postgres.PostgresStore` walk
their template rows in row-id order, one transaction per batch, and record their progress durably in the same
transaction (the store's ``meta`` table); the SQL differs, the rules below do not. Both inherit
:class:`TemplateReissue` (``transform_vectors`` itself) and check keys at open and rotation arguments here.
"""

from __future__ import annotations

import abc
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from advface.crypto import TemplateCipher
from advface.errors import ConfigError, IntegrityError, ValidationError
from advface.store.base import check_positive_int

R = TypeVar("R", bound=Sequence[Any])

log = logging.getLogger(__name__)

#: Most rows per rotation / re-issue transaction.
MAX_BATCH = 1_000_000


def check_batch_size(batch_size: Any) -> int:
    """``batch_size`` as an int in ``[1, MAX_BATCH]`` (ValidationError otherwise)."""
    return check_positive_int(batch_size, "batch_size", MAX_BATCH)


def check_rotation(new_cipher: Any, batch_size: Any, current: Any, where: str) -> tuple[int, TemplateCipher]:
    """Check the arguments of a store's ``rotate``: ``new_cipher`` a TemplateCipher, the store at ``where`` opened
    with a TemplateCipher keyring (``current``). Returns ``batch_size`` checked and ``current``. ConfigError for the
    ciphers (the operator's keys), ValidationError for ``batch_size``."""
    if not isinstance(new_cipher, TemplateCipher):
        raise ConfigError(f"new_cipher must be a TemplateCipher, got {type(new_cipher).__name__}")
    batch_size = check_batch_size(batch_size)
    if current is None:
        raise ConfigError(
            f"template store {where} is not encrypted; open it with a cipher and migrate_plaintext=True to encrypt it"
        )
    if not isinstance(current, TemplateCipher):
        raise ConfigError("rotate needs the store opened with a TemplateCipher (a keyring)")
    return batch_size, current


def encryption_state(meta: Mapping[str, str], cipher: Any) -> dict[str, object]:
    """A store's ``encryption_info()`` from its ``meta`` table and its cipher (None: not encrypted)."""
    return {
        "encrypted": meta.get("encryption", "none") != "none",
        "key_ids": json.loads(meta.get("key_ids", "[]")),
        "primary_key_id": None if cipher is None else cipher.key_id,
        "rotation": meta.get("rotation"),
        "plaintext_rows": meta.get("plaintext_rows") == "1",
    }


def check_keys_present(
    used: Iterable[str], has_key: Callable[[str], bool], configured: Sequence[str], meta: Mapping[str, str], where: str
) -> None:
    """At open: ConfigError naming the key ids rows are under (``used``) that the configured keyring
    (``configured``, ``has_key``) lacks, with a hint (an unfinished rotation recorded in ``meta``, or a wrong key)."""
    lacking = sorted(k for k in used if not has_key(k))
    if lacking:
        rotation_to = meta.get("rotation")
        hint = (
            f"; a rotation to key {rotation_to} is unfinished: configure both keys (previous_key_files) "
            "and run `advface rotate-key` again"
            if rotation_to
            else "; wrong key?"
        )
        raise ConfigError(
            f"template store {where} holds templates encrypted under key id(s) {', '.join(lacking)}, "
            f"which the configured key(s) {', '.join(configured)} do not include{hint}"
        )


def key_ids_at_open(meta: Mapping[str, str], key_ids: list[str], primary: str, where: str) -> str | None:
    """``meta.key_ids`` to record when a store opens with primary key ``primary``: ``key_ids`` (the keys rows may
    be under) with ``primary`` first if missing (new rows will be written under it); None when unchanged. Logs a
    warning for an unfinished rotation to another key."""
    if primary not in key_ids:
        key_ids = [primary, *key_ids]
    if meta.get("rotation") and meta["rotation"] != primary:
        log.warning("template store %s: a rotation to key %s is unfinished", where, meta["rotation"])
    value = json.dumps(key_ids)
    return None if value == meta.get("key_ids") else value


def row_label(tenant: str, subject_id: str, template_id: str) -> str:
    """How errors name a template row."""
    return f"tenant {tenant!r} subject {subject_id!r} template {template_id!r}"


def check_job_name(job: Any) -> str:
    """``job`` if it is a non-empty string (ValidationError otherwise)."""
    if not isinstance(job, str) or not job:
        raise ValidationError("job must be a non-empty string")
    return job


def reencrypt(ring: Any, blob: bytes, aad: bytes, row: str, where: str) -> bytes:
    """``blob`` decrypted with the keyring ``ring`` and encrypted again under its primary key; an authentication
    failure is an IntegrityError naming ``row`` (tenant, subject, template) of the store ``where``."""
    try:
        raw = ring.decrypt(bytes(blob), aad)
    except IntegrityError as exc:
        raise IntegrityError(f"template store {where}: {row} failed authentication during rotation: {exc}") from None
    return ring.encrypt(raw, aad)


def job_state(job: str, last: int) -> str:
    """The JSON recorded in ``meta.transform_job``: the job and the last row id rewritten."""
    return json.dumps({"job": job, "last": int(last)})


def resume_point(state: str | None, job: str, where: str) -> int | None:
    """The last row id ``job`` rewrote according to ``meta.transform_job`` (``state``), or None when no job is
    recorded (a new job starts after row 0). Another unfinished job: ConfigError."""
    if state is None:
        return None
    recorded = json.loads(state)
    if recorded.get("job") != job:
        raise ConfigError(
            f"template store {where} has an unfinished re-issue job {recorded.get('job')!r}; finish it (same "
            f"command) before starting {job!r}"
        )
    return int(recorded.get("last", 0))


def recorded_job(state: str | None) -> str | None:
    """The job name of ``meta.transform_job`` (None when there is none)."""
    return None if state is None else str(json.loads(state).get("job"))


def check_finish(state: str | None, job: str, where: str) -> None:
    """ConfigError unless the recorded job (if any) is ``job``."""
    if state is not None and json.loads(state).get("job") != job:
        raise ConfigError(f"template store {where}: the unfinished job is not {job!r}")


def group_by_tenant(rows: Sequence[R], tenant_of: Callable[[R], str]) -> dict[str, list[R]]:
    """``rows`` grouped by tenant, in their order (tenants in order of first appearance)."""
    out: dict[str, list[R]] = {}
    for row in rows:
        out.setdefault(tenant_of(row), []).append(row)
    return out


def apply_transform(fn: Callable[[str, np.ndarray], np.ndarray], tenant: str, vectors: np.ndarray) -> np.ndarray:
    """``fn(tenant, vectors)`` as float32, checked: same shape, finite (ConfigError otherwise; nothing written)."""
    out = np.asarray(fn(tenant, vectors), dtype=np.float32)
    if out.shape != vectors.shape or not np.isfinite(out).all():
        raise ConfigError(f"transform gave an unusable result of shape {out.shape} for input {vectors.shape}")
    return out


def merged_key_ids(recorded: Mapping[str, str], primary: str) -> str:
    """``meta.key_ids`` (JSON list) with ``primary`` first: the keys rows may be under while rotating to it."""
    key_ids = [str(k) for k in json.loads(recorded.get("key_ids", "[]"))]
    return json.dumps([primary] + [k for k in key_ids if k != primary])


class TemplateReissue(abc.ABC):
    """:meth:`transform_vectors` (re-issue of every template under a new transform), driven the same way for every
    store; a store supplies its three steps: :meth:`_reissue_start`, :meth:`_reissue_batch`, :meth:`_reissue_end`."""

    def transform_vectors(
        self,
        fn: Callable[[str, np.ndarray], np.ndarray],
        *,
        job: str,
        batch_size: int = 1000,
        progress: bool = False,
    ) -> int:
        """Rewrite every template ``v`` of tenant ``t`` as ``fn(t, V)`` (``N x dim`` -> ``N x dim``, batches of one
        tenant); returns the rows rewritten by this call. Used to re-issue templates under a new keyed transform.

        Rows are rewritten in row-id order, ``batch_size`` per transaction, each transaction also recording
        ``job`` and its last row id in the store's meta (key ``transform_job``), so a crash loses at most the batch
        under way and calling again with the same ``job`` resumes after the last committed row (no row is rewritten
        twice). A different ``job`` while one is unfinished, or an unusable result of ``fn``: ConfigError; a bad
        ``batch_size`` or ``job``: ValidationError. Ids, subjects, metadata and encryption are kept. Call
        ``finish_transform_job`` once the caller has recorded the result elsewhere. What a store adds (locks, other
        replicas): its :meth:`_reissue_batch`.
        """
        batch_size = check_batch_size(batch_size)
        job = check_job_name(job)
        from tqdm.auto import tqdm

        total = self._reissue_start(job)
        done = 0
        with tqdm(total=total, desc="re-issuing templates", unit="tpl", disable=not progress) as bar:
            while n := self._reissue_batch(fn, job, batch_size):
                done += max(n, 0)
                bar.update(max(n, 0))
        self._reissue_end()
        return done

    @abc.abstractmethod
    def _reissue_start(self, job: str) -> int:
        """Record ``job`` (unless it is being resumed: :func:`resume_point`); returns the rows left to rewrite."""

    @abc.abstractmethod
    def _reissue_batch(self, fn: Callable[[str, np.ndarray], np.ndarray], job: str, batch_size: int) -> int:
        """One transaction: the next ``batch_size`` rows after the recorded last one rewritten and the new last one
        recorded; returns the rows rewritten (0: none left; -1: none in this id range, go on)."""

    @abc.abstractmethod
    def _reissue_end(self) -> None:
        """After the last batch (rebuild in-memory indexes...)."""
