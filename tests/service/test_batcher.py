"""ProtectionBatcher: concurrent protection requests share protector calls and get exactly their own rows back."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from advface.service.batcher import ProtectionBatcher


def _slow_double(calls: list[int]):
    lock = threading.Lock()

    def protect(x: np.ndarray) -> np.ndarray:
        with lock:
            calls.append(len(x))
        time.sleep(0.2)
        if (x < 0).any():
            raise ValueError("negative")
        return x * 2

    return protect


def test_queued_requests_are_coalesced_and_split_back() -> None:
    calls: list[int] = []

    async def main() -> list[np.ndarray]:
        with ThreadPoolExecutor(2) as pool:
            batcher = ProtectionBatcher(_slow_double(calls), pool, slots=1, max_rows=8)
            inputs = [np.full((n, 3), i, np.float32) for i, n in enumerate([1, 2, 1, 3, 1])]
            outs = await asyncio.gather(*(batcher.protect(x) for x in inputs))
            assert batcher.calls == 2 and batcher.rows == 8
            return [o - 2 * x for o, x in zip(outs, inputs)]

    for diff in asyncio.run(main()):
        assert not diff.any()
    assert calls == [1, 7]  # the first alone, the four that queued behind it together


def test_max_rows_and_errors_reach_every_request_of_the_call() -> None:
    calls: list[int] = []

    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            batcher = ProtectionBatcher(_slow_double(calls), pool, slots=1, max_rows=3)
            good = np.ones((2, 3), np.float32)
            bad = -np.ones((1, 3), np.float32)
            results = await asyncio.gather(
                batcher.protect(good),
                batcher.protect(good),
                batcher.protect(bad),
                batcher.protect(good),
                return_exceptions=True,
            )
            assert isinstance(results[0], np.ndarray)
            assert isinstance(results[1], ValueError) and isinstance(results[2], ValueError)  # shared call failed
            assert isinstance(results[3], np.ndarray)

    asyncio.run(main())
    assert calls == [2, 3, 2]


def test_cancelled_request_does_not_break_the_others() -> None:
    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            batcher = ProtectionBatcher(_slow_double([]), pool, slots=1, max_rows=8)
            first = asyncio.ensure_future(batcher.protect(np.ones((1, 3), np.float32)))
            second = asyncio.ensure_future(batcher.protect(np.ones((1, 3), np.float32)))
            third = asyncio.ensure_future(batcher.protect(np.full((1, 3), 5, np.float32)))
            await asyncio.sleep(0.05)
            second.cancel()
            assert (await first == 2).all()
            assert (await third == 10).all()
            with pytest.raises(asyncio.CancelledError):
                await second

    asyncio.run(main())


def test_queue_is_shared_among_slots_in_whole_lanes() -> None:
    calls: list[int] = []

    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            batcher = ProtectionBatcher(_slow_double(calls), pool, slots=2, max_rows=32, lanes=4)
            first = [asyncio.ensure_future(batcher.protect(np.ones((1, 3), np.float32))) for _ in range(2)]
            await asyncio.sleep(0.05)  # both slots busy with one row each; ten single-row requests queue behind
            rest = [asyncio.ensure_future(batcher.protect(np.full((1, 3), i, np.float32))) for i in range(10)]
            outs = await asyncio.gather(*first, *rest)
            assert all((o == 2 * x).all() for o, x in zip(outs[2:], [np.full((1, 3), i) for i in range(10)]))

    asyncio.run(main())
    # the ten queued rows: 10 / 2 slots = 5 -> 8 (whole lanes) for the first slot to free, the other 2 for the next
    assert calls[:2] == [1, 1] and sorted(calls[2:]) == [2, 8]
