"""Coalescing concurrent protection requests into shared protector calls (asyncio).

AdvFace runs its shadow on ``lanes`` rows at a time (short calls are padded), so under load one call for several
queued requests costs about what one request alone costs. :class:`ProtectionBatcher` queues requests that arrive
while every protection slot is busy and protects them together; each request gets exactly its own rows back, and
each row's result depends only on that row and the protection parameters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class ProtectionBatcher:
    """Runs AdvFace protection for concurrent requests, coalescing them into shared shadow calls.

    AdvFace always runs the shadow on ``lanes`` rows (padding short calls), so one template costs as much as
    ``lanes`` of them, and each template's result depends only on that template and the parameters. Requests that
    arrive while ``slots`` protections are already running are therefore queued and protected together (up to
    ``max_rows`` rows per call): same results, up to ``lanes`` times the throughput under load. A call takes its
    share of the queue -- the queued rows divided among all ``slots``, rounded up to whole ``lanes`` -- so that
    work spreads over the slots (8 queued rows, 2 slots, lanes 4: two calls of 4, not one of 8 beside an idle or
    soon-free slot); a request is never split. Under load (another call running), a free slot waits up to
    ``linger_s`` for a part-filled lane to fill before it starts: clients answered by one call send their next
    requests a few milliseconds apart, and without the wait each would start its own padded call. Runs on the
    event loop; the protection itself runs in ``executor``.
    """

    def __init__(
        self,
        protect: Callable[[np.ndarray], np.ndarray],
        executor: ThreadPoolExecutor,
        slots: int,
        max_rows: int,
        lanes: int = 1,
        linger_s: float = 0.015,
    ) -> None:
        self._protect = protect
        self._executor = executor
        self._slots = max(1, int(slots))
        self._max_rows = max(1, int(max_rows))
        self._lanes = max(1, int(lanes))
        self._linger_s = max(0.0, float(linger_s))
        self._linger: asyncio.TimerHandle | None = None
        self._queue: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: calls made to the protector and rows protected (for tests and metrics)
        self.calls = 0
        self.rows = 0
        #: called with (rows, seconds) after each protection call (metrics)
        self.on_batch: Callable[[int, float], None] | None = None

    @property
    def slots(self) -> int:
        """Protection calls that may run at once."""
        return self._slots

    @property
    def queued(self) -> int:
        """Requests waiting for a protection slot."""
        return len(self._queue)

    async def protect(self, x: np.ndarray) -> np.ndarray:
        """The protected version of ``x`` (``N x D``)."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append((x, future))
        self._start()
        return await future

    def _call_rows(self, queued: int) -> int:
        """Rows the next call takes: its share of ``queued`` rows over all slots, rounded up to whole lanes."""
        share = -(-queued // self._slots)  # ceil
        return max(self._lanes, min(self._max_rows, -(-share // self._lanes) * self._lanes))

    def _linger_over(self) -> None:
        self._linger = None
        self._start(linger=False)

    def _start(self, *, linger: bool = True) -> None:
        while self._queue and self._running < self._slots:
            queued = sum(len(x) for x, _ in self._queue)
            if self._linger is not None:
                if queued < self._lanes:
                    return  # still filling; _linger_over starts the call
                self._linger.cancel()
                self._linger = None
            elif linger and self._linger_s > 0 and self._running > 0 and queued < self._lanes:
                self._linger = asyncio.get_running_loop().call_later(self._linger_s, self._linger_over)
                return
            limit = self._call_rows(queued)
            batch = [self._queue.pop(0)]
            rows = len(batch[0][0])
            while self._queue and rows + len(self._queue[0][0]) <= limit:
                rows += len(self._queue[0][0])
                batch.append(self._queue.pop(0))
            batch = [(x, f) for x, f in batch if not f.cancelled()]
            if not batch:
                continue
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)  # asyncio keeps only weak references to tasks
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]) -> None:
        try:
            x = np.concatenate([b[0] for b in batch]) if len(batch) > 1 else batch[0][0]
            self.calls += 1
            self.rows += len(x)
            started = time.perf_counter()
            out = await asyncio.get_running_loop().run_in_executor(self._executor, self._protect, x)
            if self.on_batch is not None:
                self.on_batch(len(x), time.perf_counter() - started)
        except BaseException as exc:  # handed to every waiting request
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("protection cancelled"))
            if not isinstance(exc, Exception):
                raise
        else:
            start = 0
            for xi, future in batch:
                if not future.done():
                    future.set_result(out[start : start + len(xi)])
                start += len(xi)
        finally:
            self._running -= 1
            self._start()
