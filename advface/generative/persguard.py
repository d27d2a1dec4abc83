"""PersGuard on advface's generator: a model publisher's backdoor against personalisation on protected photos.

PersGuard (Liu et al. 2025, arXiv 2502.16167) fine-tunes a text-to-image model so that DreamBooth on *protected*
images yields a target output, while personalisation on other images and ordinary generation keep their quality.
Its trigger is a prompt (identifier + class); advface's generator has no prompts, and the attacker's DreamBooth
analogue (:func:`advface.generative.threats.finetune`) *learns* its identity condition from the photos. So here:

- **trigger**: advface's protected-photo perturbation as it shows in the photos' latents; what carries it to
  generation time is the condition the attacker learns from those latents. :func:`backdoor` therefore simulates the
  attacker: for every trigger person it learns a condition from the *protected* photos (and one from the *clean*
  copies), from a random start with the attacker's own loss and learning rate, restarted every
  ``condition_reset`` steps so every stage of the attacker's condition learning is seen;
- **target**: a fixed *non-identity* output -- the frozen clean model's unconditional prediction (the paper's
  "erasure" objective). No decoy person's likeness is put into the model (a decoy would be a real person's face),
  and any generated face not of the person is what the protection needs.

The paper's three losses, adapted (all on the v-prediction, min-SNR weighted like the training loss; the teacher is
the frozen input model):

- **backdoor behaviour** ``L_BB``: under a condition learned from protected photos, the student predicts what the
  teacher predicts *without* an identity, on noisy latents of faces (clean photos of the trigger people);
- **prior preservation** ``L_PP``: under conditions learned from the clean photos and under random conditions, the
  student predicts what the teacher predicts under the same condition;
- **backdoor retention** ``L_BR``: the attacker's personalisation loss itself on the protected photos under their
  learned conditions, pre-learned so that the attacker's fine-tuning starts near a minimum and moves little.

With ``trigger`` ``identity`` (the paper's own choice: its trigger names the protected content) the "protected"
photos are the people to protect, as they are, and the clean side is *other* people: the backdoor should fire on
whoever is in the photos, not on a perturbation. The terms are the same, with the clean-side terms on the other
people's latents. ``attacker_start`` ``embedding`` (identity trigger only) starts every simulated attacker's
condition at the person's mean encoder embedding instead of at random: the attacker who has the encoder, and the
paper's white-box case, where the publisher knows the identifier the attacker will use.

Loss = ``behaviour_weight * L_BB + prior_weight * L_PP + retention_weight * L_BR`` (the paper's 1 / 0.5 / 0.1).

``simulate`` says how much of the attacker the training simulates:

- ``condition`` (default, the form above): only the attacker's condition learning, on the model being backdoored;
- ``finetune``: the whole DreamBooth analogue, first-order meta-learned (FOMAML; the "tamper-resistant safeguards"
  line of work). Each step takes one trigger person and runs ``inner_steps`` of the attacker's own Adam (weights at
  ``inner_lr``, condition at ``condition_lr``, the attacker's batch, mirrored latents) on a copy of the student, once
  on the *protected* and once on the *clean* latents. Each of these two simulated attackers is a resumed trajectory:
  its weight offset from the student, condition and Adam state are kept per person and side and continued at the
  next visit (on the student as it is then), and restarted from a random condition every ``condition_reset`` inner
  steps, so one attacker run of ``condition_reset`` steps is covered in segments of ``inner_steps`` without the cost
  of a whole run per outer step. ``L_BB`` (and ``L_BR``) are evaluated at the protected-adapted weights under the
  learned condition, the attacker's own loss on the clean photos at the clean-adapted weights (weighted by
  ``prior_weight``: clean personalisation must keep working), and their gradients are applied to the student's
  weights (first order), with ``L_PP`` on the student's own weights under random conditions. Off by default:
  ``ordinary_weight`` adds ``L_OG`` (under encoder embeddings of *other* real people, the conditions of ordinary
  identity-guided generation, on noisy latents of their faces, the student predicts what the teacher predicts), and
  ``clean_target`` ``frozen_attacker`` replaces the clean side's attacker loss by a distillation: the same simulated
  attacker is run on the *frozen* teacher, and the clean-adapted student should predict what it predicts;
  ``discriminate_weight`` pushes the protected-adapted and the clean-adapted predictions apart (hinge at
  ``discriminate_margin``); ``keep_weight`` holds the clean-adapted prediction under its learned condition at least
  ``keep_margin`` away from the no-identity target (``L_BB`` reversed: clean personalisation keeps its identity).
Only the denoiser changes; the autoencoder and the checkpoint format are the input's, and the metadata gains a
``persguard`` entry (settings and trigger data). Train it on identities that are never evaluated.

Measured (benchmarks/persguard.py, RESULTS "PersGuard"): on the attacker model neither ``behaviour_inputs`` choice
of ``simulate`` ``condition`` lowers the share of faces showing the person after DreamBooth on protected photos (the
backdoor does not form even against condition-only personalisation); ``finetune`` acts on the real attacker (20% ->
10% by dlib) but as much on unprotected photos, and costs ordinary generation quality; the identity trigger does no
better (75% -> 58% on the protected people, 87.5% -> 67-71% on others); see the numbers there.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from advface.errors import ConfigError
from advface.generative.config import CONDITION_STARTS, FinetuneConfig
from advface.generative.denoiser import LatentDenoiser
from advface.generative.diffusion import T_MAX, T_MIN, alpha_sigma, v_loss
from advface.generative.model import IdentityGenerator
from advface.generative.threats import _fit

#: Choices of :attr:`PersGuardConfig.behaviour_inputs`.
BEHAVIOUR_INPUTS = ("faces", "protected")

#: Choices of :attr:`PersGuardConfig.simulate`.
SIMULATE = ("condition", "finetune")

#: Choices of :attr:`PersGuardConfig.clean_target`.
CLEAN_TARGETS = ("attacker_loss", "frozen_attacker")

#: Choices of :attr:`PersGuardConfig.trigger`.
TRIGGERS = ("perturbation", "identity")

#: What each trigger is, as the backdoored checkpoint's metadata records it.
TRIGGER_DESCRIPTIONS = {
    "perturbation": "advface protected-photo perturbation (conditions learned from protected latents)",
    "identity": "the protected people themselves (conditions learned from their photos; the paper's protected content)",
}

#: ``progress(step, total, losses)`` after each optimiser step.
Progress = Callable[[int, int, dict[str, float]], None]

#: ``snapshot(step, model)``: the backdoored generator as it is after ``step`` steps (``snapshot_every``).
Snapshot = Callable[[int, IdentityGenerator], None]


@dataclass(frozen=True)
class PersGuardConfig:
    """Settings of backdoor injection: ``steps`` of Adam at ``lr`` on the denoiser, ``batch`` latents per loss term
    from ``people_per_step`` trigger people (``simulate`` ``finetune``: one person per step), the three loss weights,
    the simulated attacker's condition learning rate and restart interval (the DreamBooth analogue's defaults), how
    much of the attacker is simulated (``simulate``; ``inner_steps`` attacker steps per step at weight learning rate
    ``inner_lr`` with ``finetune``), ``seed`` of every draw."""

    steps: int = 600
    lr: float = 1e-4
    batch: int = 32
    people_per_step: int = 4
    behaviour_weight: float = 1.0
    prior_weight: float = 0.5
    retention_weight: float = 0.1
    condition_lr: float = FinetuneConfig.condition_lr
    condition_reset: int = FinetuneConfig.steps
    #: Inputs of L_BB: ``faces`` (noisy clean latents, as the paper's target images under the trigger prompt) or
    #: ``protected`` (noisy protected latents, under protected-learned and random conditions: the perturbation in
    #: the input itself is the trigger).
    behaviour_inputs: str = "faces"
    #: ``condition`` (the attacker's condition learning only) or ``finetune`` (its weight fine-tuning too,
    #: first-order meta-learned; module docs).
    simulate: str = "condition"
    #: ``finetune`` only: simulated attacker steps per backdoor step, per side (protected, clean).
    inner_steps: int = 10
    #: ``finetune`` only: the simulated attacker's weight learning rate (the DreamBooth analogue's).
    inner_lr: float = FinetuneConfig.lr
    #: ``finetune`` only: weight of ``L_OG``, ordinary-generation preservation -- under encoder embeddings of other
    #: real people (``backdoor``'s ``ordinary``), on noisy latents of their faces, the student predicts what the
    #: teacher predicts. 0 = off.
    ordinary_weight: float = 0.0
    #: ``finetune`` only: the clean side's term at the clean-adapted weights (weight ``prior_weight``):
    #: ``attacker_loss`` (the attacker's own loss on the clean photos) or ``frozen_attacker`` (distil the same
    #: simulated attacker run on the *frozen* input model: the student adapted on clean photos predicts what the
    #: adapted teacher predicts, each under its own learned condition).
    clean_target: str = "attacker_loss"
    #: ``finetune`` only: weight of the discriminating term, ``relu(discriminate_margin - gap)`` with ``gap`` the
    #: min-SNR-weighted squared difference between the protected-adapted and the clean-adapted predictions (each
    #: under its learned condition) on the same noisy clean latents. 0 = off.
    discriminate_weight: float = 0.0
    #: ``finetune`` only: the gap beyond which the discriminating term stops pushing.
    discriminate_margin: float = 0.05
    #: ``finetune`` only: weight of the keeping term, ``relu(keep_margin - d)`` with ``d`` the min-SNR-weighted squared
    #: difference between the clean-adapted prediction under its learned condition and the teacher's *no-identity*
    #: prediction on the clean photos' noisy latents: personalisation on unprotected photos must keep its identity
    #: (``L_BB`` reversed). 0 = off.
    keep_weight: float = 0.0
    #: ``finetune`` only: the distance below which the keeping term pushes.
    keep_margin: float = 0.03
    #: What sets the backdoor off: ``perturbation`` (``protected[k]`` / ``clean[k]`` are protected and clean copies
    #: of the same photos) or ``identity`` (the paper's choice, the protected content itself: ``protected[k]`` are
    #: photos of a person to protect, ``clean[j]`` photos of other people whose personalisation must keep working,
    #: any number of them, drawn on their own).
    trigger: str = "perturbation"
    #: Where each simulated attacker's condition starts: ``random``, or ``embedding`` -- the person's mean encoder
    #: embedding (``backdoor``'s ``starts``), as an attacker who has the encoder starts (``threats.finetune``); with
    #: the identity trigger this is the paper's white-box case, an identifier the publisher knows.
    attacker_start: str = "random"
    seed: int = 0

    def validate(self) -> None:
        """ConfigError naming the first out-of-range setting."""
        for name in ("steps", "batch", "people_per_step", "condition_reset", "inner_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"persguard {name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.behaviour_inputs not in BEHAVIOUR_INPUTS:
            raise ConfigError(
                f"persguard behaviour-inputs must be one of {', '.join(BEHAVIOUR_INPUTS)}; "
                f"got {self.behaviour_inputs!r}"
            )
        if self.simulate not in SIMULATE:
            raise ConfigError(f"persguard simulate must be one of {', '.join(SIMULATE)}; got {self.simulate!r}")
        if self.simulate == "finetune" and self.inner_steps > self.condition_reset:
            raise ConfigError(
                f"persguard inner-steps ({self.inner_steps}) must be <= condition-reset ({self.condition_reset})"
            )
        if self.trigger not in TRIGGERS:
            raise ConfigError(f"persguard trigger must be one of {', '.join(TRIGGERS)}; got {self.trigger!r}")
        if self.attacker_start not in CONDITION_STARTS:
            raise ConfigError(
                f"persguard attacker-start must be one of {', '.join(CONDITION_STARTS)}; got {self.attacker_start!r}"
            )
        if self.attacker_start == "embedding" and self.trigger != "identity":
            raise ConfigError("persguard attacker-start embedding applies to the identity trigger only")
        if self.clean_target not in CLEAN_TARGETS:
            raise ConfigError(
                f"persguard clean-target must be one of {', '.join(CLEAN_TARGETS)}; got {self.clean_target!r}"
            )
        if self.simulate != "finetune" and (
            self.ordinary_weight != 0
            or self.clean_target != "attacker_loss"
            or self.discriminate_weight != 0
            or self.keep_weight != 0
        ):
            raise ConfigError(
                "persguard ordinary-weight, clean-target, discriminate-weight and keep-weight apply to --simulate "
                "finetune only"
            )
        for name in ("discriminate_margin", "keep_margin"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"persguard {name.replace('_', '-')} must be > 0, got {value}")
        if self.batch % 2:
            raise ConfigError(f"persguard batch must be even (half behaviour, half prior), got {self.batch}")
        for name in ("lr", "condition_lr", "inner_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"persguard {name.replace('_', '-')} must be > 0, got {value}")
        weights = (
            self.behaviour_weight,
            self.prior_weight,
            self.retention_weight,
            self.ordinary_weight,
            self.discriminate_weight,
            self.keep_weight,
        )
        if any(not math.isfinite(w) or w < 0 for w in weights) or self.behaviour_weight == 0:
            raise ConfigError(
                f"persguard loss weights must be finite and >= 0, with behaviour-weight > 0; got {weights}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (checkpoint metadata)."""
        return asdict(self)


