"""PersGuard measured: the attacker model backdoored by ``advface persguard``, attacked as in diffusion_defences.py.

Usage (``--trigger identity``: first ``--write-trigger-folders DIR``, then ``advface persguard --trigger identity
--trigger-photos DIR/protected --other-photos DIR/others``, then measure with ``--trigger identity``)::

    python benchmarks/persguard.py --attacker generator_attacker.pt --backdoored attacker_persguard.pt \
        [--people 10] [--n 4] [--runs protected,unprotected,quality] [--clean-baseline measure|JSON] \
        [--persistence-people 5] [--out PART.json]
    python benchmarks/persguard.py --merge PART1.json PART2.json [--clean-from RESULT.json] \
        [--out benchmarks/results/persguard.json]

People and photos are those of ``benchmarks/diffusion_defences.py`` (the first ``--people`` evaluation-group
identities with >= 4 photos; photos 1-3 protected as ``--protection`` says -- ``library``, the default: protect-image's
defaults, every stage on the shipped defender surrogate; ``legacy``: stages 1 and 2 under the uniform 8/255 budget, as
every run before 2026-12-06 -- cached under ``benchmarks/results/local/diffusion_defences/``; the 4th photo, clean, is
the reference). The attacker's pipeline is that benchmark's :class:`Attacker`: dlib alignment of the photo, then

- **training-based** (DreamBooth analogue, ``threats.finetune``, ``--personalise-steps`` at the default learning
  rate, seed ``1000 k`` for person k) on the *backdoored* model: ``protected`` (photos 1-3 protected) and
  ``unprotected`` (photos 1-3 clean) runs, ``--n`` faces each;
- **persistence** (``--runs`` ``steps`` / ``lr``; ``clean_steps`` / ``clean_lr`` the same on the clean model): the
  protected run again with ``--persistence-steps`` fine-tuning steps, or with learning rate ``--persistence-lr``, on
  the first ``--persistence-people`` people;
- **quality** of ordinary generation: training-free faces (identity-guided, as diffusion_defences.py) from the clean
  photos' embeddings, on the input and on the backdoored model;
- **diagnose** (cheap, the first ``--diagnose-people`` people, protected photos, clean and backdoored model): does the
  backdoor act *before* the attacker fine-tunes weights? For each of ``--diagnose-steps`` weight fine-tuning steps
  (0: condition-only personalisation, ``threats.learn_condition``; else the DreamBooth analogue with that many
  steps): the faces' match rate / ISM, and ``target_distance``, the min-SNR-weighted squared error between the
  adapted model's prediction under the learned condition and the clean model's *no-identity* prediction on the
  person's clean latents (the backdoor's target; fixed draws; lower = nearer the target).

With ``--trigger identity`` (the paper's trigger, the protected content itself) the backdoor is trained on photos
1-3 of the first ``--people`` evaluation people, as they are; ``protected`` / ``clean_protected`` / persistence runs
personalise on those photos, ``unprotected`` / ``clean_unprotected`` on photos 1-3 of the next ``--people``
evaluation people (never seen by backdoor training), each judged against the person's 4th photo.

The clean model's training-based numbers (``clean_model``) are measured here with ``--clean-baseline measure``
(runs ``clean_protected`` / ``clean_unprotected``), or taken from a diffusion_defences.py result with the same
attacker model, people, photos and settings (``--clean-baseline JSON``; checked). ``unprotected_ism_drop`` = ISM of
the clean model minus ISM of the backdoored model on the unprotected photos (per judge). Each part writes its runs
after every run; ``--merge`` unites parts run side by side and writes the summary.
"""

from __future__ import annotations

