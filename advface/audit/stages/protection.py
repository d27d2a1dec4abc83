"""Protection stage: the protection the audit applies (the store configuration's, else the audit's flags), the keyed
transform (the store's own, else one simulated with ``--key-file`` or an ephemeral key) and the audited templates of
each kind: raw, protected, protected+key."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from advface.audit.config import AuditConfig
from advface.audit.results import ProtectionResult, ProtectorSummary
from advface.audit.stages.inputs import AuditInputs
from advface.encoders.base import FaceEncoder
from advface.errors import AdvfaceError, ConfigError
from advface.protect.advface import AdvFaceConfig

#: ``protect(embeddings, seed, progress)``: protected templates; ``progress(n)`` is told of each n done.
ProtectFn = Callable[[np.ndarray, int, Callable[[int], None]], np.ndarray]


@dataclass
class AuditProtector:
    """The audit's protection as a function, with what the adaptive attacker's cache depends on."""

    protect: ProtectFn
    #: Identifies the protection (method, shadows, budget, steps, seed) in the adaptive attacker's cache key.
    cache_key: str
    summary: ProtectorSummary
    #: Probes through the protection (a scheme that transforms probes, with the enrolment's key); None: raw probes.
    protect_probes: Callable[[np.ndarray], np.ndarray] | None = None

    def protect_with_bar(self, z: np.ndarray, seed: int, what: str, progress: bool) -> np.ndarray:
        """``z`` protected with ``seed``, with a progress bar (when ``progress``) naming ``what``."""
        with tqdm(
            total=len(z),
            desc=f"protect {what} ({self.summary.method})",
            unit="template",
            disable=not progress,
            leave=False,
        ) as bar:
            return self.protect(z, seed, bar.update)


@dataclass
class ProtectionSetup:
    """The protection and keys the later stages apply, and the audited templates of each kind (in memory only:
    holds key material)."""

    protector: AuditProtector
    raw: np.ndarray
    protected: np.ndarray
    keyed: np.ndarray
    #: The keyed transform of database A, the same at version 2 (renewal), and the transform of database B of the
    #: i-th pair of tenant keys (unlinkability).
    key_a: Any
    key_a2: Any
    other_key: Callable[[int], Any]
    progress: bool
    result: ProtectionResult
    #: The probes compared with the protected templates when the scheme transforms probes (None: raw probes).
    protected_probes: np.ndarray | None = None

    @property
    def probes(self) -> np.ndarray:
        """What the system compares protected templates with: raw probes, or probes through the scheme."""
        return self.raw if self.protected_probes is None else self.protected_probes

    @property
    def method(self) -> str:
        """The protection method."""
        return self.protector.summary.method

    def protect(self, z: np.ndarray, seed: int, what: str = "templates") -> np.ndarray:
        """``z`` protected with ``seed``, with a progress bar naming ``what``."""
        return self.protector.protect_with_bar(z, seed, what, self.progress)


def choose_protection(config: AuditConfig, store: Any) -> tuple[Any, str]:
    """``(spec, source)``: the protection the audit applies (spec None: none) and where it comes from. With a store,
    the store configuration's ``protection`` section (what its sidecar ran); else the audit's flags
    (``--protection``, ``--rel-l2``, ``--steps``, ``--shadow``; defaults: plain AdvFace with the shipped shadow, the
    library's budget and steps)."""
    from advface.protect import IdentityAwareConfig, ProtectionSpec, shipped_shadow_path

    c = config
    if store is not None:
        from advface.service.protection import protection_spec

        source = "the store's configuration (protection section of --config)"
        return protection_spec(store.protection, c.encoder), source
    source = "audit flags"
    method = c.protection or "advface"
    if method == "none":
        return None, source
    shadows = tuple(str(p) for p in c.shadows) or (str(shipped_shadow_path(c.encoder)),)
    rel_l2 = c.rel_l2 if c.rel_l2 is not None else AdvFaceConfig.rel_l2
    steps = c.steps if c.steps is not None else AdvFaceConfig.steps
    config_class = AdvFaceConfig if method == "advface" else IdentityAwareConfig
    protect_config = config_class(rel_l2=rel_l2, steps=steps, seed=c.seed)
    return ProtectionSpec(method, shadows, protect_config, encoder=c.encoder), source


def scheme_protector(config: AuditConfig, public: np.ndarray | None = None) -> AuditProtector:
    """The scheme of ``--scheme`` / ``--protect-cmd`` (:mod:`advface.audit.schemes`) as an :class:`AuditProtector`:
    the key of each protection seed from :func:`advface.audit.schemes.scheme_key`; probes through the scheme with the
    enrolment's key unless the scheme leaves them raw. A reference scheme is centred (``scheme_centre``, default
    :data:`advface.audit.schemes.CENTRE_DEFAULT`) on the mean of ``public``, raw templates of the defender group."""
    from advface.audit.schemes import CENTRE_DEFAULT, SCHEMES, centred, command_scheme, load_scheme, scheme_key

    centre_note = None
    if config.protect_cmd is not None:
        scheme = command_scheme(config.protect_cmd, transforms_probes=not config.raw_probes)
        source = "--protect-cmd"
    else:
        assert config.scheme is not None
        scheme = load_scheme(config.scheme)
        source = f"--scheme {config.scheme}"
        if config.raw_probes:
            scheme = replace(scheme, transforms_probes=False)
        centre = config.scheme_centre if config.scheme_centre is not None else CENTRE_DEFAULT
        if config.scheme in SCHEMES and centre:
            if public is None or not len(public):
                raise ConfigError(
                    f"--scheme {config.scheme} is centred on the defender group's mean, but the dataset has no "
                    "defender-group photo (use more identities, or --no-centre)"
                )
            mean = np.asarray(public, np.float64).mean(axis=0)
            scheme = centred(scheme, mean)
            centre_note = (
                f"centred: the mean of {len(public)} raw templates of the defender group subtracted first "
                f"(public, not a secret; norm {np.linalg.norm(mean):.3f})"
            )
        elif config.scheme in SCHEMES:
            centre_note = "not centred: templates hashed as they come"

    def protect(z: np.ndarray, seed: int, progress: Callable[[int], None]) -> np.ndarray:
        out = scheme.apply(z, scheme_key(seed))
        progress(len(z))
        return out

    probes = (lambda z: scheme.apply(z, scheme_key(config.seed))) if scheme.transforms_probes else None
    summary = ProtectorSummary(scheme.name, source, centre=centre_note)
    return AuditProtector(protect, f"scheme|{scheme.identity}|{config.seed}", summary, probes)


def make_protector(
    config: AuditConfig, encoder: FaceEncoder, store: Any, public: np.ndarray | None = None
) -> AuditProtector:
    """The protection of :func:`choose_protection` as an :class:`AuditProtector` (the identity for none), or the
    scheme of ``--scheme`` / ``--protect-cmd`` (a reference scheme centred on the mean of ``public``)."""
    from advface.hashing import file_sha256
    from advface.protect import load_protector

    if config.scheme is not None or config.protect_cmd is not None:
        return scheme_protector(config, public)
    spec, source = choose_protection(config, store)
    if spec is None:
        return AuditProtector(
            lambda z, seed, progress: np.asarray(z, np.float32).copy(), "none", ProtectorSummary("none", source)
        )
    protector = load_protector(spec, encoder=encoder)  # ConfigError for a shadow of another encoder
    p = spec.config
    jitter = getattr(p, "jitter", None)
    cache_key = (
        f"{spec.method}|{'+'.join(file_sha256(s)[:16] for s in spec.shadows)}|{p.rel_l2}|"
        f"{p.steps}|{config.seed}" + ("|no-jitter" if jitter is False else "")
    )
    summary = ProtectorSummary(
        spec.method, source, rel_l2=p.rel_l2, steps=p.steps, shadows=[Path(s).name for s in spec.shadows], jitter=jitter
    )

    def protect(z: np.ndarray, seed: int, progress: Callable[[int], None]) -> np.ndarray:
        seeded = copy.copy(protector)
        seeded.config = replace(p, seed=seed)
        return seeded.protect(z, progress=progress)

    return AuditProtector(protect, cache_key, summary)


def _key_norm(config: AuditConfig, inputs: AuditInputs) -> float | None:
    """Norm equalisation of the keyed transform: the sidecar's calibrated norm for the encoder
    (``advface.protect.tenant_transform``), else the mean norm of the attacker group's raw embeddings."""
    try:
        from advface.protect.tenant_transform import resolve_norm

        return resolve_norm("auto", config.encoder)
    except (ImportError, AdvfaceError):
        public = inputs.pairs.of_identities(set(inputs.split.attacker)).embeddings
        return float(np.linalg.norm(public, axis=1).mean()) if len(public) else None


@dataclass
class _Keys:
    """The keyed transforms of :class:`ProtectionSetup`, the protected+key templates and what the report says."""

    key_a: Any
    key_a2: Any
    other_key: Callable[[int], Any]
    keyed: np.ndarray
    norm: float | None
    note: str


def _store_keys(store: Any, stored: np.ndarray) -> _Keys:
    """The store's own keyed transform: ``stored`` (the database as stored) is the protected+key templates."""
    transforms, tenant = store.transforms, store.tenant
    key_a = transforms.for_tenant(tenant)
    return _Keys(
        key_a=key_a,
        key_a2=transforms.for_tenant(tenant, version=transforms.version + 1),
        # other tenants of the same deployment (database B of the unlinkability test, one per key pair)
        other_key=lambda i: transforms.for_tenant(f"audit-b{i or ''}:{tenant}"),
        keyed=np.asarray(stored, np.float32),
        norm=transforms.norm,
        note=f"the store's keyed transform (tenant {tenant!r}, version {transforms.version}, key id {key_a.key_id})",
    )


def _audit_keys(config: AuditConfig, inputs: AuditInputs, protected: np.ndarray) -> _Keys:
    """A keyed transform simulated by the audit from ``--key-file`` (else an ephemeral key), applied to
    ``protected``."""
    from advface.protect.keyed import KeyedTransform

    if config.key_file is not None:
        from advface.crypto import load_key_file

        secret, note = load_key_file(config.key_file), f"key file {config.key_file}"
    else:
        secret, note = os.urandom(32), "ephemeral random key (no --key-file)"
    norm = _key_norm(config, inputs)
    dim = protected.shape[1] if protected.ndim == 2 else inputs.encoder.dim  # a scheme may change the dimension
    key_a = KeyedTransform.from_secret(secret, "audit-a", dim, norm=norm)
    return _Keys(
        key_a=key_a,
        key_a2=KeyedTransform.from_secret(secret, "audit-a", dim, version=2, norm=norm),
        other_key=lambda i: KeyedTransform.from_secret(secret, f"audit-b{i or ''}", dim, norm=norm),
        keyed=key_a.apply(protected),
        norm=norm,
        note=note,
    )


def setup_protection(config: AuditConfig, inputs: AuditInputs) -> ProtectionSetup:
    """Protect the audited templates (or take the database's) and set up the keyed transforms."""
    c = config
    defender = inputs.pairs.of_identities(set(inputs.split.defender)).without_flips().embeddings
    protector = make_protector(c, inputs.encoder, inputs.store, defender)
    raw = inputs.raw
    store_transform = inputs.store is not None and inputs.store.transforms is not None
    if store_transform:
        # the store's own keyed transform: stored vectors are T_tenant(AdvFace(z)) ("protected+key", what a
        # thief with the database but without the transform key holds); through T_tenant^-1 they are the
        # AdvFace output ("protected", what a thief with every key or the sidecar's memory holds)
        if c.key_file is not None:
            raise ConfigError(
                "--key-file cannot be used with a store whose --config has a keyed transform: the "
                "audit uses the store's own transform (keyed_transform section)"
            )
        protected, stored = inputs.untransformed_db, inputs.templates_db
        assert protected is not None and stored is not None  # a store with a keyed transform gives both
        keys = _store_keys(inputs.store, stored)
        templates_note = "database as stored (protected+key) and through the tenant's inverse transform (protected)" + (
            ": with norm equalisation only the direction of the AdvFace output comes back"
            if keys.norm is not None
            else ""
        )
    else:
        protected = (
            inputs.templates_db
            if inputs.templates_db is not None
            else protector.protect_with_bar(raw, c.seed, "templates", c.progress)
        )
        keys = _audit_keys(c, inputs, protected)
        templates_note = "database as stored" if inputs.db is not None else "protected here"
    result = ProtectionResult(
        protector.summary, keys.note, keys.norm, templates_note, store_keyed_transform=store_transform
    )
    probes = protector.protect_probes(raw) if protector.protect_probes is not None else None
    return ProtectionSetup(
        protector, raw, protected, keys.keyed, keys.key_a, keys.key_a2, keys.other_key, c.progress, result, probes
    )