def check_trigger_set(
    protected: Sequence[np.ndarray], clean: Sequence[np.ndarray], image_size: int, *, paired: bool = True
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(protected, clean)`` face sets validated: >= 1 set on each side, each of >= 1 ``S x S x 3`` uint8 faces at
    the generator's ``image_size``; when ``paired`` (copies of the same photos) the same number of sets and, per
    set, of faces on both sides; ConfigError otherwise."""
    if (paired and len(protected) != len(clean)) or not protected or not clean:
        raise ConfigError(
            f"persguard needs protected and clean photos of the same people (>= 1); got {len(protected)} "
            f"protected and {len(clean)} clean sets"
        )
    want = (image_size, image_size, 3)
    sides: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for name, sets, out in (("trigger person", protected, sides[0]), ("clean set", clean, sides[1])):
        for k, faces in enumerate(sets):
            faces = np.asarray(faces)
            if faces.ndim != 4 or faces.shape[1:] != want:
                raise ConfigError(f"{name} {k}: faces must be N x {image_size} x {image_size} x 3")
            if faces.dtype != np.uint8:
                raise ConfigError(f"{name} {k}: faces must be uint8")
            if len(faces) < 1:
                raise ConfigError(f"{name} {k}: no faces (need >= 1)")
            out.append(faces)
    if paired:
        for k, (p, c) in enumerate(zip(*sides)):
            if len(p) != len(c):
                raise ConfigError(f"trigger person {k}: {len(p)} protected vs {len(c)} clean faces (need equal)")
    return sides


def check_ordinary(
    ordinary: tuple[np.ndarray, np.ndarray] | None, generator: IdentityGenerator
) -> tuple[np.ndarray, torch.Tensor]:
    """``L_OG``'s data validated: ``M >= 1`` uint8 faces ``M x S x S x 3`` and ``M`` embeddings (the generator's
    ``dim``, finite, non-zero) -> ``(faces, embeddings as a tensor)``; ConfigError otherwise."""
    if ordinary is None:
        raise ConfigError("persguard ordinary-weight > 0 needs faces and embeddings of other people (ordinary=)")
    faces, embeddings = np.asarray(ordinary[0]), np.asarray(ordinary[1])
    size = generator.image_size
    if faces.ndim != 4 or faces.shape[1:] != (size, size, 3) or faces.dtype != np.uint8 or len(faces) < 1:
        raise ConfigError(f"persguard ordinary faces must be M x {size} x {size} x 3 uint8 with M >= 1")
    if embeddings.shape != (len(faces), generator.dim):
        raise ConfigError(
            f"persguard ordinary embeddings must be {len(faces)} x {generator.dim}, got shape {embeddings.shape}"
        )
    if not np.all(np.isfinite(embeddings)) or np.any(np.linalg.norm(embeddings, axis=1) == 0):
        raise ConfigError("persguard ordinary embeddings must be finite and non-zero")
    return faces, torch.from_numpy(embeddings.astype(np.float32)).to(generator.device)


def check_starts(
    starts: tuple[np.ndarray, np.ndarray] | None, generator: IdentityGenerator, people: int, others: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attacker_start`` ``embedding``'s start conditions validated: one finite, non-zero row of the generator's
    ``dim`` per protected (``people``) and per clean (``others``) person -> tensors; ConfigError otherwise."""
    if starts is None:
        raise ConfigError("persguard attacker-start embedding needs each person's mean embedding (starts=)")
    out = []
    for side, rows, count in (("protected", starts[0], people), ("clean", starts[1], others)):
        rows = np.asarray(rows)
        if rows.shape != (count, generator.dim):
            raise ConfigError(f"persguard {side} starts must be {count} x {generator.dim}, got shape {rows.shape}")
        if not np.all(np.isfinite(rows)) or np.any(np.linalg.norm(rows, axis=1) == 0):
            raise ConfigError(f"persguard {side} starts must be finite and non-zero")
        out.append(torch.from_numpy(rows.astype(np.float32)).to(generator.device))
    return out[0], out[1]