import argparse
import hashlib
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
from advface.generative.config import FinetuneConfig, PersonaliseConfig  # noqa: E402
from advface.generative.diffusion import T_MAX, T_MIN, alpha_sigma  # noqa: E402
from advface.generative.model import IdentityGenerator, load_generator  # noqa: E402
from advface.generative.threats import finetune, learn_condition  # noqa: E402
from advface.images import load_image  # noqa: E402
from advface.protect.image.core import ImageProtector, ProtectConfig  # noqa: E402
from benchmarks.common import file_digest, write_results  # noqa: E402
from benchmarks.diffusion_defences import (  # noqa: E402
    PHOTOS_PER_PERSON,
    Attacker,
    Tally,
    add_attacker_start_argument,
    evaluation_people,
    protect_people,
)
from benchmarks.generative_eval import Judges  # noqa: E402

#: ``--protection legacy``: how every run before 2026-12-06 protected the evaluation photos (stages 1 and 2, the uniform
#: 8/255 budget; its cache key, which names the surrogate's path and no budget, is pinned here).
PROTECTION: dict[str, Any] = {
    "config": "encoders+deflection",
    "encoders": "dlib-torch,mobilefacenet",
    "surrogate": "advface/models/generator_defender_dlib.pt",
    "steps": ProtectConfig.steps,
    "deflection_weight": ProtectConfig.deflection_weight,
    "seed": 0,
}
#: ``--protection``: ``library`` (protect-image's defaults: every stage, the default budget; diffusion_defences.py's
#: default configuration and its cache) or ``legacy`` (:data:`PROTECTION`).
PROTECTIONS = ("library", "legacy")
#: Settings a clean baseline taken from a diffusion_defences.py result must share with this run.
#: Runs on the clean model only (a part made of them needs no --backdoored).
CLEAN_RUNS = {"clean_protected", "clean_unprotected", "clean_steps", "clean_lr", "trigger"}
SHARED_SETTINGS = ("people", "photos_per_person", "n", "steps", "guidance", "finetune_steps", "protect_steps")


def protection_config(name: str) -> tuple[ProtectConfig, dict[str, Any]]:
    """The ``ProtectConfig`` of ``--protection name`` and what the results record of it."""
    if name == "legacy":
        p = PROTECTION
        guidance = tuple(str(p["config"]).split("+"))
        return ProtectConfig(guidance=guidance, steps=int(p["steps"]), seed=int(p["seed"]), budget="uniform"), p
    if name != "library":
        raise SystemExit(f"unknown --protection {name!r}; choose from {', '.join(PROTECTIONS)}")
    from advface.cli.persguard import protection_record

    config = ProtectConfig()
    record = {
        "name": "library",
        "config": "+".join(config.guidance),
        "encoders": PROTECTION["encoders"],
        "surrogate": PROTECTION["surrogate"],
        "surrogate_sha256_16": file_digest(PROTECTION["surrogate"]),
        "settings": protection_record(config),
    }
    return config, record


def protected_photos(
    people: list[tuple[str, list[str]]],
    paths: dict[str, Path],
    name: str,
    config: ProtectConfig,
    record: dict[str, Any],
) -> dict[str, np.ndarray]:
    """Photos 1-3 of each person protected as ``--protection name`` says (``protection_config(name)``: ``config``
    and ``record``), cached where diffusion_defences.py caches them."""
    from benchmarks.diffusion_defences import cache_tag

    protector = ImageProtector(str(record["encoders"]).split(","), surrogate=str(record["surrogate"]))
    if name == "legacy":
        p = PROTECTION
        key = f"{p['config']}|{p['encoders']}|{p['surrogate']}|{p['steps']}|{p['deflection_weight']}|{p['seed']}"
        tag = f"{p['config']}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    else:
        digest = file_digest(str(record["surrogate"]))
        tag = cache_tag(config, str(record["encoders"]), digest)
    photos, _ = protect_people(protector, config, people, paths, tag)
    return photos


def training_based(
    generator: IdentityGenerator, attacker: Attacker, chips: list[np.ndarray | None], config: FinetuneConfig, n: int
) -> np.ndarray | None:
    """``n`` faces after the DreamBooth analogue with ``config`` (Attacker.training_based with a settable config)."""
    found = [c for c in chips if c is not None]
    if not found:
        return None
    small = resize_faces(np.stack(found), generator.image_size)
    tuned, condition = finetune(generator, small, config, embeddings=attacker.start_embeddings(found))
    a = attacker.args
    return tuned.generate(condition[None], n, steps=a.steps, guidance=a.guidance, seed=config.seed)[0]


