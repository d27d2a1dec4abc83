"""Subject ids and metadata at rest: plain, or sealed under the store's encryption key.

A store keeps, per subject, an id column (looked up by equality, ordered for paging) and a metadata text column.
:class:`PlainNames` stores the caller's subject id and ``json.dumps(metadata)`` as they are. :class:`SealedNames`
(stores created encrypted) stores instead:

- the id column: ``HMAC-SHA256(names key, tenant NUL subject id)``, first 16 bytes as 32 hex digits: equal ids
  still find their row, but the column reveals neither the id nor its order;
- the metadata column: ``{"sealed": base64(AES-256-GCM(JSON {"id": subject id, "metadata": {...}}))}``, bound to
  its tenant and stored id (associated data), so a blob moved to another row fails to open.

The *names key* (32 random bytes) is made when the store is created and kept in the store's ``meta`` table wrapped
(encrypted) under the store's encryption key (:func:`wrap_names_key`), so it survives key rotation: rotation re-wraps
it and re-encrypts the metadata blobs, and the stored ids never change. A thief of the database without the
encryption key gets keyed hashes and ciphertext only.

A store that held subjects before it was encrypted starts with plain ids; the stores' ``rotate`` (``advface
rotate-key``) then seals them after the templates are encrypted (:func:`begin_sealing`, :func:`seal_plain_row`):
``meta`` records ``subject_names = sealing``, the wrapped names key and the last subject row sealed
(``names_sealed_upto``); each batch of subject rows (ids, metadata, and their templates' ciphertexts, whose
associated data names the stored id) is one transaction that also records its progress, so a crash leaves every row
readable and running the pass again (or opening the store with its key) resumes where it stopped.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from advface.crypto import KEY_BYTES, TemplateCipher, blob_key_id, template_aad
from advface.errors import ConfigError, IntegrityError

#: ``meta`` key naming how subject ids are kept: ``sealed``, ``sealing`` (plain ids being sealed; absent: plain).
NAMES_META = "subject_names"
#: ``meta`` key of the wrapped names key (base64 of the cipher's blob).
NAMES_KEY_META = "names_key"
#: ``meta`` key of the last subject row (row id) sealed by an unfinished sealing pass.
NAMES_PROGRESS_META = "names_sealed_upto"
SEALED = "sealed"
SEALING = "sealing"
#: Subject rows per transaction when a store resumes an interrupted sealing pass at open.
RESUME_BATCH = 1000
#: Logged (``%s``: the store) when an encrypted store keeps plain subject ids (encrypted by an older advface).
PLAIN_NAMES_WARNING = (
    "template store %s is encrypted but keeps its subject ids and metadata in plain text (encrypted before advface "
    "sealed them); seal them with `advface rotate-key` (the current key as --new-key-file re-encrypts nothing)"
)
_WRAP_AAD = b"advface-names-key-v1"
_DOMAIN = b"advface-subject-id-v1\x00"


class SubjectNames(Protocol):
    """How a store writes and reads a subject's id and metadata columns."""

    sealed: bool

    def stored_id(self, tenant: str, subject_id: str) -> str:
        """The id column's value for ``subject_id``."""

    def pack(self, tenant: str, stored_id: str, subject_id: str, metadata: dict[str, str]) -> str:
        """The metadata column's text for a subject."""

    def unpack(self, tenant: str, stored_id: str, text: str) -> tuple[str, dict[str, str]]:
        """``(subject id, metadata)`` from a row's id and metadata columns."""


class PlainNames:
    """Subject ids and metadata stored as given (plaintext stores, and stores encrypted after they held subjects)."""

    sealed = False

    def stored_id(self, tenant: str, subject_id: str) -> str:
        return subject_id

    def pack(self, tenant: str, stored_id: str, subject_id: str, metadata: dict[str, str]) -> str:
        return json.dumps(metadata, sort_keys=True)

    def unpack(self, tenant: str, stored_id: str, text: str) -> tuple[str, dict[str, str]]:
        return stored_id, json.loads(text)


class SealedNames:
    """Keyed-hash ids and encrypted metadata (see module docs); ``cipher`` may be a keyring during rotation."""

    sealed = True

    def __init__(self, cipher: TemplateCipher, names_key: bytes) -> None:
        if len(names_key) != KEY_BYTES:
            raise ValueError("the names key must be 32 bytes")
        self.cipher = cipher
        self.key = names_key

    def stored_id(self, tenant: str, subject_id: str) -> str:
        message = _DOMAIN + tenant.encode("utf-8") + b"\x00" + subject_id.encode("utf-8")
        return hmac.new(self.key, message, hashlib.sha256).digest()[:16].hex()

    def pack(self, tenant: str, stored_id: str, subject_id: str, metadata: dict[str, str]) -> str:
        plain = json.dumps({"id": subject_id, "metadata": metadata}, sort_keys=True).encode("utf-8")
        blob = self.cipher.encrypt(plain, _row_aad(tenant, stored_id))
        return json.dumps({SEALED: base64.b64encode(blob).decode("ascii")})

    def unpack(self, tenant: str, stored_id: str, text: str) -> tuple[str, dict[str, str]]:
        plain = self.cipher.decrypt(sealed_blob(text), _row_aad(tenant, stored_id))
        value = json.loads(plain)
        return str(value["id"]), dict(value["metadata"])

    def key_id_of(self, text: str) -> str:
        """The id of the key a sealed metadata column is under."""
        return blob_key_id(sealed_blob(text))

    def reseal(self, tenant: str, stored_id: str, text: str, cipher: TemplateCipher) -> str:
        """The metadata column re-encrypted under ``cipher``'s primary key (key rotation)."""
        plain = self.cipher.decrypt(sealed_blob(text), _row_aad(tenant, stored_id))
        return json.dumps({SEALED: base64.b64encode(cipher.encrypt(plain, _row_aad(tenant, stored_id))).decode()})

    def reseal_rows(self, rows: Iterable[Sequence[Any]], cipher: TemplateCipher) -> list[tuple[str, Any]]:
        """``(new metadata column, row key)`` for each subject row ``(row key, tenant, stored id, metadata column)``
        not yet under ``cipher``'s primary key, re-encrypted under it (key rotation; rows already under it, e.g.
        done by an interrupted pass, are left out)."""
        return [
            (self.reseal(tenant, stored, text, cipher), key)
            for key, tenant, stored, text in rows
            if self.key_id_of(text) != cipher.key_id
        ]


