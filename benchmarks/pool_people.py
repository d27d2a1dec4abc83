"""One cell of ``benchmarks/diffusion_defences.py`` over more people: the same threat measured by runs on disjoint
groups of people (``--people-from``), pooled face by face.

Usage::

    python benchmarks/pool_people.py --cell NAME=RUN.json:CONFIG:THREAT [--cell NAME=...] [--out pooled.json]

Every ``--cell`` names one result cell (``RUN.json``'s ``ablation[CONFIG][THREAT]``, e.g.
``encoders+deflection+antipure:training_based_cfg5``); cells with the same ``NAME`` are pooled. Per judge (the
system judge, ``transfer``, ``unseen``): accepted faces are summed over the parts and divided by the faces judged
(``match``, with its Wilson 95% interval), the ISM and the impostor ISM are averaged weighted by the faces judged, and
rank-1 identification, which each part measured among its own people, is averaged the same way and reported as
``rank1_within_parts`` beside each part's chance level (it is not rank-1 among all the pooled people). ``per_person``
is the parts' lists joined in the order given. The parts must come from the same attacker model and judges (the same
thresholds) and settings but for the people and the sampling scale, and cover disjoint people
(``settings.people_from`` and ``settings.people``); SystemExit otherwise.

Cells record the faces each judge judged (``judged``) since 2026-12-07; for earlier cells it is read back from the
match rate (accepted / match), and a judge that accepted no face is taken to have judged every face of the cell.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.audit.field_metrics import wilson_interval  # noqa: E402
from benchmarks.common import write_results  # noqa: E402

JUDGES = ("system", "transfer", "unseen")
#: Cell keys pooled as means weighted by the faces judged.
WEIGHTED = ("ism", "ism_impostor", "rank1")
#: Settings the parts may differ in: which people, and the sampling scale a cell was read at (the cells are named).
MAY_DIFFER = frozenset({"people", "people_from", "guidance", "sample_guidance", "threats", "purify", "classical"})


def judged_faces(cell: dict[str, Any], judge: str) -> int:
    """Faces ``judge`` judged in ``cell`` (generated plus those counted as not matched): the cell's ``judged`` where
    recorded, else accepted / match, else (no face accepted) every face of the cell."""
    entry = cell if judge == "system" else cell[judge]
    if "judged" in entry:
        return int(entry["judged"])
    accepted = sum(cell["per_person"][judge])
    if accepted > 0:
        return round(accepted / entry["match"])
    return int(cell["faces"]) + int(cell.get("no_face", 0))


def people_range(document: dict[str, Any]) -> range:
    """The positions in the evaluation people's list that a run covered."""
    settings = document["settings"]
    first = int(settings.get("people_from", 0))
    return range(first, first + int(settings["people"]))


def pool(parts: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Pool ``(run document, cell)`` pairs of one threat into one cell (see the module docs)."""
    if not parts:
        raise SystemExit("nothing to pool")
    first = parts[0][0]
    covered: set[int] = set()
    for document, _ in parts:
        if (
            document["thresholds"] != first["thresholds"]
            or document["models"]["attacker"] != first["models"]["attacker"]
        ):
            raise SystemExit("the parts differ in attacker model or judges")
        differ = sorted(
            key
            for key in set(document["settings"]) | set(first["settings"])
            if key not in MAY_DIFFER and document["settings"].get(key) != first["settings"].get(key)
        )
        if differ:
            raise SystemExit(f"the parts differ in settings {differ}")
        people = set(people_range(document))
        if people & covered:
            raise SystemExit(f"the parts overlap in people (positions {sorted(people & covered)[:5]} ...)")
        covered |= people
    cells = [cell for _, cell in parts]
    out: dict[str, Any] = {"people": len(covered), "parts": len(cells)}
    for judge in JUDGES:
        if any(judge != "system" and judge not in cell for cell in cells):
            continue
        entries = [cell if judge == "system" else cell[judge] for cell in cells]
        judged = [judged_faces(cell, judge) for cell in cells]
        accepted = sum(sum(cell["per_person"][judge]) for cell in cells)
        total = sum(judged)
        pooled: dict[str, Any] = {
            "accepted": accepted,
            "judged": total,
            "match": accepted / total if total else 0.0,
            "match_ci95": list(wilson_interval(accepted, total)),
        }
        for key in WEIGHTED:
            values = [(e[key], n) for e, n in zip(entries, judged) if e.get(key) is not None]
            if values:
                name = "rank1_within_parts" if key == "rank1" else key
                pooled[name] = sum(v * n for v, n in values) / sum(n for _, n in values)
        if all("rank1_chance" in e for e in entries):
            pooled["rank1_chance_parts"] = [e["rank1_chance"] for e in entries]
        if judge == "system":
            out.update(pooled)
        else:
            out[judge] = pooled
    out["per_person"] = {
        key: [x for cell in cells for x in cell["per_person"][key]]
        for key in cells[0]["per_person"]
        if all(key in cell["per_person"] for cell in cells)
    }
    return out


def parse_cell(spec: str) -> tuple[str, str, str, str]:
    """``NAME=RUN.json:CONFIG:THREAT`` -> its four parts (SystemExit when malformed)."""
    name, sep, rest = spec.partition("=")
    fields = rest.rsplit(":", 2)
    if not sep or not name or len(fields) != 3 or not all(fields):
        raise SystemExit(f"--cell wants NAME=RUN.json:CONFIG:THREAT, got {spec!r}")
    return name, fields[0], fields[1], fields[2]


def main(argv: Sequence[str] | None = None) -> None:
    """Pool the named cells and write the result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", action="append", required=True, help="NAME=RUN.json:CONFIG:THREAT (repeatable)")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/pool_people.json)")
    args = parser.parse_args(argv)
    groups: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    sources: dict[str, list[str]] = {}
    documents: dict[str, dict[str, Any]] = {}
    for spec in args.cell:
        name, path, config, threat = parse_cell(spec)
        if path not in documents:
            documents[path] = json.loads(Path(path).read_text())
        document = documents[path]
        cell = document.get("ablation", {}).get(config, {}).get(threat)
        if cell is None:
            raise SystemExit(f"{path} has no cell {config}:{threat}")
        groups.setdefault(name, []).append((document, cell))
        sources.setdefault(name, []).append(f"{path}:{config}:{threat}")
    pooled = {name: {**pool(parts), "from": sources[name]} for name, parts in groups.items()}
    parts = {path: {"command": doc.get("command"), "date": doc.get("date")} for path, doc in documents.items()}
    written = write_results("pool_people", {"pooled": pooled, "parts": parts}, args.out)
    for name, cell in pooled.items():
        rates = [f"{cell['match']:.3f}"] + [f"{cell[j]['match']:.3f}" for j in JUDGES[1:] if j in cell]
        print(name, cell["people"], "people:", " / ".join(rates), "match")
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
