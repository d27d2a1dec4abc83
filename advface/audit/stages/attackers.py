"""Attackers stage: each attacker reconstructs faces from the raw, protected and protected+key templates, and the
reconstructions are scored for identity inference (:func:`advface.audit.metrics.evaluate_attack`).

Attackers: trained decoders (``deconv``, ``resup+id``, ...: trained on raw templates of the attacker group), the
adaptive insider (``adaptive``, ``adaptive-ARCH``: trained on protected templates of its own enrolments), the
GAN-prior latent search (``gan-prior``) and the identity-conditioned generator (``diffusion``). With a transfer
judge (:mod:`advface.audit.transfer`) every reconstruction is also scored by a second encoder that neither the
attacker nor the protection touched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from advface.audit.config import AuditConfig
from advface.audit.metrics import evaluate_attack, evaluate_transfer
from advface.audit.report import GRID_COLUMNS, ReportArtifacts
from advface.audit.results import (
    TEMPLATE_KINDS,
    AttackResult,
    DecoderAttackResult,
    DiffusionAttackResult,
    GanPriorAttackResult,
    ReconstructionResult,
)
from advface.audit.stages.inputs import AuditInputs
from advface.audit.stages.protection import ProtectionSetup
from advface.audit.transfer import TransferJudge
from advface.errors import AdvfaceError, ConfigError

#: A reconstruction attack: templates -> face images.
Reconstruct = Callable[[np.ndarray], np.ndarray]
#: Template kinds whose reconstructions are shown in the report's image grid.
GRID_KINDS = ("raw", "protected")


def judge_reconstructions(
    inputs: AuditInputs,
    reconstruct: Reconstruct,
    templates: np.ndarray,
    sel: np.ndarray,
    transfer: TransferJudge | None = None,
) -> tuple[ReconstructionResult, np.ndarray]:
    """Reconstruct ``templates`` (those of the audited rows ``sel``) and score the faces against the victims' photos
    by the system encoder (and the ``transfer`` judge); also returns the first reconstructions for the image grid."""
    v = inputs.victims
    own_rows = inputs.rows[sel]
    other_rows = v.other[own_rows]
    own = v.pairs.embeddings[own_rows]
    other = v.pairs.embeddings[np.maximum(other_rows, 0)]
    own_ids = v.pairs.ids[own_rows]
    other_ids = np.where(other_rows >= 0, v.pairs.ids[np.maximum(other_rows, 0)], "")
    recon = reconstruct(templates)
    judged = evaluate_transfer(transfer, recon, own_ids, other_ids) if transfer is not None else None
    result = evaluate_attack(
        inputs.encoder, recon, own, other, other_rows >= 0, v.pairs.faces[own_rows], inputs.thresholds, judged
    )
    return result, recon[:GRID_COLUMNS]


def decoder_settings(config: AuditConfig, inputs: AuditInputs) -> dict[str, Any]:
    """The training settings every decoder attacker of the run shares (part of their cache keys)."""
    c = config
    return {
        "image_size": c.image_size,
        "epochs": c.epochs,
        "seed": c.seed,
        "cache_dir": inputs.cache,
        "batch_size": c.batch_size,
        "progress": c.progress,
    }


def _evaluate(
    inputs: AuditInputs,
    protection: ProtectionSetup,
    reconstruct: Reconstruct,
    rows: np.ndarray | None = None,
    transfer: TransferJudge | None = None,
) -> tuple[dict[str, ReconstructionResult], dict[str, np.ndarray]]:
    """Reconstruct the audited templates of each kind (``rows`` of them, default all) and score them (also by the
    ``transfer`` judge when there is one); also returns the first reconstructions of each kind for the image grid.

    When a scheme under audit changes the templates' dimension, an attacker that cannot take the templates of a kind
    leaves that kind out (raises only when it can take none)."""
    sel = np.arange(len(inputs.rows)) if rows is None else rows
    templates = dict(zip(TEMPLATE_KINDS, (protection.raw, protection.protected, protection.keyed)))
    results: dict[str, ReconstructionResult] = {}
    grid: dict[str, np.ndarray] = {}
    dims_differ = len({t.shape[1] for t in templates.values()}) > 1
    errors: list[str] = []
    for kind, of_kind in templates.items():
        try:
            results[kind], grid[kind] = judge_reconstructions(inputs, reconstruct, of_kind[sel], sel, transfer)
        except (AdvfaceError, RuntimeError) as exc:  # a decoder's EmbeddingError; torch's shape mismatch
            if not dims_differ:
                raise
            errors.append(f"{kind} templates ({of_kind.shape[1]} values): {exc}")
    if not results:
        raise ConfigError("; ".join(errors))
    return results, grid


def _decoder_attack(
    name: str,
    config: AuditConfig,
    inputs: AuditInputs,
    protection: ProtectionSetup,
    transfer: TransferJudge | None = None,
) -> tuple[DecoderAttackResult, dict[str, np.ndarray]]:
    """A trained decoder: the adaptive insider (``adaptive``, ``adaptive-ARCH``) or one trained on raw templates."""
    from advface.attack_metrics import reconstruct

    c = config
    common = decoder_settings(c, inputs)
    if name == "adaptive" or name.startswith("adaptive-"):
        from advface.audit.attacks.adaptive import train_or_load_adaptive

        kind, arch = "adaptive", name.removeprefix("adaptive").removeprefix("-") or "deconv"
        decoder, meta, cached = train_or_load_adaptive(
            arch,
            inputs.pairs,
            inputs.split,
            inputs.encoder,
            lambda z: protection.protect(z, c.seed, "attacker enrolments"),
            protection.protector.cache_key,
            **common,
        )
        loss, trained_on = meta.get("loss"), "protected templates of the attacker group"
    else:
        from advface.audit.attacks.decoder import parse_attacker, train_or_load

        attacker = parse_attacker(name)
        decoder, meta, cached = train_or_load(attacker, inputs.pairs, inputs.split, inputs.encoder, **common)
        kind, arch, loss, trained_on = "decoder", attacker.arch, attacker.loss, "raw templates of the attacker group"
    by_templates, grid = _evaluate(inputs, protection, lambda z: reconstruct(decoder, z), transfer=transfer)
    return DecoderAttackResult(
        kind=kind,
        by_templates=by_templates,
        arch=arch,
        loss=loss,
        cached=cached,
        trained_on=trained_on,
        cache_key=meta.get("cache_key"),
    ), grid


def _gan_prior_attack(
    config: AuditConfig, inputs: AuditInputs, protection: ProtectionSetup, transfer: TransferJudge | None = None
) -> tuple[GanPriorAttackResult, dict[str, np.ndarray]]:
    """The GAN-prior latent search on the first ``--gan-templates`` audited templates of each kind."""
    from advface.audit.attacks.gan_prior import GanPriorConfig, invert_templates, load_generator

    c = config
    module = inputs.encoder.torch_module()
    if module is None:
        raise ConfigError(f"the GAN-prior attack needs an encoder with a differentiable module ({c.encoder})")
    generator = load_generator()
    rows = np.arange(min(c.gan_templates, len(inputs.rows)))
    search = GanPriorConfig(steps=c.gan_steps, restarts=c.gan_restarts, seed=c.seed)
    histories: list[list[float]] = []

    def reconstruct(templates: np.ndarray) -> np.ndarray:
        with tqdm(
            total=len(templates), desc="GAN-prior search", unit="template", disable=not c.progress, leave=False
        ) as bar:
            res = invert_templates(
                templates,
                module,
                chip_size=inputs.encoder.chip.size,
                metric=inputs.encoder.metric,
                config=search,
                generator=generator,
                progress=bar.update,
            )
        histories.append(res.history)
        return res.faces

    by_templates, grid = _evaluate(inputs, protection, reconstruct, rows, transfer)
    result = GanPriorAttackResult(
        by_templates=by_templates,
        prior="gan-face-generate DCGAN 64x64 (DigiFace1M)",
        templates=len(rows),
        steps=c.gan_steps,
        restarts=c.gan_restarts,
        similarity_history_raw=histories[0] if histories else [],
    )
    return result, grid


def _diffusion_attack(
    config: AuditConfig, inputs: AuditInputs, protection: ProtectionSetup, transfer: TransferJudge | None = None
) -> tuple[DiffusionAttackResult, dict[str, np.ndarray]]:
    """The identity-conditioned generator: trained on the attacker group (cached) or ``--generator``."""
    from advface.audit.attacks import diffusion

    c = config
    scale = c.diffusion_guidance or 0.0
    if c.generator is not None:
        generator = diffusion.load_given_generator(c.generator, inputs.encoder, inputs.pairs, inputs.split)
        cached, source = True, str(c.generator)
        trained_on = str(generator.metadata.get("training_data", {}).get("group", "unknown")) + " group (given)"
    else:
        train_config = diffusion.diffusion_train_config(c.image_size, c.seed, c.quick)
        generator, cached = diffusion.train_or_load_generator(
            inputs.pairs, inputs.split, inputs.encoder, train_config, cache_dir=inputs.cache, progress=c.progress
        )
        source, trained_on = "trained by the audit", "(face, raw template) pairs of the attacker group"
    if scale > 0 and inputs.encoder.torch_module(str(generator.device)) is None:
        raise ConfigError(f"--diffusion-guidance needs an encoder with a differentiable module ({c.encoder})")
    steps = diffusion.QUICK_SAMPLE_STEPS if c.quick else diffusion.SAMPLE_STEPS

    def reconstruct(templates: np.ndarray) -> np.ndarray:
        return diffusion.reconstruct_templates(
            generator,
            templates,
            seed=c.seed,
            steps=steps,
            guide_scale=scale,
            encoder=inputs.encoder,
        )

    by_templates, grid = _evaluate(inputs, protection, reconstruct, transfer=transfer)
    result = DiffusionAttackResult(
        by_templates=by_templates,
        generator=source,
        cached=cached,
        trained_on=trained_on,
        image_size=generator.image_size,
        sample_steps=steps,
        cfg_scale=diffusion.CFG_SCALE,
        guidance_scale=scale,
    )
    return result, grid


def run_attacker(
    name: str,
    config: AuditConfig,
    inputs: AuditInputs,
    protection: ProtectionSetup,
    artifacts: ReportArtifacts,
    transfer: TransferJudge | None = None,
) -> AttackResult:
    """Run the attacker ``name`` on the audited templates of each kind, scored by the system encoder and the
    ``transfer`` judge (None: none); its reconstructions of raw and protected templates (and the GAN-prior search
    progress) go to ``artifacts`` for the report's plots."""
    result: AttackResult
    if name == "gan-prior":
        result, grid = _gan_prior_attack(config, inputs, protection, transfer)
        artifacts.gan_history = result.similarity_history_raw
    elif name == "diffusion":
        result, grid = _diffusion_attack(config, inputs, protection, transfer)
    else:
        result, grid = _decoder_attack(name, config, inputs, protection, transfer)
    for kind in GRID_KINDS:
        if kind in grid:  # a kind the attacker could not take (a scheme's dimension) has no row
            artifacts.grid_rows.append((f"{name} ({kind})", grid[kind]))
    return result
