"""Comparison of protection schemes on the same attackers, judges and utility metrics: ``advface audit`` run once per
scheme (BioHashing, MLP-hash, PolyProtect-style, each as its embeddings come and centred on the public defender-group
mean; AdvFace; AdvFace + keyed transform is the ``protected+key`` column of the AdvFace run, its scenarios those of
``scenarios["protected+key"]``) with the same settings, data, seed and attacker cache, one row per scheme.

Usage (a reduced quick mode that fits 2 busy CPU cores; the decoders trained on raw templates are shared through
the cache, so only the first run trains them)::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/audit_schemes.py --data $ADVFACE_LFW_DIR --threads 1

Writes benchmarks/results/audit_schemes.json (the per-scheme rows and the audit command of each) and keeps each
report under ``--work`` (reports hold no faces with ``--no-images``, which this script always passes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_results  # noqa: E402

#: Scheme label -> the ``advface audit`` flags choosing it (the reference schemes with and without centring).
SCHEMES = {
    "biohash": ["--scheme", "biohash", "--no-centre"],
    "biohash-centred": ["--scheme", "biohash", "--centre"],
    "mlphash": ["--scheme", "mlphash", "--no-centre"],
    "mlphash-centred": ["--scheme", "mlphash", "--centre"],
    "polyprotect": ["--scheme", "polyprotect", "--no-centre"],
    "polyprotect-centred": ["--scheme", "polyprotect", "--centre"],
    "advface": ["--protection", "advface"],
}
#: The reduced quick mode: ``--quick`` on more people, decoders trained longer (flags appended to every run).
REDUCED = [
    "--quick",
    "--max-identities",
    "300",
    "--max-photos",
    "4",
    "--max-victims",
    "60",
    "--epochs",
    "6",
    "--attackers",
    "deconv",
    "resup+id",
    "gan-prior",
    "adaptive",
    "--scenario-pool",
    "512",
    "--known-pairs-k",
    "1",
    "4",
    "16",
    "64",
    "256",
    "512",
    "--score-victims",
    "8",
]


def _best(attacks: dict[str, Any], kind: str, judge: bool = False) -> tuple[str | None, float | None]:
    """The attacker with the best Type I at FMR 0.1% on ``kind`` templates (by the transfer judge with ``judge``)."""
    rates: dict[str, float] = {}
    for name, attack in attacks.items():
        entry = attack.get(kind)
        if entry is None:
            continue
        if judge:
            value = (entry.get("transfer") or {}).get("fmr_1e-3", {}).get("type1_success")
        else:
            value = entry.get("type1_success")
        if value is not None:
            rates[name] = value
    if not rates:
        return None, None
    name = max(rates, key=lambda n: rates[n])
    return name, rates[name]


def row_of(report: dict[str, Any], kind: str) -> dict[str, Any]:
    """The comparison row of one report's ``kind`` templates (``protected`` or ``protected+key``)."""
    attacks = report.get("attacks", {})
    best_name, best = _best(attacks, kind)
    _, best_judge = _best(attacks, kind, judge=True)
    _, raw_best = _best(attacks, "raw")
    utility = report.get("utility", {})
    unl = report.get("unlinkability", {}).get("d_sys", {})
    renew = report.get("renewability", {})
    d_key = "advface+key" if kind == "protected+key" else "advface"
    out: dict[str, Any] = {
        "templates": kind,
        "best_attacker": best_name,
        "type1_best": best,
        "type1_best_transfer_judge": best_judge,
        "type1_best_on_raw": raw_best,
        "centre": report.get("protection", {}).get("centre"),
        "fnmr_at_fmr_1e-3": utility.get("fnmr_at_fmr_1e-3", {}).get(kind, {}).get("fnmr"),
        "fnmr_at_fmr_1e-3_ci95": utility.get("fnmr_at_fmr_1e-3", {}).get(kind, {}).get("fnmr_ci95"),
        "fnmr_at_fmr_1e-3_raw": utility.get("fnmr_at_fmr_1e-3", {}).get("raw", {}).get("fnmr"),
        "genuine_comparisons": utility.get("fnmr_at_fmr_1e-3", {}).get(kind, {}).get("genuine_comparisons"),
        "d_sys_unlinkability": unl.get(d_key),
        "d_sys_renewability": renew.get("d_sys", {}).get(d_key),
        "largest_nonmatching_set_min": renew.get("largest_nonmatching_set", {}).get(d_key, {}).get("min"),
    }
    sc = report.get("scenarios")
    if sc is not None and sc.get("templates") != kind:
        sc = sc.get(kind)  # the scenarios under the keyed transform (report format 6)
    if sc is not None and sc.get("templates") == kind:
        full = sc.get("full_disclosure", {})
        pairs = sc.get("known_pairs", [])
        exposure = sc.get("score_exposure", {})
        out.update(
            full_disclosure_type1=full.get("type1_success"),
            full_disclosure_template_match=full.get("inverse", {}).get("template_match_rate"),
            known_pairs=[
                {"k": p["k"], "template_match_rate": p["template_match_rate"], "type1_success": p["type1_success"]}
                for p in pairs
            ],
            score_exposure_scores=exposure.get("with_scores"),
            score_exposure_decisions=exposure.get("decisions_only"),
            score_exposure_budget=exposure.get("query_budget"),
        )
    return out


def main() -> None:
    """Audit each scheme and write benchmarks/results/audit_schemes.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="LFW root (identity folders under images/)")
    parser.add_argument("--work", help="folder for the reports (default: a temporary folder)")
    parser.add_argument("--cache-dir", help="the audits' cache (pairs, decoders); default $ADVFACE_CACHE_DIR")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="result file (default benchmarks/results/audit_schemes.json)")
    parser.add_argument(
        "--reuse", action="store_true", help="read a scheme's report already in --work instead of auditing it again"
    )
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="audit_schemes-"))
    advface = Path(sys.executable).parent / "advface"
    rows: dict[str, Any] = {}
    commands: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    for label in args.schemes:
        out = work / label
        command = [str(advface), "audit", "--data", args.data, "--out", str(out), *REDUCED, *SCHEMES[label]]
        command += ["--no-images", "--quiet", "--threads", str(args.threads)]
        if args.cache_dir:
            command += ["--cache-dir", args.cache_dir]
        started = time.perf_counter()
        if not (args.reuse and (out / "report.json").is_file()):
            print("running", " ".join(command), flush=True)
            subprocess.run(command, check=True)
        report = json.loads((out / "report.json").read_text())
        seconds[label] = report.get("seconds") or round(time.perf_counter() - started, 1)
        commands[label] = command[1:]
        rows[label] = row_of(report, "protected")
        rows[label]["missing"] = report.get("missing", [])
        if label == "advface":
            rows["advface+key"] = row_of(report, "protected+key")
        print(label, json.dumps(rows[label])[:400], flush=True)
    payload = {
        "mode": "reduced quick mode: " + " ".join(REDUCED),
        "note": "AdvFace + keyed transform is the protected+key column of the AdvFace run, its scenarios those on "
        "the protected+key templates (reports of format 6; an older report has none); every scheme's protected+key "
        "column is the scheme under the same keyed transform; the keyed transform's key is ephemeral per run; "
        "'-centred': the reference scheme on templates minus the public mean of the defender group",
        "schemes": rows,
        "audit_commands": commands,
        "seconds": seconds,
    }
    print("wrote", write_results("audit_schemes", payload, args.out))


if __name__ == "__main__":
    main()
