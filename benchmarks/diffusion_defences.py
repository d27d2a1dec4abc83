"""Photo protection against diffusion personalisation, measured on a generator the protection never used.

Usage::

    python benchmarks/diffusion_defences.py --attacker generator_attacker.pt --surrogate generator_defender.pt
        [--people 20] [--n 4] [--protect-steps 60] [--personalise-steps 150] [--personalise-lr 2e-4]
        [--purify 0.1,0.2,0.3]
        [--classical jpeg75,blur1.0] [--configs encoders,deflection,encoders+deflection,encoders+deflection+antipure]
        [--purify-configs encoders+deflection,encoders+deflection+antipure]
        [--antipure-identity surrogate|ensemble] [--antipure-identity-weight 1] [--decoy-weight 0]
        [--threats training_free,training_based] [--attacker-start random|embedding] [--personalise-guidance 0]
        [--guidance 3] [--sample-guidance 5,7]
        [--out benchmarks/results/diffusion_defences.json]
    python benchmarks/diffusion_defences.py --merge RUN1.json RUN2.json[:CONFIG,...] [--out ...]   # side by side
    python benchmarks/pool_people.py --cell NAME=RUN1.json:CONFIG:THREAT --cell NAME=RUN2.json:...  # disjoint people
    python benchmarks/diffusion_defences.py --surrogate generator_defender.pt --protect-only [--configs ...]  # cache
    python benchmarks/diffusion_defences.py ... --configs encoders+deflection+antipure --skip-clean --band low|high
    python benchmarks/diffusion_defences.py ... --protect-high-band 0.9 --band high   # protection in the high band

The result is rewritten after every configuration and purification level.

People: LFW identities of the project's *evaluation* group (never in either generator's training data) with at
least four photos, in name order. Photos 1-3 of a person are protected as whole photos by ``advface protect-image``'s
:class:`~advface.protect.image.core.ImageProtector` under each guidance configuration (``--configs``; the deflection
term runs on the *defender surrogate* ``--surrogate``), and attacked on the *attacker model* ``--attacker``, as an
attacker would: detect and align the photo (dlib), embed it, then

- **training-free**: generate ``--n`` faces from each photo's embedding, each sampling step pulled towards that
  embedding through the encoder's gradient (``--identity-guidance``; the white-box attacker of
  ``benchmarks/generative_eval.py``, 0 for conditioning alone);
- **training-based**: fine-tune a copy of the attacker model and an identity condition on the three photos' chips
  (DreamBooth analogue, :func:`advface.generative.threats.finetune`: ``--personalise-steps`` Adam steps at learning
  rate ``--personalise-lr``, recorded as ``settings.finetune_lr`` when not the default), generate ``--n`` faces; the
  condition starts at random (no encoder involved), or with ``--attacker-start embedding`` at the chips' mean
  embedding by the encoder conditioning the generator (an attacker who uses the encoder; recorded as
  ``settings.attacker_start``); ``--personalise-guidance S`` also pulls each sampling step of the fine-tuned model
  towards the photos' mean embedding through the encoder's gradient (the attacker who has the encoder uses both
  levers; recorded as ``settings.personalise_guidance``); each fine-tuned model is sampled at classifier-free
  guidance ``--guidance`` (key ``training_based``) and, with ``--sample-guidance 5,7``, also at those scales from
  the same fine-tuning and seeds (keys ``training_based_cfg5``, ``training_based_cfg7``: the thief's sampling lever
  for the cost of sampling alone; recorded as ``settings.sample_guidance``);
- **purified** (the ``--purify-configs``, default the ``--default-config`` only): the same two after the attacker
  model's diffusion purification of the chips at each ``--purify`` noise level, and after each classical
  purification of the whole photo (``--classical``: names of
  :func:`advface.protect.image.purify.standard_purifications`, e.g. ``jpeg75``, ``blur1.0``, ``resize0.5``); the
  strongest (the one giving the attacker the most matches, system judge) is reported as ``purified``.

Each generated face is compared with the person's *fourth* photo, clean (Type II), by the system judge (the encoder
conditioning the generator, dlib, FMR 0.1% on clean LFW), the transfer judge (MobileFaceNet, its own FMR 0.1%; the
protection's encoder ensemble uses it) and the unseen judge (``--unseen-judge``, default FaceNet: an encoder no attacker
and no protection ever used, its own FMR 0.1%; its figures under ``unseen``, as the transfer judge's under
``transfer``); ``match`` = share accepted (``match_ci95``: its Wilson 95% interval; ``judged``: the faces it is a share
of), ``ism`` = mean cosine, ``ism_impostor`` = the mean cosine of the same faces with the *other* people's fourth photos
(the ISM a face with no trace of the person gets from this generator; the ISM means something only above it), ``rank1``
= the share of faces most similar to their own person's photo among the run's people (``rank1_chance``: one over the
people; both from :func:`benchmarks.generative_eval.identification`), ``per_person``: faces generated and accepted by
each judge per person, in the run's order of people (runs of the same people and seeds pair up person by person).
``clean`` = the same threats on the unprotected photos. Photos in which the attacker finds no face give no training-free
faces (counted as not matched, reported as ``no_face_rate``). ``--threats`` measures only some of the threats;
``--antipure-*`` and ``--decoy-weight`` set the AntiPure options
(:class:`~advface.protect.image.antipure.AntiPureConfig`) of every configuration naming ``antipure``. Protected photos
are cached under ``benchmarks/results/local/diffusion_defences/`` (not committed: LFW likenesses), so a rerun with the
same settings (and the same surrogate file) reuses them. The result is rewritten after every purification level, so a
long run's finished part is never lost; each person's generated faces are kept too (:class:`FaceStore`, under
``benchmarks/results/local/diffusion_defences/faces/``, one folder per attacker model, photos and settings), so a run
stopped part-way (or a longer run on more people) takes up again at the first person not yet attacked. ``--band
low|high`` attacks only one frequency band of each protected photo's perturbation (:func:`band_split`: ``low`` keeps
what survives the attacker's downsampling of the face to the generator's size, or with ``--band-sigma`` only coarser
structure, ``high`` the rest; recorded as ``settings.band`` and ``settings.band_sigma``, with the banded photos'
PSNR, SSIM and visibility (:func:`advface.protect.image.visibility.visibility`) under ``quality``): which part of the
perturbation does the work against the generator, and which part the eye sees. ``--protect-high-band SIGMA`` protects
with the perturbation confined to the high band from the start (:class:`HighBandProtector`; own cache folders; with
``--band high`` the threats see only that band): can a protection live where the eye is less sensitive, against a
generator that learns from the face at a larger size? ``--protect-only`` fills that cache and measures nothing (no
attacker model needed), so protection can run before or beside the attacker's training; it picks the people from the
LFW pairs embedded at the generator size of ``--attacker`` when given, else of the surrogate (built and cached on first
use, an hour on two busy cores: pass ``--attacker`` when its size's pairs are cached); each cached photo's protection
seconds and face SSIM are kept with it and reported by the later run. ``--purified-only`` skips the threats on the
unpurified photos of the ``--purify-configs`` (a run measuring one more purification level need not repeat them;
``--merge`` unites the parts).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.audit.field_metrics import wilson_interval  # noqa: E402
from advface.datasets import LFW  # noqa: E402
from advface.datasets.pairs import resize_faces  # noqa: E402
from advface.datasets.splits import split_identities  # noqa: E402
from advface.encoders.base import ChipSpec  # noqa: E402
from advface.errors import AdvfaceError  # noqa: E402
from advface.faces.align import alignment_matrix  # noqa: E402
from advface.faces.detect import Face  # noqa: E402
from advface.faces.pipeline import FaceChipper  # noqa: E402
from advface.generative.config import CONDITION_STARTS, FinetuneConfig  # noqa: E402
from advface.generative.model import IdentityGenerator, load_generator  # noqa: E402
from advface.generative.threats import generate_from_embeddings, learn_person, sample_person  # noqa: E402
from advface.images import load_image  # noqa: E402
from advface.protect.image.core import ImageProtector, ProtectConfig  # noqa: E402
from advface.protect.image.io import save_png  # noqa: E402
from advface.protect.image.purify import standard_purifications  # noqa: E402
from advface.protect.image.quality import psnr, ssim  # noqa: E402
from advface.protect.image.ssim_budget import SsimBudget  # noqa: E402
from advface.protect.image.transforms import gaussian_blur  # noqa: E402
from advface.protect.image.visibility import visibility  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_antipure_arguments,
    add_budget_arguments,
    antipure_from_args,
    budget_from_args,
    file_digest,
    write_results,
)
from benchmarks.generative_eval import UNSEEN_JUDGE, Judges  # noqa: E402

LOCAL = Path(__file__).resolve().parent / "results" / "local" / "diffusion_defences"
#: Budget shape and uint8 levels of the runs that record no budget (the library's default, uniform 8/255): their
#: settings and cache keys name none, so that results and cached photos of that time stay comparable.
LEGACY_BUDGET = ("uniform", 8)
#: The defender surrogate (sha256, first 16 hex digits) of the ``benchmarks/persguard.py`` results that record none:
#: all of them protected on the 64-px surrogate advface shipped from 2026-12-05 to 2026-12-07.
UNRECORDED_SURROGATE = "0439cfcab37748ee"
PHOTOS_PER_PERSON = 3
#: Settings that only runs which protected photos record (a clean-only part has none of them).
PROTECTION_ONLY = frozenset({"budget", "encoder_weight"})
THREATS = ("training_free", "training_based")
BANDS = ("low", "high")
#: Sigma of :func:`band_split`'s Gaussian, in generator pixels.
BAND_SIGMA = 0.5


class Attacker:
    """The attacker's pipeline on the attacker model: align and embed photos, then the two threats."""

    def __init__(self, generator: IdentityGenerator, judges: Judges, args: argparse.Namespace) -> None:
        self.generator = generator
        self.encoder = judges.encoder
        self.guide_encoder = judges.scorer  # the encoder's differentiable twin (dlib-torch for dlib)
        self.chipper = FaceChipper("dlib", self.encoder.chip, "largest")
        self.args = args

    def chips(self, photo: np.ndarray) -> np.ndarray | None:
        """The photo's face chip in the encoder's frame, or None when no face is found."""
        try:
            return self.chipper.chips(photo, "<photo>")[0][1]
        except AdvfaceError:
            return None

    def face_scale(self, photo: np.ndarray) -> tuple[float, tuple[float, ...]] | None:
        """``(photo pixels per generator pixel, face box)`` of the photo's face as the attacker cuts it (the chip's
        scale, then the chip resized to the generator's size); None when no face is found."""
        try:
            face = self.chipper.select(photo, "<photo>")[0]
        except AdvfaceError:
            return None
        return generator_pixel(face, self.encoder.chip, self.generator.image_size), tuple(face.box)

    def training_free(self, chips: list[np.ndarray | None], seed: int) -> list[np.ndarray | None]:
        """``n`` faces per chip (None where the photo had no face)."""
        a = self.args
        out: list[np.ndarray | None] = []
        for k, chip in enumerate(chips):
            if chip is None:
                out.append(None)
                continue
            emb = self.embed_chips([chip])
            faces = generate_from_embeddings(
                self.generator,
                emb,
                a.n,
                steps=a.steps,
                guidance=a.guidance,
                seed=seed + k,
                encoder=self.guide_encoder,
                guide_scale=a.identity_guidance,
            )
            out.append(faces[0])
        return out

    def training_based(self, chips: list[np.ndarray | None], seed: int) -> dict[float, np.ndarray] | None:
        """``n`` faces of the condition learned from the chips, per classifier-free guidance scale of
        :meth:`sampling_scales` (one fine-tuning, sampled at each with the same seed); None when no photo had a
        face."""
        a = self.args
        found = [c for c in chips if c is not None]
        if not found:
            return None
        small = resize_faces(np.stack(found), self.generator.image_size)
        config = FinetuneConfig(steps=a.personalise_steps, lr=a.personalise_lr, seed=seed)
        start = self.start_embeddings(found)
        target = None
        if a.personalise_guidance > 0:  # the attacker who has the encoder: towards the photos' mean embedding
            target = (start if start is not None else self.embed_chips(found)).mean(0)
        model, condition = learn_person(self.generator, small, config, embeddings=start)
        return {
            scale: sample_person(
                model,
                condition,
                a.n,
                steps=a.steps,
                guidance=scale,
                seed=seed,
                encoder=self.guide_encoder,
                guide_scale=a.personalise_guidance,
                guide_target=target,
            )
            for scale in self.sampling_scales()
        }

    def sampling_scales(self) -> tuple[float, ...]:
        """The classifier-free guidance scales the training-based threat samples at: ``--guidance``, then each of
        ``--sample-guidance``."""
        return (self.args.guidance, *self.args.sample_guidance)

    def start_embeddings(self, chips: list[np.ndarray]) -> np.ndarray | None:
        """The chips' encoder embeddings, where the DreamBooth analogue's condition starts with ``--attacker-start
        embedding``; None (a random start) otherwise."""
        if self.args.attacker_start != "embedding":
            return None
        return self.embed_chips(chips)

    def embed_chips(self, chips: list[np.ndarray]) -> np.ndarray:
        """The chips' embeddings by the encoder conditioning the generator (each resized to its chip size)."""
        return np.asarray(self.encoder.embed(resize_faces(np.stack(chips), self.encoder.chip.size)))

    def purify(self, chips: list[np.ndarray | None], t_star: float, seed: int) -> list[np.ndarray | None]:
        """The chips after the attacker model's diffusion purification at ``t_star`` (at the generator's size)."""
        return [
            None
            if c is None
            else self.generator.purify(resize_faces(c[None], self.generator.image_size), t_star, seed=seed)[0]
            for c in chips
        ]


