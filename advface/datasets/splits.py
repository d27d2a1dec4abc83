"""Identity-disjoint splits of a face dataset into defender / attacker / evaluation groups.

The split is a pure function of the identity names and a seed, so every script reproduces it:

1. identities with at least ``eval_min_images`` photos (needed for Type-II attacks: another photo of the person)
   are ranked by ``sha256(f"{seed}:{name}")``; the first ``eval_fraction`` of them form the *evaluation* group;
2. every other identity is ranked the same way and dealt alternately to *defender* (even ranks) and *attacker*
   (odd ranks).

No identity is in two groups. The shadow model is trained on the defender group, attackers on the attacker group,
and all privacy numbers are measured on the evaluation group.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

GROUPS = ("defender", "attacker", "evaluation")


@dataclass(frozen=True)
class IdentitySplit:
    """Disjoint identity groups."""

    defender: frozenset[str]
    attacker: frozenset[str]
    evaluation: frozenset[str]
    seed: int

    def group(self, name: str) -> frozenset[str]:
        """The identities of group ``name`` (defender, attacker or evaluation)."""
        if name not in GROUPS:
            raise ValueError(f"unknown split group {name!r}; use one of {', '.join(GROUPS)}")
        return getattr(self, name)

    def describe(self) -> dict[str, object]:
        """JSON-able summary (sizes, seed, rule)."""
        return {
            "seed": self.seed,
            "rule": "advface.datasets.splits (sha256-ranked identities; evaluation from people with >= 2 photos)",
            **{name: len(self.group(name)) for name in GROUPS},
        }


def _rank(names: Iterable[str], seed: int) -> list[str]:
    return sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())


def split_identities(
    identities: Iterable[str], *, seed: int = 0, eval_fraction: float = 0.3, eval_min_images: int = 2
) -> IdentitySplit:
    """Split the identities of a dataset (one entry per photo) into the three disjoint groups."""
    counts = Counter(identities)
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError("eval_fraction must be in (0, 1)")
    eligible = _rank([n for n, c in counts.items() if c >= eval_min_images], seed)
    evaluation = eligible[: round(len(eligible) * eval_fraction)]
    chosen = set(evaluation)
    rest = _rank([n for n in counts if n not in chosen], seed)
    return IdentitySplit(
        defender=frozenset(rest[0::2]),
        attacker=frozenset(rest[1::2]),
        evaluation=frozenset(evaluation),
        seed=seed,
    )


def identities_digest(names: Iterable[str]) -> str:
    """SHA-256 of a set of identity names (sorted, newline-joined): what a trained model records of the people it
    saw, so that a later check can compare groups without storing the names."""
    return hashlib.sha256("\n".join(sorted(set(names))).encode()).hexdigest()
