"""Identity fidelity, realism and cost of advface's face generator, judged by the encoder that conditions it (the
system judge) and by a transfer encoder the generator never used.

Usage::

    python benchmarks/generative_eval.py --model generator_attacker.pt [--people 100] [--n 4] [--steps 25]
        [--guidance 3] [--identity-guidance 0] [--personalise-photos 3] [--out benchmarks/results/generative.json]

Evaluation people: LFW identities of the project's *evaluation* group (split seed 0; never in any generator's
training data) with two or more photos, in name order.

- **training-free** (IP-Adapter-FaceID / Arc2Face analogue): the generator is conditioned on photo A's system
  embedding; each of ``--n`` generated faces is compared with *another* photo B of the person (Type II) by the system
  encoder at its FMR 0.1% threshold on clean LFW, and by the transfer judge (MobileFaceNet for dlib) at its own FMR
  0.1% threshold on its own clean embeddings; ``*_match`` = share accepted, ``ism_*`` = mean cosine similarity;
  without a threshold, per judge, ``ism_impostor_*`` = the same faces' mean cosine with the *other* people's
  compared photos (the floor ``ism_*`` is read against) and ``rank1_*`` = share of faces closest to their own
  person's photo among the people of the run (chance: one over their number);
- **training-free, identity-guided** (``--identity-guidance S`` > 0; ``training_free_guided``): the same faces, each
  sampling step also pulling the predicted face towards photo A's embedding through the system encoder's gradient
  (:func:`advface.generative.threats.identity_guide`: the white-box attacker). The system judge then scores an
  optimisation it took part in; the transfer judge is the honest check of likeness;
- **training-based**: people with at least ``--personalise-photos + 1`` photos; a copy of the generator and an
  identity condition are fine-tuned on the first ``--personalise-photos`` (``--personalise finetune``, DreamBooth
  analogue, :func:`advface.generative.threats.finetune`) or only the condition is learned (``--personalise
  condition``, textual-inversion analogue, :func:`advface.generative.threats.learn_condition`), both through
  :func:`advface.generative.threats.personalise`; no encoder involved;
  the generated faces are compared with a held-out photo the same way;
- **realism**: share of generated faces in which dlib's detector finds a face (faces upscaled 2x), and the Frechet
  distance in the transfer encoder's embedding space between generated faces and real faces of the same people
  (lower is better), beside the same distance for the DCGAN of ``gan-face-generate`` (its faces are not aligned like
  chips: resized straight to the judge's chip, so that figure is an upper bound);
- **cost**: seconds per generated face at ``--steps`` on this machine.

Generated faces are written to ``benchmarks/results/local/generative/`` (not committed: they are likenesses of LFW
people).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.audit.metrics import attack_thresholds  # noqa: E402
from advface.audit.transfer import TransferJudge, build_transfer_judge, default_transfer_encoder  # noqa: E402
from advface.datasets import LFW  # noqa: E402
from advface.datasets.pairs import build_face_pairs, resize_faces  # noqa: E402
from advface.datasets.splits import split_identities  # noqa: E402
from advface.encoders import create_encoder  # noqa: E402
from advface.generative.model import IdentityGenerator, load_generator  # noqa: E402
from advface.generative.threats import (  # noqa: E402
    FinetuneConfig,
    PersonaliseConfig,
    generate_from_embeddings,
    personalise,
)
from advface.protect.image.io import save_png  # noqa: E402
from benchmarks.common import write_results  # noqa: E402

LOCAL = Path(__file__).resolve().parent / "results" / "local" / "generative"


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of ``a`` and ``b``."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


#: The third judge (``--unseen-judge``): an encoder neither the attackers nor the photo protection ever used.
UNSEEN_JUDGE = "facenet"


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of ``a`` with every row of ``b`` (NaN rows of ``b`` give NaN columns)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def identification(similarity: np.ndarray, own: np.ndarray) -> tuple[float | None, float | None]:
    """Identity left in generated faces without a threshold: ``similarity`` holds each face's cosine (rows) with the
    compared photo of every person of the run (columns; NaN where the judge has no embedding of the photo), ``own``
    each face's person. Returns the mean cosine with the *other* people's photos (the impostor ISM: what the ISM of a
    face with no trace of the person would be) and the share of faces most similar to their own person's photo among
    the run's people (rank-1 identification; chance is one over the number of people). None for both where no face
    has its own photo and another person's to compare with."""
    columns = np.arange(similarity.shape[1])
    rows = np.arange(len(similarity))
    usable = ~np.isnan(similarity[rows, own]) & ((~np.isnan(similarity)).sum(axis=1) >= 2)
    if not usable.any():
        return None, None
    sim, own = similarity[usable], own[usable]
    others = np.where(columns[None, :] == own[:, None], np.nan, sim)
    impostor = float(np.nanmean(np.nanmean(others, axis=1)))
    rank1 = float((sim[np.arange(len(sim)), own] > np.nanmax(others, axis=1)).mean())
    return impostor, rank1