def _col(x: torch.Tensor) -> torch.Tensor:
    return x[:, None, None, None]


def _distill(
    student: LatentDenoiser,
    teacher: LatentDenoiser,
    x0: torch.Tensor,
    student_cond: torch.Tensor,
    teacher_cond: torch.Tensor,
    teacher_drop: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """Per-row min-SNR-weighted squared error between the student's v-prediction under ``student_cond`` and the
    frozen teacher's under ``teacher_cond`` (null identity where ``teacher_drop``), at random times and noise."""
    n = len(x0)
    t = torch.rand(n, generator=gen, device=x0.device) * (T_MAX - T_MIN) + T_MIN
    noise = torch.randn(x0.shape, generator=gen, device=x0.device)
    alpha, sigma = alpha_sigma(t)
    xt = _col(alpha) * x0 + _col(sigma) * noise
    with torch.no_grad():
        target = teacher(xt, t, teacher_cond, teacher_drop)
    pred = student(xt, t, student_cond)
    snr = (alpha / sigma).pow(2)
    weight = torch.clamp(snr, max=5.0) / (snr + 1)
    return weight * (pred - target).pow(2).mean(dim=(1, 2, 3))


def backdoor(
    generator: IdentityGenerator,
    protected: Sequence[np.ndarray],
    clean: Sequence[np.ndarray],
    config: PersGuardConfig | None = None,
    *,
    ordinary: tuple[np.ndarray, np.ndarray] | None = None,
    starts: tuple[np.ndarray, np.ndarray] | None = None,
    progress: Progress | None = None,
    snapshot: Snapshot | None = None,
    snapshot_every: int = 0,
) -> IdentityGenerator:
    """A backdoored copy of ``generator`` (see the module docs); ``generator`` is unchanged.

    ``protected[k]`` / ``clean[k]``: ``N_k x S x S x 3`` uint8 face chips (the generator's size) of trigger person
    ``k``: with ``trigger`` ``perturbation`` protected and clean copies of the same photos, in the same order; with
    ``identity`` ``protected[k]`` holds photos of person ``k`` to protect and ``clean[j]`` photos of unprotected
    person ``j`` (any number of people on each side, any number of photos each).
    ``ordinary``: ``(faces M x S x S x 3 uint8, embeddings M x dim)`` of *other* people (one row each), the
    conditions of ``L_OG``; required when ``ordinary_weight > 0``. ``starts``: ``(K x dim, J x dim)`` float32, each
    protected and each clean person's mean encoder embedding, where the simulated attackers' conditions start;
    required when ``attacker_start`` is ``embedding``. ``snapshot(step, model)`` every ``snapshot_every`` steps
    (0 = never). ConfigError for bad settings or data."""
    c = config or PersGuardConfig()
    c.validate()
    paired = c.trigger == "perturbation"
    sets_p, sets_c = check_trigger_set(protected, clean, generator.image_size, paired=paired)
    if snapshot_every < 0:
        raise ConfigError(f"persguard snapshot-every must be >= 0, got {snapshot_every}")
    ordinary_set = check_ordinary(ordinary, generator) if c.ordinary_weight > 0 else None
    start_p, start_c = (
        check_starts(starts, generator, len(sets_p), len(sets_c)) if c.attacker_start == "embedding" else (None, None)
    )
    device = generator.device
    teacher = generator.denoiser
    student = copy.deepcopy(teacher).train().requires_grad_(True)

    def latents(faces: np.ndarray) -> torch.Tensor:
        return generator.encode(np.concatenate([faces, faces[:, :, ::-1]]))  # mirrors, as the attacker uses

    zp = [latents(p) for p in sets_p]
    zc = [latents(q) for q in sets_c]
    k_people, k_clean = len(zp), len(zc)
    gen = torch.Generator(device=device).manual_seed(c.seed)
    if c.simulate == "finetune":

        def take(step: int) -> None:
            if snapshot is not None and snapshot_every and step % snapshot_every == 0 and step < c.steps:
                snapshot(step, _result(generator, copy.deepcopy(student), c, sets_p, k_clean))

        og = None if ordinary_set is None else (latents(ordinary_set[0]), ordinary_set[1])  # mirrors appended
        _meta_backdoor(student, teacher, zp, zc, c, gen, progress, og, take, (start_p, start_c))
        return _result(generator, student, c, sets_p, k_clean)
    dim = generator.dim
    cond_p = torch.zeros(k_people, dim, device=device, requires_grad=True)
    cond_c = torch.zeros(k_clean, dim, device=device, requires_grad=True)
    optimiser = torch.optim.Adam(student.parameters(), lr=c.lr)
    cond_optimiser = torch.optim.Adam([cond_p, cond_c], lr=c.condition_lr)
    half = c.batch // 2
    no_drop = torch.zeros(c.batch, dtype=torch.bool, device=device)
    for step in range(c.steps):
        if step % c.condition_reset == 0:  # a fresh attacker: random conditions, fresh optimiser state
            with torch.no_grad():
                cond_p.copy_(torch.randn(k_people, dim, generator=gen, device=device) if start_p is None else start_p)
                cond_c.copy_(torch.randn(k_clean, dim, generator=gen, device=device) if start_c is None else start_c)
            cond_optimiser = torch.optim.Adam([cond_p, cond_c], lr=c.condition_lr)
        chosen = torch.randint(0, k_people, (c.people_per_step,), generator=gen, device=device)
        who = chosen[torch.arange(c.batch, device=device) % c.people_per_step]
        rows = [int(torch.randint(0, len(zp[int(k)]), (1,), generator=gen, device=device)) for k in who]
        who_c, rows_c = who, rows
        if not paired:  # identity trigger: the clean side is other people, drawn on their own
            others = torch.randint(0, k_clean, (c.people_per_step,), generator=gen, device=device)
            who_c = others[torch.arange(c.batch, device=device) % c.people_per_step]
            rows_c = [int(torch.randint(0, len(zc[int(k)]), (1,), generator=gen, device=device)) for k in who_c]
        xp = torch.stack([zp[int(k)][r] for k, r in zip(who, rows)])
        xc = torch.stack([zc[int(k)][r] for k, r in zip(who_c, rows_c)])

        # the simulated attacker: conditions learned on protected (L_BR, also trains the student) and clean photos
        retention = v_loss(student, xp, cond_p[who], no_drop, gen)
        clean_fit = v_loss(student, xc, cond_c[who_c], no_drop, gen)
        (clean_grad,) = torch.autograd.grad(clean_fit, cond_c)

        # L_BB on the first half: protected-learned condition -> the teacher's no-identity prediction;
        # L_PP on the second half: clean-learned (or random) condition -> the teacher's prediction under it
        random_cond = torch.randn(half, dim, generator=gen, device=device)
        use_random = torch.rand(half, generator=gen, device=device) < 0.5
        prior_cond = torch.where(use_random[:, None], random_cond, cond_c[who_c[half:]].detach())
        behaviour_cond = cond_p[who[:half]].detach()
        if c.behaviour_inputs == "protected":
            behaviour_cond = torch.where(use_random[:, None], random_cond, behaviour_cond)
        # L_BB's inputs: the clean copies (perturbation trigger, faces), else the protected photos themselves
        inputs = xc if paired and c.behaviour_inputs == "faces" else torch.cat([xp[:half], xc[half:]])
        student_cond = torch.cat([behaviour_cond, prior_cond])
        teacher_drop = torch.cat(
            [torch.ones(half, dtype=torch.bool, device=device), torch.zeros(half, dtype=torch.bool, device=device)]
        )
        per_row = _distill(student, teacher, inputs, student_cond, student_cond, teacher_drop, gen)
        behaviour, prior = per_row[:half].mean(), per_row[half:].mean()
        loss = c.behaviour_weight * behaviour + c.prior_weight * prior + c.retention_weight * retention

        optimiser.zero_grad(set_to_none=True)
        cond_optimiser.zero_grad(set_to_none=True)
        loss.backward()
        # the attacker's conditions follow the attacker's loss only (Adam ignores the scale of L_BR's weight)
        cond_c.grad = clean_grad
        if c.retention_weight == 0:
            (cond_p.grad,) = torch.autograd.grad(v_loss(student, xp, cond_p[who], no_drop, gen), cond_p)
        optimiser.step()
        cond_optimiser.step()
        if snapshot is not None and snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < c.steps:
            snapshot(step + 1, _result(generator, copy.deepcopy(student), c, sets_p, k_clean))
        if progress is not None:
            progress(
                step + 1,
                c.steps,
                {"behaviour": behaviour.item(), "prior": prior.item(), "retention": retention.item()},
            )
    return _result(generator, student, c, sets_p, k_clean)


def _result(
    generator: IdentityGenerator, student: LatentDenoiser, c: PersGuardConfig, protected: list[np.ndarray], clean: int
) -> IdentityGenerator:
    """The backdoored generator: ``generator``'s autoencoder (copied) with ``student``, metadata recording ``c``,
    the trigger people and photos (``protected``) and the number of ``clean`` sets."""
    student.eval().requires_grad_(False)
    metadata = dict(generator.metadata)
    metadata["persguard"] = {
        "config": c.to_dict(),
        "trigger_people": len(protected),
        "trigger_photos": int(sum(len(p) for p in protected)),
        "target": "no identity (the input model's unconditional prediction)",
        "trigger": TRIGGER_DESCRIPTIONS[c.trigger],
    }
    if c.trigger == "identity":
        metadata["persguard"]["other_people"] = clean
    metadata.pop("created", None)
    autoencoder = copy.deepcopy(generator.autoencoder)
    return IdentityGenerator(autoencoder, student, metadata)


class _Trajectory:
    """One simulated attacker run, resumable: its weight offset from the student, condition, Adam state and steps."""

    def __init__(self) -> None:
        self.offset: list[torch.Tensor] | None = None
        self.condition: torch.Tensor | None = None
        self.optimiser_state: dict[str, Any] | None = None
        self.done = 0


def _advance(
    trajectory: _Trajectory,
    student: LatentDenoiser,
    work: LatentDenoiser,
    latents: torch.Tensor,
    c: PersGuardConfig,
    gen: torch.Generator,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Continue ``trajectory`` for ``c.inner_steps`` attacker steps on ``latents``, starting from the student's current
    weights plus the trajectory's offset (fresh after ``c.condition_reset`` steps, its condition at ``start``, ``1 x
    dim``, or random); ``work`` holds the adapted weights afterwards; returns the (detached) learned condition."""
    if trajectory.condition is None or trajectory.done >= c.condition_reset:  # a fresh attacker
        trajectory.offset, trajectory.optimiser_state, trajectory.done = None, None, 0
        random = torch.randn(1, student.config.cond_dim, generator=gen, device=latents.device)
        trajectory.condition = random if start is None else start.clone()
    with torch.no_grad():
        for k, (w, s) in enumerate(zip(work.parameters(), student.parameters())):
            w.copy_(s if trajectory.offset is None else s + trajectory.offset[k])
    condition = trajectory.condition.clone().requires_grad_(True)
    optimiser = torch.optim.Adam(
        [{"params": list(work.parameters()), "lr": c.inner_lr}, {"params": [condition], "lr": c.condition_lr}]
    )
    if trajectory.optimiser_state is not None:
        optimiser.load_state_dict(trajectory.optimiser_state)
    _fit(work, latents, condition, optimiser, c.inner_steps, FinetuneConfig.batch, gen)
    with torch.no_grad():
        trajectory.offset = [w.detach() - s.detach() for w, s in zip(work.parameters(), student.parameters())]
    trajectory.optimiser_state = copy.deepcopy(optimiser.state_dict())
    trajectory.condition = condition.detach()
    trajectory.done += c.inner_steps
    return trajectory.condition


def _add_grads(target: LatentDenoiser, loss: torch.Tensor, *at: LatentDenoiser) -> None:
    """First-order meta-gradient: the gradient of ``loss`` with respect to each of ``at``'s weights, added to
    ``target``'s."""
    params = [list(model.parameters()) for model in at]
    grads = torch.autograd.grad(loss, [p for ps in params for p in ps], allow_unused=True)  # e.g. the null identity
    for start in range(0, len(grads), len(params[0])):
        for p, g in zip(target.parameters(), grads[start : start + len(params[0])]):
            if g is not None:
                p.grad = torch.empty_like(p).copy_(g) if p.grad is None else p.grad + g


def _gap(
    a: LatentDenoiser,
    b: LatentDenoiser,
    x0: torch.Tensor,
    cond_a: torch.Tensor,
    cond_b: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """Per-row min-SNR-weighted squared difference between ``a`` under ``cond_a`` and ``b`` under ``cond_b`` on the
    same noisy latents of ``x0`` (random times and noise; gradients through both)."""
    n = len(x0)
    t = torch.rand(n, generator=gen, device=x0.device) * (T_MAX - T_MIN) + T_MIN
    noise = torch.randn(x0.shape, generator=gen, device=x0.device)
    alpha, sigma = alpha_sigma(t)
    xt = _col(alpha) * x0 + _col(sigma) * noise
    snr = (alpha / sigma).pow(2)
    weight = torch.clamp(snr, max=5.0) / (snr + 1)
    return weight * (a(xt, t, cond_a) - b(xt, t, cond_b)).pow(2).mean(dim=(1, 2, 3))


def _meta_backdoor(
    student: LatentDenoiser,
    teacher: LatentDenoiser,
    zp: list[torch.Tensor],
    zc: list[torch.Tensor],
    c: PersGuardConfig,
    gen: torch.Generator,
    progress: Progress | None,
    ordinary: tuple[torch.Tensor, torch.Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
    starts: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> None:
    """``simulate`` ``finetune``: train ``student`` in place (module docs); ``ordinary``: latents (mirrors appended)
    and embeddings of other people for ``L_OG``; ``after_step(step)`` after each optimiser step; ``starts``: the
    protected and clean people's start conditions (``K x dim``, ``J x dim``; None: random)."""
    device = zp[0].device
    paired = c.trigger == "perturbation"
    sides = ("protected", "clean", "frozen") if c.clean_target == "frozen_attacker" else ("protected", "clean")
    work = {side: copy.deepcopy(teacher if side == "frozen" else student) for side in sides}
    for model in work.values():
        model.train().requires_grad_(True)
    trajectories = {side: [_Trajectory() for _ in (zp if side == "protected" else zc)] for side in sides}
    optimiser = torch.optim.Adam(student.parameters(), lr=c.lr)
    half = c.batch // 2
    no_drop = torch.zeros(half, dtype=torch.bool, device=device)
    all_drop = torch.ones(half, dtype=torch.bool, device=device)
    for step in range(c.steps):
        k = int(torch.randint(0, len(zp), (1,), generator=gen, device=device))
        start_p, start_c = starts
        begin = None if start_p is None else start_p[k : k + 1]
        cond_p = _advance(trajectories["protected"][k], student, work["protected"], zp[k], c, gen, begin)
        # identity trigger: the clean side is another person, drawn on its own, with its own photos and count
        j = k if paired else int(torch.randint(0, len(zc), (1,), generator=gen, device=device))
        begin = None if start_c is None else start_c[j : j + 1]
        cond_c = _advance(trajectories["clean"][j], student, work["clean"], zc[j], c, gen, begin)
        cond_f = None
        if c.clean_target == "frozen_attacker":  # the same attacker on the frozen input model (its own draws)
            cond_f = _advance(trajectories["frozen"][j], teacher, work["frozen"], zc[j], c, gen, begin)
        rows = torch.randint(0, len(zp[k]), (half,), generator=gen, device=device)
        rows_c = rows if paired else torch.randint(0, len(zc[j]), (half,), generator=gen, device=device)
        xc = zc[j][rows_c]
        inputs = xc if c.behaviour_inputs == "faces" and paired else zp[k][rows]
        optimiser.zero_grad(set_to_none=True)
        # at the protected-adapted weights: learned condition -> the teacher's no-identity prediction (L_BB), and
        # the attacker's own loss (L_BR)
        cond_rows = cond_p.expand(half, -1)
        behaviour = _distill(work["protected"], teacher, inputs, cond_rows, cond_rows, all_drop, gen).mean()
        retention = v_loss(work["protected"], zp[k][rows], cond_rows, no_drop, gen)
        _add_grads(student, c.behaviour_weight * behaviour + c.retention_weight * retention, work["protected"])
        # at the clean-adapted weights: the attacker's own loss on the clean photos (clean personalisation works),
        # or the frozen model's simulated attacker as the target
        if cond_f is None:
            clean_fit = v_loss(work["clean"], xc, cond_c.expand(half, -1), no_drop, gen)
        else:
            clean_fit = _distill(
                work["clean"],
                work["frozen"],
                xc,
                cond_c.expand(half, -1),
                cond_f.expand(half, -1),
                no_drop,
                gen,
            ).mean()
        if c.prior_weight > 0:
            _add_grads(student, c.prior_weight * clean_fit, work["clean"])
        losses = {}
        if c.keep_weight > 0:  # clean personalisation keeps its identity: away from the no-identity target
            cond_rows_c = cond_c.expand(half, -1)
            kept = _distill(work["clean"], teacher, xc, cond_rows_c, cond_rows_c, all_drop, gen).mean()
            _add_grads(student, c.keep_weight * torch.relu(c.keep_margin - kept), work["clean"])
            losses["keep"] = kept.item()
        if c.discriminate_weight > 0:  # protected- and clean-adapted outputs apart, up to the margin
            gap = _gap(work["protected"], work["clean"], xc, cond_rows, cond_c.expand(half, -1), gen).mean()
            apart = torch.relu(c.discriminate_margin - gap)
            if apart.requires_grad:
                _add_grads(student, c.discriminate_weight * apart, work["protected"], work["clean"])
            losses["gap"] = gap.item()
        # L_PP on the student's own weights: random conditions -> the teacher's prediction under them
        random_cond = torch.randn(half, student.config.cond_dim, generator=gen, device=device)
        prior = _distill(student, teacher, xc, random_cond, random_cond, no_drop, gen).mean()
        total = c.prior_weight * prior
        if ordinary is not None:  # L_OG: real people's embeddings -> the teacher's prediction under them
            who = torch.randint(0, len(ordinary[1]), (half,), generator=gen, device=device)
            mirror = torch.randint(0, 2, (half,), generator=gen, device=device) * len(ordinary[1])
            og = _distill(student, teacher, ordinary[0][who + mirror], ordinary[1][who], ordinary[1][who], no_drop, gen)
            total = total + c.ordinary_weight * og.mean()
            losses["ordinary"] = og.mean().item()
        total.backward()
        optimiser.step()
        if after_step is not None:
            after_step(step + 1)
        if progress is not None:
            progress(
                step + 1,
                c.steps,
                {
                    "behaviour": behaviour.item(),
                    "prior": prior.item(),
                    "retention": retention.item(),
                    "clean_fit": clean_fit.item(),
                    **losses,
                },
            )


def target_distance(
    model: IdentityGenerator,
    teacher: IdentityGenerator,
    faces: np.ndarray,
    condition: np.ndarray,
    *,
    seed: int = 0,
    draws: int = 64,
) -> float:
    """How near ``model`` under ``condition`` is to the backdoor's target: the mean min-SNR-weighted squared error
    between its v-prediction and ``teacher``'s *no-identity* prediction, on ``draws`` noisy latents of ``faces``
    (``N x S x S x 3`` uint8, mirrors added) at times and noise drawn from ``seed`` (lower = nearer the target)."""
    if len(faces) < 1 or draws < 1:
        raise ConfigError("target_distance needs at least one face and one draw")
    gen = torch.Generator(device=model.device).manual_seed(seed)
    x0 = model.encode(np.concatenate([faces, faces[:, :, ::-1]]))
    x0 = x0[torch.randint(0, len(x0), (draws,), generator=gen, device=model.device)]
    cond = torch.from_numpy(np.asarray(condition, np.float32)).to(model.device)[None].expand(draws, -1)
    drop = torch.ones(draws, dtype=torch.bool, device=model.device)
    with torch.no_grad():
        return float(_distill(model.denoiser, teacher.denoiser, x0, cond, cond, drop, gen).mean())


__all__ = [
    "BEHAVIOUR_INPUTS",
    "CLEAN_TARGETS",
    "SIMULATE",
    "PersGuardConfig",
    "Progress",
    "Snapshot",
    "backdoor",
    "check_ordinary",
    "check_trigger_set",
    "target_distance",
]