def target_distance(
    model: IdentityGenerator, teacher: IdentityGenerator, faces: np.ndarray, condition: np.ndarray, seed: int
) -> float:
    """Mean min-SNR-weighted squared error between ``model``'s v-prediction under ``condition`` and ``teacher``'s
    no-identity prediction, on noisy latents of ``faces`` (and mirrors) at 64 fixed draws of time and noise."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    x0 = model.encode(np.concatenate([faces, faces[:, :, ::-1]]))
    rows = torch.randint(0, len(x0), (64,), generator=gen, device=model.device)
    x0 = x0[rows]
    t = torch.rand(len(x0), generator=gen, device=model.device) * (T_MAX - T_MIN) + T_MIN
    noise = torch.randn(x0.shape, generator=gen, device=model.device)
    alpha, sigma = alpha_sigma(t)
    xt = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * noise
    cond = torch.from_numpy(condition).to(model.device)[None].expand(len(x0), -1)
    with torch.no_grad():
        pred = model.denoiser(xt, t, cond)
        target = teacher.denoiser(xt, t, cond, torch.ones(len(x0), dtype=torch.bool, device=model.device))
    snr = (alpha / sigma).pow(2)
    weight = torch.clamp(snr, max=5.0) / (snr + 1)
    return float((weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean())


def diagnose(
    models: dict[str, IdentityGenerator],
    attacker: Attacker,
    chips: dict[str, dict[str, np.ndarray | None]],
    people: list[tuple[str, list[str]]],
    args: argparse.Namespace,
    tally: Tally,
) -> dict[str, Any]:
    """The ``diagnose`` run (module docs): faces into ``tally`` as ``diagnose_<model>_<stage>``, and per model and
    stage the mean ``target_distance`` over people (returned)."""
    distances: dict[str, dict[str, list[float]]] = {}
    steps = [int(s) for s in args.diagnose_steps.split(",") if s]
    for k, (_, ids) in enumerate(people[: args.diagnose_people]):
        seed = args.seed + 1000 * k
        found = [c for c in (chips["protected"][pid] for pid in ids[:PHOTOS_PER_PERSON]) if c is not None]
        if not found:
            continue
        small = resize_faces(np.stack(found), models["clean_model"].image_size)
        clean_small = resize_faces(
            np.stack([c for c in (chips["unprotected"][pid] for pid in ids[:PHOTOS_PER_PERSON]) if c is not None]),
            models["clean_model"].image_size,
        )
        for name, model in models.items():
            for s in steps:
                stage = "condition_only" if s == 0 else f"finetune_{s}"
                if s == 0:
                    tuned, condition = model, learn_condition(model, small, PersonaliseConfig(seed=seed))
                else:
                    tuned, condition = finetune(model, small, FinetuneConfig(steps=s, seed=seed))
                a = attacker.args
                faces = tuned.generate(condition[None], args.n, steps=a.steps, guidance=a.guidance, seed=seed)[0]
                tally.add(f"diagnose_{name}_{stage}", faces, ids[PHOTOS_PER_PERSON], args.n)
                d = target_distance(tuned, models["clean_model"], clean_small, condition, seed)
                distances.setdefault(name, {}).setdefault(stage, []).append(d)
                print(f"diagnose: person {k + 1} {name} {stage}: target distance {d:.5f}", flush=True)
    return {name: {stage: float(np.mean(v)) for stage, v in by.items()} for name, by in distances.items()}


def trigger_size(
    generator: IdentityGenerator, chips: dict[str, dict[str, np.ndarray | None]], people: list[tuple[str, list[str]]]
) -> dict[str, Any]:
    """How large the protection's perturbation is in the attacker model's latents (what the backdoor must detect):
    ``||z_protected - z_clean|| / ||z_clean||``, and at times t of the diffusion the ratio of the perturbation to the
    noise in ``x_t`` (``alpha(t) ||dz|| / (sigma(t) sqrt(numel))``; below 1 it is buried in the noise)."""
    from advface.generative.diffusion import alpha_sigma

    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for _, ids in people:
        for pid in ids[:PHOTOS_PER_PERSON]:
            c, p = chips["unprotected"][pid], chips["protected"][pid]
            if c is not None and p is not None:
                pairs.append((c, p))
    clean = generator.encode(resize_faces(np.stack([c for c, _ in pairs]), generator.image_size))
    protected = generator.encode(resize_faces(np.stack([p for _, p in pairs]), generator.image_size))
    delta = (protected - clean).flatten(1)
    rel = (delta.norm(dim=1) / clean.flatten(1).norm(dim=1)).mean().item()
    rms = delta.pow(2).mean().sqrt().item()
    ratios = {}
    for t in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9):
        alpha, sigma = alpha_sigma(torch.tensor([t]))
        ratios[f"{t:g}"] = float(alpha.item() * rms / sigma.item())
    return {
        "photos": len(pairs),
        "relative_latent_change": rel,
        "latent_change_rms": rms,
        "perturbation_to_noise": ratios,
    }


def check_identity_model(backdoored: IdentityGenerator | None, people: int, runs: set[str]) -> None:
    """``--trigger identity``: the runs must not need protected photos, and the backdoored model must have been
    trained with the identity trigger on ``people`` people (those of ``--write-trigger-folders``); SystemExit
    otherwise."""
    unsupported = runs & {"trigger", "diagnose"}
    if unsupported:
        raise SystemExit(f"runs {sorted(unsupported)} measure the perturbation trigger; not with --trigger identity")
    if backdoored is None:
        return
    record = backdoored.metadata["persguard"]
    if record["config"].get("trigger") != "identity" or record["trigger_people"] != people:
        raise SystemExit(
            f"--trigger identity needs a model backdoored with --trigger identity on the {people} people of "
            "--write-trigger-folders"
        )


def write_trigger_folders(args: argparse.Namespace) -> None:
    """``--trigger identity``'s training data as ``advface persguard --trigger-photos / --other-photos`` folders
    under ``--write-trigger-folders DIR``: ``DIR/protected/<person>/`` links to photos 1-3 of the first ``--people``
    evaluation people (the people the protected runs personalise on; the 4th photo, the reference, is left out), and
    ``DIR/others/<person>/`` links to 3 photos each of the first ``--other-people`` defender-group identities with
    >= 3 photos (never evaluated). Folder names are hashes of the names; links, not copies: no photo is duplicated."""
    from advface.cli.persguard import lfw_defender_people

    dataset = LFW(args.lfw_dir)
    paths = {item.id: Path(item.path) for item in dataset}
    judges = Judges(load_generator(args.attacker), dataset, args.models_dir)
    protected = evaluation_people(judges, PHOTOS_PER_PERSON + 1)[: args.people]
    defender = list(lfw_defender_people(args.lfw_dir, PHOTOS_PER_PERSON).items())[: args.other_people]
    others = [(person, [pid for pid, _ in photos]) for person, photos in defender]
    root = Path(args.write_trigger_folders)
    for side, group in (("protected", protected), ("others", others)):
        for person, ids in group:
            folder = root / side / hashlib.sha1(person.encode()).hexdigest()[:10]
            folder.mkdir(parents=True, exist_ok=True)
            for pid in ids[:PHOTOS_PER_PERSON]:
                link = folder / paths[pid].name
                if not link.is_symlink():
                    link.symlink_to(paths[pid].resolve())
    print(f"wrote {root}/protected ({len(protected)} people) and {root}/others ({len(others)} people)")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every run of ``--runs``; the document is rewritten to ``--out`` after each."""
    dataset = LFW(args.lfw_dir)
    paths = {item.id: Path(item.path) for item in dataset}
    clean_model = load_generator(args.attacker)
    runs = [r for r in args.runs.split(",") if r]
    backdoored = clean_model
    if args.backdoored:
        backdoored = load_generator(args.backdoored)
        if "persguard" not in backdoored.metadata:
            raise SystemExit(f"{args.backdoored} is not a persguard checkpoint")
    elif set(runs) - CLEAN_RUNS:
        raise SystemExit(f"runs {sorted(set(runs) - CLEAN_RUNS)} need --backdoored")
    judges = Judges(clean_model, dataset, args.models_dir)
    args.personalise_steps = args.personalise_steps or FinetuneConfig.steps
    attacker = Attacker(clean_model, judges, args)
    identity = args.trigger == "identity"
    people = evaluation_people(judges, PHOTOS_PER_PERSON + 1)[: args.people * (2 if identity else 1)]
    if identity:
        check_identity_model(backdoored if args.backdoored else None, args.people, set(runs))
    clean_photos = {pid: load_image(paths[pid]) for _, ids in people for pid in ids[:PHOTOS_PER_PERSON]}
    need_protected = not identity and any(
        r in ("protected", "steps", "lr", "clean_protected", "trigger", "diagnose") for r in runs
    )
    photos = {"unprotected": clean_photos}
    protect_config, protection = protection_config(args.protection)
    if need_protected:
        photos["protected"] = protected_photos(people, paths, args.protection, protect_config, protection)
    chips = {side: {pid: attacker.chips(img) for pid, img in imgs.items()} for side, imgs in photos.items()}
    document: dict[str, Any] = {
        "models": {
            "clean": {"path": args.attacker, **{k: clean_model.metadata.get(k) for k in ("role", "steps", "seed")}},
        },
        "settings": {
            "people": len(people),
            "photos_per_person": PHOTOS_PER_PERSON,
            "n": args.n,
            "steps": args.steps,
            "guidance": args.guidance,
            "identity_guidance": args.identity_guidance,
            "finetune_steps": args.personalise_steps,
            "finetune_lr": FinetuneConfig.lr,
            "protect_steps": protect_config.steps,
            "protection": protection,
            "persistence_people": args.persistence_people,
            "persistence_steps": args.persistence_steps,
            "persistence_lr": args.persistence_lr,
            "diagnose_people": args.diagnose_people,
            "diagnose_steps": args.diagnose_steps,
            "trigger": args.trigger,
            **({"attacker_start": args.attacker_start} if args.attacker_start != "random" else {}),
        },
        "thresholds": judges.thresholds(),
        "runs": {},
        "seconds": {},
    }
    if args.backdoored:
        document["models"]["backdoored"] = {"path": args.backdoored, "persguard": backdoored.metadata["persguard"]}
    # (model, photos, people by index, fine-tuning override); identity trigger: the protected people are the first
    # --people (their photos as they are), the unprotected ones the next --people
    p, pp = args.people, args.persistence_people
    protected_side, unprotected = ("unprotected", range(p, 2 * p)) if identity else ("protected", range(p))
    plan: dict[str, tuple[IdentityGenerator, str, range, dict[str, Any]]] = {
        "protected": (backdoored, protected_side, range(p), {}),
        "unprotected": (backdoored, "unprotected", unprotected, {}),
        "clean_protected": (clean_model, protected_side, range(p), {}),
        "clean_unprotected": (clean_model, "unprotected", unprotected, {}),
        "steps": (backdoored, protected_side, range(pp), {"steps": args.persistence_steps}),
        "lr": (backdoored, protected_side, range(pp), {"lr": args.persistence_lr}),
        "clean_steps": (clean_model, protected_side, range(pp), {"steps": args.persistence_steps}),
        "clean_lr": (clean_model, protected_side, range(pp), {"lr": args.persistence_lr}),
    }
    for run in runs:
        started = time.perf_counter()
        tally = Tally(judges)
        if run == "trigger":
            document["trigger"] = trigger_size(clean_model, chips, people)
        elif run == "diagnose":
            models = {"clean_model": clean_model, "backdoored": backdoored}
            document["target_distance"] = diagnose(models, attacker, chips, people, args, tally)
        elif run == "quality":
            for name, model in (("clean_model", clean_model), ("backdoored", backdoored)):
                attacker.generator = model
                for k, (_, ids) in enumerate(people):
                    found = [chips["unprotected"][pid] for pid in ids[:PHOTOS_PER_PERSON]]
                    for faces in attacker.training_free(found, args.seed + 1000 * k):
                        tally.add(f"training_free_{name}", faces, ids[PHOTOS_PER_PERSON], args.n)
            attacker.generator = clean_model
        elif run in plan:
            model, side, indices, override = plan[run]
            for k in indices:
                ids = people[k][1]
                seed = args.seed + 1000 * k
                config = FinetuneConfig(
                    steps=override.get("steps", args.personalise_steps),
                    lr=override.get("lr", FinetuneConfig.lr),
                    seed=seed,
                )
                found = [chips[side][pid] for pid in ids[:PHOTOS_PER_PERSON]]
                faces = training_based(model, attacker, found, config, args.n)
                tally.add(run, faces, ids[PHOTOS_PER_PERSON], args.n)
                print(f"{run}: person {k + 1} ({indices.start + 1}-{indices.stop}) done", flush=True)
        else:
            raise SystemExit(f"unknown run {run!r}")
        document["runs"].update(tally.summary())
        document["seconds"][run] = time.perf_counter() - started
        print(f"{run}: {json.dumps({k: v for k, v in tally.summary().items()}, default=float)[:300]}", flush=True)
        write_results("persguard", document, args.out)
    return document


