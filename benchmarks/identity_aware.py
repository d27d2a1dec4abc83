"""Identity-aware attackers against plain and identity-aware AdvFace on LFW (dlib encoder).

The field's strongest cheap attacker trains its inversion decoder with an identity loss through the encoder (L1 +
the relative distance between the embedding of its jittered reconstruction and the input embedding). This script
trains such decoders (cached), then measures, across perturbation budgets, for plain AdvFace (the shipped
pixel-trained shadow) and identity-aware AdvFace (an ensemble of identity-aware shadows of three architectures):

- utility: LFW View-2 accuracy and TAR@FAR=1e-3 with protected templates against raw probes (``--view2-folds``
  folds of the ten, so that the slow identity-aware protection fits on a CPU);
- privacy: Type-I / Type-II identity-inference success (FMR 0.1% threshold on clean LFW) of every attacker, whose
  architecture and training identities differ from every shadow's, plus an adaptive attacker fine-tuned on
  templates protected by identity-aware AdvFace (an insider who enrols faces and reads their stored templates back).

Decoders (identity groups from ``advface.datasets.splits``, seed 0; shadows on *defender*, attackers on *attacker*,
victims from *evaluation*) are trained in two phases: pixel L1, then L1 + identity loss (fine-tuning). Train them in
parallel processes with ``--train NAME`` (one decoder, then exit), then run without ``--train`` to evaluate::

    python benchmarks/identity_aware.py --train shadow-resup-id &
    python benchmarks/identity_aware.py --train attacker-tokens-id &  ...
    python benchmarks/identity_aware.py --budgets 0.1 0.2 0.3
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.attack_metrics import attack_success, impostor_threshold, reconstruct  # noqa: E402
from advface.datasets import LFW  # noqa: E402
from advface.datasets.pairs import FacePairs, build_face_pairs  # noqa: E402
from advface.datasets.splits import split_identities  # noqa: E402
from advface.encoders import create_encoder  # noqa: E402
from advface.inversion import load_decoder  # noqa: E402
from advface.inversion.training import TrainConfig, train_on_group  # noqa: E402
from advface.paths import cache_dir  # noqa: E402
from advface.protect import AdvFaceConfig, perturbation_stats, protect_embeddings  # noqa: E402
from advface.protect.shipped import shipped_shadow_path  # noqa: E402
from benchmarks.advface_lfw import evaluation_set  # noqa: E402
from benchmarks.common import view2_verification, write_results  # noqa: E402


@dataclass(frozen=True)
class DecoderSpec:
    """One decoder of the study: architecture, identity group, pixel epochs (0 = start from ``init``), identity
    fine-tuning epochs."""

    arch: str
    group: str
    pixel_epochs: int
    id_epochs: int
    init: str | None = None  # "shipped" or a cache file name (pixel phase skipped)


SPECS: dict[str, DecoderSpec] = {
    # identity-aware shadows (defender identities), three architectures
    "shadow-resup-id": DecoderSpec("resup", "defender", 0, 1, init="shipped"),
    "shadow-deconv-id": DecoderSpec("deconv", "defender", 4, 1),
    "shadow-pixelshuffle-id": DecoderSpec("pixelshuffle", "defender", 4, 1),
    # identity-aware attackers (attacker identities), architectures no shadow uses
    "attacker-tokens-id": DecoderSpec("tokens", "attacker", 6, 1),
    "attacker-modconv-id": DecoderSpec("modconv", "attacker", 6, 1),
}
ID_WEIGHT = 1.0
#: pairs of the identity fine-tuning phase (a seeded random subset of the group's pairs: the identity loss runs the
#: encoder forward and backward, ~10x the cost of a pixel step on a CPU)
ID_PAIRS = 3200


def _work() -> Path:
    work = cache_dir() / "identity_aware"
    work.mkdir(parents=True, exist_ok=True)
    return work


def train_spec(name: str, pairs: FacePairs, split, encoder, *, image_size: int) -> tuple:  # noqa: ANN001
    """Train (or load from the cache) decoder ``name`` of :data:`SPECS`."""
    spec = SPECS[name]
    work = _work()
    final = work / f"{name}.pt"
    if final.is_file():
        return load_decoder(final)
    if spec.init == "shipped":
        init = str(shipped_shadow_path("dlib"))
    elif spec.init:
        init = str(cache_dir() / spec.init)
        if not Path(init).is_file():
            raise SystemExit(f"{name}: needs {init} (run benchmarks/advface_lfw.py --train-only first)")
    else:
        init = str(work / f"{name}-pixel.pt")
        if not Path(init).is_file():
            train_on_group(
                pairs,
                split,
                spec.group,
                encoder,
                TrainConfig(arch=spec.arch, image_size=image_size, epochs=spec.pixel_epochs, seed=0),
                out=init,
                dataset_name="lfw",
                work_dir=work / f"{name}-pixel",
            )
    config = TrainConfig(
        arch=spec.arch,
        image_size=image_size,
        epochs=spec.id_epochs,
        lr=5e-4,
        seed=0,
        id_weight=ID_WEIGHT,
        init_from=init,
    )
    return train_on_group(
        _id_subset(pairs, split.group(spec.group)),
        split,
        spec.group,
        encoder,
        config,
        out=final,
        dataset_name=f"lfw ({ID_PAIRS} random pairs of the group)",
        work_dir=work / name,
    )


def _id_subset(pairs: FacePairs, identities: frozenset[str]) -> FacePairs:
    """A seeded random subset of :data:`ID_PAIRS` pairs of ``identities`` (all of them when fewer)."""
    rows = np.flatnonzero(np.isin(pairs.identities, sorted(identities)))
    if len(rows) > ID_PAIRS:
        rows = np.sort(np.random.default_rng(0).choice(rows, ID_PAIRS, replace=False))
    return pairs.subset(rows)


def main() -> None:  # noqa: PLR0915 - one linear script
    """Train one decoder (``--train``) or run the evaluation and write benchmarks/results/identity_aware.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", choices=sorted(SPECS), help="only train (and cache) this decoder, then exit")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3], help="budgets of plain AdvFace")
    parser.add_argument(
        "--id-budgets",
        type=float,
        nargs="+",
        default=[0.2, 0.3],
        help="budgets of identity-aware AdvFace (slow: fewer points)",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--per-identity", type=int, default=2)
    parser.add_argument(
        "--view2-folds",
        type=int,
        default=3,
        help="View-2 folds for utility (of 10; 0: privacy only, no utility, no plot)",
    )
    parser.add_argument("--methods", nargs="+", default=["advface", "advface-id"])
    parser.add_argument(
        "--max-templates", type=int, default=0, help="evaluate on a seeded random subset of this many victims (0: all)"
    )
    parser.add_argument(
        "--adaptive",
        action="store_true",
        help="also fine-tune and test the adaptive attacker (protects the attacker group: slow)",
    )
    parser.add_argument("--adaptive-budget", type=float, default=0.2)
    parser.add_argument(
        "--adaptive-epochs",
        type=int,
        default=1,
        help="epochs of the adaptive fine-tuning (default 1, like the attackers' identity phase)",
    )
    parser.add_argument("--lfw-dir")
    parser.add_argument("--out")
    args = parser.parse_args()
    started = time.perf_counter()

    lfw = LFW(args.lfw_dir)
    encoder = create_encoder("dlib-torch")
    pairs = build_face_pairs(lfw, encoder, image_size=args.image_size, workers=1)
    split = split_identities(pairs.identities[~pairs.flipped].tolist(), seed=0)
    if args.train:
        train_spec(args.train, pairs, split, encoder, image_size=args.image_size)
        return

    from advface.protect.identity_aware import IdentityAwareConfig, protect_identity_aware

    decoders = {name: train_spec(name, pairs, split, encoder, image_size=args.image_size)[0] for name in SPECS}
    shadows = [decoders[n] for n in SPECS if n.startswith("shadow-")]
    attackers = {n: d for n, d in decoders.items() if n.startswith("attacker-")}
    plain_shadow = load_decoder(shipped_shadow_path("dlib"))[0]
    module = encoder.torch_module()

    def protect(method: str, z: np.ndarray, budget: float) -> np.ndarray:
        if method == "advface":
            return protect_embeddings(z, plain_shadow, AdvFaceConfig(rel_l2=budget, steps=args.steps, seed=0))
        config = IdentityAwareConfig(rel_l2=budget, steps=args.steps, seed=0)
        with tqdm(total=len(z), desc=f"advface-id E={budget}", unit="template") as bar:
            return protect_identity_aware(z, shadows, module, config, chip_size=encoder.chip.size, progress=bar.update)

    clean = pairs.without_flips()
    threshold = impostor_threshold(clean.embeddings, clean.identities, encoder.metric, fmr=1e-3)
    evalset, other = evaluation_set(pairs, split.evaluation, args.per_identity)
    z_other = evalset.embeddings[other]  # Type II: another photo of the same person
    if 0 < args.max_templates < len(evalset):
        keep = np.sort(np.random.default_rng(0).choice(len(evalset), args.max_templates, replace=False))
        evalset, z_other = evalset.subset(keep), z_other[keep]
    z = evalset.embeddings
    view2 = [p for p in lfw.pairs() if p.fold < args.view2_folds]
    raw = {i: e for i, e in zip(clean.ids.tolist(), clean.embeddings)}
    needed = sorted(i for i in {p.a for p in view2} | {p.b for p in view2} if i in raw)

    # Adaptive attacker: the identity-aware tokens attacker fine-tuned again, with the same recipe as its identity
    # phase (the same ID_PAIRS pairs of its identities, L1 + identity loss), on their identity-aware-protected
    # templates: an insider who enrolled those people and read the stored templates back.
    adaptive_file = _work() / (
        f"adaptive-tokens-id-b{args.adaptive_budget}-s{args.steps}-e{args.adaptive_epochs}-p{ID_PAIRS}.pt"
    )
    if adaptive_file.is_file():
        attackers["adaptive-tokens-id"] = load_decoder(adaptive_file)[0]
    elif args.adaptive and "advface-id" in args.methods:
        own = _id_subset(pairs, split.attacker)
        prot = FacePairs(
            own.ids, own.identities, protect("advface-id", own.embeddings, args.adaptive_budget), own.faces, own.flipped
        )
        config = TrainConfig(
            arch="tokens",
            image_size=args.image_size,
            epochs=args.adaptive_epochs,
            lr=5e-4,
            seed=0,
            id_weight=ID_WEIGHT,
            init_from=str(_work() / "attacker-tokens-id.pt"),
        )
        attackers["adaptive-tokens-id"] = train_on_group(
            prot,
            split,
            "attacker",
            encoder,
            config,
            out=adaptive_file,
            dataset_name=f"lfw ({len(own)} pairs of the group, identity-aware AdvFace E={args.adaptive_budget} "
            "templates)",
            work_dir=_work() / adaptive_file.stem,
        )[0]

    results: dict = {
        "encoder": encoder.fingerprint,
        "split": split.describe(),
        "threshold_fmr_1e-3": threshold,
        "evaluation_templates": len(z),
        "steps": args.steps,
        "view2_folds": args.view2_folds,
        "view2_pairs": len(view2),
        "id_weight": ID_WEIGHT,
        "per_identity": args.per_identity,
        "adaptive": (
            {
                "file": adaptive_file.name,
                "budget": args.adaptive_budget,
                "epochs": args.adaptive_epochs,
                "pairs": ID_PAIRS,
                "init": "attacker-tokens-id",
            }
            if "adaptive-tokens-id" in attackers
            else None
        ),
        "decoders": {
            n: {k: d.metadata.get(k) for k in ("arch", "loss", "training_data", "metrics")} for n, d in decoders.items()
        },
        "utility_raw": view2_verification(encoder, view2, raw, raw) if view2 else None,
        "privacy_raw": {
            n: attack_success(encoder, reconstruct(d, z), z, z_other, evalset.faces, threshold).as_dict()
            for n, d in attackers.items()
        },
        "sweep": [],
    }
    print("raw:", {n: round(100 * r["type1_success"], 1) for n, r in results["privacy_raw"].items()}, flush=True)
    for method in args.methods:
        for budget in args.id_budgets if method == "advface-id" else args.budgets:
            t0 = time.perf_counter()
            z_prot = protect(method, z, budget)
            seconds_per_template = (time.perf_counter() - t0) / len(z)
            prot_view2 = dict(zip(needed, protect(method, np.stack([raw[i] for i in needed]), budget))) if view2 else {}
            entry = {
                "method": method,
                "rel_l2": budget,
                "perturbation": perturbation_stats(z, z_prot),
                "seconds_per_template": round(seconds_per_template, 4),
                "utility": view2_verification(encoder, view2, prot_view2, raw) if view2 else None,
                "privacy": {},
            }
            for name, decoder in attackers.items():
                if name.startswith("adaptive") and not (method == "advface-id" and budget == args.adaptive_budget):
                    continue
                entry["privacy"][name] = attack_success(
                    encoder, reconstruct(decoder, z_prot), z, z_other, evalset.faces, threshold
                ).as_dict()
            results["sweep"].append(entry)
            write_results("identity_aware", {**results, "complete": False}, args.out)  # partial, in case of a stop
            utility = entry["utility"]
            print(
                f"{method} E={budget}: "
                + (
                    f"acc {100 * utility['accuracy_mean']:.2f}% TAR {100 * utility['tar_at_far_1e-3']:.2f}% "
                    if utility
                    else ""
                )
                + " ".join(f"{n}:{100 * r['type1_success']:.1f}%" for n, r in entry["privacy"].items()),
                flush=True,
            )
    results["seconds"] = round(time.perf_counter() - started, 1)
    out = write_results("identity_aware", {**results, "complete": True}, args.out)
    print("wrote", out)
    if results["utility_raw"] is not None:  # the frontier needs utility
        _plot(results, out.parent / f"{out.stem}_frontier.png")


def _plot(results: dict, path: Path) -> None:
    """Frontier: mean Type-I success of the independent identity-aware attackers vs accuracy drop, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_acc = results["utility_raw"]["accuracy_mean"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({e["method"] for e in results["sweep"]}):
        rows = [e for e in results["sweep"] if e["method"] == method]
        drop = [100 * (base_acc - e["utility"]["accuracy_mean"]) for e in rows]
        succ = [
            100 * np.mean([r["type1_success"] for n, r in e["privacy"].items() if not n.startswith("adaptive")])
            for e in rows
        ]
        ax.plot(drop, succ, "o-", label=method)
        for e, x, y in zip(rows, drop, succ):
            ax.annotate(f"E={e['rel_l2']}", (x, y), fontsize=8)
    raw = 100 * np.mean([r["type1_success"] for r in results["privacy_raw"].values()])
    ax.axhline(raw, color="gray", ls="--", label="no protection")
    ax.set_xlabel("LFW accuracy drop (points)")
    ax.set_ylabel("Type-I success of identity-aware attackers (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
