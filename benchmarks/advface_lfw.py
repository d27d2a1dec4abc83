"""AdvFace on LFW with the dlib encoder: utility (View-2 verification with protected templates) and privacy
(identity inference from reconstructions by the shadow model, independent attackers and an adaptive attacker),
over a sweep of perturbation budgets.

Usage (full run, about an hour on 2 CPU cores; attackers and pairs are cached)::

    python benchmarks/advface_lfw.py --shadow advface/models/shadow_dlib.pt --epochs 20

Identity groups come from ``advface.datasets.splits`` (seed 0): the shadow is trained on *defender* identities,
attackers on *attacker* identities, privacy is measured on *evaluation* identities (at most ``--per-identity``
photos each). Attackers: ``attacker-deconv`` and ``attacker-pixelshuffle`` (pixel L1, other architectures than the
shadow), and ``adaptive-deconv``, trained on the protected templates of the attacker identities (an insider who
enrols people and reads back their stored templates).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.attack_metrics import attack_success, impostor_threshold, reconstruct  # noqa: E402
from advface.datasets import LFW  # noqa: E402
from advface.datasets.pairs import FacePairs, build_face_pairs  # noqa: E402
from advface.datasets.splits import split_identities  # noqa: E402
from advface.encoders import create_encoder  # noqa: E402
from advface.hashing import file_sha256  # noqa: E402
from advface.inversion import load_decoder  # noqa: E402
from advface.inversion.training import TrainConfig, train_on_group  # noqa: E402
from advface.paths import cache_dir  # noqa: E402
from advface.protect import AdvFaceConfig, perturbation_stats, protect_embeddings  # noqa: E402
from benchmarks.common import RESULTS_DIR, view2_verification, write_results  # noqa: E402

ATTACKERS = {"attacker-deconv": "deconv", "attacker-pixelshuffle": "pixelshuffle"}


def evaluation_set(pairs: FacePairs, identities: frozenset[str], per_identity: int) -> tuple[FacePairs, np.ndarray]:
    """Up to ``per_identity`` photos per evaluation identity, and for each the index of another photo of the person."""
    originals = pairs.without_flips().of_identities(identities)
    keep: list[int] = []
    for name in sorted(identities):
        rows = np.flatnonzero(originals.identities == name)
        if len(rows) >= 2:
            keep.extend(rows[:per_identity].tolist())
    subset = originals.subset(np.asarray(keep))
    other = np.empty(len(subset), dtype=int)
    for i, name in enumerate(subset.identities):
        rows = np.flatnonzero(subset.identities == name)
        other[i] = rows[(np.searchsorted(rows, i) + 1) % len(rows)]
    return subset, other


def main() -> None:  # noqa: PLR0915 - one linear script
    """Run the benchmark and write benchmarks/results/advface_lfw.json (+ PNG plot and image grid)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shadow", help="shadow checkpoint (default: train one on the defender group)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20, help="epochs of each trained decoder")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--default-budget", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=AdvFaceConfig.steps)
    parser.add_argument("--per-identity", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lfw-dir")
    parser.add_argument(
        "--train-only",
        choices=["attacker-deconv", "attacker-pixelshuffle", "adaptive-deconv"],
        help="only train (and cache) this attacker, then exit: lets attackers train in parallel",
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    started = time.perf_counter()

    lfw = LFW(args.lfw_dir)
    encoder = create_encoder("dlib-torch")  # same embeddings as the dlib runtime (max diff < 1e-6), batched
    pairs = build_face_pairs(lfw, encoder, image_size=args.image_size, workers=args.workers)
    split = split_identities(pairs.identities[~pairs.flipped].tolist(), seed=0)
    work = cache_dir() / "advface_lfw"
    work.mkdir(parents=True, exist_ok=True)
    train_config = dict(image_size=args.image_size, epochs=args.epochs, seed=0)

    decoders = {}
    for name, arch in ATTACKERS.items():
        if args.train_only and args.train_only != name:
            continue
        ckpt = work / f"{name}-e{args.epochs}.pt"
        if ckpt.is_file():
            decoders[name] = load_decoder(ckpt)[0]
        else:
            decoders[name] = train_on_group(
                pairs,
                split,
                "attacker",
                encoder,
                TrainConfig(arch=arch, **train_config),
                out=ckpt,
                dataset_name="lfw",
                work_dir=work / name,
            )[0]

    def protect(z: np.ndarray, budget: float) -> np.ndarray:
        return protect_embeddings(z, shadow, AdvFaceConfig(rel_l2=budget, steps=args.steps, seed=0))

    if args.train_only and args.train_only != "adaptive-deconv":
        return
    if args.shadow:
        shadow, shadow_meta = load_decoder(args.shadow)
    else:
        shadow, shadow_meta = train_on_group(
            pairs,
            split,
            "defender",
            encoder,
            TrainConfig(arch="resup", **train_config),
            out=work / "shadow.pt",
            dataset_name="lfw",
            work_dir=work / "shadow",
        )
    decoders = {"shadow": shadow, **decoders}
    # Adaptive attacker: trains on protected templates of its own (attacker-group) identities.
    shadow_id = file_sha256(args.shadow or work / "shadow.pt")[:12]
    adaptive_name = f"adaptive-deconv-e{args.epochs}-b{args.default_budget}-s{args.steps}-{shadow_id}"
    adaptive_ckpt = work / f"{adaptive_name}.pt"
    if adaptive_ckpt.is_file():
        decoders["adaptive-deconv"] = load_decoder(adaptive_ckpt)[0]
    else:
        attacker_pairs = pairs.of_identities(split.attacker)
        protected_pairs = FacePairs(
            attacker_pairs.ids,
            attacker_pairs.identities,
            protect(attacker_pairs.embeddings, args.default_budget),
            attacker_pairs.faces,
            attacker_pairs.flipped,
        )
        decoders["adaptive-deconv"] = train_on_group(
            protected_pairs,
            split,
            "attacker",
            encoder,
            TrainConfig(arch="deconv", **train_config),
            out=adaptive_ckpt,
            dataset_name="lfw (protected templates)",
            work_dir=work / adaptive_name,
        )[0]
    if args.train_only:
        return

    # Evaluation templates and the FMR 0.1% threshold on clean LFW.
    clean = pairs.without_flips()
    threshold = impostor_threshold(clean.embeddings, clean.identities, encoder.metric, fmr=1e-3)
    evalset, other = evaluation_set(pairs, split.evaluation, args.per_identity)
    z = evalset.embeddings

    # Utility on View-2 (photos that failed detection count as rejections).
    view2 = lfw.pairs()
    raw = {i: e for i, e in zip(clean.ids.tolist(), clean.embeddings)}
    needed = sorted({p.a for p in view2} | {p.b for p in view2})
    needed = [i for i in needed if i in raw]
    utility_raw = view2_verification(encoder, view2, raw, raw)

    results: dict = {
        "encoder": encoder.fingerprint,
        "split": split.describe(),
        "threshold_fmr_1e-3": threshold,
        "evaluation_templates": len(z),
        "steps": args.steps,
        "default_budget": args.default_budget,
        "shadow": {k: shadow_meta.get(k) for k in ("arch", "loss", "training_data", "metrics")},
        "budget_sweep": [],
    }
    for budget in args.budgets:
        t0 = time.perf_counter()
        z_prot = protect(z, budget)
        prot_view2 = dict(zip(needed, protect(np.stack([raw[i] for i in needed]), budget)))
        entry = {
            "rel_l2": budget,
            "perturbation": perturbation_stats(z, z_prot),
            "utility": {
                "protected": view2_verification(encoder, view2, prot_view2, raw),
                "protected_vs_protected": view2_verification(encoder, view2, prot_view2, prot_view2),
            },
            "privacy": {},
        }
        for name, decoder in decoders.items():
            if name == "adaptive-deconv" and budget != args.default_budget:
                continue
            entry["privacy"][name] = attack_success(
                encoder, reconstruct(decoder, z_prot), z, z[other], evalset.faces, threshold
            ).as_dict()
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results["budget_sweep"].append(entry)
        print(
            f"E={budget}: acc {100 * entry['utility']['protected']['accuracy_mean']:.2f}% "
            + " ".join(f"{n}:{100 * r['type1_success']:.1f}%" for n, r in entry["privacy"].items()),
            flush=True,
        )

    # Enrolment photo as the target x~ instead of S(z) (the poster's online mode), at the default budget.
    z_img = protect_embeddings(
        z, shadow, AdvFaceConfig(rel_l2=args.default_budget, steps=args.steps, seed=0), target_images=evalset.faces
    )
    results["with_enrolment_image"] = {
        "rel_l2": args.default_budget,
        "privacy": {
            name: attack_success(encoder, reconstruct(decoder, z_img), z, z[other], evalset.faces, threshold).as_dict()
            for name, decoder in decoders.items()
        },
    }

    default = next(e for e in results["budget_sweep"] if e["rel_l2"] == args.default_budget)
    results["utility"] = {"raw": utility_raw, **default["utility"]}
    results["privacy"] = {}
    for name, decoder in decoders.items():
        raw_attack = attack_success(encoder, reconstruct(decoder, z), z, z[other], evalset.faces, threshold)
        results["privacy"][name] = {
            "raw": raw_attack.as_dict(),
            "protected": default["privacy"][name],
            "adaptive": name.startswith("adaptive"),
            "role": "shadow" if name == "shadow" else "attacker",
        }
    results["seconds"] = round(time.perf_counter() - started, 1)
    out = write_results("advface_lfw", results, args.out)
    print("wrote", out)
    _plots(results, decoders, evalset, z, protect, args, out.parent if args.out else RESULTS_DIR)


def _plots(results, decoders, evalset, z, protect, args, folder: Path) -> None:  # noqa: ANN001
    """Privacy-utility frontier and the image grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["budget_sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    drops = [
        100 * (results["utility"]["raw"]["tar_at_far_1e-3"] - e["utility"]["protected"]["tar_at_far_1e-3"])
        for e in sweep
    ]
    for name in decoders:
        pts = [(d, 100 * e["privacy"][name]["type1_success"]) for d, e in zip(drops, sweep) if name in e["privacy"]]
        ax.plot(*zip(*pts), "o-", label=name)
    for d, e in zip(drops, sweep):
        ax.annotate(f"E={e['rel_l2']}", (d, 0), fontsize=7)
    ax.set_xlabel("TAR@FAR=1e-3 drop (points), protected vs raw probe")
    ax.set_ylabel("Type-I identity inference (%) at FMR 0.1%")
    ax.set_title("AdvFace on LFW (dlib): privacy vs utility")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "advface_lfw_frontier.png", dpi=120)
    plt.close(fig)

    n = 6
    z_prot = protect(z[:n], args.default_budget)
    rows = [("original", evalset.faces[:n])]
    for name, decoder in decoders.items():
        rows.append((f"{name} raw", reconstruct(decoder, z[:n])))
        rows.append((f"{name} prot.", reconstruct(decoder, z_prot)))
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 1.2, len(rows) * 1.25))
    for r, (label, faces) in enumerate(rows):
        for c in range(n):
            axes[r, c].imshow(faces[c])
            axes[r, c].axis("off")
        axes[r, 0].set_title(label, fontsize=6, loc="left")
    fig.tight_layout()
    # The grid shows LFW faces: written next to the results but never committed (see .gitignore).
    (folder / "local").mkdir(exist_ok=True)
    fig.savefig(folder / "local" / "advface_lfw_grid.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
