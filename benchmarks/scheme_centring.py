"""Utility of the audit's reference schemes with and without centring: FNMR at FMR 0.1% and 0.01% of BioHashing,
MLP-hash and PolyProtect-style on raw dlib templates as they come and minus the public mean of the defender group
(``advface audit --centre`` / ``--no-centre``), measured exactly as the audit's ``utility`` section is (the audit's
dataset loading, identity split, evaluation photos and ``advface.audit.field_metrics``), but without the attackers,
so that it can use every LFW person the full-mode audit uses.

Usage (the (embedding, face) pairs come from the audit's pairs cache; a cold cache detects every LFW photo first)::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/scheme_centring.py --data $ADVFACE_LFW_DIR --cache-dir .cache/advface

Writes benchmarks/results/scheme_centring.json: per scheme and setting, the FNMR at each FMR with its Wilson 95%
interval and the comparison counts, and the norm of the mean that centring subtracts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.audit.config import AuditConfig  # noqa: E402
from advface.audit.field_metrics import all_pair_scores, fnmr_at_fmr  # noqa: E402
from advface.audit.results import UTILITY_FMRS  # noqa: E402
from advface.audit.schemes import SCHEMES  # noqa: E402
from advface.audit.stages.inputs import load_dataset, select_victims  # noqa: E402
from advface.audit.stages.protection import scheme_protector  # noqa: E402
from benchmarks.common import write_results  # noqa: E402


def measure(scores: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """FNMR at each of the audit's utility FMRs for ``(genuine, impostor)`` scores."""
    genuine, impostor = scores
    return {label: fnmr_at_fmr(genuine, impostor, fmr).to_json() for label, fmr in UTILITY_FMRS.items()}


def main() -> None:
    """Measure each reference scheme centred and not, and write benchmarks/results/scheme_centring.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="LFW root (identity folders under images/)")
    parser.add_argument("--cache-dir", help="the audit's cache (pairs); default $ADVFACE_CACHE_DIR")
    parser.add_argument("--max-identities", type=int, default=0, help="0: every identity, as the full-mode audit")
    parser.add_argument("--per-identity", type=int, help="evaluation photos per person (default: the audit's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="result file (default benchmarks/results/scheme_centring.json)")
    args = parser.parse_args()
    overrides: dict[str, Any] = {"per_identity": args.per_identity} if args.per_identity else {}
    config = AuditConfig(
        data=Path(args.data),
        out=Path(tempfile.mkdtemp(prefix="scheme_centring-")),
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        max_identities=args.max_identities,
        seed=args.seed,
        progress=False,
        **overrides,
    )
    started = time.perf_counter()
    inputs = select_victims(config, load_dataset(config))
    raw, identities, metric = inputs.raw, inputs.identities, inputs.encoder.metric
    defender = inputs.pairs.of_identities(set(inputs.split.defender)).without_flips().embeddings
    rows: dict[str, Any] = {"raw": measure(all_pair_scores(raw, raw, identities, metric))}
    for name in SCHEMES:
        for centre in (False, True):
            scheme_config = AuditConfig(config.data, config.out, scheme=name, scheme_centre=centre, seed=args.seed)
            protector = scheme_protector(scheme_config, defender)
            enrolled = protector.protect(raw, args.seed, lambda n: None)
            assert protector.protect_probes is not None  # the reference schemes transform probes
            probes = protector.protect_probes(raw)
            label = f"{name}{'-centred' if centre else ''}"
            rows[label] = {
                "centre": protector.summary.centre,
                **measure(all_pair_scores(enrolled, probes, identities, metric)),
            }
            print(label, {k: round(v["fnmr"], 4) for k, v in rows[label].items() if k != "centre"}, flush=True)
    payload = {
        "protocol": "the audit's utility measurement (advface.audit.field_metrics, as report.json utility): every pair "
        "of distinct evaluation photos, enrolled template of one against the probe of the other, both through the "
        "scheme with the key of seed --seed; evaluation photos, split and defender group as advface audit chooses "
        "them (full mode unless --max-identities); FNMR with a Wilson 95% interval, the threshold the highest "
        "impostor score keeping the FMR at most the target",
        "data": inputs.summary.to_json(),
        "defender_templates": len(defender),
        "defender_mean_norm": float(np.linalg.norm(np.asarray(defender, np.float64).mean(axis=0))),
        "mean_template_norm": float(np.linalg.norm(raw, axis=1).mean()),
        "schemes": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print("wrote", write_results("scheme_centring", payload, args.out))


if __name__ == "__main__":
    main()
