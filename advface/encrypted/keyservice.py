"""The key service's core: bound score ciphertexts in, decisions out (no gRPC here; see docs/encrypted-matching.md).

It holds the secret key and the decision policy (threshold, ``top_k`` limit, whether rounded scores are released):
the sidecar cannot choose the threshold, so it cannot binary-search a score through the key service. Each request
goes through, in order: the rate limit of its operation, the key-pair fingerprint, the MAC
(:func:`~advface.encrypted.binding.check_mac`), freshness and replay (:class:`~advface.encrypted.binding.ReplayGuard`;
after the MAC, so only the sidecar can spend a nonce), the structure of every ciphertext (this key pair, data
level, exactly the score scale -- a stored template column has the template scale and is refused), and the range of
every decrypted slot (a score of unit or ``max_norm`` vectors; a scaled or shifted forgery falls outside). Only then
are decisions computed. Every request, refused or not, is written to the audit log without ids, scores or probe
data.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from advface.encrypted._seal import from_bytes, require, to_bytes
from advface.encrypted.audit import AuditLog
from advface.encrypted.binding import BindingKeyring, BoundRequest, ReplayGuard
from advface.encrypted.errors import RateLimitedError, RefusedError
from advface.encrypted.keys import PublicKeys, SecretKeys
from advface.encrypted.ratelimit import RateLimiter
from advface.errors import ConfigError, IntegrityError

__all__ = ["Decision", "DecisionPolicy", "KeyServiceCore", "VerifyDecision"]

#: most slots one request may ask about (a 1M gallery plus room)
MAX_SLOTS = 2_000_000
#: least seconds between two re-readings of the binding keys prompted by requests failing their MAC
RELOAD_INTERVAL_S = 2.0


def _check_keyring(keyring: BindingKeyring) -> None:
    if len(keyring.current) < 32 or (keyring.previous is not None and len(keyring.previous) < 32):
        raise ConfigError("the binding key must be at least 32 bytes")


@dataclass(frozen=True)
class DecisionPolicy:
    """What the key service releases: decisions at ``threshold`` (on the store's score: cosine similarity, or
    minus the Euclidean distance), at most ``top_k_max`` candidates, scores rounded to ``score_decimals`` or none."""

    metric: Literal["cosine", "euclidean"]
    threshold: float
    top_k_max: int = 10
    score_decimals: int | None = None
    range_slack: float = 1e-3

    def __post_init__(self) -> None:
        if self.metric not in ("cosine", "euclidean"):
            raise ConfigError(f"key service metric must be cosine or euclidean, got {self.metric!r}")
        if not math.isfinite(self.threshold):
            raise ConfigError("key service threshold must be a finite number")
        if not 1 <= self.top_k_max <= 1000:
            raise ConfigError(f"key service top_k_max must be in [1, 1000], got {self.top_k_max}")
        if self.score_decimals is not None and not 0 <= self.score_decimals <= 6:
            raise ConfigError(f"key service score_decimals must be in [0, 6] or None, got {self.score_decimals}")


@dataclass(frozen=True)
class Decision:
    """A released slot: which item of the request and which slot; the score only if the policy releases it."""

    item: int
    slot: int
    score: float | None = None


@dataclass(frozen=True)
class VerifyDecision:
    """Verify's answer: the match bit, and the best slot only when it matched."""

    match: bool
    best: Decision | None = None