def generator_pixel(face: Face, chip: ChipSpec, image_size: int) -> float:
    """Photo pixels per pixel of an ``image_size`` generator, for ``face`` cut to ``chip`` (the chip's scale in the
    photo, then the chip resized to the generator's size)."""
    chip_per_photo = float(np.sqrt(abs(np.linalg.det(alignment_matrix(face, chip)[:, :2]))))
    return chip.size / image_size / chip_per_photo


def cached_photo_name(photo_id: str) -> str:
    """The stem of a protected photo's PNG in the cache (no photo id on disk)."""
    return hashlib.sha1(photo_id.encode()).hexdigest()[:16]


def band_split(
    clean: np.ndarray, protected: np.ndarray, pixel: float, sigma: float = BAND_SIGMA
) -> dict[str, np.ndarray]:
    """``low``: the clean photo plus the perturbation low-passed by a Gaussian of ``sigma`` generator pixels
    (``pixel`` photo pixels each; at the default, half a pixel, it passes what survives the downsampling to the
    generator's size and damps the rest to under a third at that size's Nyquist frequency; larger ``sigma`` keeps only
    coarser structure); ``high``: the clean photo plus the remainder. Both rounded to uint8."""
    if not pixel > 0 or not sigma > 0:
        raise ValueError(f"the generator's pixel and sigma must be > 0, got {pixel} photo pixels and {sigma}")
    base = clean.astype(np.float32)
    delta = protected.astype(np.float32) - base
    width = pixel * sigma
    low = cv2.GaussianBlur(delta, (0, 0), sigmaX=width, sigmaY=width, borderType=cv2.BORDER_REFLECT)
    return {
        band: np.clip(np.rint(base + part), 0, 255).astype(np.uint8)
        for band, part in (("low", low), ("high", delta - low))
    }


