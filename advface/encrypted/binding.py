"""Requests from the sidecar to the key service, bound to the sidecar by HMAC-SHA256 and fresh once.

A request carries the operation, tenant, the key pair's fingerprint, a random 128-bit nonce, the time it was made,
``top_k`` and its items (each: a score ciphertext and the slots asked about, with opaque group numbers for Identify).
The MAC covers all of it, ciphertexts by their SHA-256, under the *binding key* that only the sidecar and the key
service hold. The key service (see :mod:`advface.encrypted.keyservice`) accepts a request only when the MAC is
right, it is not older (or newer) than its window, and its nonce was not seen before in that window.

What the binding stops: a caller who can reach the key service (or holds its transport token) but is not the
sidecar -- e.g. someone with a copy of the database, or a replayed capture -- gets nothing decrypted, and nobody can
change a bound request's slots, ``top_k`` or ciphertexts in transit. What it cannot stop: whoever runs code *as the
sidecar* (and so holds the binding key) can bind any ciphertext; against that the key service keeps the threshold,
checks that ciphertexts have the structure and range of score results, releases decisions only, and rate-limits
(docs/encrypted-matching.md measures what that leaves).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from advface.encrypted.errors import RefusedError

__all__ = [
    "OPS",
    "BindingKeyring",
    "BoundRequest",
    "ReplayGuard",
    "RequestItem",
    "bind",
    "binding_fingerprint",
    "check_mac",
]

OPS = ("verify", "identify", "refresh", "rotate")
_DOMAIN = b"advface.keyservice.request.v1\x00"


@dataclass(frozen=True)
class RequestItem:
    """One ciphertext and the slots the request is about (``groups``: Identify's per-slot subject numbers)."""

    ciphertext: bytes
    slots: tuple[int, ...]
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class BoundRequest:
    """A request as the key service receives it."""

    op: str
    tenant: str
    fingerprint: str
    nonce: str
    issued_ms: int
    top_k: int
    items: tuple[RequestItem, ...]
    mac: str
    #: ``rotate`` only: the fingerprint of the key pair to re-encrypt under (MAC'd; empty otherwise)
    target: str = ""


def _canonical(
    op: str,
    tenant: str,
    fingerprint: str,
    nonce: str,
    issued_ms: int,
    top_k: int,
    items: Sequence[RequestItem],
    target: str = "",
) -> bytes:
    doc: dict[str, object] = {
        "op": op,
        "tenant": tenant,
        "fingerprint": fingerprint,
        "nonce": nonce,
        "issued_ms": int(issued_ms),
        "top_k": int(top_k),
        "items": [
            {
                "sha256": hashlib.sha256(item.ciphertext).hexdigest(),
                "slots": [int(s) for s in item.slots],
                "groups": [int(g) for g in item.groups],
            }
            for item in items
        ],
    }
    if target:  # absent from the other operations' documents (their MACs are unchanged)
        doc["target"] = target
    return _DOMAIN + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _mac(key: bytes, message: bytes) -> str:
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def bind(
    key: bytes,
    op: str,
    tenant: str,
    fingerprint: str,
    items: Sequence[RequestItem],
    *,
    top_k: int = 1,
    clock: Callable[[], float] = time.time,
    target: str = "",
) -> BoundRequest:
    """A fresh request (new nonce, current time) MAC'd under the binding ``key`` (``target``: ``rotate``'s new key
    pair)."""
    if op not in OPS:
        raise ValueError(f"unknown key-service operation {op!r}")
    nonce = secrets.token_hex(16)
    issued_ms = int(clock() * 1000)
    items = tuple(items)
    mac = _mac(key, _canonical(op, tenant, fingerprint, nonce, issued_ms, top_k, items, target))
    return BoundRequest(op, tenant, fingerprint, nonce, issued_ms, int(top_k), items, mac, target)


def check_mac(key: bytes, request: BoundRequest) -> None:
    """RefusedError unless ``request`` was bound under ``key`` and not changed since."""
    try:
        expected = _mac(
            key,
            _canonical(
                request.op,
                request.tenant,
                request.fingerprint,
                request.nonce,
                request.issued_ms,
                request.top_k,
                request.items,
                request.target,
            ),
        )
    except (TypeError, ValueError, AttributeError):
        raise RefusedError("malformed request") from None
    if not isinstance(request.mac, str) or not hmac.compare_digest(expected, request.mac):
        raise RefusedError("request is not bound by the sidecar (MAC mismatch)")


def binding_fingerprint(key: bytes) -> str:
    """A name for a binding key that reveals nothing of it (32 hex digits; recorded in stores and rotation files)."""
    return hmac.new(key, b"advface binding key fingerprint", hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class BindingKeyring:
    """The binding keys a key service accepts: the current one, and during a rotation's grace period the previous
    one until ``previous_until`` (seconds since the epoch)."""

    current: bytes
    previous: bytes | None = None
    previous_until: float = 0.0

    def check(self, request: BoundRequest, now: float) -> bool:
        """RefusedError unless ``request`` is bound under the current key, or under the previous one before the end
        of its grace period; whether it was the previous one."""
        try:
            check_mac(self.current, request)
            return False
        except RefusedError:
            if self.previous is None:
                raise
        try:
            check_mac(self.previous, request)
        except RefusedError:
            raise RefusedError("request is not bound by the sidecar (MAC mismatch)") from None
        if now >= self.previous_until:
            raise RefusedError("request is bound under the previous binding key, whose grace period has ended")
        return True


class ReplayGuard:
    """Refuses requests made more than ``window_s`` from now, and nonces seen within the window."""

    def __init__(self, window_s: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self.window_s = float(window_s)
        self.clock = clock
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, request: BoundRequest) -> None:
        now = self.clock()
        if abs(now - request.issued_ms / 1000.0) > self.window_s:
            raise RefusedError(f"request is stale or from the future (more than {self.window_s:g} s off)")
        with self._lock:
            for nonce in [n for n, expiry in self._seen.items() if expiry < now]:
                del self._seen[nonce]
            if request.nonce in self._seen:
                raise RefusedError("request was already used (replayed nonce)")
            self._seen[request.nonce] = now + 2 * self.window_s