class KeyServiceCore:
    """Decrypts bound score results and returns decisions; thread-safe."""

    def __init__(
        self,
        keys: SecretKeys,
        binding_key: bytes | BindingKeyring,
        policy: DecisionPolicy,
        *,
        limiter: RateLimiter | None = None,
        audit: AuditLog | None = None,
        window_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        lock_after_refusals: int | None = None,
        next_keys: PublicKeys | SecretKeys | None = None,
        reload_binding: Callable[[], BindingKeyring] | None = None,
    ) -> None:
        keyring = binding_key if isinstance(binding_key, BindingKeyring) else BindingKeyring(bytes(binding_key))
        _check_keyring(keyring)
        self.seal = require()
        self.keys = keys
        self.params = keys.public.params
        self.policy = policy
        self.limiter = limiter
        self.audit = audit or AuditLog(None)
        self._keyring = keyring
        #: re-reads the binding keys (e.g. from the key-service folder after `rotate-binding start`): called when a
        #: request fails its MAC, at most every RELOAD_INTERVAL_S, so a running service picks up a rotation
        self._reload_binding = reload_binding
        self._reloaded_at = -math.inf
        self._clock = clock
        self._replay = ReplayGuard(window_s, clock)
        if lock_after_refusals is not None and lock_after_refusals < 1:
            raise ConfigError(f"lock_after_refusals must be >= 1 or None, got {lock_after_refusals}")
        self.lock_after_refusals = lock_after_refusals
        self.forged_requests = 0
        self.locked = False
        self._context = keys.public.context
        self._parms_id = self._context.first_parms_id()
        self._decryptor = keys.decryptor()
        self._encryptor = keys.public.encryptor()
        next_public = next_keys.public if isinstance(next_keys, SecretKeys) else next_keys
        if next_public is not None and next_public.params != self.params:
            raise ConfigError("the next key pair of a rotation must have the same CKKS parameters")
        #: the key pair a rotation re-encrypts into (public key only; None: ``rotate`` is refused)
        self.next_keys = next_public
        self._next_encryptor = next_public.encryptor() if next_public is not None else None
        #: with the next key pair's secret key too, requests under it are decided as well (a store rotated while
        #: its sidecar serves is matched under the new key pair right after its swap, before this service restarts)
        self._next_decryptor = next_keys.decryptor() if isinstance(next_keys, SecretKeys) else None
        self._encoder = self.seal.CKKSEncoder(self._context)
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        """The key pair this service decrypts for (the sidecar compares it with its own at start)."""
        return self.keys.fingerprint

    def holds(self, fingerprint: str) -> bool:
        """Whether this service decides requests under key pair ``fingerprint``: its own, or the next key pair of a
        rotation when it was given that pair's secret key."""
        if fingerprint == self.fingerprint:
            return True
        following = self.next_keys
        return self._next_decryptor is not None and following is not None and fingerprint == following.fingerprint

    # ------------------------------------------------------------------ operations

    def verify(self, request: BoundRequest) -> VerifyDecision:
        """The match bit of the best requested slot against the threshold."""

        def run() -> tuple[VerifyDecision, int]:
            values = self._open(request, "verify", self.params.score_scale)
            best: tuple[float, int, int] | None = None
            for i, (item, v) in enumerate(zip(request.items, values)):
                for slot in item.slots:
                    score = self._score(float(v[slot]))
                    if best is None or score > best[0]:
                        best = (score, i, slot)
            assert best is not None
            if best[0] >= self.policy.threshold:
                return VerifyDecision(True, Decision(best[1], best[2], self._release(best[0]))), 1
            return VerifyDecision(False), 0

        return self._audited(request, "verify", run)

    def identify(self, request: BoundRequest) -> list[Decision]:
        """The best slot of each group (subject), those at or above the threshold, best first, at most ``top_k``."""

        def run() -> tuple[list[Decision], int]:
            if not 1 <= request.top_k <= self.policy.top_k_max:
                raise RefusedError(f"top_k {request.top_k} is outside [1, {self.policy.top_k_max}]")
            values = self._open(request, "identify", self.params.score_scale)
            best: dict[Any, tuple[float, int, int]] = {}
            for i, (item, v) in enumerate(zip(request.items, values)):
                slots = np.asarray(item.slots, np.int64)
                scores = self._scores(v[slots])
                keep = np.flatnonzero(scores >= self.policy.threshold)
                for j in keep:
                    group = item.groups[j] if item.groups else (i, int(slots[j]))
                    current = best.get(group)
                    if current is None or scores[j] > current[0]:
                        best[group] = (float(scores[j]), i, int(slots[j]))
            ranked = sorted(best.values(), key=lambda t: (-t[0], t[1], t[2]))[: request.top_k]
            out = [Decision(i, slot, self._release(score)) for score, i, slot in ranked]
            return out, len(out)

        return self._audited(request, "identify", run)

    def refresh(self, request: BoundRequest) -> list[bytes]:
        """Re-encrypt masked template columns with the requested slots zeroed (erasure of removed templates).
        Returns ciphertexts only: nothing decrypted leaves the key service."""

        def run() -> tuple[list[bytes], int]:
            under_next = self._next_encryptor is not None and request.fingerprint != self.fingerprint
            return self._reencrypt(request, "refresh", self._next_encryptor if under_next else self._encryptor)

        return self._audited(request, "refresh", run)

    def rotate(self, request: BoundRequest) -> list[bytes]:
        """Like :meth:`refresh`, but re-encrypted under the next key pair's public key (``next_keys``; the request's
        ``target`` must name it): rotation of stored templates to a new key pair, block by block. Returns
        ciphertexts only."""

        def run() -> tuple[list[bytes], int]:
            if self.next_keys is None or self._next_encryptor is None:
                raise RefusedError("this key service has no next key pair to rotate to")
            if getattr(request, "fingerprint", None) != self.fingerprint:
                raise RefusedError("a rotation starts from this service's current key pair")
            if request.target != self.next_keys.fingerprint:
                raise RefusedError(
                    f"rotation to key pair {request.target!r}; this service rotates to {self.next_keys.fingerprint}"
                )
            return self._reencrypt(request, "rotate", self._next_encryptor)

        return self._audited(request, "rotate", run)

    def _reencrypt(self, request: BoundRequest, op: str, encryptor: Any) -> tuple[list[bytes], int]:
        """Masked template columns decrypted, the requested slots zeroed, encrypted again with ``encryptor``."""
        values = self._open(request, op, self.params.template_scale, check_range=False)
        out = []
        for item, v in zip(request.items, values):
            v = v.copy()
            v[list(item.slots)] = 0.0
            plain = self.seal.Plaintext()
            self._encoder.encode(v.tolist(), self._parms_id, self.params.template_scale, plain)
            cipher = self.seal.Ciphertext(self._context)
            encryptor.encrypt(plain, cipher)
            out.append(to_bytes(cipher))
        return out, 0

    # ------------------------------------------------------------------ checks

    def _audited(self, request: BoundRequest, op: str, run: Callable[[], tuple[Any, int]]) -> Any:
        items = getattr(request, "items", ()) or ()
        tenant = str(getattr(request, "tenant", ""))[:128]
        slots = sum(len(getattr(i, "slots", ())) for i in items)
        request_id = str(getattr(request, "mac", ""))

        def record(outcome: str, **extra: Any) -> None:
            self.audit.record(op, outcome, tenant=tenant, items=len(items), slots=slots, **extra)

        try:
            if self.limiter is not None:
                self.limiter.take(op)
            result, released = run()
        except RateLimitedError:
            record("rate_limited")
            raise
        except RefusedError as exc:
            record("refused", reason=str(exc), request_id=request_id)
            raise
        except Exception as exc:
            record("error", reason=type(exc).__name__, request_id=request_id)
            raise
        record("ok", released=released, request_id=request_id)
        return result

    def _open(self, request: BoundRequest, op: str, scale: float, *, check_range: bool = True) -> list[np.ndarray]:
        """The decrypted slot values of each item, after every check of the module docs. A request that carries
        the sidecar's MAC but is not a score result counts as forged: after ``lock_after_refusals`` of them the
        service locks (refuses everything until restarted): only a holder of the binding key can trigger it."""
        if self.locked:
            raise RefusedError("key service locked after forged requests; investigate the sidecar, then restart")
        if not isinstance(request, BoundRequest) or request.op != op:
            raise RefusedError(f"not a {op} request")
        if not self.holds(request.fingerprint):
            raise RefusedError(f"request is for key pair {request.fingerprint!r}, this service has {self.fingerprint}")
        self._check_binding(request)
        self._replay.check(request)  # after the MAC: only the sidecar can spend a nonce
        try:
            return self._decrypt_checked(request, op, scale, check_range)
        except RefusedError:
            with self._lock:
                self.forged_requests += 1
                if self.lock_after_refusals is not None and self.forged_requests >= self.lock_after_refusals:
                    self.locked = True
            raise

    @property
    def keyring(self) -> BindingKeyring:
        """The binding keys accepted now."""
        return self._keyring

    def _check_binding(self, request: BoundRequest) -> None:
        """The MAC under the accepted binding keys. A request that fails, or passes under the previous key only,
        makes the service re-read its keys first (at most every RELOAD_INTERVAL_S): a rotation started, or its
        grace period ended early, while the service runs."""
        now = self._clock()
        try:
            if not self._keyring.check(request, now):
                return
        except RefusedError:
            if not self._may_reload(now):
                raise
        else:
            if not self._may_reload(now):
                return
        assert self._reload_binding is not None
        keyring = self._reload_binding()
        _check_keyring(keyring)
        with self._lock:
            self._keyring = keyring
        keyring.check(request, now)

    def _may_reload(self, now: float) -> bool:
        with self._lock:
            if self._reload_binding is None or now - self._reloaded_at < RELOAD_INTERVAL_S:
                return False
            self._reloaded_at = now
            return True

    def _decrypt_checked(self, request: BoundRequest, op: str, scale: float, check_range: bool) -> list[np.ndarray]:
        """Slots, ciphertext structure and range of a bound request; the decrypted values."""
        if not request.items:
            raise RefusedError("request has no items")
        total = 0
        for i, item in enumerate(request.items):
            slots = item.slots
            if not slots and op not in ("refresh", "rotate"):
                raise RefusedError(f"item {i} asks about no slot")
            if any(not 0 <= s < self.params.slots for s in slots) or len(set(slots)) != len(slots):
                raise RefusedError(f"item {i}: slots out of range or repeated")
            if item.groups and len(item.groups) != len(slots):
                raise RefusedError(f"item {i}: {len(item.groups)} groups for {len(slots)} slots")
            total += len(slots)
        if total > MAX_SLOTS:
            raise RefusedError(f"request asks about {total} slots; at most {MAX_SLOTS}")
        values = []
        context, decryptor = self._context, self._decryptor
        if request.fingerprint != self.fingerprint and self.next_keys is not None and self._next_decryptor is not None:
            context, decryptor = self.next_keys.context, self._next_decryptor  # checked by holds()
        for i, item in enumerate(request.items):
            try:
                cipher = from_bytes(self.seal.Ciphertext, context, item.ciphertext, f"item {i}")
            except IntegrityError as exc:
                raise RefusedError(str(exc)) from None
            if cipher.size() != 2 or cipher.parms_id() != self._parms_id or cipher.scale != scale:
                raise RefusedError(f"item {i} is not a {op} ciphertext of this key pair (size, level or scale)")
            plain = self.seal.Plaintext()
            decryptor.decrypt(cipher, plain)
            v = np.asarray(self._encoder.decode_double(plain), np.float64)
            if check_range:
                low, high = self._value_range()
                if not np.isfinite(v).all() or v.min() < low or v.max() > high:
                    raise RefusedError(f"item {i} holds values outside the range of scores: not a score result")
            values.append(v)
        return values

    def _value_range(self) -> tuple[float, float]:
        slack = self.policy.range_slack
        if self.policy.metric == "cosine":
            return -1.0 - slack, 1.0 + slack
        return -self.params.value_bound - slack, slack

    def _scores(self, values: np.ndarray) -> np.ndarray:
        if self.policy.metric == "cosine":
            return values
        return -np.sqrt(np.maximum(0.0, -values))

    def _score(self, value: float) -> float:
        return float(self._scores(np.array([value]))[0])

    def _release(self, score: float) -> float | None:
        return None if self.policy.score_decimals is None else round(score, self.policy.score_decimals)
