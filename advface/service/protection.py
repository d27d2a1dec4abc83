"""The configured template protection: the ``protection`` section as a protector, and how many run at once.

:func:`protection_spec` turns the section into a :class:`~advface.protect.ProtectionSpec` (``advface``: one shadow,
``protection.shadow`` or the model shipped for the encoder; ``advface-id``: the ``protection.shadows`` ensemble);
:func:`build_protector` loads it for the service's encoder; :func:`protection_parallelism` sizes the protection
slots and torch threads so that concurrent protections never oversubscribe the cores (one torch thread per slot
unless ``protection.threads`` says otherwise).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from advface.config import ProtectionConfig
from advface.encoders.base import FaceEncoder
from advface.errors import ConfigError
from advface.protect import (
    METHODS,
    AdvFaceConfig,
    IdentityAwareConfig,
    ProtectionSpec,
    TemplateProtector,
    load_protector,
    shipped_shadow_path,
)
from advface.threads import DEFAULT_THREADS

#: AdvFace's seed when ``protection.seed`` is unset and no key folder gave the deployment its own.
UNSET_SEED = 0


def protection_seed(section: ProtectionConfig) -> int:
    """The AdvFace seed of the ``protection`` section (:data:`UNSET_SEED` when it is unset)."""
    return UNSET_SEED if section.seed is None else section.seed


def protection_spec(section: ProtectionConfig, encoder_name: str) -> ProtectionSpec | None:
    """The spec of the ``protection`` section for templates of ``encoder_name``; None when ``enabled`` is false.
    ConfigError for an unknown method, an advface-id section without shadows or a missing shadow file."""
    if not section.enabled:
        return None
    if section.method == "advface-id":
        shadows = tuple(str(Path(p).expanduser()) for p in section.shadows)
        if not shadows:
            raise ConfigError("protection.method is advface-id but protection.shadows is empty")
        config = IdentityAwareConfig(
            steps=section.steps, rel_l2=section.rel_l2, seed=protection_seed(section), jitter=section.jitter
        )
        return ProtectionSpec(section.method, shadows, config, encoder=encoder_name)
    if section.method != "advface":
        raise ConfigError(f"protection.method {section.method!r} is not supported (use one of {', '.join(METHODS)})")
    path = Path(section.shadow).expanduser() if section.shadow else shipped_shadow_path(encoder_name)
    return ProtectionSpec(
        section.method,
        (str(path),),
        AdvFaceConfig(steps=section.steps, rel_l2=section.rel_l2, seed=protection_seed(section)),
        encoder=encoder_name,
    )


def build_protector(section: ProtectionConfig, encoder: FaceEncoder) -> TemplateProtector | None:
    """The protector of the ``protection`` section for ``encoder`` (None when disabled); ConfigError at start for a
    bad shadow or, with advface-id, an encoder without a differentiable torch module."""
    spec = protection_spec(section, encoder.name)
    return None if spec is None else load_protector(spec, encoder=encoder)


@dataclass(frozen=True)
class Parallelism:
    """How protection uses the cores: ``slots`` protection calls at once, each with ``threads`` torch threads."""

    slots: int
    threads: int


def protection_parallelism(
    section: ProtectionConfig, workers: int, torch_threads: int, cores: int | None = None
) -> Parallelism:
    """``protection.slots`` (0: ``min(workers, cores)``) and ``protection.threads`` (0:
    :data:`~advface.threads.DEFAULT_THREADS`, one, at most ``torch_threads``): each protection call runs
    ``threads`` lanes at once, each on one torch thread (:func:`advface.protect.ascent.run_lanes`), so ``slots x
    threads`` stays within the cores, and one thread per slot keeps a machine that other jobs also use from
    stalling (multi-threaded torch teams collapse there: ``benchmarks/protect_threads.py``). The sidecar's
    worker threads, photo protection included, run torch on ``threads`` threads."""
    cores = cores or os.cpu_count() or 1
    slots = section.slots or min(workers, cores)
    threads = section.threads or max(1, min(torch_threads, DEFAULT_THREADS))
    return Parallelism(slots, threads)
