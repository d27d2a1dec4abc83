"""Protect enrolment photos: each input photo -> a PNG whose face no longer yields its identity to face encoders.

PGD on the whole photo under an L-inf budget (default 12/255 with the default SSIM budget, which keeps the face's and
the whole photo's SSIM at 0.97; 8/255 with --budget uniform: no pixel changes by more than 8 levels) against an
ensemble of face encoders (default dlib + MobileFaceNet; MobileFaceNet is left out, with a note, when its model file
is not in $ADVFACE_MODELS_DIR), with random JPEG/resize/blur/crop during optimisation so that the protection
survives them. Inputs are files, folders (searched recursively) or glob patterns; each protected photo is written
to OUT_DIR as a lossless PNG with the input's stem (folder inputs keep their sub-folders), without the input's
metadata, EXIF orientation applied. Inputs are never modified. Outputs that exist already are skipped (a rerun
resumes) unless --overwrite. Photos that cannot be protected (no face, face too small, animated, corrupt...) are
reported and skipped; the batch goes on. A JSON report of the run is written to OUT_DIR (or --report). Torch runs
on --threads threads (default 1: more pays off only on idle cores).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from tqdm import tqdm

from advface.errors import ConfigError, ImageError
from advface.images import IMAGE_SUFFIXES, iter_image_files
from advface.threads import add_threads_argument, apply_threads

NAME = "protect-image"
HELP = "photos -> protected PNGs (face encoders no longer recognise the person)"


def parse_epsilon(text: str) -> float:
    """``"8/255"``, ``"0.03"`` -> float in (0, 1]; ConfigError otherwise."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError) as exc:
        raise ConfigError(f"--epsilon {text!r} is not a number or fraction like 8/255") from exc
    if not 0 < value <= 1:
        raise ConfigError(f"--epsilon must be in (0, 1] (image scale 0..1, e.g. 8/255), got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``advface protect-image``."""
    from advface.protect.image import DEFAULT_ENCODERS, ProtectConfig
    from advface.protect.image.jnd_budget import STATISTICS
    from advface.protect.image.perceptual import BUDGETS

    defaults = ProtectConfig()
    parser.add_argument("inputs", nargs="+", metavar="IN", help="image files, folders or glob patterns")
    parser.add_argument("--out", "-o", required=True, metavar="OUT_DIR", help="folder for the protected PNGs")
    from advface.protect.image.core import SHAPE_DEFAULTS

    shapes = ", ".join(f"{name} {round(d.epsilon * 255)}/255" for name, d in SHAPE_DEFAULTS.items())
    weights = ", ".join(f"{name} {d.encoder_weight:g}" for name, d in SHAPE_DEFAULTS.items())
    parser.add_argument(
        "--epsilon",
        default=None,
        help=f"L-inf budget on the 0..1 scale, e.g. 8/255 (default: the budget's own: {shapes})",
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"PGD steps (default {defaults.steps})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the random transforms (default 0)")
    parser.add_argument(
        "--encoders",
        nargs="+",
        default=None,
        metavar="SPEC",
        help=f"encoders to confuse (default: {' '.join(DEFAULT_ENCODERS)}; any differentiable encoder spec)",
    )
    parser.add_argument("--detector", default="dlib", help="face detector: dlib (default), scrfd, scrfd:PATH")
    parser.add_argument("--policy", default="largest", help="which face: largest (default), center, best-score, single")
    parser.add_argument(
        "--target-similarity",
        type=float,
        default=None,
        metavar="COS",
        help="stop a photo early once every encoder's cosine (clean vs protected) is at or below COS",
    )
    parser.add_argument(
        "--no-eot", action="store_true", help="no random transforms during optimisation (faster, less robust)"
    )
    parser.add_argument(
        "--feature-weight",
        type=float,
        default=defaults.feature_weight,
        metavar="W",
        help=f"weight of the feature-level term on encoders that name feature layers (dlib-torch); it makes the "
        f"protection carry over to encoders outside the ensemble; 0 attacks embeddings only "
        f"(default {defaults.feature_weight:g})",
    )
    parser.add_argument(
        "--encoder-weight",
        type=float,
        default=None,
        metavar="W",
        help=f"weight of every encoder term against the diffusion terms (deflection, antipure); under --budget ssim "
        f"or jnd a larger weight keeps the protection against face encoders (default: the budget's own: {weights})",
    )
    parser.add_argument(
        "--guidance",
        default=",".join(defaults.guidance),
        metavar="TERMS",
        help="comma-separated guidance terms: encoders (confuse the face encoders, IDGuardian stage 1), deflection "
        "(steer the photo's latent away from its identity on the defender surrogate generator, IDGuardian stage 2), "
        "antipure (make the protection survive diffusion purification, on the same surrogate) "
        f"(default {','.join(defaults.guidance)})",
    )
    parser.add_argument(
        "--surrogate",
        default=None,
        metavar="CKPT",
        help="defender surrogate generator for the deflection and antipure terms (default: the one shipped with "
        "advface)",
    )
    parser.add_argument(
        "--budget",
        choices=BUDGETS,
        default=defaults.budget,
        help=f"perceptual: each pixel's budget (at most --epsilon) follows a just-noticeable-difference map, smaller "
        f"on smooth skin than on hair, edges and background (quieter, weaker protection); ssim: every pixel within "
        f"--epsilon, the optimisation keeps the face's and the whole photo's SSIM at --ssim-target (quiet; with its "
        f"12/255 and encoder weight 3 as strong as uniform 8/255 against diffusion personalisation and face "
        f"encoders); jnd: every pixel "
        f"within --epsilon, the optimisation keeps the change's visibility (JND units) at or below --jnd-target "
        f"(quieter, weaker); uniform: every pixel may change by --epsilon (louder; the default until 2026-12-06) "
        f"(default {defaults.budget})",
    )
    parser.add_argument(
        "--ssim-target",
        type=float,
        default=None,
        metavar="S",
        help=f"with --budget ssim: the face-box SSIM to keep the photo at, in (0, 1) (default {defaults.ssim.target})",
    )
    parser.add_argument(
        "--ssim-photo-target",
        type=float,
        default=None,
        metavar="S",
        help="with --budget ssim: keep the whole photo's SSIM at or above S, in (0, 1), so that the change does not "
        "move onto forehead, hair and background (default: the --ssim-target)",
    )
    parser.add_argument(
        "--ssim-face-box-only",
        action="store_true",
        help="with --budget ssim: constrain the face box's SSIM alone, not the whole photo's (the change then moves "
        "onto forehead, hair and background)",
    )
    parser.add_argument(
        "--jnd-target",
        type=float,
        default=None,
        metavar="J",
        help=f"with --budget jnd: the face box's visibility statistic (JND units, > 0) to keep the photo at or below "
        f"(default {defaults.jnd.target})",
    )
    parser.add_argument(
        "--jnd-photo-target",
        type=float,
        default=None,
        metavar="J",
        help="with --budget jnd: keep the whole photo's visibility statistic at or below J (JND units, > 0) too "
        "(default: the --jnd-target)",
    )
    parser.add_argument(
        "--jnd-face-box-only",
        action="store_true",
        help="with --budget jnd: constrain the face box's visibility alone, not the whole photo's",
    )
    parser.add_argument(
        "--jnd-statistic",
        choices=STATISTICS,
        default=None,
        help=f"with --budget jnd: pooled (Minkowski mean of the visibility map, exponent 4) or top (mean of its "
        f"largest {defaults.jnd.top_share * 100:.0f}%%, a smooth 95th percentile) (default {defaults.jnd.statistic})",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.add_argument("--batch-size", type=int, default=4, help="photos of equal size optimised together (default 4)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_threads_argument(parser, "the optimisation of each batch of photos")
    parser.add_argument(
        "--report",
        default=None,
        metavar="JSON",
        help="run report path (default OUT_DIR/protect-image-report-<UTC time>.json)",
    )
    parser.add_argument("--overwrite", action="store_true", help="protect again photos whose output exists")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when any photo failed")


def expand_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """``(input file, output path relative to OUT_DIR)`` for files, folders and glob patterns, in order."""
    jobs: list[tuple[Path, Path]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            for file, rel in iter_image_files([path]):
                jobs.append((file, Path(rel).with_suffix(".png")))
        elif path.exists():
            jobs.append((path, Path(path.stem + ".png")))
        elif glob.has_magic(raw):
            matches = sorted(Path(p) for p in glob.glob(raw, recursive=True) if Path(p).is_file())
            if not matches:
                raise ConfigError(f"no file matches {raw!r}")
            jobs.extend((m, Path(m.stem + ".png")) for m in matches)
        else:
            raise ConfigError(f"{raw}: no such file, folder or pattern")
    return jobs


@dataclass
class _Pending:
    source: Path
    output: Path
    entry: dict[str, Any]
    photo: Any = None
    face: Any = None
    notes: list[str] = field(default_factory=list)


def _only_with_budget(args: argparse.Namespace, budget: str, given: dict[str, bool]) -> None:
    """ConfigError naming the first of the ``given`` flags that was set without ``--budget budget``."""
    for flag, is_set in given.items():
        if is_set and args.budget != budget:
            raise ConfigError(f"{flag} applies only with --budget {budget}")


def run(args: argparse.Namespace) -> int:
    """Protect every input; returns 1 under --strict when any photo failed, else 0."""
    from advface.protect.image import ImageProtector, ProtectConfig
    from advface.protect.image.guidance import parse_guidance
    from advface.protect.image.io import load_for_protection, save_png
    from advface.protect.image.jnd_budget import JndBudget
    from advface.protect.image.ssim_budget import SsimBudget

    _only_with_budget(
        args,
        "ssim",
        {
            "--ssim-target": args.ssim_target is not None,
            "--ssim-photo-target": args.ssim_photo_target is not None,
            "--ssim-face-box-only": args.ssim_face_box_only,
        },
    )
    if args.ssim_face_box_only and args.ssim_photo_target is not None:
        raise ConfigError("--ssim-photo-target and --ssim-face-box-only contradict each other")
    ssim = SsimBudget(
        target=SsimBudget.target if args.ssim_target is None else args.ssim_target,
        whole_photo=not args.ssim_face_box_only,
        photo_target=args.ssim_photo_target,
    )
    _only_with_budget(
        args,
        "jnd",
        {
            "--jnd-target": args.jnd_target is not None,
            "--jnd-photo-target": args.jnd_photo_target is not None,
            "--jnd-face-box-only": args.jnd_face_box_only,
            "--jnd-statistic": args.jnd_statistic is not None,
        },
    )
    if args.jnd_face_box_only and args.jnd_photo_target is not None:
        raise ConfigError("--jnd-photo-target and --jnd-face-box-only contradict each other")
    jnd = JndBudget(
        target=JndBudget.target if args.jnd_target is None else args.jnd_target,
        photo_target=args.jnd_photo_target,
        whole_photo=not args.jnd_face_box_only,
        statistic=JndBudget.statistic if args.jnd_statistic is None else args.jnd_statistic,
    )
    config = ProtectConfig(
        epsilon=None if args.epsilon is None else parse_epsilon(args.epsilon),
        steps=args.steps,
        seed=args.seed,
        eot=not args.no_eot,
        target_similarity=args.target_similarity,
        feature_weight=args.feature_weight,
        encoder_weight=args.encoder_weight,
        budget=args.budget,
        ssim=ssim,
        jnd=jnd,
        guidance=parse_guidance(args.guidance),
    )
    config.validate()
    threads = apply_threads(args.threads)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    out_dir = Path(args.out)
    if out_dir.suffix.lower() in IMAGE_SUFFIXES and not out_dir.is_dir():
        raise ConfigError(
            f"--out is the folder the protected PNGs are written to; {args.out!r} looks like a file name "
            "(give a folder, e.g. --out protected/)"
        )
    jobs = expand_inputs(args.inputs)
    if not jobs:
        raise ConfigError("no input images found")
    protector = ImageProtector(
        args.encoders, detector=args.detector, policy=args.policy, device=args.device, surrogate=args.surrogate
    )
    protector.check_guidance(config)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once the settings are known to work
    for note in protector.notes:
        print(f"advface protect-image: note: {note}", file=sys.stderr)
    started = _dt.datetime.now(_dt.UTC)
    entries: list[dict[str, Any]] = []
    inputs_resolved = {src.resolve() for src, _ in jobs}
    seen_outputs: set[Path] = set()
    batches: dict[tuple[int, ...], list[_Pending]] = {}
    counts = {"protected": 0, "skipped": 0, "failed": 0}
    # the bar counts finished photos (protected, skipped or failed), so its rate and ETA are those of the protection
    bar = tqdm(total=len(jobs), desc="protect-image", unit="photo", disable=args.quiet)

    def finished(status: str) -> None:
        counts[status] += 1
        bar.update(1)
        bar.set_postfix(done=counts["protected"], skipped=counts["skipped"], failed=counts["failed"])

    def fail(entry: dict[str, Any], reason: str) -> None:
        entry.update(status="failed", reason=reason)
        tqdm.write(f"advface protect-image: {entry['input']}: {reason}", file=sys.stderr)
        finished("failed")

    def flush(items: list[_Pending]) -> None:
        try:
            results = protector.protect(
                [p.photo.image for p in items],
                config,
                [str(p.source) for p in items],
                faces=[p.face for p in items],
                grayscale=[p.photo.grayscale for p in items],
            )
        except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the run
            for p in items:
                fail(p.entry, f"protection failed ({exc.__class__.__name__}: {exc})")
            return
        for p, (image, report) in zip(items, results):
            try:
                save_png(image, p.output, grayscale=p.photo.grayscale)
            except OSError as exc:
                fail(p.entry, f"cannot write {p.output} ({exc})")
                continue
            report.notes = p.photo.notes + report.notes
            p.entry.update(status="protected", report=report.to_dict())
            finished("protected")

    start = time.perf_counter()
    for source, rel in jobs:
        output = out_dir / rel
        entry: dict[str, Any] = {"input": str(source), "output": str(output)}
        entries.append(entry)
        resolved = output.resolve()
        if resolved in inputs_resolved:
            fail(entry, "the output would overwrite an input; choose another --out")
            continue
        if resolved in seen_outputs:
            fail(entry, f"another input already writes {output} (same stem)")
            continue
        seen_outputs.add(resolved)
        if output.exists() and not args.overwrite:
            entry["status"] = "skipped"
            entry["reason"] = "output exists (use --overwrite to protect again)"
            finished("skipped")
            continue
        try:
            photo = load_for_protection(source)
            face = protector.find_face(photo.image, str(source))
        except ImageError as exc:
            fail(entry, exc.reason)
            continue
        pending = _Pending(source, output, entry, photo, face)
        group = batches.setdefault(photo.image.shape, [])
        group.append(pending)
        if len(group) >= args.batch_size:
            flush(batches.pop(photo.image.shape))
    for group in batches.values():
        flush(group)
    bar.close()

    report_path = (
        Path(args.report)
        if args.report
        else out_dir / (f"protect-image-report-{started.strftime('%Y%m%dT%H%M%SZ')}.json")
    )
    document = {
        "command": "advface protect-image",
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - start, 2),
        "config": {
            "epsilon": config.effective_epsilon,
            "epsilon_levels": config.levels,
            "steps": config.steps,
            "seed": config.seed,
            "eot": config.eot,
            "target_similarity": config.target_similarity,
            "feature_weight": config.feature_weight,
            "encoder_weight": config.effective_encoder_weight,
            "budget": config.budget,
            "ssim_target": config.ssim.target if config.budget == "ssim" else None,
            "ssim_photo_target": config.ssim.whole_photo_target if config.budget == "ssim" else None,
            "jnd_target": config.jnd.target if config.budget == "jnd" else None,
            "jnd_photo_target": config.jnd.whole_photo_target if config.budget == "jnd" else None,
            "jnd_statistic": config.jnd.statistic if config.budget == "jnd" else None,
            "detector": args.detector,
            "policy": args.policy,
            "threads": threads,
        },
        "encoders": protector.encoder_names,
        "notes": protector.notes,
        "summary": counts,
        "files": entries,
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(document, indent=2) + "\n")
    print(
        f"protected {counts['protected']}, skipped {counts['skipped']} (already done), failed {counts['failed']}; "
        f"report {report_path}"
    )
    return 1 if args.strict and counts["failed"] else 0