def judge_scores(
    judge: TransferJudge, faces: np.ndarray, photo_ids: list[str], own: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A judge's view of generated faces (system encoder's chip frame): each face's score and cosine against the
    photo it is compared with (``photo_ids[own[i]]``; NaN where the judge has no embedding of the photo), its
    embeddings of the faces, and the cosines of every face with every photo of ``photo_ids`` (NaN columns where it
    has none)."""
    emb = judge.embed_reconstructions(faces)
    rows = judge.rows_of(np.asarray(photo_ids))
    photos = np.where(rows[:, None] >= 0, judge.embeddings[np.maximum(rows, 0)], np.nan)
    similarity = cosine_matrix(emb, photos)
    score = np.full(len(faces), np.nan)
    ok = rows[own] >= 0
    if ok.any():
        score[ok] = judge.encoder.score(emb[ok], photos[own[ok]])
    return score, similarity[np.arange(len(faces)), own], emb, similarity


def judge_summary(judge: TransferJudge, score: np.ndarray, cos: np.ndarray) -> tuple[float | None, float | None, int]:
    """Match rate at the judge's FMR 0.1% threshold and mean cosine over the faces it could score, and their
    number."""
    valid = ~np.isnan(score)
    if not valid.any():
        return None, None, 0
    match = float((score[valid] >= judge.thresholds["1e-3"]).mean())
    return match, float(np.nanmean(cos)), int(valid.sum())


class Judges:
    """The system judge (the conditioning encoder), the transfer judge and optionally the unseen judge, with their
    FMR 0.1% thresholds."""

    def __init__(
        self, generator: IdentityGenerator, dataset: LFW, models_dir: str | None, unseen: str | None = None
    ) -> None:
        name = str(generator.metadata.get("encoder", "dlib"))
        self.encoder = create_encoder(name)
        # dlib-torch gives dlib's embeddings, batched: used to score generated faces
        self.scorer = create_encoder("dlib-torch") if name == "dlib" else self.encoder
        self.pairs = build_face_pairs(dataset, self.encoder, image_size=generator.image_size)
        clean = self.pairs.without_flips()
        self.system_threshold = attack_thresholds(clean.embeddings, clean.identities, self.encoder.metric)["1e-3"]
        self.transfer = self._judge(default_transfer_encoder(name), dataset, generator, models_dir)
        #: The judge no attacker and no protection used (None: not asked for, ``unseen`` None or "none").
        self.unseen = self._judge(unseen, dataset, generator, models_dir) if unseen not in (None, "none") else None

    def _judge(self, name: str, dataset: LFW, generator: IdentityGenerator, models_dir: str | None) -> TransferJudge:
        return build_transfer_judge(
            name,
            dataset,
            self.encoder.chip,
            seed=0,
            use_cache=True,
            models_dir=models_dir,
        )

    @property
    def others(self) -> dict[str, TransferJudge]:
        """The judges beside the system judge, by the key results give them: ``transfer``, and ``unseen`` when asked
        for."""
        return {"transfer": self.transfer, **({"unseen": self.unseen} if self.unseen is not None else {})}

    def thresholds(self) -> dict[str, Any]:
        """The judges' encoders and FMR 0.1% thresholds, as results record them."""
        out: dict[str, Any] = {"system_fmr_1e-3": self.system_threshold}
        for key, judge in self.others.items():
            out[key] = {"encoder": judge.name, "fmr_1e-3": judge.thresholds["1e-3"]}
        return out

    def score(self, faces: np.ndarray, photo_ids: list[str]) -> dict[str, np.ndarray]:
        """Per generated face (``N x S x S x 3``, chip frame of the system encoder) and the photo it is compared
        with: system and transfer (and unseen) scores and cosines (NaN where a judge has no embedding of the
        photo), the transfer judge's embeddings of the faces, and per judge the cosines with every distinct compared
        photo (``*_all``, columns in first-seen order; ``own``: each face's column) for :func:`identification`."""
        clean = self.pairs.without_flips()
        row_of = {pid: i for i, pid in enumerate(clean.ids.tolist())}
        column = {pid: i for i, pid in enumerate(dict.fromkeys(photo_ids))}
        distinct = list(column)
        own = np.array([column[p] for p in photo_ids], dtype=int)
        photos = clean.embeddings[[row_of[p] for p in distinct]]
        emb = self.scorer.embed(resize_faces(faces, self.scorer.chip.size))
        similarity = cosine_matrix(emb, photos)
        out = {
            "system": self.scorer.score(emb, photos[own]),
            "system_cos": similarity[np.arange(len(faces)), own],
            "system_all": similarity,
            "own": own,
        }
        for key, judge in self.others.items():
            out[key], out[f"{key}_cos"], out[f"{key}_emb"], out[f"{key}_all"] = judge_scores(
                judge, faces, distinct, own
            )
        return out

    def summary(self, scored: dict[str, np.ndarray]) -> dict[str, Any]:
        """Match rates at FMR 0.1% and mean cosines; per judge also the impostor ISM and the rank-1 identification
        among the compared people (:func:`identification`)."""
        out: dict[str, Any] = {
            "faces": len(scored["system"]),
            "system_match": float((scored["system"] >= self.system_threshold).mean()),
            "ism_system": float(scored["system_cos"].mean()),
        }
        for key, judge in self.others.items():
            out[f"{key}_match"], out[f"ism_{key}"], out[f"{key}_faces"] = judge_summary(
                judge, scored[key], scored[f"{key}_cos"]
            )
        for key in ("system", *self.others):
            out[f"ism_impostor_{key}"], out[f"rank1_{key}"] = identification(scored[f"{key}_all"], scored["own"])
        return out


