"""benchmarks/pool_people.py: one diffusion_defences cell pooled over runs on disjoint groups of people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import pool_people


def _cell(system: list[int], transfer: list[int], *, judged: int | None = None, ism: float = 0.5) -> dict[str, Any]:
    faces = 4 * len(system)
    transfer_cell: dict[str, Any] = {"match": sum(transfer) / faces, "ism": ism / 2, "rank1": 0.5, "rank1_chance": 0.5}
    if judged is not None:
        transfer_cell = {**transfer_cell, "judged": judged, "match": sum(transfer) / judged}
    return {
        "faces": faces,
        "no_face": 0,
        "match": sum(system) / faces,
        "ism": ism,
        "ism_impostor": 0.1,
        "rank1": 1.0,
        "rank1_chance": 0.5,
        "transfer": transfer_cell,
        "per_person": {"faces": [4] * len(system), "system": system, "transfer": transfer},
    }


def _run(people_from: int, people: int = 2, threshold: float = -0.5) -> dict[str, Any]:
    settings: dict[str, Any] = {"people": people, **({"people_from": people_from} if people_from else {})}
    return {"settings": settings, "thresholds": {"system_fmr_1e-3": threshold}, "models": {"attacker": {"path": "a"}}}


def test_pooling_sums_accepted_faces_and_weights_the_means_by_faces_judged() -> None:
    first = _cell([1, 0], [0, 0], ism=0.4)  # 8 faces; the transfer judge accepted none: taken as all 8 judged
    second = _cell([2, 1], [1, 0], judged=6, ism=0.8)  # the transfer judge judged 6 of the 8 faces
    pooled = pool_people.pool([(_run(0), first), (_run(2), second)])
    assert pooled["people"] == 4 and pooled["accepted"] == 4 and pooled["judged"] == 16
    assert pooled["match"] == pytest.approx(4 / 16)
    assert pooled["ism"] == pytest.approx(0.6)
    assert pooled["rank1_within_parts"] == pytest.approx(1.0) and pooled["rank1_chance_parts"] == [0.5, 0.5]
    transfer = pooled["transfer"]
    assert (transfer["accepted"], transfer["judged"]) == (1, 14)
    assert transfer["match"] == pytest.approx(1 / 14)
    assert transfer["ism"] == pytest.approx((8 * 0.2 + 6 * 0.4) / 14)
    lo, hi = transfer["match_ci95"]
    assert lo < 1 / 14 < hi
    assert pooled["per_person"]["system"] == [1, 0, 2, 1]
    # an old cell without `judged`: read back from the match rate
    assert pool_people.judged_faces(_cell([1, 0], [3, 0]), "transfer") == 8


def test_parts_must_cover_disjoint_people_with_the_same_judges() -> None:
    cell = _cell([0, 0], [0, 0])
    with pytest.raises(SystemExit, match="overlap"):
        pool_people.pool([(_run(0), cell), (_run(1), cell)])
    with pytest.raises(SystemExit, match="judges"):
        pool_people.pool([(_run(0), cell), (_run(2, threshold=0.1), cell)])
    other = _run(2)
    other["settings"]["finetune_steps"] = 150  # another attacker
    with pytest.raises(SystemExit, match="finetune_steps"):
        pool_people.pool([(_run(0), cell), (other, cell)])
    other["settings"] = {"people": 2, "people_from": 2, "guidance": 5.0}  # another scale: the cells are named
    assert pool_people.pool([(_run(0), cell), (other, cell)])["people"] == 4


def test_command_line_pools_named_cells_and_refuses_malformed_ones(tmp_path: Path) -> None:
    paths = []
    for k, (start, cell) in enumerate([(0, _cell([1, 0], [0, 0])), (2, _cell([0, 0], [0, 2]))]):
        path = tmp_path / f"run{k}.json"
        path.write_text(json.dumps({**_run(start), "ablation": {"cfg": {"training_based_cfg5": cell}}}))
        paths.append(path)
    out = tmp_path / "pooled.json"
    pool_people.main([*(f"--cell=cfg5={p}:cfg:training_based_cfg5" for p in paths), "--out", str(out)])
    pooled = json.loads(out.read_text())["pooled"]["cfg5"]
    assert (pooled["accepted"], pooled["judged"], pooled["transfer"]["accepted"]) == (1, 16, 2)
    assert len(pooled["from"]) == 2
    with pytest.raises(SystemExit, match="NAME=RUN.json"):
        pool_people.main(["--cell", f"{paths[0]}:cfg:training_based"])
    with pytest.raises(SystemExit, match="no cell"):
        pool_people.main(["--cell", f"x={paths[0]}:cfg:training_free"])
