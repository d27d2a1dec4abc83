"""benchmarks/generative_eval.py: the judges' identity measures without a threshold (impostor ISM, rank-1
identification among the run's people)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.generative_eval import Judges, identification


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (the fake encoders' score)."""
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_identification_compares_each_face_with_the_other_peoples_photos() -> None:
    # three people's photos (columns), five faces: two of person 0, two of person 1, one of person 2
    similarity = np.array(
        [
            [0.6, 0.1, 0.2],  # closest to its own person
            [0.1, 0.3, 0.0],  # closest to another person
            [0.2, 0.5, 0.0],  # closest to its own
            [0.4, 0.4, 0.1],  # a tie is not an identification
            [0.0, np.nan, 0.1],  # the judge has no embedding of person 1's photo: compared with person 0's only
        ]
    )
    own = np.array([0, 0, 1, 1, 2])
    impostor, rank1 = identification(similarity, own)
    assert impostor == pytest.approx(np.mean([0.15, 0.15, 0.1, 0.25, 0.0]))
    assert rank1 == pytest.approx(3 / 5)
    # a face whose own photo the judge lacks, or with no other person to compare with, is left out
    assert identification(np.array([[np.nan, 0.2]]), np.array([0])) == (None, None)
    assert identification(np.array([[0.5, np.nan]]), np.array([0])) == (None, None)


def _judges(system: np.ndarray, transfer: np.ndarray, transfer_has: list[str]) -> Judges:
    """Judges whose encoders read a face's first pixel as the row of the embedding it produces; the photos a4, b4,
    c4 have rows 0, 1, 2 (the transfer judge only those in ``transfer_has``)."""
    ids = ["a4", "b4", "c4"]
    judges = object.__new__(Judges)
    judges.pairs = SimpleNamespace(without_flips=lambda: SimpleNamespace(ids=np.array(ids), embeddings=system))
    judges.scorer = SimpleNamespace(
        chip=SimpleNamespace(size=2), embed=lambda chips: system[chips[:, 0, 0, 0]], score=cosine
    )
    judges.system_threshold = 0.9
    index = {pid: ids.index(pid) for pid in transfer_has}
    judges.transfer = SimpleNamespace(
        embed_reconstructions=lambda faces: transfer[faces[:, 0, 0, 0]],
        rows_of=lambda photo_ids: np.array([index.get(str(p), -1) for p in photo_ids.tolist()]),
        embeddings=transfer,
        encoder=SimpleNamespace(score=cosine),
        thresholds={"1e-3": 0.9},
    )
    judges.unseen = None
    return judges


def test_judges_report_impostor_ism_and_rank1_from_the_compared_photos() -> None:
    rng = np.random.default_rng(0)
    system, transfer = rng.normal(size=(3, 16)), rng.normal(size=(3, 8))
    judges = _judges(system, transfer, transfer_has=["a4", "b4"])  # the transfer judge lacks c4
    # faces drawn as: a, a, a (for person b: no trace of b), c
    faces = np.zeros((4, 2, 2, 3), np.uint8)
    faces[:, 0, 0, 0] = [0, 0, 0, 2]
    summary = judges.summary(judges.score(faces, ["a4", "a4", "b4", "c4"]))
    assert summary["rank1_system"] == pytest.approx(3 / 4)
    sys_cos = cosine(np.repeat(system, 3, axis=0), np.tile(system, (3, 1))).reshape(3, 3)
    expected = np.mean([sys_cos[0, [1, 2]].mean()] * 2 + [sys_cos[0, [0, 2]].mean(), sys_cos[2, [0, 1]].mean()])
    assert summary["ism_impostor_system"] == pytest.approx(expected)
    # each face against its own compared photo: the ISM, and the match at the threshold (a face drawn as its own
    # person has cosine 1)
    assert summary["ism_system"] == pytest.approx(np.mean([1, 1, sys_cos[0, 1], 1]))
    assert summary["system_match"] == pytest.approx(3 / 4)
    # the transfer judge compares the three faces it has photos for, with a4 and b4 only: the two faces of a with
    # b4, the face drawn as a for b with a4 itself
    assert summary["rank1_transfer"] == pytest.approx(2 / 3)
    tr_cos = cosine(transfer[[0]], transfer[[1]])[0]
    assert summary["ism_impostor_transfer"] == pytest.approx((2 * tr_cos + 1) / 3)
    assert summary["transfer_faces"] == 3
    assert summary["ism_transfer"] == pytest.approx((2 + tr_cos) / 3)
    assert summary["transfer_match"] == pytest.approx(2 / 3)
