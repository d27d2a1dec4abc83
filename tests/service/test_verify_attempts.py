"""The per-subject budget of failed Verify attempts (advface.service.attempts): the counter on its own, with a
clock the test moves, and in TemplateService.verify (the refused attempt never reaches the store)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from advface.config import Config, MatchingConfig, load_config
from advface.errors import AttemptsExhaustedError, ConfigError
from advface.service import TemplateService
from advface.service.attempts import VerifyAttempts
from advface.testing.synthetic import dlib_like_people


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _attempts(max_failures: int = 3, window_s: float = 60.0, max_tracked: int = 100) -> tuple[VerifyAttempts, Clock]:
    clock = Clock()
    return VerifyAttempts(max_failures, window_s, max_tracked, clock=clock), clock


def _fail(attempts: VerifyAttempts, subject: str, tenant: str = "t") -> None:
    attempts.begin(tenant, subject)
    attempts.end(tenant, subject, False)


# ------------------------------------------------------------------------------------------------ the counter


def test_the_budget_locks_the_subject_until_the_window_ends() -> None:
    attempts, clock = _attempts(max_failures=3, window_s=60.0)
    for _ in range(3):
        _fail(attempts, "alice")
    assert attempts.lockouts == 1
    clock.now += 20.0
    with pytest.raises(AttemptsExhaustedError) as refused:
        attempts.begin("t", "alice")
    assert refused.value.retry_after_s == pytest.approx(40.0) and "retry in 40 s" in str(refused.value)
    attempts.begin("t", "bob")  # other subjects, and the same subject id of another tenant, are not locked
    attempts.end("t", "bob", False)
    attempts.begin("other-tenant", "alice")
    attempts.end("other-tenant", "alice", False)
    clock.now += 39.9
    with pytest.raises(AttemptsExhaustedError):
        attempts.begin("t", "alice")
    assert attempts.refused == 2
    clock.now += 0.1  # the window (from the first failure) has ended: a fresh budget
    for _ in range(3):
        _fail(attempts, "alice")
    with pytest.raises(AttemptsExhaustedError):
        attempts.begin("t", "alice")


def test_a_match_resets_the_count_and_no_decision_counts_neither_way() -> None:
    attempts, _ = _attempts(max_failures=3)
    _fail(attempts, "alice")
    _fail(attempts, "alice")
    attempts.begin("t", "alice")
    attempts.end("t", "alice", True)  # the genuine user: a fresh count (PIN practice)
    assert attempts.tracked() == 0
    for _ in range(5):  # invalid probe, unknown subject, deadline: no decision, no failure
        attempts.begin("t", "alice")
        attempts.end("t", "alice", None)
    _fail(attempts, "alice")
    _fail(attempts, "alice")
    attempts.begin("t", "alice")  # the third attempt is still admitted
    attempts.end("t", "alice", False)
    with pytest.raises(AttemptsExhaustedError):
        attempts.begin("t", "alice")  # ... and then the subject is locked, a genuine probe included


def test_attempts_in_flight_count_against_the_budget() -> None:
    attempts, _ = _attempts(max_failures=3)
    for _ in range(3):
        attempts.begin("t", "alice")  # three concurrent attempts, none finished
    with pytest.raises(AttemptsExhaustedError) as refused:
        attempts.begin("t", "alice")
    assert refused.value.retry_after_s == 0.0  # not locked: full of attempts in flight
    attempts.end("t", "alice", None)
    attempts.begin("t", "alice")


def test_threads_never_overshoot_the_budget() -> None:
    attempts, _ = _attempts(max_failures=10)
    admitted: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(20):
            try:
                attempts.begin("t", "alice")
            except AttemptsExhaustedError:
                continue
            with lock:
                admitted.append(1)
            attempts.end("t", "alice", False)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 10 and attempts.lockouts == 1 and attempts.refused == 8 * 20 - 10


def test_the_cap_on_tracked_subjects() -> None:
    attempts, clock = _attempts(max_failures=2, window_s=60.0, max_tracked=3)
    _fail(attempts, "s0")
    _fail(attempts, "s0")  # s0 locked
    _fail(attempts, "s1")
    _fail(attempts, "s2")
    assert attempts.tracked() == 3
    _fail(attempts, "s3")  # full: the least recently used entry that is not locked (s1) goes, s0 stays locked
    assert attempts.tracked() == 3
    with pytest.raises(AttemptsExhaustedError):
        attempts.begin("t", "s0")
    _fail(attempts, "s1")
    _fail(attempts, "s1")  # s1 counted from zero again: locked only now
    with pytest.raises(AttemptsExhaustedError):
        attempts.begin("t", "s1")
    clock.now += 61.0  # every window ended: expired entries make room first
    _fail(attempts, "s4")
    assert attempts.tracked() == 1 and attempts.dropped_locked == 0


def test_at_the_cap_with_every_subject_locked_the_oldest_lock_is_dropped() -> None:
    attempts, _ = _attempts(max_failures=1, window_s=60.0, max_tracked=2)
    _fail(attempts, "s0")
    _fail(attempts, "s1")
    _fail(attempts, "s2")  # both tracked subjects locked: s0, the least recently used, goes
    assert attempts.tracked() == 2 and attempts.dropped_locked == 1
    attempts.begin("t", "s0")  # its lock ended early
    with pytest.raises(AttemptsExhaustedError):
        attempts.begin("t", "s2")


def test_zero_turns_the_budget_off_and_bad_values_are_refused() -> None:
    attempts, _ = _attempts(max_failures=0)
    for _ in range(50):
        _fail(attempts, "alice")
    assert attempts.tracked() == 0 and not attempts.enabled
    for bad in ((-1, 60.0, 10), (3, 0.0, 10), (3, float("nan"), 10), (3, 60.0, 0)):
        with pytest.raises(ValueError):
            VerifyAttempts(*bad)


def _load(folder: Path, matching: dict[str, Any]) -> Config:
    (folder / "advface.yaml").write_text(yaml.safe_dump({"matching": matching, "keys": {"auto": False}}))
    return load_config(folder / "advface.yaml", env={})


def test_config_keys_defaults_and_validation(tmp_path: Path) -> None:
    defaults = MatchingConfig()
    assert (defaults.verify_max_failures, defaults.verify_window_s) == (10, 900.0)
    cfg = _load(tmp_path, {"verify_max_failures": 5, "verify_window_s": 30, "verify_max_tracked": 7})
    assert (cfg.matching.verify_max_failures, cfg.matching.verify_window_s, cfg.matching.verify_max_tracked) == (
        5,
        30.0,
        7,
    )
    overrides = {"ADVFACE_MATCHING_VERIFY_MAX_FAILURES": "0", "ADVFACE_MATCHING_VERIFY_WINDOW_S": "2.5"}
    env = load_config(None, env=overrides)
    assert env.matching.verify_max_failures == 0 and env.matching.verify_window_s == 2.5
    for bad in (
        {"verify_max_failures": -1},
        {"verify_max_failures": "ten"},
        {"verify_window_s": 0},
        {"verify_window_s": -5},
        {"verify_max_tracked": 0},
    ):
        with pytest.raises(ConfigError, match="matching.verify_"):
            _load(tmp_path, bad)


# ------------------------------------------------------------------------------------------------ the service


def _service_config(folder: Path) -> Config:
    data = {
        "server": {"workers": 1},
        "encoder": {"name": "dlib-torch"},
        "protection": {"steps": 2},
        "store": {"data_dir": str(folder / "data"), "use_gpu": False},
        "matching": {"verify_max_failures": 3, "verify_window_s": 60.0},
        "keys": {"auto": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "advface.yaml").write_text(yaml.safe_dump(data))
    return load_config(folder / "advface.yaml", env={})


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemplateService]:
    svc = TemplateService(_service_config(tmp_path_factory.mktemp("attempts")))
    yield svc
    svc.close()


class StoreSpy:
    """Counts the store calls of Verify (and passes them on)."""

    def __init__(self, service: TemplateService, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        for name in ("get_subject", "subject_vectors"):
            real = getattr(service.store, name)
            monkeypatch.setattr(service.store, name, self._counting(real))

    def _counting(self, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        return call


def test_the_service_refuses_the_attempt_past_the_budget_before_the_store(
    service: TemplateService, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(service.verify_attempts, "clock", clock)
    enrolled, probes = dlib_like_people(3, seed=5)
    asyncio.run(service.enroll("t", "victim", enrolled[0], {}))
    asyncio.run(service.enroll("t", "other", enrolled[1], {}))
    spy = StoreSpy(service, monkeypatch)
    for _ in range(3):
        assert not asyncio.run(service.verify("t", "victim", probes[2])).match
    assert spy.calls > 0
    spy.calls = 0
    with pytest.raises(AttemptsExhaustedError):
        asyncio.run(service.verify("t", "victim", probes[0]))  # even the genuine probe, while locked
    assert spy.calls == 0
    assert asyncio.run(service.verify("t", "other", probes[1])).match  # another subject is not locked
    clock.now += 60.0  # the window has passed: the genuine probe gets through, and resets the count
    assert asyncio.run(service.verify("t", "victim", probes[0])).match
    for _ in range(3):
        assert not asyncio.run(service.verify("t", "victim", probes[2])).match
    with pytest.raises(AttemptsExhaustedError):
        asyncio.run(service.verify("t", "victim", probes[2]))


def test_a_genuine_match_resets_the_count_in_the_service(service: TemplateService) -> None:
    enrolled, probes = dlib_like_people(2, seed=9)
    asyncio.run(service.enroll("t", "carol", enrolled[0], {}))
    for _ in range(5):  # 2 failures, then the genuine user: never locked
        for _ in range(2):
            assert not asyncio.run(service.verify("t", "carol", probes[1])).match
        assert asyncio.run(service.verify("t", "carol", probes[0])).match
    bad = np.zeros(128, np.float32)
    for _ in range(5):  # refused probes are no decision: not counted
        with pytest.raises(Exception, match="zero|norm"):
            asyncio.run(service.verify("t", "carol", bad))
    assert not asyncio.run(service.verify("t", "carol", probes[1])).match