def main() -> None:
    """Measure and write benchmarks/results/generative.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="generator checkpoint (best: the attacker model)")
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--models-dir", help="ONNX models folder (default $ADVFACE_MODELS_DIR)")
    parser.add_argument("--people", type=int, default=100, help="evaluation people (default 100)")
    parser.add_argument("--n", type=int, default=4, help="faces per person (default 4)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (default 3)")
    parser.add_argument(
        "--identity-guidance", type=float, default=0.0, help="also sample identity-guided faces at this scale (0: no)"
    )
    parser.add_argument("--personalise-photos", type=int, default=3, help="photos per person to learn from")
    parser.add_argument("--personalise", choices=("finetune", "condition"), default="finetune")
    parser.add_argument(
        "--personalise-steps", type=int, default=None, help="steps (default: FinetuneConfig's or PersonaliseConfig's)"
    )
    parser.add_argument(
        "--unseen-judge",
        default="none",
        help=f"a third judge, an encoder the generator never used, e.g. {UNSEEN_JUDGE} (default none: two judges)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()

    dataset = LFW(args.lfw_dir)
    generator = load_generator(args.model)
    judges = Judges(generator, dataset, args.models_dir, unseen=args.unseen_judge)
    clean = judges.pairs.without_flips()
    split = split_identities(judges.pairs.identities[~judges.pairs.flipped].tolist(), seed=0)
    photos: dict[str, list[int]] = {}
    for i, person in enumerate(clean.identities.tolist()):
        if person in split.evaluation:
            photos.setdefault(person, []).append(i)
    people = sorted(p for p, rows in photos.items() if len(rows) >= 2)[: args.people]
    LOCAL.mkdir(parents=True, exist_ok=True)

    # training-free: condition on photo A, compare with photo B
    conditions = np.stack([clean.embeddings[photos[p][0]] for p in people])
    started = time.perf_counter()
    faces = generator.generate(conditions, args.n, steps=args.steps, guidance=args.guidance, seed=args.seed)
    seconds = (time.perf_counter() - started) / faces[:, :, 0, 0, 0].size
    flat = faces.reshape(-1, *faces.shape[2:])
    compare = [str(clean.ids[photos[p][1]]) for p in people for _ in range(args.n)]
    free = judges.score(flat, compare)
    for k, face in enumerate(flat[: 8 * args.n]):
        save_png(face, LOCAL / f"free_{k // args.n:03d}_{k % args.n}.png")

    guided = None
    if args.identity_guidance > 0:
        started = time.perf_counter()
        guided_faces = generate_from_embeddings(
            generator,
            conditions,
            args.n,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            encoder=judges.scorer,
            guide_scale=args.identity_guidance,
        )
        guided = judges.summary(judges.score(guided_faces.reshape(flat.shape), compare))
        guided["sample_seconds_cpu"] = (time.perf_counter() - started) / len(flat)

    # training-based: learn from the first k photos, compare with the next one
    k = args.personalise_photos
    rich = [p for p in people if len(photos[p]) >= k + 1]
    based_faces, based_compare = [], []
    for p in rich:
        faces = clean.faces[photos[p][:k]]
        steps = {"steps": args.personalise_steps} if args.personalise_steps else {}
        config = (
            FinetuneConfig(seed=args.seed, **steps)
            if args.personalise == "finetune"
            else PersonaliseConfig(seed=args.seed, **steps)
        )
        based_faces.append(
            personalise(
                generator, faces, args.n, config=config, steps=args.steps, guidance=args.guidance, seed=args.seed
            )
        )
        based_compare += [str(clean.ids[photos[p][k]])] * args.n
    based = judges.summary(judges.score(np.concatenate(based_faces), based_compare)) if rich else None

    # realism: detection rate, Frechet distance in the transfer judge's space
    from advface.faces import create_detector

    detector = create_detector("dlib")
    detected = float(np.mean([len(detector.detect(resize_faces(f[None], 2 * f.shape[0])[0])) > 0 for f in flat]))
    real = judges.transfer.embeddings[
        [
            judges.transfer.index[i]
            for i in clean.ids[sum((photos[p] for p in people), [])].tolist()
            if i in judges.transfer.index
        ]
    ]
    realism: dict[str, Any] = {
        "detection_rate": detected,
        "frechet_transfer": {"generator": frechet(free["transfer_emb"], real)},
    }
    try:
        from advface.audit.attacks.gan_prior import sample_faces

        images = sample_faces(len(flat), args.seed)
        chips = resize_faces(images, judges.transfer.encoder.chip.size)
        realism["frechet_transfer"]["dcgan_unaligned"] = frechet(judges.transfer.encoder.embed(chips), real)
    except Exception as exc:  # noqa: BLE001 - the baseline is optional
        realism["frechet_transfer"]["dcgan_unaligned"] = f"not measured: {type(exc).__name__}: {exc}"

    free_summary = judges.summary(free)
    payload = {
        "model": {
            "path": str(args.model),
            **{
                key: generator.metadata.get(key)
                for key in ("role", "encoder", "training_data", "steps", "parameters", "seconds")
            },
        },
        "settings": {
            "people": len(people),
            "n": args.n,
            "steps": args.steps,
            "guidance": args.guidance,
            "identity_guidance": args.identity_guidance,
            "personalise_photos": k,
            "personalise": args.personalise,
            "personalise_steps": args.personalise_steps,
            "seed": args.seed,
        },
        "thresholds": judges.thresholds(),
        "training_free": free_summary,
        "training_free_guided": guided,
        "training_based": based,
        "realism": realism,
        "sample_seconds_cpu": seconds,
    }
    out = write_results("generative", payload, args.out)
    print(
        f"training-free: system {free_summary['system_match']:.3f}, transfer "
        f"{free_summary['transfer_match']}; wrote {out}"
    )


if __name__ == "__main__":
    main()
