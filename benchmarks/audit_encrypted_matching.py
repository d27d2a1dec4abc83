"""The audit's own row for encrypted stores: ``advface audit --quick --matching encrypted`` on a dataset, and the
``encrypted_matching`` section and verdict row of its report (attackers B and C against encrypted matching: the
thief with the database and a memory dump of the sidecar, no key service; docs/audit.md, "Encrypted matching").

Usage (a quick audit plus the sidecar-like child: minutes on 2 busy CPU cores)::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/audit_encrypted_matching.py --data $ADVFACE_LFW_DIR --threads 1

Writes benchmarks/results/audit_encrypted_matching.json (the audit command, the row, the verdict row, the audited
sizes) and keeps the report under ``--work`` (``--no-images``: the report holds no faces).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_results  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="face dataset (an LFW root)")
    parser.add_argument("--work", type=Path, help="folder for the report (default: a temporary folder)")
    parser.add_argument("--cache-dir", type=Path, help="the audit's attacker cache (default: the audit's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more advface audit flags (last)")
    parser.add_argument("--out", help="results file (default benchmarks/results/audit_encrypted_matching.json)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="audit-encrypted-"))
    out = work / "report"
    command = [
        sys.executable,
        "-m",
        "advface.cli.main",
        "audit",
        "--quick",
        "--quiet",
        "--no-images",
        "--matching",
        "encrypted",
        "--data",
        args.data,
        "--out",
        str(out),
        "--threads",
        str(args.threads),
        *(["--cache-dir", str(args.cache_dir)] if args.cache_dir else []),
        *args.extra,
    ]
    started = time.time()
    run = subprocess.run(command, capture_output=True, text=True)
    seconds = round(time.time() - started, 1)
    print(run.stdout[-4000:], run.stderr[-2000:], sep="\n")
    if run.returncode != 0:
        raise SystemExit(f"advface audit failed with exit {run.returncode}")
    report = json.loads((out / "report.json").read_text())
    enc = report.get("encrypted_matching")
    if enc is None:
        raise SystemExit("the report has no encrypted_matching section: " + json.dumps(report.get("missing")))
    row = next(r for r in report["verdict"] if r["attacker"].startswith("thief with the database and the sidecar"))
    payload = {
        "audit_command": " ".join(command[2:]),
        "audit_seconds": seconds,
        "format_version": report["format_version"],
        "protection": report["protection"]["method"],
        "victims": report["data"].get("victims"),
        "missing": report["missing"],
        "encrypted_matching": enc,
        "verdict_row": row,
    }
    print("wrote", write_results("audit_encrypted_matching", payload, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