def baseline_from(path: str, settings: dict[str, Any], attacker: str) -> dict[str, Any]:
    """The clean model's training-based runs from a diffusion_defences.py result, checked to share this run's attacker
    model, protection and settings."""
    other = json.loads(Path(path).read_text())
    mismatched = [k for k in SHARED_SETTINGS if other["settings"].get(k) != settings.get(k)]
    if Path(other["models"]["attacker"]["path"]).name != Path(attacker).name:
        mismatched.append("attacker model")
    if settings.get("protection", PROTECTION) != PROTECTION:
        mismatched.append("protection (--clean-baseline JSON takes --protection legacy's runs)")
    if other["models"]["surrogate"]["path"] != PROTECTION["surrogate"]:
        mismatched.append("surrogate")
    if mismatched:
        raise SystemExit(f"{path} differs from this run in {mismatched}; use --clean-baseline measure")
    default = PROTECTION["config"]
    return {
        "clean_protected": other["ablation"][default]["training_based"],
        "clean_unprotected": other["ablation"]["clean"]["training_based"],
        "source": {"file": path, "command": other.get("command"), "date": other.get("date")},
    }


def summarise(document: dict[str, Any], baseline: str | None) -> dict[str, Any]:
    """The ``persguard`` summary: per judge (system on top, MobileFaceNet under ``transfer``)."""
    runs = document["runs"]
    clean = {k: runs[k] for k in ("clean_protected", "clean_unprotected") if k in runs}
    source = "measured here"
    if len(clean) < 2 and baseline:
        if document["settings"].get("trigger", "perturbation") != "perturbation":
            raise SystemExit("--clean-baseline JSON holds the perturbation trigger's runs; measure them here")
        other = baseline_from(baseline, document["settings"], document["models"]["clean"]["path"])
        clean = {k: other[k] for k in ("clean_protected", "clean_unprotected")}
        source = other["source"]

    def side(entry: dict[str, Any] | None, judge: str) -> dict[str, Any] | None:
        if entry is None:
            return None
        e = entry if judge == "system" else entry["transfer"]
        return {"match": e["match"], "ism": e.get("ism"), "faces": entry.get("faces")}

    def block(judge: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "protected": side(runs.get("protected"), judge),
            "unprotected": side(runs.get("unprotected"), judge),
            "clean_model": {
                "protected": side(clean.get("clean_protected"), judge),
                "unprotected": side(clean.get("clean_unprotected"), judge),
            },
            "persistence": {
                f"steps_{document['settings']['persistence_steps']}": side(runs.get("steps"), judge),
                f"lr_{document['settings']['persistence_lr']:g}": side(runs.get("lr"), judge),
                f"clean_model_steps_{document['settings']['persistence_steps']}": side(runs.get("clean_steps"), judge),
                f"clean_model_lr_{document['settings']['persistence_lr']:g}": side(runs.get("clean_lr"), judge),
            },
            "training_free_quality": {
                "clean_model": side(runs.get("training_free_clean_model"), judge),
                "backdoored": side(runs.get("training_free_backdoored"), judge),
            },
        }
        ours, theirs = out["unprotected"], out["clean_model"]["unprotected"]
        if ours and theirs and ours["ism"] is not None and theirs["ism"] is not None:
            out["unprotected_ism_drop"] = theirs["ism"] - ours["ism"]
        return out

    summary = block("system")
    summary["transfer"] = block("transfer")
    summary["clean_model_source"] = source
    summary["trigger"] = document["settings"].get("trigger", "perturbation")
    return summary


