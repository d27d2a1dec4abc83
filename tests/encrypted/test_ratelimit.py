from __future__ import annotations

import pytest

from advface.encrypted.errors import RateLimitedError
from advface.encrypted.ratelimit import RateLimiter


def test_token_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter({"verify": (2.0, 3)}, clock=lambda: now[0])
    for _ in range(3):
        limiter.take("verify")
    with pytest.raises(RateLimitedError, match="verify"):
        limiter.take("verify")
    now[0] = 0.5  # one token back
    limiter.take("verify")
    with pytest.raises(RateLimitedError):
        limiter.take("verify")
    now[0] = 100.0  # never more than the burst
    for _ in range(3):
        limiter.take("verify")
    with pytest.raises(RateLimitedError):
        limiter.take("verify")
    limiter.take("identify")  # no rate: not limited


def test_bad_rates() -> None:
    with pytest.raises(ValueError):
        RateLimiter({"verify": (0.0, 3)})
    with pytest.raises(ValueError):
        RateLimiter({"verify": (1.0, 0)})
