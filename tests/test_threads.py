"""advface.threads: the --threads helper every CPU-heavy command uses, and the single-threaded lane pool."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from advface.errors import ConfigError
from advface.threads import (
    DEFAULT_THREADS,
    add_threads_argument,
    apply_threads,
    check_threads,
    map_single_threaded,
    torch_threads,
)


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_check_threads() -> None:
    assert check_threads(0) == 0 and check_threads(3) == 3
    for bad in (-1, 1.5, "2", True, None):
        with pytest.raises(ConfigError, match="--threads must be an integer >= 0"):
            check_threads(bad)
    with pytest.raises(ConfigError, match="protection.threads"):
        check_threads(-2, "protection.threads")


def test_apply_threads() -> None:
    assert apply_threads(1) == 1 == torch.get_num_threads()
    assert apply_threads(2) == 2 == torch.get_num_threads()
    assert apply_threads(0) == 2  # 0 leaves torch as it is
    # threads started later take the process setting
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    assert seen == [2]
    with pytest.raises(ConfigError):
        apply_threads(-1)


def test_the_flag() -> None:
    parser = argparse.ArgumentParser()
    add_threads_argument(parser, "what it does")
    assert parser.parse_args([]).threads == DEFAULT_THREADS == 1
    assert parser.parse_args(["--threads", "4"]).threads == 4
    assert "what it does" in parser.format_help()


def test_torch_threads_restores() -> None:
    torch.set_num_threads(2)
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_map_single_threaded() -> None:
    torch.set_num_threads(2)
    main = threading.get_ident()
    lock = threading.Lock()
    where: dict[int, tuple[int, int]] = {}

    def work(item: int) -> int:
        time.sleep(0.02)  # long enough that both workers take items
        with lock:
            where[item] = (threading.get_ident(), torch.get_num_threads())
        return item * item

    assert map_single_threaded(work, range(8), 2) == [i * i for i in range(8)]  # in order
    assert {count for _, count in where.values()} == {1}  # every item on one torch thread
    idents = {ident for ident, _ in where.values()}
    assert len(idents) == 2 and main not in idents
    assert torch.get_num_threads() == 2  # the caller's count, and the process default, are back
    later: list[int] = []
    worker = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    assert later == [2]

    # one worker (or one item): the caller computes, on one torch thread, then gets its count back
    where.clear()
    assert map_single_threaded(work, [3], 4) == [9]
    assert where == {3: (main, 1)} and torch.get_num_threads() == 2
    assert map_single_threaded(work, [], 2) == []

    def fail(item: int) -> int:
        raise ValueError(f"item {item}")

    with pytest.raises(ValueError, match="item"):
        map_single_threaded(fail, range(4), 2)
    assert torch.get_num_threads() == 2
