"""Do extra training faces sampled from the packaged DCGAN help advface's face generator? (issue #17)

Usage::

    python benchmarks/generative_extra_data.py --reference generator_attacker.pt --work-dir DIR [--extra 2000]
        [--steps 2000] [--people 100] [--n 4] [--identity-guidance 0.05] [--threads 1]
        [--out benchmarks/results/generative_extra_data.json]

Two denoisers are trained from scratch with the reference model's settings (``--reference``: its ``train_config``,
seed and data group; ``--steps`` denoiser steps instead of its schedule), both on the reference's autoencoder
(:meth:`advface.generative.training.GeneratorTrainer.adopt_autoencoder`: one autoencoder, so only the denoiser's data
differ): ``without`` on the LFW faces of the reference's group, ``with`` on the same faces plus ``--extra`` DCGAN
samples detected, aligned and embedded like them (:mod:`advface.generative.extra_faces`, ``advface train-generator
--extra-dcgan``). Models and work folders go to ``--work-dir`` (``without.pt``, ``with.pt``; resumable: the same
command continues a killed run, a finished model is reused; ``--train-only ARM`` trains one arm and stops, so that
the arms can train side by side).

Both are evaluated like ``benchmarks/generative_eval.py`` (its judges) on the same LFW evaluation people, seeds and
conditions: training-free generation from photo A's embedding, each face compared with another photo B of the person
at FMR 0.1% by the system encoder and by the transfer judge (``*_match``), mean cosines (``ism_*``), without and
with identity guidance (``--identity-guidance``); realism: the Frechet distance in the transfer judge's space between
the unguided faces and the people's real photos, and dlib's detection rate. ``difference`` gives, per figure,
``with - without`` and a 95% interval from a paired bootstrap over people (the faces of one person are not
independent; the interval does not cover training-seed variance: one training run per arm).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.datasets import LFW  # noqa: E402
from advface.datasets.pairs import resize_faces  # noqa: E402
from advface.datasets.splits import split_identities  # noqa: E402
from advface.encoders import create_encoder  # noqa: E402
from advface.errors import ConfigError  # noqa: E402
from advface.generative.config import GeneratorTrainConfig  # noqa: E402
from advface.generative.data import group_training_data  # noqa: E402
from advface.generative.extra_faces import cached_dcgan_faces, with_extra_faces  # noqa: E402
from advface.generative.model import IdentityGenerator, load_generator, save_generator  # noqa: E402
from advface.generative.threats import generate_from_embeddings  # noqa: E402
from advface.generative.training import GeneratorTrainer  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from benchmarks.generative_eval import Judges, frechet  # noqa: E402

BOOTSTRAP = 2000


def train_arm(
    name: str,
    extra: int,
    reference: IdentityGenerator,
    reference_path: str,
    args: argparse.Namespace,
    dataset: LFW,
) -> IdentityGenerator:
    """Train (or resume, or reuse) the denoiser of one arm on the reference's autoencoder."""
    work = Path(args.work_dir)
    out = work / f"{name}.pt"
    if out.is_file():
        model = load_generator(out)
        recorded = model.metadata.get("training_data", {}).get("extra_dcgan", {}).get("sampled", 0)
        if model.metadata.get("steps", {}).get("denoiser") == args.steps and recorded == extra:
            print(f"{name}: reusing {out}", file=sys.stderr)
            return model
    settings = dict(reference.metadata["train_config"])
    known = {f.name for f in dataclasses.fields(GeneratorTrainConfig)}
    settings = {k: v for k, v in settings.items() if k in known}
    settings["multipliers"] = tuple(settings["multipliers"])
    config = GeneratorTrainConfig(
        **{
            **settings,
            "steps": args.steps,
            "warmup": settings["warmup"] if args.warmup is None else args.warmup,
            "extra_dcgan": extra,
            "threads": args.threads,
            "checkpoint_minutes": 5.0,
        }
    )
    group = str(reference.metadata["training_data"]["group"])
    encoder = create_encoder(str(reference.metadata["encoder"]))
    data = group_training_data(dataset, encoder, group, image_size=config.image_size, dataset_name="lfw")
    expected = reference.metadata["training_data"].get("fingerprint")
    if expected and data.fingerprint() != expected:
        raise ConfigError(f"the {group} faces built here ({data.fingerprint()}) are not the reference's ({expected})")
    arm_work = work / f"{name}.work"
    if extra:
        faces = cached_dcgan_faces(arm_work, extra, encoder, seed=config.seed, image_size=config.image_size)
        data = with_extra_faces(data, faces)
        print(f"{name}: {faces.kept} of {faces.sampled} DCGAN samples kept", file=sys.stderr)
    metadata = {
        "role": group,
        "encoder": encoder.name,
        "encoder_fingerprint": encoder.fingerprint,
        "autoencoder_from": reference_path,
    }
    trainer = GeneratorTrainer(config, data, arm_work, metadata, progress=not args.quiet)
    if trainer.stage == "autoencoder" and trainer.step == 0:
        trainer.adopt_autoencoder(reference.autoencoder, reference_path)
    save_generator(out, trainer.run())
    return load_generator(out)  # as a later run sees it (metadata completed on saving)


