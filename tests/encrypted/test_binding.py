from __future__ import annotations

import dataclasses

import pytest

from advface.encrypted.binding import ReplayGuard, RequestItem, bind, check_mac
from advface.encrypted.errors import RefusedError

KEY = b"b" * 32


def _request(clock=lambda: 1000.0):  # noqa: ANN001, ANN202
    items = [RequestItem(b"ciphertext-bytes", (1, 2, 3), (0, 0, 1))]
    return bind(KEY, "identify", "tenant-a", "f" * 32, items, top_k=2, clock=clock)


def test_bound_request_checks() -> None:
    request = _request()
    check_mac(KEY, request)
    assert len(request.nonce) == 32 and request.issued_ms == 1_000_000
    assert _request().nonce != request.nonce


@pytest.mark.parametrize(
    "change",
    [
        {"op": "verify"},
        {"tenant": "tenant-b"},
        {"fingerprint": "e" * 32},
        {"top_k": 3},
        {"issued_ms": 1_000_001},
        {"nonce": "0" * 32},
        {"items": (RequestItem(b"ciphertext-bytez", (1, 2, 3), (0, 0, 1)),)},
        {"items": (RequestItem(b"ciphertext-bytes", (1, 2, 4), (0, 0, 1)),)},
        {"items": (RequestItem(b"ciphertext-bytes", (1, 2, 3), (0, 1, 1)),)},
        {"mac": "00" * 32},
        {"mac": None},
    ],
)
def test_any_change_breaks_the_mac(change: dict) -> None:
    forged = dataclasses.replace(_request(), **change)
    with pytest.raises(RefusedError, match="not bound|malformed"):
        check_mac(KEY, forged)


def test_other_key_refused() -> None:
    with pytest.raises(RefusedError, match="not bound"):
        check_mac(b"c" * 32, _request())


def test_unknown_op() -> None:
    with pytest.raises(ValueError):
        bind(KEY, "decrypt", "t", "f", [])


def test_replay_and_staleness() -> None:
    now = [1000.0]
    guard = ReplayGuard(30.0, clock=lambda: now[0])
    request = _request()
    guard.check(request)
    with pytest.raises(RefusedError, match="replayed"):
        guard.check(request)
    with pytest.raises(RefusedError, match="stale"):
        guard.check(_request(clock=lambda: 900.0))
    with pytest.raises(RefusedError, match="future"):
        guard.check(_request(clock=lambda: 1100.0))
    now[0] = 1200.0  # nonces older than the window are forgotten (their requests are stale anyway)
    guard.check(_request(clock=lambda: 1200.0))
    assert len(guard._seen) == 1