#: Result keys of runs on the clean model only, which ``--clean-from`` may take from another result.
CLEAN_MODEL_RUNS = ("clean_protected", "clean_unprotected", "clean_steps", "clean_lr", "training_free_clean_model")


def merge(files: list[str], baseline: str | None, out: str | None, clean_from: str | None = None) -> Path:
    """One result from parts of the same settings and models: runs and timings united, summary added. ``clean_from``:
    another persguard result (part or merged) with the same clean model and settings whose clean-model runs
    (:data:`CLEAN_MODEL_RUNS`) are taken where the parts lack them (the pipeline is deterministic)."""
    documents = [json.loads(Path(f).read_text()) for f in files]
    first = documents[0]
    backdoored = {json.dumps(doc["models"]["backdoored"]) for doc in documents if "backdoored" in doc["models"]}
    persistence = ("persistence_people", "persistence_steps", "persistence_lr", "diagnose_people", "diagnose_steps")

    def shared(doc: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in doc["settings"].items() if k not in persistence}

    for doc in documents[1:]:
        if shared(doc) != shared(first) or doc["models"]["clean"] != first["models"]["clean"]:
            raise SystemExit("the parts to merge differ in settings or clean model")
    if len(backdoored) != 1:
        raise SystemExit("the parts to merge must name one backdoored model")
    merged = {key: first[key] for key in ("models", "settings", "thresholds")}
    merged["models"] = {"clean": first["models"]["clean"], "backdoored": json.loads(backdoored.pop())}
    # persistence settings: those of the part that ran the persistence runs (the others do not use them)
    for doc in documents:
        if {"steps", "lr", "clean_steps", "clean_lr"} & set(doc["seconds"]):
            merged["settings"] = {**merged["settings"], **{k: doc["settings"][k] for k in persistence}}
    merged["runs"] = {k: v for doc in documents for k, v in doc["runs"].items()}
    merged["seconds"] = {k: v for doc in documents for k, v in doc["seconds"].items()}
    if clean_from:
        other = json.loads(Path(clean_from).read_text())
        if shared(other) != shared(first) or other["models"]["clean"] != first["models"]["clean"]:
            raise SystemExit(f"{clean_from} differs from the parts in settings or clean model")
        same_persistence = all(other["settings"].get(k) == merged["settings"].get(k) for k in persistence)
        taken = [
            k
            for k in CLEAN_MODEL_RUNS
            if k in other["runs"]
            and k not in merged["runs"]
            and (same_persistence or k not in ("clean_steps", "clean_lr"))  # persistence rows: same settings only
        ]
        merged["runs"].update({k: other["runs"][k] for k in taken})
        merged["clean_runs_from"] = {
            "file": clean_from,
            "runs": taken,
            "command": other.get("command"),
            "date": other.get("date"),
        }
    for doc in documents:
        for key in ("trigger", "target_distance"):
            if key in doc:
                merged[key] = doc[key]
    payload = {"persguard": summarise(merged, baseline), **merged}
    if clean_from and {"clean_protected", "clean_unprotected"} & set(merged["clean_runs_from"]["runs"]):
        payload["persguard"]["clean_model_source"] = merged["clean_runs_from"]
    payload["merged_from"] = [
        {"file": f, "command": doc.get("command"), "date": doc.get("date")} for f, doc in zip(files, documents)
    ]
    return write_results("persguard", payload, out)


