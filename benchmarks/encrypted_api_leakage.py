"""What an API client of a sidecar with ``store.matching: encrypted`` learns from Verify: the audit's score-search
attack (:mod:`advface.audit.attacks.score_search`) through the public API, decisions only and with rounded scores,
against plaintext matching with scores released (the literature's setting) as the reference.

Usage (with the defaults, 8 victims: about 8 CPU-minutes on one thread, 25 minutes on a busy 2-core machine)::

    OMP_NUM_THREADS=1 python benchmarks/encrypted_api_leakage.py --lfw-dir $ADVFACE_LFW_DIR --victims 8

Deployment (the library path, no gRPC): a :class:`~advface.service.TemplateService` (dlib-torch, AdvFace on as
deployed: shipped shadow, rel_l2 0.1, 3 steps, seed 0; no keyed transform, which keeps scores and so changes
nothing an API client sees) over an :class:`~advface.encrypted.store.EncryptedSQLiteStore`, its key service a real
:class:`~advface.encrypted.keyservice.KeyServiceCore` in the same process (every check: MAC, freshness, replay,
structure, range; ``--lock-after-refusals`` 10 as ``advface keyservice serve``; no rate limit during the attack: the
time at the default ``--verify-rate`` 100/s is computed from the queries, and the limiter is measured on its own).
The reference: the same service over the plaintext SQLite + faiss store, whose Verify returns the score.

Data: LFW dlib-torch embeddings from the face-pair cache (``advface.datasets.pairs.build_face_pairs``, no mirrored
copies), split by ``advface.datasets.splits.split_identities`` (seed 0). Victims: evaluation-group people with two
or more photos (seeded order); their first photo is enrolled (one template each, AdvFace-protected by the service),
the second is the *other photo* that judges a face-level success. The attacker's pool: every attacker-group photo's
raw embedding (identity-disjoint from the victims).

Modes, each an API client sending raw probe embeddings to ``Verify(victim)``:

- ``decisions`` (the key service's default): the match bit only; :func:`search_with_decisions` (the pool's
  templates and mixtures, 64 at a time, until one is accepted);
- ``rounded`` (``--score-decimals``): the key service releases rounded scores, but only with a match (a rejected
  Verify carries no score, checked on every query); :func:`search_with_scores` on what the client gets, a rejection
  read as the lowest score the key service can release;
- ``plaintext`` (reference): the plaintext store's exact score; :func:`search_with_scores`.

Per-subject budget of failed Verify attempts (``matching.verify_max_failures`` per ``verify_window_s``, escalating
by ``lockout_growth`` up to ``lockout_max_s``, capped at ``verify_max_consecutive_failures`` in a row:
:mod:`advface.service.attempts`): off (0) unless ``--verify-budget``, which runs the services with the
configuration's defaults (``--verify-max-consecutive`` overrides the cap). The attacker then sends at full speed; a
Verify refused for the subject's lockout (AttemptsExhaustedError) is retried, with the same probe, once its window
has ended; one refused for the cap (AttemptsCappedError) ends the attack on that victim (it never refills without an
operator), and the probes of the batch it was in count as rejections. The wait is not slept: the
service's attempt counter runs on a clock that is the real monotonic clock plus the waits skipped so far, so every
window is enforced by the service itself. Reported per victim: the attacker's time to the accepted probe on that
clock (the victims are attacked one after another; each has its own window, so an attacker would run them in
parallel), the number of lockouts it met, and whether the cap ended the search before a probe was accepted (then the
queries and hours to the cap).

A probe the service refuses (a norm outside its limits) counts as a rejected query. One run with the largest budget
gives every smaller one: the searches are deterministic and a smaller budget only stops the same sequence of probes
earlier (the pool must hold at least the largest budget, so the probe orders agree). Reported per mode and budget:
victims with an accepted probe, median queries to it, accepted probes that also match the victim's other photo
(raw vs raw at dlib's published threshold 0.6: a face-level success, not only a template over the threshold), and
the time at the default rate limit.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.audit.attacks.score_search import (  # noqa: E402
    SearchOutcome,
    search_with_decisions,
    search_with_scores,
)
from advface.errors import AttemptsCappedError, AttemptsExhaustedError, ConfigError, ValidationError  # noqa: E402
from benchmarks.common import write_results  # noqa: E402

TENANT = "t"
#: advface keyservice serve's defaults
DEFAULT_VERIFY_RATE = 100.0
DEFAULT_LOCK_AFTER = 10
MODES = ("plaintext", "decisions", "rounded")


@dataclass(frozen=True)
class People:
    """Victims' enrolled and other photos (raw embeddings) and the attacker's pool."""

    names: list[str]
    enrolled: np.ndarray
    other: np.ndarray
    pool: np.ndarray
    pool_people: int


def load_people(lfw_dir: str | None, victims: int, seed: int) -> People:
    """Victims from LFW's evaluation group, the pool from its attacker group (module docs)."""
    from advface.datasets import LFW
    from advface.datasets.pairs import build_face_pairs
    from advface.datasets.splits import split_identities
    from advface.encoders import create_encoder

    pairs = build_face_pairs(LFW(lfw_dir), create_encoder("dlib-torch"), image_size=64, workers=1).without_flips()
    split = split_identities(pairs.identities.tolist(), seed=0)
    rng = np.random.default_rng(seed)
    names = sorted(split.evaluation)
    chosen: list[str] = []
    enrolled, other = [], []
    for i in rng.permutation(len(names)):
        rows = np.flatnonzero(pairs.identities == names[i])
        if len(rows) < 2:  # a photo without a face: the person is left out
            continue
        rows = rows[np.argsort(pairs.ids[rows])]
        chosen.append(names[i])
        enrolled.append(pairs.embeddings[rows[0]])
        other.append(pairs.embeddings[rows[1]])
        if len(chosen) == victims:
            break
    attacker = np.isin(pairs.identities, list(split.attacker))
    pool = pairs.embeddings[attacker]
    pool = pool[rng.permutation(len(pool))].astype(np.float32)
    return People(chosen, np.stack(enrolled), np.stack(other), pool, len(set(pairs.identities[attacker].tolist())))