def per_person(accepted: np.ndarray, n: int) -> np.ndarray:
    """Mean of ``accepted`` (one value per face, NaN = not judged) over each person's ``n`` faces."""
    grid = accepted.reshape(-1, n)
    with np.errstate(invalid="ignore"):
        return np.nanmean(grid, axis=1)


def per_person_figures(key: str, scored: dict[str, np.ndarray], judges: Judges, n: int) -> dict[str, np.ndarray]:
    """Per person: the share of faces accepted by each judge at FMR 0.1%, and the mean cosines."""
    transfer = scored["transfer"]
    accepted = np.where(np.isnan(transfer), np.nan, (transfer >= judges.transfer.thresholds["1e-3"]).astype(float))
    return {
        f"{key}.system_match": per_person((scored["system"] >= judges.system_threshold).astype(float), n),
        f"{key}.transfer_match": per_person(accepted, n),
        f"{key}.ism_system": per_person(scored["system_cos"], n),
        f"{key}.ism_transfer": per_person(scored["transfer_cos"], n),
    }


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int) -> dict[str, Any]:
    """``mean(b) - mean(a)`` over people (rows judged in both) and its 95% paired-bootstrap interval."""
    ok = ~(np.isnan(a) | np.isnan(b))
    diff = b[ok] - a[ok]
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (BOOTSTRAP, len(diff)))].mean(axis=1)
    return {
        "difference": float(diff.mean()),
        "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
        "people": int(ok.sum()),
    }


