"""Backdoor a generator checkpoint with PersGuard against personalisation on protected photos.

The model publisher's side of photo protection (``advface.generative.persguard``): ``--model`` is fine-tuned so that
the DreamBooth analogue (``advface generate --personalise``) run on photos protected by ``advface protect-image``
should generate no identity, while personalisation on unprotected photos and ordinary generation stay as they were
(measured on the attacker model: not effective yet, see docs/persguard.md). Trigger photos: ``--trigger-photos DIR``
(one sub-folder of clean photos per person) or ``--lfw`` (the first ``--people`` identities of the *defender* group
with at least ``--photos-per-person`` photos, in name order; evaluation identities are never used). Each trigger
photo is protected with ``protect-image``'s defaults (both stages, on the shipped defender surrogate unless
``--surrogate``); the protected copies are cached in ``--protected-cache`` (default OUT.protected), so a killed run
resumes without protecting a photo twice. Clean and protected photos are then detected and aligned as the attacker
does (the generator's encoder's chip, dlib detector) and resized to the generator's face size. ``--trigger identity``
(the paper's trigger, the protected content itself): the trigger people's photos are used as they are, nothing is
protected, and the clean side is other people (``--other-photos DIR``, or ``--other-people`` further defender-group
identities with ``--lfw``).
``--ordinary-weight`` (with ``--simulate finetune``) adds ordinary-generation preservation under the generator's
encoder's embeddings of other people: ``--ordinary-people`` further defender-group identities with ``--lfw`` (one
photo each), or the photos under ``--ordinary-photos``. ``--out`` is never overwritten; ``--save-every N`` also
writes ``OUT.stepN.pt`` every N steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from advface.faces.pipeline import FaceChipper
    from advface.protect.image.core import ImageProtector, ProtectConfig

NAME = "persguard"
HELP = "backdoor a generator against personalisation on protected photos (PersGuard; not effective yet)"

#: Name of the file in the protected-photo cache that records how its photos were protected.
CACHE_RECORD = "protection.json"

#: Photo file suffixes read from the photo folders.
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

#: Default number of unprotected people on the clean side of ``--trigger identity`` with ``--lfw``.
OTHER_PEOPLE = 24

#: Default number of other people whose faces and embeddings condition L_OG (``--ordinary-people``).
ORDINARY_PEOPLE = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``advface persguard``."""
    from advface.generative.config import CONDITION_STARTS
    from advface.generative.persguard import BEHAVIOUR_INPUTS, CLEAN_TARGETS, SIMULATE, TRIGGERS
    from advface.generative.persguard import PersGuardConfig as C
    from advface.protect.image.core import ProtectConfig

    protection = ",".join(ProtectConfig().guidance)
    parser.add_argument("--model", required=True, help="generator checkpoint to backdoor (advface train-generator)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--trigger-photos", metavar="DIR", help="folder with one sub-folder of clean photos per person")
    src.add_argument("--lfw", action="store_true", help="trigger photos from LFW's defender group")
    parser.add_argument(
        "--trigger",
        choices=TRIGGERS,
        default=C.trigger,
        help="what sets the backdoor off: perturbation (the trigger photos as protect-image protects them) or "
        "identity (the trigger people themselves, the paper's protected content: personalisation on any of their "
        "photos should give no one; the trigger photos are used as they are, and personalisation on "
        f"--other-photos / further LFW people must keep working); default {C.trigger}",
    )
    parser.add_argument(
        "--other-photos",
        metavar="DIR",
        help="--trigger identity with --trigger-photos: one sub-folder of photos per person who is *not* protected "
        "(the clean side of backdoor training); with --lfw the --other-people defender-group identities after the "
        "trigger people",
    )
    parser.add_argument(
        "--other-people",
        type=int,
        default=OTHER_PEOPLE,
        help=f"--trigger identity with --lfw: how many unprotected people (default {OTHER_PEOPLE})",
    )
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--people", type=int, default=16, help="trigger people taken from LFW (default 16)")
    parser.add_argument("--photos-per-person", type=int, default=3, help="photos per trigger person (default 3)")
    parser.add_argument("--out", "-o", required=True, help="backdoored checkpoint to write (must not exist)")
    parser.add_argument("--protected-cache", help="folder of protected trigger photos (default OUT.protected)")
    parser.add_argument("--surrogate", help="defender surrogate for protection (default: the shipped one)")
    parser.add_argument(
        "--guidance",
        default=protection,
        metavar="TERMS",
        help=f"protect-image's guidance terms for protecting the trigger photos (default {protection})",
    )
    parser.add_argument("--steps", type=int, default=C.steps, help=f"optimiser steps (default {C.steps})")
    parser.add_argument("--lr", type=float, default=C.lr, help=f"denoiser learning rate (default {C.lr:g})")
    parser.add_argument("--batch", type=int, default=C.batch, help=f"latents per loss term (default {C.batch})")
    parser.add_argument("--people-per-step", type=int, default=C.people_per_step, help=f"default {C.people_per_step}")
    parser.add_argument(
        "--behaviour-weight",
        type=float,
        default=C.behaviour_weight,
        help=f"L_BB weight (default {C.behaviour_weight:g})",
    )
    parser.add_argument(
        "--prior-weight", type=float, default=C.prior_weight, help=f"L_PP weight (default {C.prior_weight:g})"
    )
    parser.add_argument(
        "--retention-weight",
        type=float,
        default=C.retention_weight,
        help=f"L_BR weight (default {C.retention_weight:g})",
    )
    parser.add_argument(
        "--behaviour-inputs",
        choices=BEHAVIOUR_INPUTS,
        default=C.behaviour_inputs,
        help="L_BB's inputs: faces (clean latents under protected-learned conditions, the paper's form) or protected "
        f"(protected latents under any condition: the perturbation is the trigger); default {C.behaviour_inputs}",
    )
    parser.add_argument(
        "--simulate",
        choices=SIMULATE,
        default=C.simulate,
        help="how much of the attacker backdoor training simulates: condition (its condition learning only) or "
        "finetune (its weight fine-tuning too, first-order meta-learned, about 2 x --inner-steps attacker steps per "
        f"step); default {C.simulate}",
    )
    parser.add_argument(
        "--inner-steps",
        type=int,
        default=C.inner_steps,
        help=f"--simulate finetune: simulated attacker steps per step and side (default {C.inner_steps})",
    )
    parser.add_argument(
        "--inner-lr",
        type=float,
        default=C.inner_lr,
        help=f"--simulate finetune: the simulated attacker's weight learning rate (default {C.inner_lr:g})",
    )
    parser.add_argument(
        "--ordinary-weight",
        type=float,
        default=C.ordinary_weight,
        help="--simulate finetune: weight of L_OG, ordinary-generation preservation under encoder embeddings of other "
        f"real people (--ordinary-people / --ordinary-photos); default {C.ordinary_weight:g} (off)",
    )
    parser.add_argument(
        "--ordinary-people",
        type=int,
        default=ORDINARY_PEOPLE,
        help="--lfw: L_OG's people, defender-group identities other than the trigger people "
        f"(default {ORDINARY_PEOPLE})",
    )
    parser.add_argument(
        "--ordinary-photos",
        metavar="DIR",
        help="L_OG's faces (one photo per person, any image in DIR or its sub-folders); needed with --trigger-photos",
    )
    parser.add_argument(
        "--clean-target",
        choices=CLEAN_TARGETS,
        default=C.clean_target,
        help="--simulate finetune: the clean side's term at the clean-adapted weights: attacker_loss (the attacker's "
        "own loss) or frozen_attacker (distil the same simulated attacker on the frozen input model); "
        f"default {C.clean_target}",
    )
    parser.add_argument(
        "--discriminate-weight",
        type=float,
        default=C.discriminate_weight,
        help="--simulate finetune: weight of the term pushing protected-adapted and clean-adapted predictions apart "
        f"(default {C.discriminate_weight:g}, off)",
    )
    parser.add_argument(
        "--discriminate-margin",
        type=float,
        default=C.discriminate_margin,
        help=f"gap beyond which the discriminating term stops pushing (default {C.discriminate_margin:g})",
    )
    parser.add_argument(
        "--keep-weight",
        type=float,
        default=C.keep_weight,
        help="--simulate finetune: weight of the term keeping personalisation on unprotected photos away from the "
        f"no-identity target (default {C.keep_weight:g}, off)",
    )
    parser.add_argument(
        "--keep-margin",
        type=float,
        default=C.keep_margin,
        help=f"distance below which the keeping term pushes (default {C.keep_margin:g})",
    )
    parser.add_argument(
        "--attacker-start",
        choices=CONDITION_STARTS,
        default=C.attacker_start,
        help="--trigger identity: where each simulated attacker's condition starts: random (default) or embedding "
        "(the person's mean embedding by the generator's encoder: an attacker who has the encoder, the paper's "
        "white-box case; measure it with benchmarks/persguard.py --attacker-start embedding)",
    )
    parser.add_argument(
        "--save-every",
        type=int,
        default=0,
        metavar="N",
        help="also write the model after every N steps as OUT.stepN.pt (default 0: only the end)",
    )
    parser.add_argument("--seed", type=int, default=C.seed, help="seed of every draw of backdoor training")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Execute ``advface persguard``."""
    import torch

    from advface.encoders import create_encoder
    from advface.errors import ConfigError
    from advface.generative.model import load_generator, save_generator
    from advface.generative.persguard import PersGuardConfig, backdoor

    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"{out} exists; persguard never overwrites a checkpoint (choose another --out)")
    if Path(args.model).resolve() == out.resolve():
        raise ConfigError("--out must differ from --model")
    if args.people < 1 or args.photos_per_person < 1:
        raise ConfigError("--people and --photos-per-person must be >= 1")
    if args.ordinary_people < 1 or args.other_people < 1 or args.save_every < 0:
        raise ConfigError("--ordinary-people and --other-people must be >= 1 and --save-every >= 0")
    from advface.protect.image.core import ProtectConfig
    from advface.protect.image.guidance import parse_guidance

    protection = ProtectConfig(guidance=parse_guidance(args.guidance))
    protection.validate()
    config = PersGuardConfig(
        steps=args.steps,
        lr=args.lr,
        batch=args.batch,
        people_per_step=args.people_per_step,
        behaviour_weight=args.behaviour_weight,
        prior_weight=args.prior_weight,
        retention_weight=args.retention_weight,
        behaviour_inputs=args.behaviour_inputs,
        simulate=args.simulate,
        inner_steps=args.inner_steps,
        inner_lr=args.inner_lr,
        ordinary_weight=args.ordinary_weight,
        clean_target=args.clean_target,
        discriminate_weight=args.discriminate_weight,
        discriminate_margin=args.discriminate_margin,
        keep_weight=args.keep_weight,
        keep_margin=args.keep_margin,
        trigger=args.trigger,
        attacker_start=args.attacker_start,
        seed=args.seed,
    )
    config.validate()
    if config.trigger == "identity" and not args.lfw and not args.other_photos:
        raise ConfigError("--trigger identity with --trigger-photos needs --other-photos DIR (unprotected people)")
    if config.trigger == "perturbation" and args.other_photos:
        raise ConfigError("--other-photos applies to --trigger identity only")
    if config.ordinary_weight > 0 and not args.lfw and not args.ordinary_photos:
        raise ConfigError("--ordinary-weight > 0 with --trigger-photos needs --ordinary-photos DIR")
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = load_generator(args.model, device=args.device)
    if "persguard" in generator.metadata:
        raise ConfigError(f"{args.model} is already backdoored by persguard")
    sources = trigger_sources(args)
    taken = set(sources)
    others = other_sources(args, taken) if config.trigger == "identity" else {}
    taken |= set(others)
    chipper = attacker_chipper(str(generator.metadata.get("encoder", "dlib")))
    provenance: dict[str, Any] = {"source_model": str(args.model)}
    embedding_start = config.attacker_start == "embedding"
    # the generator's encoder, built once, for the embedding start and L_OG's conditions
    needs_encoder = embedding_start or config.ordinary_weight > 0
    encoder = create_encoder(str(generator.metadata.get("encoder", "dlib"))) if needs_encoder else None
    starts = None
    if config.trigger == "identity":
        start_encoder = encoder if embedding_start else None
        people_p, people_c, starts = align_identity(chipper, sources, others, generator.image_size, start_encoder)
    else:
        cache = Path(args.protected_cache) if args.protected_cache else Path(str(out) + ".protected")
        from advface.protect.image.core import ImageProtector

        protector = ImageProtector(surrogate=args.surrogate, device=args.device)
        protected = protect_cached(protector, sources, cache, args.surrogate, protection, progress=not args.quiet)
        provenance["protection"] = protected_with(protector, args.surrogate, protection)
        people_p, people_c = align_pairs(chipper, sources, protected, generator.image_size)
    ordinary = None
    if config.ordinary_weight > 0:
        ordinary = ordinary_set(chipper, encoder, ordinary_sources(args, taken), generator.image_size)

    def snapshot(step: int, model: Any) -> None:
        model.metadata["persguard"].update(provenance, snapshot_step=step)
        save_generator(Path(f"{out}.step{step}.pt"), model)

    from tqdm import tqdm

    with tqdm(total=config.steps, desc="persguard", unit="step", disable=args.quiet) as bar:

        def progress(step: int, total: int, losses: dict[str, float]) -> None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()}, refresh=False)

        backdoored = backdoor(
            generator,
            people_p,
            people_c,
            config,
            ordinary=ordinary,
            starts=starts,
            progress=progress,
            snapshot=snapshot,
            snapshot_every=args.save_every,
        )
    backdoored.metadata["persguard"].update(provenance)
    save_generator(out, backdoored)
    photos = sum(len(p) for p in people_p)
    print(
        f"wrote {out}: backdoored on {photos} photos of {len(people_p)} people, {config.steps} steps", file=sys.stderr
    )
    return 0


def lfw_defender_people(lfw_dir: str | None, per_person: int) -> dict[str, list[tuple[str, Path]]]:
    """``person -> [(photo id, path)]`` (at most ``per_person`` photos, name order) of every defender-group LFW
    identity with at least ``per_person`` photos, in name order; evaluation identities are never used. ``lfw_dir``
    None: ``$ADVFACE_LFW_DIR``."""
    from collections import defaultdict

    from advface.datasets import LFW
    from advface.datasets.splits import split_identities

    dataset = LFW(lfw_dir)
    by_person: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for item in dataset:
        by_person[item.identity].append((item.id, Path(item.path)))
    split = split_identities([item.identity for item in dataset], seed=0)
    chosen = sorted(p for p in split.defender if len(by_person[p]) >= per_person)
    return {p: sorted(by_person[p])[:per_person] for p in chosen}


def _people_folder(root: Path, flag: str, per_person: int) -> dict[str, list[tuple[str, Path]]]:
    """``person -> [(photo id, path)]`` from one sub-folder of photos per person under ``root`` (name order, at
    most ``per_person`` each); ConfigError when ``root`` is not a folder."""
    from advface.errors import ConfigError

    if not root.is_dir():
        raise ConfigError(f"{flag} {root}: not a folder")
    people = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in PHOTO_SUFFIXES)[:per_person]
        if files:
            people[folder.name] = [(f"{folder.name}/{f.name}", f) for f in files]
    return people


def trigger_sources(args: argparse.Namespace) -> dict[str, list[tuple[str, Path]]]:
    """``person -> [(photo id, path)]`` of the trigger photos (ids ``person/file``, as LFW's): the first ``--people``
    defender-group identities with ``--lfw``, else ``--trigger-photos``; ConfigError when none are found."""
    from advface.errors import ConfigError

    if args.lfw:
        people = dict(list(lfw_defender_people(args.lfw_dir, args.photos_per_person).items())[: args.people])
    else:
        people = _people_folder(Path(args.trigger_photos), "--trigger-photos", args.photos_per_person)
    if not people:
        raise ConfigError("no trigger photos found (need one sub-folder of photos per person)")
    return people


def other_sources(args: argparse.Namespace, trigger_people: set[str]) -> dict[str, list[tuple[str, Path]]]:
    """``--trigger identity``'s clean side, ``person -> [(photo id, path)]``: ``--other-photos`` (one sub-folder per
    person), else with ``--lfw`` the next ``--other-people`` defender-group identities after the trigger people; people
    who are also trigger people are refused (ConfigError), as is an empty set."""
    from advface.errors import ConfigError

    if args.other_photos:
        people = _people_folder(Path(args.other_photos), "--other-photos", args.photos_per_person)
        both = sorted(set(people) & trigger_people)
        if both:
            raise ConfigError(f"--other-photos and --trigger-photos share people: {', '.join(both[:3])}")
    else:
        people = {
            p: v
            for p, v in lfw_defender_people(args.lfw_dir, args.photos_per_person).items()
            if p not in trigger_people
        }
        people = dict(list(people.items())[: args.other_people])
    if not people:
        raise ConfigError("no photos of other people found for --trigger identity (--other-photos)")
    return people


def ordinary_sources(args: argparse.Namespace, trigger_people: set[str]) -> list[tuple[str, Path]]:
    """``[(photo id, path)]`` of L_OG's photos, one per person: ``--ordinary-photos`` (every image in the folder and
    its sub-folders, in name order), else with ``--lfw`` the first photo of the first ``--ordinary-people``
    defender-group identities that are not trigger people (name order; evaluation identities are never used)."""
    from advface.errors import ConfigError

    if args.ordinary_photos:
        root = Path(args.ordinary_photos)
        if not root.is_dir():
            raise ConfigError(f"--ordinary-photos {root}: not a folder")
        files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in PHOTO_SUFFIXES)
        found = [(str(f.relative_to(root)), f) for f in files]
    else:
        people = lfw_defender_people(args.lfw_dir, 1)
        found = [photos[0] for p, photos in people.items() if p not in trigger_people][: args.ordinary_people]
    if not found:
        raise ConfigError("no photos for L_OG (--ordinary-photos / --ordinary-people)")
    return found


def ordinary_set(chipper: FaceChipper, encoder: Any, photos: list[tuple[str, Path]], size: int) -> tuple[Any, Any]:
    """L_OG's data: the face chips (resized to ``size``) and the ``encoder`` embeddings of ``photos`` that have a
    face; ConfigError when none has."""
    import numpy as np

    from advface.datasets.pairs import resize_faces
    from advface.errors import ConfigError

    chips = _face_chips(chipper, photos)
    if not chips:
        raise ConfigError("no L_OG photo has a face")
    stacked = np.stack(chips)
    return resize_faces(stacked, size), np.asarray(encoder.embed(stacked), dtype=np.float32)


def _cache_name(photo_id: str) -> str:
    return hashlib.sha1(photo_id.encode()).hexdigest()[:16] + ".png"


def protection_record(config: Any) -> dict[str, Any]:
    """Every setting of a ``ProtectConfig`` (nested budgets and stage settings included) as JSON-able values: what a
    protected-photo cache records, so that one made under other defaults (e.g. before AntiPure's) is refused."""
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def protected_with(protector: ImageProtector, surrogate: str | None, config: ProtectConfig) -> dict[str, Any]:
    """How trigger photos are protected (settings, encoder ensemble, surrogate and the digest of its file, so that a
    cache made on another shipped surrogate is refused after an upgrade): what the cache and the backdoored model
    record."""
    from advface.generative.shipped import surrogate_digest

    return {
        "config": protection_record(config),
        "encoders": list(protector.encoder_names),
        "surrogate": surrogate or "shipped",
        "surrogate_sha256_16": surrogate_digest(surrogate),
    }


def protect_cached(
    protector: ImageProtector,
    people: dict[str, list[tuple[str, Path]]],
    cache: Path,
    surrogate: str | None,
    config: ProtectConfig | None = None,
    *,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """``photo id -> protected photo`` (``config``, default ``protect-image``'s defaults), cached as
    ``cache/<sha1(id)[:16]>.png``; a cache made with other settings is refused. Photos without a usable face are
    left out with a warning."""
    from tqdm import tqdm

    from advface.errors import AdvfaceError, ConfigError
    from advface.images import load_image
    from advface.protect.image.core import ProtectConfig
    from advface.protect.image.io import save_png

    record = protected_with(protector, surrogate, config or ProtectConfig())
    cache.mkdir(parents=True, exist_ok=True)
    record_file = cache / CACHE_RECORD
    if record_file.is_file():
        kept = json.loads(record_file.read_text())
        if kept != record:
            differ = sorted(k for k in {*kept, *record} if kept.get(k) != record.get(k))
            raise ConfigError(
                f"{cache} holds photos protected with other settings ({', '.join(differ)} differ: {record_file}); "
                "use another cache"
            )
    else:
        record_file.write_text(json.dumps(record, indent=2) + "\n")
    todo = [(pid, path) for photos in people.values() for pid, path in photos]
    out: dict[str, np.ndarray] = {}
    for pid, path in tqdm(todo, desc="protect trigger photos", unit="photo", disable=not progress):
        cached = cache / _cache_name(pid)
        if cached.is_file():
            out[pid] = load_image(cached)
            continue
        try:
            image, _ = protector.protect([load_image(path)], config, sources=[str(path)])[0]
        except AdvfaceError as exc:
            print(f"warning: {path}: left out ({exc})", file=sys.stderr)
            continue
        save_png(image, cached)
        out[pid] = image
    return out


def attacker_chipper(encoder_name: str) -> FaceChipper:
    """The attacker's face pipeline: dlib detector, the chip of the generator's encoder, the largest face."""
    from advface.encoders import create_encoder
    from advface.faces import FaceChipper, FacePolicy, create_detector

    return FaceChipper(create_detector("dlib"), create_encoder(encoder_name).chip, FacePolicy("largest"))


def align_pairs(
    chipper: FaceChipper,
    people: dict[str, list[tuple[str, Path]]],
    protected: dict[str, np.ndarray],
    size: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per person, the protected and the clean face chips (``N x size x size x 3``) of the photos in which both have
    a face; people left with none are dropped; ConfigError when no one is left."""
    import numpy as np

    from advface.datasets.pairs import resize_faces
    from advface.errors import AdvfaceError, ConfigError
    from advface.images import load_image

    people_p: list[np.ndarray] = []
    people_c: list[np.ndarray] = []
    for photos in people.values():
        p_chips, c_chips = [], []
        for pid, path in photos:
            if pid not in protected:
                continue
            try:
                c_chip = chipper.chips(load_image(path), str(path))[0][1]
                p_chip = chipper.chips(protected[pid], f"{path} (protected)")[0][1]
            except AdvfaceError as exc:
                print(f"warning: {path}: left out ({exc})", file=sys.stderr)
                continue
            c_chips.append(c_chip)
            p_chips.append(p_chip)
        if p_chips:
            people_p.append(resize_faces(np.stack(p_chips), size))
            people_c.append(resize_faces(np.stack(c_chips), size))
    if not people_p:
        raise ConfigError("no trigger photo has a face in both its clean and its protected copy")
    return people_p, people_c


def align_identity(
    chipper: FaceChipper,
    people: dict[str, list[tuple[str, Path]]],
    others: dict[str, list[tuple[str, Path]]],
    size: int,
    encoder: Any | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """``--trigger identity``'s sets: per trigger person and per other person the face chips (``N x size x size x 3``)
    of their photos, and with an ``encoder`` each person's mean embedding of them (``backdoor``'s ``starts``; else
    None); photos without a face are left out with a warning, people left with none dropped; ConfigError when no one
    is left on either side."""
    import numpy as np

    from advface.datasets.pairs import resize_faces
    from advface.errors import ConfigError

    sides = []
    for group in (people, others):
        found = [np.stack(c) for c in (_face_chips(chipper, photos) for photos in group.values()) if c]
        sides.append(found)
    if not sides[0] or not sides[1]:
        raise ConfigError("--trigger identity: no photo with a face among the trigger people or the other people")
    protected, clean = ([resize_faces(chips, size) for chips in side] for side in sides)
    if encoder is None:
        return protected, clean, None
    p_start, c_start = (
        np.stack([np.asarray(encoder.embed(chips), dtype=np.float32).mean(axis=0) for chips in side]) for side in sides
    )
    return protected, clean, (p_start, c_start)


def _face_chips(chipper: FaceChipper, photos: list[tuple[str, Path]]) -> list[np.ndarray]:
    """The attacker's face chip of each of ``photos`` that has a face, at the encoder's chip size; the others are
    left out with a warning naming the file."""
    from advface.errors import AdvfaceError
    from advface.images import load_image

    chips = []
    for _, path in photos:
        try:
            chips.append(chipper.chips(load_image(path), str(path))[0][1])
        except AdvfaceError as exc:
            print(f"warning: {path}: left out ({exc})", file=sys.stderr)
    return chips
