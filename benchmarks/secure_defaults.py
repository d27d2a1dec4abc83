"""What a default-configured sidecar store gives a thief, before and after the key folder (issue #19).

Usage::

    python benchmarks/secure_defaults.py [--people 300] [--out benchmarks/results/secure_defaults.json]

Two deployments (two data folders, two key folders) of the sidecar's service layer on the embedded defaults
(``advface serve`` without a configuration file: dlib, AdvFace with the shipped shadow, SQLite + faiss), once with
``keys.auto: false`` (what the defaults were before) and once with the new defaults (``keys.auto: true``). Each
enrols the same LFW people (photo A's dlib embedding, the subject id the person's name, one metadata value), then:

- **thief without keys** (the data folder copied): every file is scanned for each stored template and raw embedding
  as float32 at every byte offset (a vector counts as recovered when its first 16 bytes appear), and for each subject
  id and metadata value as UTF-8;
- **linkability across deployments**: D_sys (``advface.unlinkability``) between the two deployments' stored
  templates of the same people (mated) and of different people (non-mated), as a thief holding both databases with
  their encryption keys but not the transform secrets reads them; and the share of ``Protect`` outputs that are
  byte-identical across the deployments for the same embedding;
- **matching kept**: photo B of each person verified against the enrolled subject (genuine accepts), and photo B of
  the next person (impostor accepts), at the sidecar's own threshold.

Data: the LFW people with two or more photos (first two photos, name order), dlib embeddings from the cached
``build_face_pairs`` (the same cache as ``benchmarks/advface_lfw.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.config import load_config  # noqa: E402
from advface.datasets import LFW  # noqa: E402
from advface.datasets.pairs import build_face_pairs  # noqa: E402
from advface.encoders import create_encoder  # noqa: E402
from advface.service import EnrolItem, TemplateService  # noqa: E402
from advface.unlinkability import d_sys  # noqa: E402
from benchmarks.common import write_results  # noqa: E402


def people_embeddings(lfw_dir: str | None, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names, photo-A and photo-B dlib embeddings of the first ``n`` LFW people with two or more photos."""
    pairs = build_face_pairs(LFW(lfw_dir), create_encoder("dlib"), image_size=64).without_flips()
    rows: dict[str, list[int]] = {}
    for i, person in enumerate(pairs.identities.tolist()):
        rows.setdefault(person, []).append(i)
    names = sorted(p for p, r in rows.items() if len(r) >= 2)[:n]
    a = np.stack([pairs.embeddings[rows[p][0]] for p in names]).astype(np.float32)
    b = np.stack([pairs.embeddings[rows[p][1]] for p in names]).astype(np.float32)
    return names, a, b


def deployment(folder: Path, auto: bool) -> TemplateService:
    """A sidecar service on the embedded defaults, its data and key folders in ``folder``."""
    folder.mkdir(parents=True)
    (folder / "advface.yaml").write_text(
        yaml.safe_dump(
            {"store": {"data_dir": str(folder / "data")}, "keys": {"auto": auto, "dir": str(folder / "keys")}}
        )
    )
    return TemplateService(load_config(folder / "advface.yaml", env={}))


def thief_without_keys(data_dir: Path, vectors: list[np.ndarray], texts: list[str]) -> dict[str, int]:
    """What a copy of ``data_dir`` shows without keys: vectors and texts found in its bytes."""
    blob = b"".join(p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file())
    found = sum(np.asarray(v, "<f4").tobytes()[:16] in blob for v in vectors)
    return {
        "bytes_scanned": len(blob),
        "vectors_checked": len(vectors),
        "vectors_found": int(found),
        "texts_checked": len(texts),
        "texts_found": int(sum(t.encode() in blob for t in texts)),
    }


def linkage(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """D_sys between two databases of the same people (row i = person i), scores = minus Euclidean distance."""
    scores = -np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    mated = np.diag(scores)
    nonmated = scores[~np.eye(len(a), dtype=bool)]
    value, curve = d_sys(mated, nonmated, noise_floor=True)
    return {"d_sys": value, "noise_floor": curve.noise_floor, "noise_floor_p95": curve.noise_floor_p95}


def run_setting(names: list[str], a: np.ndarray, b: np.ndarray, auto: bool, root: Path) -> dict[str, Any]:
    """Two deployments with ``keys.auto = auto``: the thief's view, linkability and matching."""
    tenant = "site"
    stored, protected, out = [], [], {}
    started = time.perf_counter()
    for which in ("A", "B"):
        svc = deployment(root / f"{'auto' if auto else 'off'}_{which}", auto)
        try:
            items = [EnrolItem(n, z, {"employee": f"EMP-{i:06d}"}) for i, (n, z) in enumerate(zip(names, a))]
            for start in range(0, len(items), svc.max_batch):
                asyncio.run(svc.enroll_batch(tenant, items[start : start + svc.max_batch]))
            vectors = np.stack([svc.store.subject_vectors(tenant, n)[0] for n in names])
            stored.append(vectors)
            protected.append(asyncio.run(svc.protect(a, tenant=None)))
            if which == "A":
                genuine = [asyncio.run(svc.verify(tenant, n, z)).match for n, z in zip(names, b)]
                impostor = [asyncio.run(svc.verify(tenant, n, z)).match for n, z in zip(names, np.roll(b, 1, 0))]
                out["matching"] = {
                    "genuine_accept": float(np.mean(genuine)),
                    "impostor_accept": float(np.mean(impostor)),
                    "threshold": svc.threshold.value,
                    "threshold_source": svc.threshold.source,
                }
                out["layers"] = {
                    "encrypted_at_rest": svc.config.encryption.enabled,
                    "keyed_transform": svc.transforms is not None,
                    "sealed_subject_ids": bool(getattr(svc.store, "sealed_names", False)),
                    "protection_seed_is_zero": svc.config.protection.seed in (None, 0),
                }
        finally:
            svc.close()
        texts = [*names, *(f"EMP-{i:06d}" for i in range(len(names)))]
        out[f"thief_without_keys_{which}"] = thief_without_keys(
            root / f"{'auto' if auto else 'off'}_{which}" / "data", [*vectors, *a], texts
        )
    out["linkability_across_deployments"] = linkage(stored[0], stored[1])
    out["protect_identical_across_deployments"] = float(np.mean(np.all(protected[0] == protected[1], axis=1)))
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=300, help="LFW people (default 300)")
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--out")
    args = parser.parse_args()
    names, a, b = people_embeddings(args.lfw_dir, args.people)
    with tempfile.TemporaryDirectory(prefix="advface-secure-defaults-") as tmp:
        payload = {
            "people": len(names),
            "before_keys_auto_false": run_setting(names, a, b, False, Path(tmp)),
            "defaults_keys_auto_true": run_setting(names, a, b, True, Path(tmp)),
        }
    out = write_results("secure_defaults", payload, args.out)
    for key in ("before_keys_auto_false", "defaults_keys_auto_true"):
        r = payload[key]
        thief = r["thief_without_keys_A"]
        print(
            f"{key}: thief finds {thief['vectors_found']}/{thief['vectors_checked']} vectors, "
            f"{thief['texts_found']}/{thief['texts_checked']} texts; D_sys across deployments "
            f"{r['linkability_across_deployments']['d_sys']:.3f}; Protect identical "
            f"{r['protect_identical_across_deployments']:.2f}; genuine {r['matching']['genuine_accept']:.3f}, "
            f"impostor {r['matching']['impostor_accept']:.3f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
