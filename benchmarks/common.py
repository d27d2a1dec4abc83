"""Helpers shared by the benchmark scripts: machine description and result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from advface.hashing import file_sha256

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        pass
    return info


def command_line() -> str:
    """The command that is running, as it could be typed again."""
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def file_digest(path: str | os.PathLike[str]) -> str:
    """The first 16 hex digits of a file's SHA-256: how results and caches name a model file's contents."""
    return file_sha256(Path(path))[:16]


def surrogate_record(path: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """How a result names the defender surrogate it protected with: the given file, or "shipped" (``path`` None), and
    the file's digest (which shipped surrogate it was)."""
    from advface.generative.shipped import surrogate_digest

    return {"path": str(path) if path else "shipped", "sha256_16": surrogate_digest(path)}


def write_results(name: str, payload: dict[str, Any], out: str | os.PathLike[str] | None = None) -> Path:
    """Write ``payload`` plus command, machine and date to ``benchmarks/results/<name>.json`` (or ``out``)."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "command": command_line(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    return path


def view2_verification(encoder: Any, pairs: list[Any], emb_a: dict, emb_b: dict) -> dict[str, Any]:
    """LFW View-2 metrics with side-a embeddings from ``emb_a`` and side-b from ``emb_b`` (photo id -> vector).

    A pair whose photo has no embedding (no face found) is scored below every other pair: always rejected.
    """
    import numpy as np

    from advface.metrics import best_threshold, kfold_accuracy, tar_at_far

    ok = np.array([p.a in emb_a and p.b in emb_b for p in pairs])
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    a = np.stack([emb_a[p.a] for p, good in zip(pairs, ok) if good])
    b = np.stack([emb_b[p.b] for p, good in zip(pairs, ok) if good])
    scores = np.full(len(pairs), -np.inf)
    scores[ok] = encoder.score(a, b)
    scores[~ok] = scores[ok].min() - 1.0
    acc = kfold_accuracy(scores, same, folds)
    tar3, t3 = tar_at_far(scores, same, 1e-3)
    tar2, t2 = tar_at_far(scores, same, 1e-2)
    return {
        "pairs_with_failed_photo": int((~ok).sum()),
        "accuracy_mean": acc.mean,
        "accuracy_std": acc.std,
        "accuracy_per_fold": acc.per_fold,
        "tar_at_far_1e-3": tar3,
        "threshold_at_far_1e-3": t3,
        "tar_at_far_1e-2": tar2,
        "threshold_at_far_1e-2": t2,
        "threshold_best_accuracy": best_threshold(scores, same),
    }


def add_antipure_arguments(parser: Any) -> None:
    """The AntiPure flags shared by the photo-protection benchmarks (defaults: ``AntiPureConfig``'s)."""
    from advface.protect.image.antipure import IDENTITY_ENCODERS, AntiPureConfig

    defaults = AntiPureConfig()
    parser.add_argument(
        "--antipure-identity",
        choices=IDENTITY_ENCODERS,
        default=defaults.identity_encoders,
        help=f"encoders reading AntiPure's purified face (default {defaults.identity_encoders})",
    )
    parser.add_argument(
        "--antipure-identity-weight",
        type=float,
        default=defaults.identity_weight,
        help=f"weight of AntiPure's identity loss (default {defaults.identity_weight:g})",
    )
    parser.add_argument(
        "--decoy-weight",
        type=float,
        default=defaults.decoy_weight,
        help=f"weight of AntiPure's targeted loss towards a decoy face (default {defaults.decoy_weight:g}: off)",
    )


def antipure_from_args(args: Any, parser: Any) -> Any:
    """The ``AntiPureConfig`` of :func:`add_antipure_arguments`' flags; a usage error when it is invalid."""
    from advface.errors import AdvfaceError
    from advface.protect.image.antipure import AntiPureConfig

    antipure = AntiPureConfig(
        identity_encoders=args.antipure_identity,
        identity_weight=args.antipure_identity_weight,
        decoy_weight=args.decoy_weight,
    )
    try:
        antipure.validate()
    except AdvfaceError as exc:
        parser.error(str(exc))
    return antipure


def add_budget_arguments(parser: Any) -> None:
    """The ``--budget`` / ``--epsilon`` / ``--encoder-weight`` flags shared by the photo-protection benchmarks
    (defaults: the library's, per budget shape)."""
    from advface.protect.image import ProtectConfig
    from advface.protect.image.core import SHAPE_DEFAULTS
    from advface.protect.image.perceptual import BUDGETS

    shapes = ", ".join(f"{name} {round(d.epsilon * 255)}/255" for name, d in SHAPE_DEFAULTS.items())
    parser.add_argument(
        "--budget",
        choices=BUDGETS,
        default=ProtectConfig.budget,
        help=f"protection budget shape (advface protect-image --budget; default {ProtectConfig.budget}; runs before "
        "2026-12-06 used uniform)",
    )
    parser.add_argument(
        "--epsilon", help=f"largest change of any pixel, a float or a fraction like 8/255 (default: {shapes})"
    )
    weights = ", ".join(f"{name} {d.encoder_weight:g}" for name, d in SHAPE_DEFAULTS.items())
    parser.add_argument(
        "--encoder-weight",
        type=float,
        help=f"weight of the encoder terms against the surrogate's and the budget's (default: {weights})",
    )


def budget_from_args(args: Any, parser: Any) -> dict[str, Any]:
    """``{"budget": ..., "epsilon": float | None, "encoder_weight": float | None}`` from
    :func:`add_budget_arguments`' flags, for ``ProtectConfig``; a usage error when they are invalid."""
    from advface.cli.protect_image import parse_epsilon
    from advface.errors import AdvfaceError
    from advface.protect.image import ProtectConfig

    try:
        epsilon = None if args.epsilon is None else parse_epsilon(args.epsilon)
        chosen = {"budget": args.budget, "epsilon": epsilon, "encoder_weight": args.encoder_weight}
        ProtectConfig(**chosen).validate()
    except AdvfaceError as exc:
        parser.error(str(exc))
    return chosen


def budget_tag(config: Any) -> str:
    """The part of a cache name that tells budgets apart: empty for the uniform budget (so that the caches made when it
    was the default stay valid), ``-NAME`` otherwise (the epsilon is named separately by ``config.levels``), and
    ``-ewW`` when the encoder weight is not the budget shape's own."""
    from advface.protect.image.core import SHAPE_DEFAULTS

    tag = "" if config.budget == "uniform" else f"-{config.budget}"
    if config.effective_encoder_weight != SHAPE_DEFAULTS[config.budget].encoder_weight:
        tag += f"-ew{config.effective_encoder_weight:g}"
    return tag
