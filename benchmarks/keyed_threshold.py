"""Decision threshold of the sidecar with the keyed per-tenant transform on (LFW View-2, dlib).

Usage (the AdvFace templates of View-2's first photos are cached with ``benchmarks/keyed_transform.py``'s cache;
a first run protects the ones not cached yet, about 10-30 minutes on 2 shared CPU cores; a rerun takes a minute)::

    python benchmarks/keyed_threshold.py

The sidecar stores ``T(AdvFace(z_a))`` and matches a probe as ``T(z_b)``, where ``T`` is the tenant's keyed transform
(``advface/protect/keyed.py``). A rotation alone keeps every score, so the calibrated threshold of plain AdvFace
holds. With norm equalisation (``keyed_transform.norm``) both vectors are first scaled to one fixed norm, which
changes scores; this script measures, on LFW View-2 (protected template of photo a vs raw probe of photo b, the
protocol of the calibrated threshold in ``server/servicer.py``), the FAR 0.1% threshold and TAR for: AdvFace alone,
AdvFace + rotation, AdvFace + norm-equalised rotation (the default norm of ``advface.protect.tenant_transform``).
The sidecar reports the norm-equalised value as its threshold when the transform is on with a norm.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.protect import shipped_shadow_path  # noqa: E402
from advface.protect.keyed import KeyedTransform  # noqa: E402
from advface.protect.tenant_transform import CALIBRATED_NORMS  # noqa: E402
from benchmarks.common import view2_verification, write_results  # noqa: E402
from benchmarks.keyed_transform import ProtectedCache, add_template_arguments, load_faces  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_template_arguments(parser)
    parser.add_argument("--out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measure and write benchmarks/results/keyed_threshold.json."""
    from advface.paths import cache_dir

    args = parse_args(argv)
    started = time.perf_counter()
    lfw, encoder, faces = load_faces(args)
    view2 = lfw.pairs()
    raw = dict(zip(faces.ids.tolist(), faces.embeddings))
    needed = sorted({p.a for p in view2 if p.a in raw})
    cache = ProtectedCache(shipped_shadow_path("dlib"), args.budget, args.steps, cache_dir() / "keyed_transform")
    protected = dict(zip(needed, cache.get(np.array(needed), np.stack([raw[i] for i in needed]), seed=0)))

    norm = CALIBRATED_NORMS["dlib"]
    secret = b"advface keyed-threshold benchmark secret (public)"
    rotation = KeyedTransform.from_secret(secret, "tenant-a", encoder.dim)  # type: ignore[attr-defined]
    equalised = KeyedTransform.from_secret(secret, "tenant-a", encoder.dim, norm=norm)  # type: ignore[attr-defined]

    def keyed(t: KeyedTransform, vectors: dict) -> dict:
        ids = list(vectors)
        return dict(zip(ids, t.apply(np.stack([vectors[i] for i in ids]))))

    keep = (
        "accuracy_mean",
        "tar_at_far_1e-3",
        "threshold_at_far_1e-3",
        "tar_at_far_1e-2",
        "threshold_at_far_1e-2",
        "pairs_with_failed_photo",
    )
    runs = {
        "raw": (raw, raw),
        "advface": (protected, raw),
        "advface + keyed rotation": (keyed(rotation, protected), keyed(rotation, raw)),
        "advface + norm-equalised keyed rotation": (keyed(equalised, protected), keyed(equalised, raw)),
        "raw + norm-equalised keyed rotation": (keyed(equalised, raw), keyed(equalised, raw)),
    }
    results: dict = {
        "protocol": "LFW View-2, 6000 pairs; side a: AdvFace template (shipped dlib shadow) of photo a, side b: raw "
        "probe of photo b, both through the keyed transform where named; pairs whose photo had no face "
        "count as rejections",
        "advface": {"shadow": "shipped dlib shadow", "rel_l2": args.budget, "steps": args.steps, "seed": 0},
        "norm": norm,
        "machine_shared": "2 CPU cores shared with other jobs (nice 10, OMP_NUM_THREADS=1)",
        "view2": {},
    }
    for name, (a, b) in runs.items():
        metrics = view2_verification(encoder, view2, a, b)
        results["view2"][name] = {k: metrics[k] for k in keep}
        print(name, results["view2"][name], flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    out = write_results("keyed_threshold", results, args.out)
    print("wrote", out)


if __name__ == "__main__":
    main()
