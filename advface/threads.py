"""Torch thread settings for advface's CPU work: the one place that applies a command's ``--threads``, and the pool
of single-threaded workers that template protection runs its lanes on.

Why a small default: torch's default intra-op team has one OpenMP thread per core, and every operation ends at a
barrier where the team waits for its slowest thread. When other jobs use the cores, a descheduled thread stalls the
whole team at each of the thousands of small operations of a protection or a training step, and throughput
collapses instead of degrading. On a 2-core machine with other jobs running, plain AdvFace protected 4.1
templates/s on torch's default 2 threads and 54 on one; with two more busy loops 0.77 against 14.5
(``benchmarks/protect_threads.py``); a decoder training step took 0.90 s against 0.16 s. So every CPU-heavy command
defaults to :data:`DEFAULT_THREADS` (one) and takes ``--threads N`` (0: torch's default, one per core) for an idle
machine.

- :func:`apply_threads` -- set torch's intra-op threads (and, once per process, its inter-op threads);
- :func:`add_threads_argument` -- the ``--threads`` flag of a command;
- :func:`torch_threads` -- a block with a fixed thread count in the calling thread;
- :func:`map_single_threaded` -- ``fn`` over items on up to N threads, each running torch on one thread: the
  result of every item is the single-threaded one whatever N is (float reductions and kernel choices of a
  multi-threaded team depend on the team size; see :mod:`advface.protect.identity_aware`), and a busy core slows
  only the items on it.

Torch keeps the intra-op thread count per thread once a thread has used it (OpenMP's per-thread setting), and
``torch.set_num_threads`` also sets the process default that threads started later pick up.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from advface.errors import ConfigError

#: ``--threads`` default of the CPU-heavy commands (protect, reencode, audit, protect-image).
DEFAULT_THREADS = 1

T = TypeVar("T")
R = TypeVar("R")


def check_threads(threads: object, what: str = "--threads") -> int:
    """``threads`` as an int >= 0 (0: torch's default); ConfigError naming ``what`` otherwise."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ConfigError(f"{what} must be an integer >= 0 (0: torch's default, one per core), got {threads!r}")
    return threads


def apply_threads(threads: int) -> int:
    """Run torch on ``threads`` intra-op threads from now on (0: leave torch's default, one per core); the first
    call of a process with ``threads > 0`` also sets torch's inter-op pool to that size (torch allows that only
    once, before any inter-op work). Returns the intra-op thread count now in effect in the calling thread."""
    import torch

    threads = check_threads(threads)
    if threads:
        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):  # already set, or its pool already started: it stays as it is
            if torch.get_num_interop_threads() != threads:
                torch.set_num_interop_threads(threads)
    return torch.get_num_threads()


def add_threads_argument(
    parser: argparse.ArgumentParser, what: str, default: int | None = DEFAULT_THREADS, default_text: str = ""
) -> None:
    """Add ``--threads N`` to a command's ``parser``: ``what`` says how the command uses them; ``default`` (None:
    the command resolves it, ``default_text`` saying how)."""
    shown = default_text or f"default {default}"
    parser.add_argument(
        "--threads",
        type=int,
        default=default,
        metavar="N",
        help=f"torch CPU threads: {what} ({shown}; 0: torch's default, one per core). More than one pays off only "
        "on idle cores",
    )


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op torch threads in the calling thread; the previous count after."""
    import torch

    previous = torch.get_num_threads()
    if previous == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def map_single_threaded(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """``[fn(item) for item in items]``, computed on up to ``workers`` threads that each run torch on one thread.

    Every item is computed sequentially by one thread, so its result does not depend on ``workers`` (nor on
    which thread ran it); items are independent, so a descheduled thread delays only its own. With one worker
    (or one item) the calling thread computes them (on one torch thread during the call). The calling thread's
    thread count is torch's process default again afterwards.
    """
    import torch

    todo = list(items)
    workers = max(1, min(int(workers), len(todo)))
    if workers == 1:
        with torch_threads(1):
            return [fn(item) for item in todo]
    caller = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="advface-lane", initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            return list(pool.map(fn, todo))
    finally:
        torch.set_num_threads(caller)  # the workers' setting also became the default of threads started later