class HighBandProtector(ImageProtector):
    """``protect-image``'s protector with the perturbation confined to the high band: the photo gets the optimised
    variable minus what a Gaussian of ``high_band_sigma`` photo pixels passes, projected into the budget's ball and
    the [0, 1] box, and the steps follow the gradient through that filter. (A sign step then takes the gradient's own
    high band at full size; projecting after each step instead threw away most of each step, session 22.) One pass
    of that filter is not a clean split: about a fifth of the change's norm still passes the same Gaussian (and the
    ball's clipping and the uint8 rounding add a little); ``--band high`` strips it before the threats. An
    experiment on where a protection can live, not a library option."""

    def __init__(self, *args: Any, high_band_sigma: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not high_band_sigma > 0:
            raise ValueError(f"high_band_sigma must be > 0, got {high_band_sigma}")
        self.high_band_sigma = high_band_sigma

    def _shape(
        self, x: torch.Tensor, delta: torch.Tensor, eps: float | torch.Tensor, gray_mask: torch.Tensor
    ) -> torch.Tensor:
        high = delta - gaussian_blur(delta, self.high_band_sigma)
        return ImageProtector._project(x, high, eps, gray_mask)


def banded_photos(
    attacker: Attacker,
    people: list[tuple[str, list[str]]],
    paths: dict[str, Path],
    photos: dict[str, np.ndarray],
    band: str,
    sigma: float = BAND_SIGMA,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``photos`` with only the ``band`` of each perturbation (:func:`band_split`; a photo in which the attacker
    finds no face is kept whole), and their quality: PSNR, SSIM and visibility on the face box of the banded photos
    and (``whole_*``) of the whole perturbation, and the generator's pixel in photo pixels."""
    out: dict[str, np.ndarray] = {}
    rows: dict[str, list[float]] = {}
    for _, ids in people:
        for pid in ids[:PHOTOS_PER_PERSON]:
            clean = load_image(paths[pid])
            scale = attacker.face_scale(clean)
            if scale is None:
                out[pid] = photos[pid]
                continue
            pixel, box = scale
            out[pid] = band_split(clean, photos[pid], pixel, sigma)[band]
            for prefix, photo in (("", out[pid]), ("whole_", photos[pid])):  # the band, and the whole perturbation
                seen = visibility(clean, photo, box).to_dict()
                for key, value in (
                    ("psnr", psnr(clean, photo)),
                    ("ssim", ssim(clean, photo)),
                    *((f"vis_{k}", seen[k]) for k in ("above_jnd_face", "p95_face", "pooled_face")),
                ):
                    rows.setdefault(prefix + key, []).append(float(value if value is not None else np.nan))
            rows.setdefault("generator_pixel", []).append(pixel)
    quality = {f"{key}_mean": float(np.mean(values)) for key, values in rows.items()}
    return out, {**quality, "photos": len(out), "banded": len(rows.get("psnr", []))}


def evaluation_people(judges: Judges, need: int) -> list[tuple[str, list[str]]]:
    """``(person, photo ids)`` of evaluation identities with at least ``need`` embedded photos, in name order."""
    clean = judges.pairs.without_flips()
    split = split_identities(judges.pairs.identities[~judges.pairs.flipped].tolist(), seed=0)
    photos: dict[str, list[str]] = {}
    for pid, person in zip(clean.ids.tolist(), clean.identities.tolist()):
        if person in split.evaluation:
            photos.setdefault(person, []).append(str(pid))
    return [(p, sorted(ids)) for p, ids in sorted(photos.items()) if len(ids) >= need]


class Tally:
    """Generated faces and the photo each is compared with, per threat; summarised by both judges."""

    def __init__(self, judges: Judges) -> None:
        self.judges = judges
        self.faces: dict[str, list[np.ndarray]] = {}
        self.compare: dict[str, list[str]] = {}
        self.missing: dict[str, int] = {}

    def add(self, threat: str, faces: np.ndarray | None, reference: str, expected: int) -> None:
        """Record ``faces`` of one threat run (None: no faces, ``expected`` counted as not matched)."""
        self.faces.setdefault(threat, [])
        self.compare.setdefault(threat, [])
        self.missing.setdefault(threat, 0)
        if faces is None:
            self.missing[threat] += expected
            return
        self.faces[threat].append(faces)
        self.compare[threat] += [reference] * len(faces)

    def summary(self) -> dict[str, Any]:
        """Per threat: system judge keys, and the same under ``transfer`` (and ``unseen`` with a third judge)."""
        out: dict[str, Any] = {}
        others = tuple(self.judges.others)
        for threat, faces in self.faces.items():
            missing = self.missing[threat]
            if not faces:
                out[threat] = {"faces": 0, "no_face": missing, "match": 0.0, **{j: {"match": 0.0} for j in others}}
                continue
            scored = self.judges.score(np.concatenate(faces), self.compare[threat])
            s = self.judges.summary(scored)
            per_person = self.per_person(scored, self.compare[threat])
            total = s["faces"] + missing
            accepted = sum(per_person["system"])
            out[threat] = {
                "faces": s["faces"],
                "no_face": missing,
                "match": accepted / total,
                "match_ci95": list(wilson_interval(accepted, total)),
                "judged": total,
                "ism": s["ism_system"],
                **self.identification(s, "system", len(per_person["faces"])),
            }
            for judge in others:
                judged, judge_accepted = (s[f"{judge}_faces"] or 0) + missing, sum(per_person[judge])
                out[threat][judge] = {
                    "match": judge_accepted / max(judged, 1),
                    "match_ci95": list(wilson_interval(judge_accepted, judged)),
                    "judged": judged,
                    "ism": s[f"ism_{judge}"],
                    **self.identification(s, judge, len(per_person["faces"])),
                }
            out[threat]["per_person"] = per_person
        return out

    @staticmethod
    def identification(summary: dict[str, Any], judge: str, people: int) -> dict[str, Any]:
        """A judge's impostor ISM and rank-1 identification among the ``people`` of the run, with its chance level
        (empty where the judges did not measure them)."""
        if f"ism_impostor_{judge}" not in summary:
            return {}
        return {
            "ism_impostor": summary[f"ism_impostor_{judge}"],
            "rank1": summary[f"rank1_{judge}"],
            "rank1_chance": 1 / people,
        }

    def per_person(self, scored: dict[str, np.ndarray], references: list[str]) -> dict[str, list]:
        """Faces accepted per person, by each judge, and faces generated per person, in the order the people were
        added (no names: the order is the run's people list): runs of the same people and seeds pair up person by
        person."""
        accepted = {"system": scored["system"] >= self.judges.system_threshold}
        for key, judge in self.judges.others.items():
            accepted[key] = np.nan_to_num(scored[key], nan=-np.inf) >= judge.thresholds["1e-3"]
        order = list(dict.fromkeys(references))
        rows = np.array([order.index(r) for r in references])
        out = {"faces": np.bincount(rows, minlength=len(order)).tolist()}
        for key, flags in accepted.items():
            out[key] = np.bincount(rows, weights=flags, minlength=len(order)).astype(int).tolist()
        return out


def parse_scales(value: str, guidance: float, parser: argparse.ArgumentParser) -> tuple[float, ...]:
    """``--sample-guidance``'s comma list -> distinct finite scales >= 1 other than ``guidance``, in the order given
    (parser error otherwise)."""
    try:
        scales = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--sample-guidance must be a comma list of numbers, got {value!r}")
    if any(not 1 <= s < float("inf") for s in scales) or len(set(scales)) != len(scales) or guidance in scales:
        parser.error(f"--sample-guidance needs distinct finite scales >= 1 other than --guidance, got {value!r}")
    return tuple(scales)


def add_attacker_start_argument(parser: argparse.ArgumentParser) -> None:
    """``--attacker-start``: where the DreamBooth analogue's identity condition starts (shared with persguard.py)."""
    parser.add_argument(
        "--attacker-start",
        choices=CONDITION_STARTS,
        default="random",
        help="training-based threat: the learned condition starts at random (default) or at the photos' mean "
        "embedding by the encoder that conditions the generator (embedding: an attacker who uses the encoder)",
    )


def cache_tag(config: ProtectConfig, encoders: str, surrogate_digest: str, high_band_sigma: float | None = None) -> str:
    """The cache folder name of photos protected with ``config`` by the ``encoders`` ensemble (comma-separated) and
    the surrogate whose sha256 starts with ``surrogate_digest`` (by :class:`HighBandProtector` when
    ``high_band_sigma`` is given): the guidance terms and a digest of every setting that changes the photos.
    Settings at the values of the first runs (the uniform 8/255 budget, encoder weight 1, no band limit) are left
    out of the digest, so that caches made then stay valid."""
    name = "+".join(config.guidance)
    key = f"{name}|{encoders}|{surrogate_digest}|{config.steps}|{config.deflection_weight}|{config.seed}"
    if "antipure" in config.guidance:  # AntiPure's settings are part of what was protected
        key += f"|{config.antipure}"
    if (config.budget, config.levels) != LEGACY_BUDGET:
        key += f"|{config.budget}|{config.levels}|{config.ssim if config.budget == 'ssim' else config.perceptual}"
    if config.effective_encoder_weight != 1.0:
        key += f"|encoder_weight={config.effective_encoder_weight:g}"
    if high_band_sigma is not None:
        key += f"|high_band_sigma={high_band_sigma:g}|through_filter"
    return f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def read_records(path: Path) -> dict[str, dict[str, float | None]]:
    """A protected-photo cache's records (photo name -> protection seconds and face SSIM); empty when none."""
    return json.loads(path.read_text()) if path.is_file() else {}


def add_record(path: Path, name: str, record: dict[str, float | None]) -> dict[str, dict[str, float | None]]:
    """Merge one photo's record into the cache's records file (under a lock, so runs side by side keep each other's
    records; the file is replaced whole) and return all records."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = read_records(path)
        records[name] = record
        partial = path.with_suffix(".part")
        partial.write_text(json.dumps(records, indent=1))
        partial.replace(path)
    return records


def protect_people(
    protector: ImageProtector,
    config: ProtectConfig,
    people: list[tuple[str, list[str]]],
    paths: dict[str, Path],
    tag: str,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Protected photos (photo id -> uint8), cached by ``tag``; and quality and cost summaries. Each cached photo's
    protection seconds and face-box SSIM are kept beside it (``records.json``), so a run that reads the cache (e.g.
    after ``--protect-only``) reports them too. Runs on other people of the same cache may protect side by side: each
    photo is written whole (renamed into place), and each record merged into ``records.json`` under a file lock."""
    folder = LOCAL / tag
    folder.mkdir(parents=True, exist_ok=True)
    records_file = folder / "records.json"
    records = read_records(records_file)
    out: dict[str, np.ndarray] = {}
    psnrs: list[float] = []
    ssims: list[float] = []
    face_ssims: list[float] = []
    seconds: list[float] = []
    for _, ids in people:
        for pid in ids[:PHOTOS_PER_PERSON]:
            name = cached_photo_name(pid)
            cached = folder / (name + ".png")
            clean = load_image(paths[pid])
            if cached.is_file():
                protected = load_image(cached)
                if name not in records:  # protected by a run beside this one since this one started
                    records = read_records(records_file)
            else:
                started = time.perf_counter()
                protected, report = protector.protect([clean], config, sources=[pid])[0]
                face_ssim = getattr(report, "ssim_face", None)
                record = {
                    "seconds": time.perf_counter() - started,
                    "ssim_face": None if face_ssim is None else float(face_ssim),
                }
                partial = folder / (name + ".part.png")
                save_png(protected, partial)
                partial.replace(cached)
                records = add_record(records_file, name, record)
            for key, found in (("seconds", seconds), ("ssim_face", face_ssims)):
                value = records.get(name, {}).get(key)
                if value is not None:
                    found.append(float(value))
            out[pid] = protected
            psnrs.append(psnr(clean, protected))
            ssims.append(ssim(clean, protected))
    quality = {
        "psnr_mean": float(np.mean(psnrs)),
        "ssim_mean": float(np.mean(ssims)),
        "ssim_face_mean": float(np.mean(face_ssims)) if face_ssims else None,
        "seconds_per_photo_cpu": float(np.mean(seconds)) if seconds else None,
        "photos": len(psnrs),
    }
    return out, quality


class FaceStore:
    """Each person's generated faces, per purification level, kept on disk so a stopped run resumes where it stopped.

    One folder per attacker model, photo set and generation settings (:func:`face_store_digest`); one ``.npz`` per
    person and level, named by a hash of the level and the person's compared photo (no photo id on disk), holding each
    threat's faces (an empty array where the threat found no face). Written atomically, after the person's threats."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _file(self, level: str, reference: str) -> Path:
        return self.folder / (hashlib.sha1(f"{level}\0{reference}".encode()).hexdigest()[:16] + ".npz")

    def load(self, level: str, reference: str) -> dict[str, np.ndarray | None] | None:
        """The threats' faces of one person at one level (None per threat that found no face), or None if not kept."""
        path = self._file(level, reference)
        if not path.is_file():
            return None
        with np.load(path) as kept:
            return {key: kept[key] if kept[key].size else None for key in kept.files}

    def save(self, level: str, reference: str, faces: dict[str, np.ndarray | None]) -> None:
        """Keep the threats' faces of one person at one level."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._file(level, reference)
        partial = path.with_suffix(".part.npz")
        arrays: dict[str, Any] = {k: np.zeros(0, np.uint8) if v is None else v for k, v in faces.items()}
        np.savez_compressed(partial, **arrays)
        partial.replace(path)


def face_store_digest(attacker_digest: str, photos: str, settings: dict[str, Any], seed: int) -> str:
    """The :class:`FaceStore` folder name of one attacker model (file digest), photo set (``clean`` or the protected
    photos' cache tag) and run settings (all but which people: a person's seeds do not depend on the run's people)."""
    generation = {k: v for k, v in settings.items() if k not in ("people", "people_from")}
    text = json.dumps(
        {"attacker": attacker_digest, "photos": photos, "settings": generation, "seed": seed}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def training_based_key(scale: float, guidance: float) -> str:
    """The result key of the training-based threat sampled at classifier-free guidance ``scale``: ``training_based``
    at the run's ``--guidance``, ``training_based_cfg<scale>`` at each ``--sample-guidance``."""
    return "training_based" if scale == guidance else f"training_based_cfg{scale:g}"


def run_threats(
    attacker: Attacker,
    judges: Judges,
    people: list[tuple[str, list[str]]],
    photos: dict[str, np.ndarray],
    args: Any,
    purify: bool,
    on_level: Callable[[dict[str, Any]], None] | None = None,
    store: FaceStore | None = None,
) -> dict[str, Any]:
    """Every threat on ``photos`` (photo id -> uint8; with ``purify`` also after each purification), judged against
    each person's fourth photo. Levels run one after another (none, then each purification); ``on_level`` receives
    the summary so far after each person (``people_done`` says how many of the level's people it covers). With a
    ``store``, a person's faces already kept there are judged without attacking again, and new ones are kept."""
    tally = Tally(judges)
    levels: list[str] = [""]
    if purify:
        levels += [f"purified_{float(t):g}" for t in args.purify.split(",") if t.strip()]
        levels += [f"purified_{name}" for name in args.classical.split(",") if name.strip()]
    classical = standard_purifications()
    no_face = 0
    summary: dict[str, Any] = {}

    def summarise_so_far(people_done: int) -> dict[str, Any]:
        out = tally.summary()
        out["no_face_rate"] = no_face / (len(people) * PHOTOS_PER_PERSON)
        out["people_done"] = people_done
        mark_strongest_purification(out)
        return out

    for level in levels:
        prefix = f"{level}_" if level else ""
        for k, (_, ids) in enumerate(people):
            reference = ids[PHOTOS_PER_PERSON]
            seed = args.seed + 1000 * (args.people_from + k)  # a person's seeds do not depend on where a run starts
            name = level.removeprefix("purified_")
            own = [photos[pid] for pid in ids[:PHOTOS_PER_PERSON]]
            if name in classical:  # the whole photo, before the attacker's pipeline
                own = [classical[name](photo) for photo in own]
            chips = [attacker.chips(photo) for photo in own]
            if not level:
                no_face += sum(c is None for c in chips)
            if not level and purify and args.purified_only:  # only the no-face count of the unpurified photos
                continue
            kept = None if store is None else store.load(level, reference)
            if kept is None:
                t_star = float(name) if level and name not in classical else None
                kept = attack_person(attacker, chips, t_star, seed, args)
                if store is not None:
                    store.save(level, reference, kept)
            for key, faces in kept.items():
                if key.startswith("training_free"):  # one entry per photo: training_free, training_free_1, ...
                    tally.add(f"{prefix}training_free", faces, reference, args.n)
                else:
                    tally.add(f"{prefix}{key}", faces, reference, args.n)
            if on_level is not None and k < len(people) - 1:  # a long run's finished people are never lost
                on_level(summarise_so_far(k + 1))
        summary = summarise_so_far(len(people))
        if on_level is not None:
            on_level(summary)
    return summary


def attack_person(
    attacker: Attacker, chips: list[np.ndarray | None], t_star: float | None, seed: int, args: Any
) -> dict[str, np.ndarray | None]:
    """One person's threats at one level: the faces of the training-free threat per photo (``training_free``,
    ``training_free_1``, ...) and of the training-based one per sampling scale (:func:`training_based_key`); None
    where a threat found no face. With ``t_star`` (a diffusion purification level), the attacker model purifies the
    chips first."""
    if t_star is not None:
        small = attacker.purify(chips, t_star, seed)
        chips = [None if c is None else resize_faces(c[None], attacker.encoder.chip.size)[0] for c in small]
    out: dict[str, np.ndarray | None] = {}
    if "training_free" in args.threats:
        for i, faces in enumerate(attacker.training_free(chips, seed)):
            out["training_free" + (f"_{i}" if i else "")] = faces
    if "training_based" in args.threats:
        sampled = attacker.training_based(chips, seed)
        for scale in attacker.sampling_scales():
            out[training_based_key(scale, args.guidance)] = None if sampled is None else sampled[scale]
    return out


def main() -> None:
    """Measure and write benchmarks/results/diffusion_defences.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacker", help="attacker model checkpoint (threats run on it; required to measure)")
    parser.add_argument("--surrogate", help="defender surrogate checkpoint (deflection runs on it)")
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="write one result from runs that measured different configurations"
    )
    parser.add_argument("--cost", help="with --merge: protect_image_cost.py result giving the default's s/photo")
    parser.add_argument("--persguard", help="with --merge: benchmarks/persguard.py result to include")
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--models-dir", help="ONNX models folder (default $ADVFACE_MODELS_DIR)")
    parser.add_argument("--people", type=int, default=20, help="evaluation people (default 20)")
    parser.add_argument(
        "--people-from",
        type=int,
        default=0,
        help="skip this many people of the list first (default 0; people 21-40: --people-from 20 --people 20; each "
        "person keeps the seeds of a run from the start; recorded as settings.people_from)",
    )
    parser.add_argument("--n", type=int, default=4, help="faces per threat run (default 4)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (default 3)")
    parser.add_argument(
        "--sample-guidance",
        default="",
        help="training-based: also sample each fine-tuned model at these classifier-free guidance scales (comma "
        "list; one fine-tuning, the same seeds; results under training_based_cfg<scale>; recorded as "
        "settings.sample_guidance)",
    )
    parser.add_argument(
        "--identity-guidance", type=float, default=0.05, help="training-free identity guidance scale (0: none)"
    )
    parser.add_argument("--personalise-steps", type=int, default=FinetuneConfig.steps, help="fine-tuning steps")
    parser.add_argument(
        "--personalise-lr",
        type=float,
        default=FinetuneConfig.lr,
        help=f"fine-tuning learning rate of the model's weights (default {FinetuneConfig.lr:g})",
    )
    add_attacker_start_argument(parser)
    parser.add_argument(
        "--personalise-guidance",
        type=float,
        default=0.0,
        help="training-based: pull each sampling step of the fine-tuned model towards the photos' mean embedding "
        "through the encoder's gradient, at this scale (default 0: none, the canonical attacker; recorded as "
        "settings.personalise_guidance)",
    )
    parser.add_argument("--protect-steps", type=int, default=ProtectConfig.steps)
    parser.add_argument("--encoders", default="dlib-torch,mobilefacenet", help="protection ensemble")
    add_budget_arguments(parser)
    parser.add_argument(
        "--ssim-target",
        type=float,
        default=SsimBudget.target,
        help=f"with --budget ssim: face-box and whole-photo SSIM to keep (default {SsimBudget.target})",
    )
    parser.add_argument(
        "--configs", default="encoders,deflection,encoders+deflection", help="guidance configurations to measure"
    )
    parser.add_argument("--default-config", default="encoders+deflection", help="the configuration reported on top")
    parser.add_argument(
        "--deflection-weight", type=float, default=ProtectConfig.deflection_weight, help="weight of the deflection term"
    )
    parser.add_argument("--skip-clean", action="store_true", help="do not measure the unprotected photos")
    parser.add_argument("--purify", default="0.1,0.2,0.3", help="attacker purification noise levels")
    parser.add_argument(
        "--classical", default="", help="classical purifications of the photo (names of standard_purifications)"
    )
    parser.add_argument(
        "--purify-configs", default=None, help="configurations attacked after purification (default: the default)"
    )
    add_antipure_arguments(parser)
    parser.add_argument(
        "--threats", default=",".join(THREATS), help=f"threats to measure (default {','.join(THREATS)})"
    )
    parser.add_argument(
        "--purified-only",
        action="store_true",
        help="for the --purify-configs: measure the threats after purification only (not on the unpurified photos, "
        "which another run measured; --merge unites them)",
    )
    parser.add_argument(
        "--protect-only",
        action="store_true",
        help="only protect the configurations' photos into the cache (no --attacker needed; with it, the people are "
        "picked from the attacker model's LFW pairs, as the measuring run picks them); a later run with the same "
        "settings measures them",
    )
    parser.add_argument(
        "--protect-high-band",
        type=float,
        default=None,
        metavar="SIGMA",
        help="protect with the perturbation confined to the high band (HighBandProtector: the photo gets the "
        "optimised variable minus what a Gaussian of SIGMA photo pixels passes, and the steps follow the gradient "
        "through that filter; recorded as settings.protect_high_band)",
    )
    parser.add_argument(
        "--band",
        choices=BANDS,
        default=None,
        help="attack only the low (what the generator's resolution keeps) or the high band of each perturbation",
    )
    parser.add_argument(
        "--band-sigma",
        type=float,
        default=BAND_SIGMA,
        help=f"with --band: the low-pass Gaussian's sigma in generator pixels (default {BAND_SIGMA}; larger keeps only "
        "coarser structure in the low band)",
    )
    parser.add_argument(
        "--unseen-judge",
        default=UNSEEN_JUDGE,
        help=f"a third judge, an encoder no attacker and no protection used (default {UNSEEN_JUDGE}; none: only two "
        "judges, as every run before 2026-12-06 19:00 UTC)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.merge:
        print(f"wrote {merge(args.merge, args.default_config, args.out, args.cost, args.persguard)}")
        return
    if not args.surrogate or not (args.attacker or args.protect_only):
        parser.error("--attacker and --surrogate are required to measure (--protect-only: --surrogate alone)")
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = budget_from_args(args, parser)
    chosen = ProtectConfig(**budget)  # the budget every configuration below protects with

    unknown = sorted(set(filter(None, args.classical.split(","))) - set(standard_purifications()))
    if unknown:
        parser.error(f"unknown classical purifications {unknown}; choose from {sorted(standard_purifications())}")
    threats = set(filter(None, args.threats.split(",")))
    if not threats or threats - set(THREATS):
        parser.error(f"--threats must name some of {', '.join(THREATS)}, got {args.threats!r}")
    args.threats = tuple(t for t in THREATS if t in threats)
    if not 0 <= args.personalise_guidance < float("inf"):
        parser.error(f"--personalise-guidance must be a finite number >= 0, got {args.personalise_guidance}")
    args.sample_guidance = parse_scales(args.sample_guidance, args.guidance, parser)
    if args.people < 1 or args.people_from < 0:
        parser.error(f"--people must be >= 1 and --people-from >= 0, got {args.people} and {args.people_from}")
    antipure = antipure_from_args(args, parser)
    purify_configs = set((args.purify_configs or args.default_config).split(","))
    dataset = LFW(args.lfw_dir)
    paths = {item.id: Path(item.path) for item in dataset}
    # --protect-only without --attacker: the surrogate stands in for the attacker model only to pick the people
    generator = load_generator(args.attacker or args.surrogate)
    judges = Judges(generator, dataset, args.models_dir, unseen=None if args.protect_only else args.unseen_judge)
    attacker = Attacker(generator, judges, args)
    people = evaluation_people(judges, PHOTOS_PER_PERSON + 1)[args.people_from : args.people_from + args.people]
    if args.protect_high_band is None:
        protector = ImageProtector(args.encoders.split(","), surrogate=args.surrogate)
    else:
        protector = HighBandProtector(
            args.encoders.split(","), surrogate=args.surrogate, high_band_sigma=args.protect_high_band
        )

    surrogate = protector.deflection.generator.metadata
    surrogate_digest = file_digest(args.surrogate)
    models = {
        "attacker": {"path": args.attacker, **{k: generator.metadata.get(k) for k in ("role", "steps", "seed")}},
        "surrogate": {
            "path": args.surrogate,
            "sha256_16": surrogate_digest,
            **{k: surrogate.get(k) for k in ("role", "steps", "seed")},
        },
    }
    settings = {
        "people": len(people),
        **({"people_from": args.people_from} if args.people_from else {}),  # absent: 0, every run before 2026-12-07
        "photos_per_person": PHOTOS_PER_PERSON,
        "n": args.n,
        "steps": args.steps,
        "guidance": args.guidance,
        "identity_guidance": args.identity_guidance,
        "finetune_steps": args.personalise_steps,
        "protect_steps": args.protect_steps,
        "deflection_weight": args.deflection_weight,
        "encoders": args.encoders,
        "purify": args.purify,
        "classical": args.classical,
        "default_config": args.default_config,
    }
    if any("antipure" in name.split("+") for name in args.configs.split(",")):
        settings["antipure"] = {
            "identity_encoders": antipure.identity_encoders,
            "identity_weight": antipure.identity_weight,
            "decoy_weight": antipure.decoy_weight,
        }
    if (chosen.budget, chosen.levels) != LEGACY_BUDGET:
        settings["budget"] = {"name": chosen.budget, "epsilon": f"{chosen.levels}/255"}
        if chosen.budget == "ssim":
            settings["budget"]["ssim_target"] = args.ssim_target
    if chosen.effective_encoder_weight != 1.0:  # absent: 1, the weight of every run before 2026-12-06
        settings["encoder_weight"] = chosen.effective_encoder_weight
    if args.threats != THREATS:
        settings["threats"] = list(args.threats)
    if args.personalise_lr != FinetuneConfig.lr:  # absent: the default, the rate of every run before 2026-12-06
        settings["finetune_lr"] = args.personalise_lr
    if args.band:
        settings["band"] = args.band
        if args.band_sigma != BAND_SIGMA:
            settings["band_sigma"] = args.band_sigma
    if args.protect_high_band is not None:
        settings["protect_high_band"] = args.protect_high_band
    if args.personalise_guidance > 0:  # absent: 0, the training-based attacker of every run before 2026-12-07
        settings["personalise_guidance"] = args.personalise_guidance
    if args.sample_guidance:  # absent: sampled at --guidance only, as every run before 2026-12-07 13:00 UTC
        settings["sample_guidance"] = list(args.sample_guidance)
    if args.attacker_start != "random":  # absent: random, the start of every run before 2026-12-06 12:40 UTC
        settings["attacker_start"] = args.attacker_start
    thresholds = judges.thresholds()
    results: dict[str, Any] = {}
    quality: dict[str, Any] = {}

    attacker_digest = "" if args.protect_only else file_digest(args.attacker)

    def face_store(photos: str) -> FaceStore:
        return FaceStore(LOCAL / "faces" / face_store_digest(attacker_digest, photos, settings, args.seed))

    def save() -> None:
        document = {"models": models, "settings": settings, "thresholds": thresholds}
        write_payload({**document, "ablation": results, "quality": quality}, args.out)

    if not args.skip_clean and not args.protect_only:
        clean_photos = {pid: load_image(paths[pid]) for _, ids in people for pid in ids[:PHOTOS_PER_PERSON]}
        results["clean"] = run_threats(
            attacker, judges, people, clean_photos, args, purify="clean" in purify_configs, store=face_store("clean")
        )
        print("clean", {t: results["clean"][t]["match"] for t in args.threats}, "match (system judge)", flush=True)
        save()
    for name in [c for c in args.configs.split(",") if c]:
        config = ProtectConfig(
            guidance=tuple(name.split("+")),
            steps=args.protect_steps,
            seed=args.seed,
            deflection_weight=args.deflection_weight,
            antipure=antipure,
            **budget,
            ssim=SsimBudget(target=args.ssim_target),
        )
        config.validate()
        tag = cache_tag(config, args.encoders, surrogate_digest, args.protect_high_band)
        photos, quality[name] = protect_people(protector, config, people, paths, tag)
        if args.band and not args.protect_only:
            photos, quality[name]["band"] = banded_photos(attacker, people, paths, photos, args.band, args.band_sigma)
        if args.protect_only:
            print(name, "protected", quality[name], flush=True)
            continue

        def level_done(summary: dict[str, Any], name: str = name) -> None:
            results[name] = summary
            save()

        run_threats(
            attacker,
            judges,
            people,
            photos,
            args,
            purify=name in purify_configs,
            on_level=level_done,
            store=face_store(tag),
        )
        matches = {
            key: cell["match"] for key, cell in results[name].items() if isinstance(cell, dict) and "match" in cell
        }
        print(name, matches, "match (system judge)", flush=True)
        save()


def summarise(document: dict[str, Any]) -> dict[str, Any]:
    """The top-level keys (the default configuration vs the clean photos, both judges) of a run's ``ablation`` and
    ``quality``."""
    results, quality = document["ablation"], document["quality"]
    default = document["settings"]["default_config"]
    top: dict[str, Any] = {"transfer": {}}
    for threat in ("training_free", "training_based"):
        for side, source in (("clean", "clean"), ("protected", default)):
            if threat not in results.get(source, {}):
                continue
            entry = results[source][threat]
            top.setdefault(threat, {})[side] = {"match": entry["match"], "ism": entry.get("ism")}
            for judge in ("transfer", "unseen"):
                if judge in entry:
                    top.setdefault(judge, {}).setdefault(threat, {})[side] = entry[judge]
    if "purified" in results.get(default, {}):
        strongest = results[default]["purified"]
        top["purified"] = {"protected": {"match": strongest["match"], "threat": strongest["threat"]}}
        for judge in ("transfer", "unseen"):
            if judge in strongest:
                top.setdefault(judge, {})["purified"] = {"protected": strongest[judge]}
    for key in ("psnr_mean", "ssim_face_mean", "seconds_per_photo_cpu"):
        top[key] = quality[default][key] if default in quality else None
    return top


def write_payload(document: dict[str, Any], out: str | None) -> Path:
    """Write the run (``models``, ``settings``, ``thresholds``, ``ablation``, ``quality``) with its summary."""
    payload = {key: document[key] for key in ("models", "settings", "thresholds")}
    payload.update(summarise(document))
    if "persguard" in document:
        payload["persguard"] = document["persguard"]
        payload["transfer"]["persguard"] = document["persguard"].get("transfer")
    payload["quality"], payload["ablation"] = document["quality"], document["ablation"]
    if "merged_from" in document:
        payload["merged_from"] = document["merged_from"]
    return write_results("diffusion_defences", payload, out)


def _models(document: dict[str, Any]) -> dict[str, Any]:
    """The models a run used, by content where the run recorded it (paths may differ between runs)."""
    return {
        role: {k: v for k, v in entry.items() if not (k == "path" and "sha256_16" in entry)}
        for role, entry in document["models"].items()
    }


def mark_strongest_purification(entry: dict[str, Any]) -> None:
    """Set ``entry["purified"]`` to the purified threat giving the attacker the most matches (system judge)."""
    purified_keys = [key for key in entry if key.startswith("purified_") and key != "purified"]
    if purified_keys:
        strongest = max(purified_keys, key=lambda key: entry[key]["match"])
        entry["purified"] = {**entry[strongest], "threat": strongest}


def check_persguard(measured: dict[str, Any], merged: dict[str, Any], path: str) -> None:
    """SystemExit unless the ``benchmarks/persguard.py`` result ``measured`` backdoored the attacker model of
    ``merged`` and, with the perturbation trigger, protected its photos as ``merged``'s default configuration."""
    attacker = Path(str(merged["models"]["attacker"]["path"])).name
    if Path(str(measured["models"]["clean"]["path"])).name != attacker:
        raise SystemExit(f"{path} backdoored another attacker model than {attacker}")
    settings = measured["settings"]
    default = merged["settings"]["default_config"]
    if settings.get("trigger", "perturbation") != "perturbation":
        return
    protection = settings["protection"]
    budget = protection.get("settings", {}).get("budget", LEGACY_BUDGET[0])  # legacy: the uniform budget
    ours = merged["settings"].get("budget", {}).get("name", LEGACY_BUDGET[0])
    if protection["config"] != default or budget != ours:
        raise SystemExit(
            f"{path} protected its photos with {protection['config']} under the {budget} budget, not {default} "
            f"under the {ours} budget"
        )
    surrogate = protection.get("surrogate_sha256_16", UNRECORDED_SURROGATE)
    if surrogate != merged["models"]["surrogate"].get("sha256_16"):
        raise SystemExit(f"{path} protected its photos on another defender surrogate (sha256 {surrogate}...)")


def merge(
    files: list[str], default: str | None, out: str | None, cost: str | None = None, persguard: str | None = None
) -> Path:
    """One result from runs of the same settings that measured different configurations (run side by side to use
    both cores): their ``ablation`` and ``quality`` entries are united (a configuration measured by several runs with
    different ``--threats`` gets the threats of all); settings must agree but for ``purify``, ``classical`` and
    ``threats``, and the models must be the same. ``FILE:NAME,NAME`` takes only those configurations of a run; a
    run that gives only ``clean`` (no protection, so no surrogate involved) must share the attacker model only.
    ``cost``: a ``benchmarks/protect_image_cost.py`` result whose seconds per photo of the default configuration's
    guidance (its CPU seconds when it ran on one thread; its wall seconds when on more, the cost on that many cores)
    replace the protection's wall time measured here (inflated when other jobs share the CPU); the wall time stays
    under ``quality``. ``persguard``: a ``benchmarks/persguard.py`` result whose
    ``persguard`` block (and its transfer judge's, under ``transfer``) is copied in."""
    specs = [f.rsplit(":", 1) if ":" in f and not Path(f).is_file() else [f, ""] for f in files]
    documents = []
    for path, names in specs:
        doc = json.loads(Path(path).read_text())
        if names:
            keep = set(names.split(","))
            missing = keep - set(doc["ablation"])
            if missing:
                raise SystemExit(f"{path} has no configurations {sorted(missing)}")
            doc["ablation"] = {k: v for k, v in doc["ablation"].items() if k in keep}
            doc["quality"] = {k: v for k, v in doc["quality"].items() if k in keep}
        documents.append(doc)
    protected = [doc for doc in documents if set(doc["ablation"]) - {"clean"}]
    first = protected[0] if protected else documents[0]
    ignore = {"purify", "classical", "default_config", "threats"}

    def shared(doc: dict[str, Any]) -> dict[str, Any]:
        # AntiPure's settings matter only to runs that measured an AntiPure configuration, the budget and the
        # encoder weight only to runs that protected photos
        skip = ignore if any("antipure" in k for k in doc["ablation"]) else ignore | {"antipure"}
        if doc not in protected:
            skip = skip | PROTECTION_ONLY
        return {k: v for k, v in doc["settings"].items() if k not in skip}

    with_antipure = [doc for doc in documents if any("antipure" in k for k in doc["ablation"])]
    for doc in documents:
        mine, theirs = shared(first), shared(doc)
        if "antipure" not in theirs:
            mine.pop("antipure", None)
        elif "antipure" not in mine:
            mine["antipure"] = theirs["antipure"]
        if doc not in protected:
            for key in PROTECTION_ONLY:
                mine.pop(key, None)
        models = ("attacker",) if doc not in protected else tuple(first["models"])
        if mine != theirs or any(_models(doc).get(m) != _models(first).get(m) for m in models):
            raise SystemExit("the runs to merge differ in settings or models")
    merged = {key: first[key] for key in ("models", "settings", "thresholds")}
    merged["settings"] = dict(first["settings"])
    if with_antipure and "antipure" in with_antipure[0]["settings"]:  # the same in all (checked above)
        merged["settings"]["antipure"] = with_antipure[0]["settings"]["antipure"]
    merged["ablation"], merged["quality"] = {}, {}
    for doc in documents:  # a configuration measured by several runs (different --threats) gets all their threats
        for k, v in doc["ablation"].items():
            merged["ablation"][k] = {**merged["ablation"].get(k, {}), **v}
        for k, v in doc["quality"].items():
            known = merged["quality"].get(k, {})
            merged["quality"][k] = {**known, **{q: x for q, x in v.items() if x is not None or q not in known}}
    for entry in merged["ablation"].values():  # over the threats of all runs
        mark_strongest_purification(entry)
    threats = [t for t in THREATS if any(t in doc["settings"].get("threats", THREATS) for doc in documents)]
    if threats == list(THREATS):
        merged["settings"].pop("threats", None)
    else:
        merged["settings"]["threats"] = threats
    if default:
        merged["settings"]["default_config"] = default
    for key in ("purify", "classical"):
        merged["settings"][key] = {
            name: doc["settings"].get(key, "") for doc in documents for name in doc["ablation"] if name != "clean"
        }
    merged["merged_from"] = [
        {"file": f, "command": doc.get("command"), "date": doc.get("date")} for f, doc in zip(files, documents)
    ]
    if cost:
        measured = json.loads(Path(cost).read_text())
        chosen = merged["settings"]["default_config"]
        entry = measured["guidance"].get(chosen.replace("+", ","))
        if entry is None or chosen not in merged["quality"]:
            raise SystemExit(f"{cost} has no cost for the default configuration {chosen}")
        threads = int(measured.get("settings", {}).get("threads", 1))
        # one thread: the process's CPU seconds (the wall time on an idle core); more: the wall seconds on that many
        # threads (CPU seconds would count each thread's), i.e. the cost per photo on that many cores
        seconds = entry["cpu_seconds_per_photo_mean"] if threads == 1 else entry["seconds_per_photo_mean"]
        merged["quality"][chosen] = {
            **merged["quality"][chosen],
            "seconds_per_photo_wall_shared": merged["quality"][chosen]["seconds_per_photo_cpu"],
            "seconds_per_photo_cpu": seconds,
            "cost_from": {
                "file": cost,
                "command": measured.get("command"),
                "date": measured.get("date"),
                "measure": "CPU seconds, one thread" if threads == 1 else f"wall seconds, {threads} threads",
            },
        }
    if persguard:
        measured = json.loads(Path(persguard).read_text())
        check_persguard(measured, merged, persguard)
        merged["persguard"] = {
            **measured["persguard"],
            "from": {"file": persguard, "command": measured.get("command"), "date": measured.get("date")},
        }
    return write_payload(merged, out)


if __name__ == "__main__":
    main()