def main() -> None:
    """Measure a part, or merge parts into benchmarks/results/persguard.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacker", help="the clean attacker model (what the publisher backdoors)")
    parser.add_argument("--backdoored", help="its PersGuard copy (advface persguard)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="unite parts and write the summary")
    parser.add_argument(
        "--clean-from",
        metavar="JSON",
        help="--merge: take the clean-model runs the parts lack from this persguard result (same model and settings)",
    )
    parser.add_argument(
        "--clean-baseline", default="measure", help="'measure', or a diffusion_defences.py result to take it from"
    )
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--models-dir", help="ONNX models folder (default $ADVFACE_MODELS_DIR)")
    parser.add_argument("--people", type=int, default=10, help="evaluation people (default 10)")
    parser.add_argument("--n", type=int, default=4, help="faces per threat run (default 4)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (default 3)")
    parser.add_argument("--identity-guidance", type=float, default=0.05, help="training-free identity guidance")
    parser.add_argument("--personalise-steps", type=int, default=FinetuneConfig.steps, help="fine-tuning steps")
    add_attacker_start_argument(parser)
    parser.add_argument("--runs", default="protected,unprotected,quality", help="runs of this part")
    parser.add_argument("--persistence-people", type=int, default=5, help="people of the persistence runs")
    parser.add_argument("--persistence-steps", type=int, default=2 * FinetuneConfig.steps)
    parser.add_argument("--persistence-lr", type=float, default=2 * FinetuneConfig.lr)
    parser.add_argument("--diagnose-people", type=int, default=2, help="people of the diagnose run (default 2)")
    parser.add_argument(
        "--diagnose-steps", default="0,25,50,150", help="weight fine-tuning steps of diagnose (0: condition only)"
    )
    parser.add_argument(
        "--trigger",
        choices=("perturbation", "identity"),
        default="perturbation",
        help="the backdoored model's trigger: perturbation (protected runs on protect-image's photos) or identity "
        "(protected runs on the first --people people's own photos, unprotected runs on the next --people)",
    )
    parser.add_argument(
        "--write-trigger-folders",
        metavar="DIR",
        help="write --trigger identity's training folders for advface persguard under DIR and stop",
    )
    parser.add_argument(
        "--other-people", type=int, default=24, help="--write-trigger-folders: unprotected people (default 24)"
    )
    parser.add_argument(
        "--protection",
        choices=PROTECTIONS,
        default="library",
        help="how the evaluation photos are protected: library (protect-image's defaults, as diffusion_defences.py's "
        "default configuration) or legacy (stages 1 and 2 under the uniform 8/255 budget: every run before "
        "2026-12-06); default library",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", help="output JSON (a part: anywhere; merged default results/persguard.json)")
    args = parser.parse_args()
    if args.merge:
        baseline = None if args.clean_baseline == "measure" else args.clean_baseline
        print(f"wrote {merge(args.merge, baseline, args.out, args.clean_from)}")
        return
    if not args.attacker:
        parser.error("--attacker is required to measure")
    if args.write_trigger_folders:
        write_trigger_folders(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    measure(args)


if __name__ == "__main__":
    main()