def sealed_blob(text: str) -> bytes:
    """The ciphertext inside a sealed metadata column (IntegrityError when it is not one)."""
    try:
        return base64.b64decode(json.loads(text)[SEALED], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise IntegrityError("a sealed subject row is malformed") from None


def _row_aad(tenant: str, stored_id: str) -> bytes:
    return b"advface-subject-v1\x00" + tenant.encode("utf-8") + b"\x00" + stored_id.encode("ascii")


def new_names_key() -> bytes:
    """A fresh names key (32 random bytes)."""
    return secrets.token_bytes(KEY_BYTES)


def wrap_names_key(cipher: TemplateCipher, names_key: bytes) -> str:
    """``names_key`` encrypted under ``cipher``'s primary key, as text for the ``meta`` table."""
    return base64.b64encode(cipher.encrypt(names_key, _WRAP_AAD)).decode("ascii")


def unwrap_names_key(cipher: TemplateCipher, wrapped: str) -> bytes:
    """The names key from :func:`wrap_names_key`'s text (IntegrityError for a wrong key or tampering)."""
    try:
        blob = base64.b64decode(wrapped, validate=True)
    except (ValueError, binascii.Error):
        raise IntegrityError("the store's wrapped names key is malformed") from None
    return cipher.decrypt(blob, _WRAP_AAD)


def new_sealed_names(cipher: TemplateCipher) -> tuple[SealedNames, dict[str, str]]:
    """Sealed names for a new store: a fresh names key, and the ``meta`` values recording it (wrapped under
    ``cipher``)."""
    names_key = new_names_key()
    return SealedNames(cipher, names_key), {NAMES_META: SEALED, NAMES_KEY_META: wrap_names_key(cipher, names_key)}


def names_from_meta(meta: dict[str, str], cipher: TemplateCipher, where: str) -> PlainNames | SealedNames:
    """How a store keeps subject ids, from its ``meta`` values: sealed (its names key unwrapped with ``cipher``) or
    plain. ConfigError when the names key is missing or a sealing pass is unfinished (the store resumes it first),
    IntegrityError when the names key cannot be opened."""
    if meta.get(NAMES_META) == SEALING:
        raise ConfigError(
            f"template store {where}: sealing its subject ids is unfinished; run `advface rotate-key` again"
        )
    if meta.get(NAMES_META) != SEALED:
        return PlainNames()
    wrapped = meta.get(NAMES_KEY_META)
    if not wrapped:
        raise ConfigError(f"template store {where} seals subject ids but its names key is missing")
    try:
        return SealedNames(cipher, unwrap_names_key(cipher, wrapped))
    except IntegrityError as exc:
        raise IntegrityError(f"template store {where}: its names key cannot be opened ({exc})") from None


def begin_sealing(
    meta: dict[str, str], cipher: TemplateCipher, where: str
) -> tuple[SealedNames, int, dict[str, str | None]]:
    """Start (or resume) sealing the plain subject ids of an encrypted store: ``(sealed names, last subject row
    already sealed, meta values to set)``. A new pass makes a names key (wrapped under ``cipher``); an unfinished one
    (``meta``: ``sealing``) resumes with its recorded key and progress."""
    if meta.get(NAMES_META) == SEALING:
        wrapped = meta.get(NAMES_KEY_META)
        if not wrapped:
            raise ConfigError(f"template store {where} is sealing subject ids but its names key is missing")
        try:
            upto = int(meta.get(NAMES_PROGRESS_META, "0"))
        except ValueError:
            raise ConfigError(f"template store {where}: unreadable {NAMES_PROGRESS_META!r} in meta") from None
        return SealedNames(cipher, unwrap_names_key(cipher, wrapped)), upto, {}
    names_key = new_names_key()
    values: dict[str, str | None] = {
        NAMES_META: SEALING,
        NAMES_KEY_META: wrap_names_key(cipher, names_key),
        NAMES_PROGRESS_META: "0",
    }
    return SealedNames(cipher, names_key), 0, values


def sealing_done() -> dict[str, str | None]:
    """The ``meta`` values recording a finished sealing pass."""
    return {NAMES_META: SEALED, NAMES_PROGRESS_META: None}


def seal_plain_row(
    names: SealedNames, tenant: str, subject_id: str, metadata_text: str
) -> tuple[str, str, Callable[[bytes, str], bytes]]:
    """Seal one plain subject row: ``(stored id, sealed metadata column, rebind)`` where ``rebind(blob,
    template_id)`` re-encrypts one of its templates' ciphertexts for the stored id (the template AAD names it)."""
    stored = names.stored_id(tenant, subject_id)
    packed = names.pack(tenant, stored, subject_id, PlainNames().unpack(tenant, subject_id, metadata_text)[1])

    def rebind(blob: bytes, template_id: str) -> bytes:
        plain = names.cipher.decrypt(bytes(blob), template_aad(tenant, template_id, subject_id))
        return names.cipher.encrypt(plain, template_aad(tenant, template_id, stored))

    return stored, packed, rebind
