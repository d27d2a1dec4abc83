"""The budgets of failed attempts (advface.service.attempts): per subject for Verify, per caller for Identify, their
escalating lockouts and hard cap; the counter on its own, with a clock the test moves, and in TemplateService
(the refused attempt never reaches the store; re-enrolment, deletion and reset_attempts clear a cap)."""

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
from advface.errors import AttemptsCappedError, AttemptsExhaustedError, ConfigError, ValidationError
from advface.service import TemplateService
from advface.service.attempts import IdentifyAttempts, VerifyAttempts
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


# ------------------------------------------------------------------------------------ escalation, cap, per caller


def _budget(
    max_failures: int = 2,
    window_s: float = 60.0,
    *,
    growth: float = 2.0,
    max_lockout_s: float = 200.0,
    max_consecutive: int = 0,
    max_tracked: int = 100,
    max_capped: int = 10,
) -> tuple[VerifyAttempts, Clock]:
    clock = Clock()
    budget = VerifyAttempts(
        max_failures,
        window_s,
        max_tracked,
        growth=growth,
        max_lockout_s=max_lockout_s,
        max_consecutive=max_consecutive,
        max_capped=max_capped,
        clock=clock,
    )
    return budget, clock


def _lockout_after(attempts: VerifyAttempts, subject: str, failures: int) -> float:
    """Fail ``failures`` times, then the refusal's retry time."""
    for _ in range(failures):
        _fail(attempts, subject)
    with pytest.raises(AttemptsExhaustedError) as refused:
        attempts.begin("t", subject)
    assert not isinstance(refused.value, AttemptsCappedError)
    return refused.value.retry_after_s


def test_consecutive_lockouts_escalate_up_to_the_longest_and_a_match_ends_the_streak() -> None:
    attempts, clock = _budget(max_failures=2, window_s=60.0, growth=2.0, max_lockout_s=200.0)
    seen = []
    for _ in range(4):
        seen.append(_lockout_after(attempts, "alice", 2))
        clock.now += seen[-1]  # the attacker waits the lockout out, then goes on
    assert seen == pytest.approx([60.0, 120.0, 200.0, 200.0])  # 60 s doubling, clamped at 200 s
    assert attempts.lockouts == 4 and attempts.window_for(3) == 200.0 and attempts.window_for(10**6) == 200.0
    assert _lockout_after(attempts, "bob", 2) == pytest.approx(60.0)  # per subject: bob starts at the first window
    attempts.begin("t", "alice")
    attempts.end("t", "alice", True)  # the genuine user, once the lockout ended: the streak is over
    assert attempts.tracked() == 1  # bob only
    assert _lockout_after(attempts, "alice", 2) == pytest.approx(60.0)


def test_without_growth_every_lockout_is_one_window() -> None:
    attempts, clock = _budget(max_failures=2, window_s=60.0, growth=1.0, max_lockout_s=60.0)
    for _ in range(3):
        assert _lockout_after(attempts, "alice", 2) == pytest.approx(60.0)
        clock.now += 60.0


def test_the_cap_refuses_the_subject_until_an_operator_resets_it() -> None:
    attempts, clock = _budget(max_failures=3, window_s=10.0, growth=1.0, max_lockout_s=10.0, max_consecutive=7)
    _lockout_after(attempts, "alice", 3)
    clock.now += 10.0
    _lockout_after(attempts, "alice", 3)
    clock.now += 10.0
    _fail(attempts, "alice")  # the 7th failure in a row since the last match: capped
    assert (attempts.capped, attempts.capped_now(), attempts.tracked()) == (1, 1, 0)
    for wait in (0.0, 10.0, 1e9):  # no window ends it
        clock.now += wait
        with pytest.raises(AttemptsCappedError) as refused:
            attempts.begin("t", "alice")  # the genuine probe too
        assert isinstance(refused.value, AttemptsExhaustedError)  # the same status for a transport
        assert refused.value.retry_after_s == float("inf") and "7 in a row" in str(refused.value)
        assert "until an operator resets it" in str(refused.value)
    attempts.begin("other", "alice")  # the same id in another tenant is another subject
    attempts.end("other", "alice", False)
    assert attempts.reset_subject("t", "alice") and not attempts.reset_subject("t", "alice")
    assert attempts.capped_now() == 0
    attempts.begin("t", "alice")  # a fresh count after the reset
    attempts.end("t", "alice", True)


def test_attempts_in_flight_count_against_the_cap() -> None:
    attempts, _ = _budget(max_failures=0, max_consecutive=3)  # the cap alone, no budget per window
    assert attempts.enabled
    _fail(attempts, "alice")
    attempts.begin("t", "alice")
    attempts.begin("t", "alice")  # 1 failed + 2 in flight = the cap
    with pytest.raises(AttemptsExhaustedError) as refused:
        attempts.begin("t", "alice")
    assert not isinstance(refused.value, AttemptsCappedError) and refused.value.retry_after_s == 0.0
    attempts.end("t", "alice", True)  # one of them matched: the streak is over
    attempts.end("t", "alice", False)
    _fail(attempts, "alice")
    attempts.begin("t", "alice")  # 2 failed since the match: room for one more
    attempts.end("t", "alice", False)
    with pytest.raises(AttemptsCappedError):
        attempts.begin("t", "alice")