class Capped(Exception):
    """The victim's cap of failed Verify attempts was reached: the search on it ends."""


def _config(folder: Path, verify_budget: bool, max_consecutive: int | None = None) -> Any:
    """The deployment's config; without ``verify_budget`` the per-subject budget of failed attempts is off;
    ``max_consecutive`` (None: the default) overrides its cap."""
    from advface.config import load_config

    data: dict[str, Any] = {
        "server": {"workers": 1},
        "encoder": {"name": "dlib-torch"},
        "store": {"data_dir": str(folder / "data"), "use_gpu": False},
        "keys": {"auto": False},
    }
    if not verify_budget:
        data["matching"] = {"verify_max_failures": 0, "verify_max_consecutive_failures": 0}
    elif max_consecutive is not None:
        data["matching"] = {"verify_max_consecutive_failures": max_consecutive}
    (folder / "advface.yaml").write_text(yaml.safe_dump(data))
    return load_config(folder / "advface.yaml", env={})


class Client:
    """An API client of one deployment: Verify(victim, probe) one probe at a time, counting queries and time.
    Refused for a lockout, it waits (on the service's attempt clock, :meth:`clock`) until the window ends."""

    def __init__(self, service: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.service, self.loop = service, loop
        self.queries = 0
        self.refused = 0
        self.scores_on_rejects = 0
        self.seconds = 0.0
        self.lockouts = 0
        self.waited = 0.0  # seconds of lockout skipped (not slept)
        self.times: list[float] = []  # the attacker's time at each decided query (the search sends batches)
        self.capped = False  # the current victim's cap was reached
        self.refused_capped = 0  # calls refused for a cap (the rest of the batch that reached it)
        self.decided = 0  # the current victim's queries answered (not refused for the cap)
        service.verify_attempts.clock = self.clock

    def clock(self) -> float:
        """The attacker's time: the real monotonic clock plus the waits skipped."""
        return time.monotonic() + self.waited

    def verify(self, subject: str, probe: np.ndarray) -> tuple[bool, float]:
        """(match, released score: NaN when none)."""
        self.queries += 1
        started = time.perf_counter()
        try:
            while True:
                try:
                    out = self.loop.run_until_complete(self.service.verify(TENANT, subject, probe))
                    break
                except AttemptsCappedError:  # capped: no answer now or later
                    self.capped = True
                    self.refused_capped += 1
                    return False, float("nan")
                except AttemptsExhaustedError as exc:  # locked: wait for the window's end, send the probe again
                    self.lockouts += 1
                    self.waited += exc.retry_after_s + 1e-3
        except ValidationError:  # the service refuses the probe (its norm): a rejection
            self.refused += 1
            return False, float("nan")
        finally:
            self.seconds += time.perf_counter() - started
            self.times.append(self.clock())
        self.decided += 1
        if not out.match and np.isfinite(out.score):
            self.scores_on_rejects += 1
        return bool(out.match), float(out.score)

    def decide(self, subject: str) -> Callable[[np.ndarray], np.ndarray]:
        def answers(probes: np.ndarray) -> np.ndarray:
            if self.capped:  # the batch before reached the cap and nothing was accepted: the search ends
                raise Capped
            return np.array([self.verify(subject, p)[0] for p in probes])

        return answers

    def oracle(self, subject: str, floor: float) -> Callable[[np.ndarray], np.ndarray]:
        """Released scores; a rejection without a score reads as ``floor``."""

        def scores(probes: np.ndarray) -> np.ndarray:
            if self.capped:
                raise Capped
            out = []
            for p in probes:
                match, score = self.verify(subject, p)
                out.append(score if np.isfinite(score) and (match or floor == -np.inf) else floor)
            return np.array(out)

        return scores


def _enrol(service: Any, loop: asyncio.AbstractEventLoop, people: People) -> None:
    from advface.service.templates import EnrolItem

    items = [EnrolItem(f"v{i}", people.enrolled[i], {}) for i in range(len(people.names))]
    loop.run_until_complete(service.enroll_batch(TENANT, items))


def _judge(
    outcomes: list[SearchOutcome],
    people: People,
    budget: int,
    threshold: float,
    hours: list[float] | None = None,
    capped: list[bool] | None = None,
) -> dict[str, Any]:
    """The summary at ``budget`` of runs made with a budget at least as large (module docs); ``hours``: each
    victim's attacker time to its accepted probe under the verify budget."""
    accepted = [o.accepted and o.queries <= budget for o in outcomes]
    queries = [o.queries for o, a in zip(outcomes, accepted) if a]
    budget_fields: dict[str, Any] = {}
    if hours is not None:
        taken = [h for h, a in zip(hours, accepted) if a]
        budget_fields = {
            "hours_to_accept_at_verify_budget": [round(h, 2) for h in taken],
            "median_hours_to_accept_at_verify_budget": round(float(np.median(taken)), 2) if taken else None,
            "accepted_within_24h_at_verify_budget": int(sum(h <= 24 for h in taken)),
        }
    if hours is not None and capped is not None:
        ended = [h for h, c, o in zip(hours, capped, outcomes) if c and o.queries <= budget]
        budget_fields |= {
            "victims_capped_before_an_accepted_probe": len(ended),
            "median_hours_to_the_cap": round(float(np.median(ended)), 2) if ended else None,
        }
    distances = [
        round(float(np.linalg.norm(o.template.astype(np.float64) - people.other[i])), 4)
        for i, (o, a) in enumerate(zip(outcomes, accepted))
        if a
    ]
    face = [-d >= threshold for d in distances]
    return {
        "budget": budget,
        "victims": len(outcomes),
        "accepted": int(sum(accepted)),
        "median_queries_to_accept": float(np.median(queries)) if queries else None,
        "queries_to_accept": queries,
        "accepted_matching_other_photo": int(sum(face)),
        "distance_to_other_photo": distances,
        "median_hours_per_victim_at_default_rate": round(float(np.median(queries)) / DEFAULT_VERIFY_RATE / 3600, 4)
        if queries
        else None,
    } | budget_fields


def _attack(
    mode: str, client: Client, people: People, budget: int, metric: str, threshold: float, floor: float, seed: int
) -> tuple[list[SearchOutcome], list[float], list[bool]]:
    """Each victim's outcome, the attacker's hours on it (:meth:`Client.clock`) and whether the cap ended it."""
    out, hours, capped = [], [], []
    for i in range(len(people.names)):
        subject = f"v{i}"
        began = client.clock()
        client.times, client.capped, client.decided = [], False, 0
        try:
            if mode == "decisions":
                o = search_with_decisions(client.decide(subject), people.pool, budget, seed=seed + i)
            else:
                oracle = client.oracle(subject, floor if mode == "rounded" else -np.inf)
                o = search_with_scores(oracle, people.pool, metric, threshold, budget, seed=seed + i)
        except Capped:  # no probe accepted before the cap: the queries answered, to the cap
            o = SearchOutcome(client.decided, False, people.pool[0].astype(np.float32), 0.0)
        capped.append(client.capped and not o.accepted)
        # to the accepted query (or the cap), not to the end of its batch (an attacker stops there)
        hours.append((client.times[max(o.queries, 1) - 1] - began) / 3600 if client.times else 0.0)
        print(
            f"{mode} victim {i}: accepted={o.accepted} queries={o.queries} capped={capped[-1]} hours={hours[-1]:.2f}",
            flush=True,
        )
        out.append(o)
    return out, hours, capped


def measure_rate_limit(service: Any, loop: asyncio.AbstractEventLoop, core: Any, people: People, n: int) -> dict:
    """``n`` Verify queries back to back through a key service with the default limiter (100/s, burst 200)."""
    from advface.encrypted.errors import RateLimitedError
    from advface.encrypted.ratelimit import RateLimiter

    core.limiter = RateLimiter({"verify": (DEFAULT_VERIFY_RATE, 2 * DEFAULT_VERIFY_RATE)})
    limited = 0
    started = time.perf_counter()
    try:
        for k in range(n):
            try:
                loop.run_until_complete(service.verify(TENANT, "v0", people.pool[k % len(people.pool)]))
            except RateLimitedError:
                limited += 1
    finally:
        core.limiter = None
    seconds = time.perf_counter() - started
    return {
        "queries": n,
        "rate_limited": limited,
        "seconds": round(seconds, 2),
        "queries_per_second": round(n / seconds, 1),
        "limiter": f"verify {DEFAULT_VERIFY_RATE:g}/s, burst {2 * DEFAULT_VERIFY_RATE:g} (advface keyservice serve)",
    }


def main() -> None:
    """Run the attack and write benchmarks/results/encrypted_api_leakage.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lfw-dir", help="LFW root (default: ADVFACE_LFW_DIR)")
    parser.add_argument("--victims", type=int, default=8)
    parser.add_argument("--budgets", type=int, nargs="+", default=[500, 2000], help="query budgets per victim")
    parser.add_argument("--score-decimals", type=int, default=2, help="rounding of the rounded-scores mode")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--rate-queries", type=int, default=250, help="queries of the rate-limit measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--verify-budget",
        action="store_true",
        help="per-subject budget of failed Verify attempts on, at the config defaults (module docs)",
    )
    parser.add_argument(
        "--verify-max-consecutive",
        type=int,
        help="with --verify-budget: matching.verify_max_consecutive_failures (default: the config's; 0: no cap)",
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.victims < 1 or min(args.budgets) < 1:
        raise ConfigError("--victims and --budgets must be >= 1")
    if args.verify_max_consecutive is not None and (not args.verify_budget or args.verify_max_consecutive < 0):
        raise ConfigError("--verify-max-consecutive needs --verify-budget and must be >= 0")
    budget = max(args.budgets)

    from advface.datasets.splits import identities_digest
    from advface.encrypted.keys import generate_keys, new_binding_key
    from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore
    from advface.encrypted.store import EncryptedSQLiteStore, integrity_key_for
    from advface.service import TemplateService

    people = load_people(args.lfw_dir, args.victims, args.seed)
    if len(people.pool) < budget:
        raise ConfigError(f"the pool has {len(people.pool)} photos, fewer than the budget {budget}")
    print(f"{len(people.names)} victims, pool of {len(people.pool)} photos", flush=True)
    loop = asyncio.new_event_loop()
    results: dict[str, Any] = {}
    payload: dict[str, Any] = {
        "attacker": "an API client of the sidecar: raw probe embeddings of its choice to Verify(victim); sees what "
        "the deployment releases (decisions only; rounded scores with a match; plaintext: the score)",
        "deployment": "TemplateService (dlib-torch, AdvFace on: shipped shadow, rel_l2 0.1, 3 steps, seed 0; no keyed "
        "transform) over EncryptedSQLiteStore with KeyServiceCore in process (lock after 10 forged requests, no rate "
        "limit during the attack); reference: the same service over the plaintext SQLite + faiss store",
        "data": "LFW dlib-torch embeddings (advface.datasets.pairs cache, no mirrored copies), split_identities "
        "seed 0: victims from the evaluation group (first photo enrolled, second = other photo), pool = attacker group",
        "attack": "advface.audit.attacks.score_search: search_with_decisions (decisions), search_with_scores "
        "(rounded: a rejection read as the lowest releasable score; plaintext: exact scores)",
        "victims": len(people.names),
        "victim_names_digest": identities_digest(people.names),
        "pool_photos": len(people.pool),
        "pool_people": people.pool_people,
        "score_decimals": args.score_decimals,
        "default_verify_rate": DEFAULT_VERIFY_RATE,
        "verify_budget": None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        keys, binding = generate_keys(), new_binding_key()
        store = EncryptedSQLiteStore(
            folder / "enc.sqlite3",
            keys.public,
            binding,
            128,
            "euclidean",
            integrity_key=integrity_key_for(binding),
            auto_erase=False,
        )
        (folder / "e").mkdir()
        service = TemplateService(_config(folder / "e", args.verify_budget, args.verify_max_consecutive), store=store)
        attempts = service.verify_attempts
        if attempts.enabled:
            payload["verify_budget"] = {
                "max_failures": attempts.max_failures,
                "window_s": attempts.window_s,
                "lockout_growth": attempts.growth,
                "lockout_max_s": attempts.max_lockout_s,
                "max_consecutive_failures": attempts.max_consecutive,
            }
        threshold = service.threshold.value
        metric = service.metric
        raw_threshold = float(service.encoder.default_threshold or -0.6)
        payload |= {"threshold": threshold, "face_level_threshold": raw_threshold}
        floor = -2.0 * keys.public.params.max_norm  # the lowest score the key service can release
        (folder / "p").mkdir()
        plain = TemplateService(_config(folder / "p", args.verify_budget, args.verify_max_consecutive))
        try:
            _enrol(service, loop, people)
            _enrol(plain, loop, people)
            cores = {
                "decisions": KeyServiceCore(
                    keys, binding, DecisionPolicy(metric, threshold), lock_after_refusals=DEFAULT_LOCK_AFTER
                ),
                "rounded": KeyServiceCore(
                    keys,
                    binding,
                    DecisionPolicy(metric, threshold, score_decimals=args.score_decimals),
                    lock_after_refusals=DEFAULT_LOCK_AFTER,
                ),
            }
            for mode in args.modes:
                client = Client(plain if mode == "plaintext" else service, loop)
                core = cores.get(mode)
                if core is not None:
                    store.keyservice = core
                    store.handshake_done(core.policy.top_k_max)
                started = time.process_time()
                outcomes, hours, capped = _attack(mode, client, people, budget, metric, threshold, floor, args.seed)
                cpu = time.process_time() - started
                timed = hours if attempts.enabled else None
                results[mode] = {
                    "by_budget": {
                        str(b): _judge(outcomes, people, b, raw_threshold, timed, capped if timed else None)
                        for b in sorted(args.budgets)
                    },
                    "per_victim": [
                        {
                            "victim": i,
                            "accepted": o.accepted,
                            "queries": o.queries,
                            "capped_before_accepted": c,
                            "hours": round(h, 2) if timed else None,
                        }
                        for i, (o, h, c) in enumerate(zip(outcomes, hours, capped))
                    ],
                    "queries": client.queries,  # Verify calls sent, those refused for the cap included
                    "probes_refused_by_the_service": client.refused,
                    "seconds_per_query": round(client.seconds / max(1, client.queries), 4),
                    "cpu_seconds": round(cpu, 1),
                    "lockouts_met": client.lockouts,
                    "calls_refused_for_the_cap": client.refused_capped,
                }
                if core is not None:
                    results[mode]["rejections_with_a_score"] = client.scores_on_rejects
                    results[mode]["keyservice_forged_requests"] = core.forged_requests
                    results[mode]["keyservice_locked"] = core.locked
                print(mode, results[mode], flush=True)
                write_results("encrypted_api_leakage", payload | {"modes": results, "partial": True}, args.out)
            rate = None
            if args.rate_queries > 0 and "decisions" in args.modes:
                store.keyservice = cores["decisions"]
                rate = measure_rate_limit(service, loop, cores["decisions"], people, args.rate_queries)
                print("rate limit", rate, flush=True)
        finally:
            service.close()
            plain.close()
            loop.close()
    payload |= {"modes": results, "rate_limit": rate}
    print("wrote", write_results("encrypted_api_leakage", payload, args.out))


if __name__ == "__main__":
    main()