def evaluate(
    model: IdentityGenerator,
    judges: Judges,
    conditions: np.ndarray,
    compare: list[str],
    real: np.ndarray,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Summaries of one model, and its per-person figures (for the paired comparison)."""
    from advface.faces import create_detector

    started = time.perf_counter()
    faces = model.generate(conditions, args.n, steps=args.sample_steps, guidance=args.guidance, seed=args.seed)
    flat = faces.reshape(-1, *faces.shape[2:])
    free = judges.score(flat, compare)
    result: dict[str, Any] = {"training_free": judges.summary(free)}
    per = per_person_figures("training_free", free, judges, args.n)
    if args.identity_guidance > 0:
        guided_faces = generate_from_embeddings(
            model,
            conditions,
            args.n,
            steps=args.sample_steps,
            guidance=args.guidance,
            seed=args.seed,
            encoder=judges.scorer,
            guide_scale=args.identity_guidance,
        )
        guided = judges.score(guided_faces.reshape(flat.shape), compare)
        result["training_free_guided"] = judges.summary(guided)
        per.update(per_person_figures("training_free_guided", guided, judges, args.n))
    detector = create_detector("dlib")
    result["realism"] = {
        "detection_rate": float(
            np.mean([len(detector.detect(resize_faces(f[None], 2 * f.shape[0])[0])) > 0 for f in flat])
        ),
        "frechet_transfer": frechet(free["transfer_emb"], real),
    }
    result["model"] = {
        key: model.metadata.get(key) for key in ("training_data", "steps", "seconds", "metrics", "autoencoder_from")
    }
    result["eval_seconds"] = round(time.perf_counter() - started, 1)
    return result, per


def evaluation_set(
    model: IdentityGenerator, dataset: LFW, args: argparse.Namespace
) -> tuple[Judges, np.ndarray, list[str], np.ndarray, list[str]]:
    """The judges, the conditions (photo A's embedding per person), the photos B compared with (one per face), the
    transfer judge's embeddings of the people's real photos, and the people (evaluation group, >= 2 photos)."""
    judges = Judges(model, dataset, args.models_dir)
    clean = judges.pairs.without_flips()
    split = split_identities(judges.pairs.identities[~judges.pairs.flipped].tolist(), seed=0)
    photos: dict[str, list[int]] = {}
    for i, person in enumerate(clean.identities.tolist()):
        if person in split.evaluation:
            photos.setdefault(person, []).append(i)
    people = sorted(p for p, rows in photos.items() if len(rows) >= 2)[: args.people]
    conditions = np.stack([clean.embeddings[photos[p][0]] for p in people])
    compare = [str(clean.ids[photos[p][1]]) for p in people for _ in range(args.n)]
    real = judges.transfer.embeddings[
        [
            judges.transfer.index[i]
            for i in clean.ids[sum((photos[p] for p in people), [])].tolist()
            if i in judges.transfer.index
        ]
    ]
    return judges, conditions, compare, real, people


def load_evaluation(
    path: Path, key: dict[str, Any], model: IdentityGenerator
) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """A kept evaluation of ``model`` with the settings ``key``, or None."""
    if not path.is_file():
        return None
    kept = json.loads(path.read_text())
    if kept.get("key") != key or kept.get("model_created") != model.metadata.get("created"):
        return None
    return kept["result"], {name: np.asarray(values, dtype=float) for name, values in kept["per_person"].items()}


def save_evaluation(
    path: Path, key: dict[str, Any], model: IdentityGenerator, result: dict[str, Any], figures: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Keep one arm's evaluation (per-person figures included) for the final comparison."""
    document = {
        "key": key,
        "model_created": model.metadata.get("created"),
        "result": result,
        "per_person": {name: values.tolist() for name, values in figures.items()},
    }
    path.write_text(json.dumps(document, default=str))
    return result, figures


def main() -> None:
    """Train both arms, evaluate them, write benchmarks/results/generative_extra_data.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="generator whose autoencoder and settings are reused")
    parser.add_argument("--work-dir", required=True, help="folder for both arms' models and work folders")
    parser.add_argument("--extra", type=int, default=2000, help="DCGAN samples of the 'with' arm (default 2000)")
    parser.add_argument("--steps", type=int, default=2000, help="denoiser steps of each arm (default 2000)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="learning-rate warm-up steps (default: the reference's)"
    )
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--models-dir", help="ONNX models folder (default $ADVFACE_MODELS_DIR)")
    parser.add_argument("--people", type=int, default=100, help="evaluation people (default 100)")
    parser.add_argument("--n", type=int, default=4, help="faces per person (default 4)")
    parser.add_argument("--sample-steps", type=int, default=25, help="sampling steps (default 25)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (default 3)")
    parser.add_argument(
        "--identity-guidance", type=float, default=0.05, help="identity-guidance scale (default 0.05; 0: skip)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default 0)")
    parser.add_argument(
        "--train-only",
        choices=("without", "with"),
        help="train (or resume) only this arm and stop: the two arms can train side by side, then the same command "
        "without this flag evaluates them",
    )
    parser.add_argument(
        "--eval-only",
        choices=("without", "with"),
        help="evaluate only this arm (kept in WORK_DIR/eval_ARM.json) and stop: an arm can be evaluated while the "
        "other trains; the command without this flag reuses the kept evaluations",
    )
    parser.add_argument("--quiet", "-q", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.extra < 1:
        parser.error("--extra must be >= 1 (the 'with' arm needs extra faces)")
    torch.set_num_threads(args.threads)

    dataset = LFW(args.lfw_dir)
    reference = load_generator(args.reference)
    arms_extra = {"without": 0, "with": args.extra}
    names = [args.train_only or args.eval_only] if (args.train_only or args.eval_only) else list(arms_extra)
    models = {name: train_arm(name, arms_extra[name], reference, str(args.reference), args, dataset) for name in names}
    if args.train_only:
        return
    eval_key = {k: getattr(args, k) for k in ("people", "n", "sample_steps", "guidance", "identity_guidance", "seed")}
    cached = {
        name: load_evaluation(Path(args.work_dir) / f"eval_{name}.json", eval_key, models[name]) for name in names
    }
    judges = None
    if any(found is None for found in cached.values()):
        judges, conditions, compare, real, people = evaluation_set(models[names[0]], dataset, args)
    for name in names:
        if cached[name] is None:
            assert judges is not None
            result, figures = evaluate(models[name], judges, conditions, compare, real, args)
            result["people"] = len(people)
            result["thresholds"] = judges.thresholds()
            cached[name] = save_evaluation(
                Path(args.work_dir) / f"eval_{name}.json", eval_key, models[name], result, figures
            )
        print(f"{name}: {cached[name][0]['training_free']}", file=sys.stderr)  # type: ignore[index]
    if args.eval_only:
        return
    arms = {name: found[0] for name, found in cached.items() if found is not None}
    per = {name: found[1] for name, found in cached.items() if found is not None}
    difference = {key: paired_difference(per["without"][key], per["with"][key], args.seed) for key in per["without"]}
    payload = {
        "reference": {
            "path": str(args.reference),
            **{key: reference.metadata.get(key) for key in ("train_config", "training_data", "steps")},
        },
        "settings": {
            "extra_dcgan": args.extra,
            "denoiser_steps": args.steps,
            "warmup": reference.metadata["train_config"]["warmup"] if args.warmup is None else args.warmup,
            "people": arms["without"]["people"],
            "n": args.n,
            "faces_per_arm": arms["without"]["people"] * args.n,
            "sample_steps": args.sample_steps,
            "guidance": args.guidance,
            "identity_guidance": args.identity_guidance,
            "seed": args.seed,
            "threads": args.threads,
            "bootstrap": BOOTSTRAP,
        },
        "thresholds": arms["without"]["thresholds"],
        "without": arms["without"],
        "with": arms["with"],
        "difference": difference,
    }
    out = write_results("generative_extra_data", payload, args.out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