def test_capped_subjects_are_never_evicted_by_the_tracking_cap_and_are_bounded_apart() -> None:
    attempts, _ = _budget(max_failures=0, max_consecutive=2, max_tracked=2, max_capped=2)
    for subject in ("c0", "c1"):
        _fail(attempts, subject)
        _fail(attempts, subject)
    for i in range(10):  # many other subjects with a streak pass through the tracking map
        _fail(attempts, f"s{i}")
    assert attempts.tracked() == 2 and attempts.dropped_streaks == 8  # s0..s7: their streaks were forgotten
    for subject in ("c0", "c1"):
        with pytest.raises(AttemptsCappedError):
            attempts.begin("t", subject)
    _fail(attempts, "s9")  # s9's 2nd failure in a row: a 3rd capped subject, past max_capped 2
    assert attempts.capped_now() == 2 and attempts.released_capped == 1
    attempts.begin("t", "c0")  # the oldest capped subject was released (logged)
    attempts.end("t", "c0", None)
    for subject in ("c1", "s9"):
        with pytest.raises(AttemptsCappedError):
            attempts.begin("t", subject)
    _fail(attempts, "s0")  # evicted with one failure: it counts from zero again, not capped yet
    attempts.begin("t", "s0")
    attempts.end("t", "s0", False)  # the 2nd in a row since it was tracked again
    with pytest.raises(AttemptsCappedError):
        attempts.begin("t", "s0")


def test_a_streak_outlives_the_window_when_escalation_or_the_cap_is_on() -> None:
    attempts, clock = _budget(max_failures=5, window_s=60.0, max_consecutive=4)
    _fail(attempts, "alice")
    _fail(attempts, "alice")
    clock.now += 3600.0  # the window ended long ago: the per-window count restarts, the streak does not
    assert attempts.tracked() == 1
    _fail(attempts, "alice")
    _fail(attempts, "alice")
    with pytest.raises(AttemptsCappedError):
        attempts.begin("t", "alice")


def test_new_parameters_are_checked() -> None:
    for bad in (
        {"growth": 0.5},
        {"growth": float("inf")},
        {"max_lockout_s": 30.0},  # shorter than the window
        {"max_consecutive": -1},
        {"max_capped": 0},
    ):
        with pytest.raises(ValueError):
            _budget(**bad)
    with pytest.raises(ValueError):
        IdentifyAttempts(-1, 60.0)


def test_identify_attempts_count_per_caller() -> None:
    clock = Clock()
    attempts = IdentifyAttempts(2, 60.0, growth=2.0, max_lockout_s=1000.0, max_consecutive=5, clock=clock)
    for _ in range(2):
        attempts.admit(("token-a",))
        attempts.close(("token-a",), False)
    with pytest.raises(AttemptsExhaustedError) as refused:
        attempts.admit(("token-a",))
    assert "failed Identify calls for this caller" in str(refused.value) and refused.value.retry_after_s == 60.0
    attempts.admit(("token-b",))  # another caller has its own budget
    attempts.close(("token-b",), False)
    clock.now += 60.0
    attempts.admit(("token-a",))
    attempts.close(("token-a",), False)
    attempts.admit(("token-a",))
    attempts.close(("token-a",), False)
    with pytest.raises(AttemptsExhaustedError) as refused:
        attempts.admit(("token-a",))
    assert refused.value.retry_after_s == 120.0  # the second lockout in a row: twice as long
    clock.now += 120.0
    attempts.admit(("token-a",))
    attempts.close(("token-a",), False)  # the 5th in a row
    with pytest.raises(AttemptsCappedError):
        attempts.admit(("token-a",))
    assert attempts.reset(("token-a",))
    attempts.admit(("token-a",))
    attempts.close(("token-a",), True)


def test_new_config_keys_defaults_and_validation(tmp_path: Path) -> None:
    defaults = MatchingConfig()
    assert (defaults.verify_max_consecutive_failures, defaults.lockout_growth, defaults.lockout_max_s) == (
        100,
        2.0,
        86_400.0,
    )
    cfg = _load(
        tmp_path,
        {
            "verify_max_consecutive_failures": 0,
            "verify_max_capped": 5,
            "identify_max_failures": 7,
            "identify_window_s": 30,
            "identify_max_consecutive_failures": 50,
            "lockout_growth": 1,
            "lockout_max_s": 900,
        },
    )
    m = cfg.matching
    assert (m.verify_max_consecutive_failures, m.verify_max_capped, m.identify_max_failures) == (0, 5, 7)
    assert (m.identify_window_s, m.identify_max_consecutive_failures, m.lockout_growth, m.lockout_max_s) == (
        30.0,
        50,
        1.0,
        900.0,
    )
    env = load_config(None, env={"ADVFACE_MATCHING_LOCKOUT_GROWTH": "4", "ADVFACE_MATCHING_IDENTIFY_MAX_FAILURES": "0"})
    assert env.matching.lockout_growth == 4.0 and env.matching.identify_max_failures == 0
    for bad in (
        {"lockout_growth": 0.5},
        {"lockout_max_s": 0},
        {"verify_max_consecutive_failures": -1},
        {"verify_max_capped": 0},
        {"identify_window_s": 0},
        {"identify_max_failures": "many"},
    ):
        with pytest.raises(ConfigError, match="matching\\.(lockout|verify|identify)_"):
            _load(tmp_path, bad)
    with pytest.raises(ConfigError, match="lockout_max_s must be at least"):
        _load(tmp_path, {"verify_window_s": 1000, "lockout_max_s": 900})
    with pytest.raises(ConfigError, match="lockout_max_s must be at least"):
        _load(tmp_path, {"identify_window_s": 100_000})


def test_the_service_passes_the_new_keys_on(tmp_path: Path) -> None:
    svc = TemplateService(_service_config(tmp_path / "s"))
    try:
        v, i = svc.verify_attempts, svc.identify_attempts
        assert (v.max_consecutive, v.growth, v.max_lockout_s, v.max_capped) == (100, 2.0, 86_400.0, 100_000)
        assert (i.max_failures, i.window_s, i.max_consecutive) == (1000, 900.0, 0)
    finally:
        svc.close()


def test_re_enrolment_deletion_and_reset_clear_a_capped_subject(
    service: TemplateService, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(service.verify_attempts, "clock", clock)
    monkeypatch.setattr(service.verify_attempts, "max_consecutive", 3)
    enrolled, probes = dlib_like_people(3, seed=21)

    def cap(subject: str) -> None:
        for _ in range(3):
            assert not asyncio.run(service.verify("t", subject, probes[2])).match
        with pytest.raises(AttemptsCappedError):
            asyncio.run(service.verify("t", subject, probes[0]))  # the genuine probe too

    asyncio.run(service.enroll("t", "dave", enrolled[0], {}))
    cap("dave")
    clock.now += 1e6  # time alone does not help
    with pytest.raises(AttemptsCappedError):
        asyncio.run(service.verify("t", "dave", probes[0]))
    asyncio.run(service.enroll("t", "dave", enrolled[0], {}, replace=True))  # re-enrolment
    assert asyncio.run(service.verify("t", "dave", probes[0])).match
    cap("dave")
    asyncio.run(service.delete_subject("t", "dave"))  # deletion: a new subject of that id starts afresh
    asyncio.run(service.enroll("t", "dave", enrolled[0], {}))
    assert asyncio.run(service.verify("t", "dave", probes[0])).match
    cap("dave")
    assert service.reset_attempts("t", subject_id="dave")  # the operator's library call
    assert not service.reset_attempts("t", subject_id="dave")
    assert asyncio.run(service.verify("t", "dave", probes[0])).match
    with pytest.raises(ValidationError):
        service.reset_attempts("t")


def test_the_service_counts_failed_identify_calls_per_caller(
    service: TemplateService, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    attempts = IdentifyAttempts(2, 60.0, growth=2.0, max_lockout_s=600.0, clock=clock)
    monkeypatch.setattr(service, "identify_attempts", attempts)
    enrolled, probes = dlib_like_people(2, seed=33)
    asyncio.run(service.enroll("t", "erin", enrolled[0], {}))
    stranger = probes[1]  # no enrolled subject: no candidate accepted
    searched: list[int] = []
    real_search = service.store.search

    def search(*args: Any, **kwargs: Any) -> Any:
        searched.append(1)
        return real_search(*args, **kwargs)

    monkeypatch.setattr(service.store, "search", search)
    for _ in range(2):
        assert not any(c.match for c in asyncio.run(service.identify("t", stranger, 1, caller="mallory")))
    with pytest.raises(AttemptsExhaustedError) as refused:
        asyncio.run(service.identify("t", probes[0], 1, caller="mallory"))  # refused before any search
    assert len(searched) == 2 and refused.value.retry_after_s == 60.0
    found = asyncio.run(service.identify("t", probes[0], 1, caller="alice"))  # another caller
    assert found[0].subject_id == "erin" and found[0].match
    for _ in range(2):  # the default caller (anonymous) has a budget of its own
        asyncio.run(service.identify("t", stranger, 1))
    with pytest.raises(AttemptsExhaustedError):
        asyncio.run(service.identify("t", stranger, 1, caller="anonymous"))
    clock.now += 60.0
    assert asyncio.run(service.identify("t", probes[0], 1, caller="mallory"))[0].match  # a match ends the streak
    for _ in range(2):
        asyncio.run(service.identify("t", stranger, 1, caller="mallory"))
    with pytest.raises(AttemptsExhaustedError) as refused:
        asyncio.run(service.identify("t", stranger, 1, caller="mallory"))
    assert refused.value.retry_after_s == 60.0  # the first lockout of a new streak
    assert service.reset_attempts("t", caller="mallory")
    asyncio.run(service.identify("t", stranger, 1, caller="mallory"))
