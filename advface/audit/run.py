"""Orchestration of ``advface audit``: data -> split -> templates -> attackers -> metrics -> report.

Every stage after the inputs are read runs on its own: a stage that fails (a missing package, an attacker that
cannot train) is recorded under ``missing`` and the report is still written, saying what it lacks. Bad inputs
(no dataset, an empty or mismatched database, no usable photo) stop the audit with a clear error, after writing a
partial report that names the problem.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from advface.audit import FULL_ATTACKERS, PROTECTIONS, QUICK_ATTACKERS, TARGET_D_SYS
from advface.audit import data as audit_data
from advface.audit.metrics import attack_thresholds, evaluate_attack, linkage, verification
from advface.audit.report import ReportArtifacts, write_report
from advface.errors import AdvfaceError, ConfigError
from advface.protect.advface import AdvFaceConfig

GRID_COLUMNS = 6


@dataclass
class AuditConfig:
    """Everything an audit run depends on (see ``advface audit --help``)."""

    data: Path
    out: Path
    encoder: str = "dlib"
    templates: Path | None = None
    store: str | None = None
    tenant: str | None = None
    store_config: Path | None = None
    protection: str | None = None
    rel_l2: float | None = None
    steps: int | None = None
    shadows: tuple[Path, ...] = ()
    key_file: Path | None = None
    attackers: tuple[str, ...] = FULL_ATTACKERS
    cache_dir: Path | None = None
    pairs_cache: bool = True
    quick: bool = False
    image_size: int = 64
    epochs: int = 20
    batch_size: int = 64
    max_identities: int = 0
    max_photos: int = 0
    per_identity: int = 3
    max_victims: int = 0
    train_identities: int = 0
    gan_templates: int = 48
    gan_steps: int = 60
    gan_restarts: int = 4
    link_keys: int = 5
    eval_fraction: float = 0.3
    seed: int = 0
    images: bool = True
    workers: int = 1
    progress: bool = True

    @classmethod
    def quick_mode(cls, data: Path, out: Path, **overrides: Any) -> AuditConfig:
        """Small subsets for a run of minutes on a CPU: 40 identities (6 photos each), 32x32 decoders trained two
        epochs in batches of 16, 2 victim photos per person, GAN prior on 4 templates with 2 restarts of 8 steps."""
        base = dict(quick=True, attackers=QUICK_ATTACKERS, image_size=32, epochs=2, batch_size=16,
                    max_identities=40, max_photos=6,
                    per_identity=2, max_victims=40, gan_templates=4, gan_steps=8, gan_restarts=2, link_keys=3,
                    eval_fraction=0.5)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(data=data, out=out, **base)

    def check(self) -> None:
        """ConfigError for contradictory or out-of-range settings."""
        if self.protection is not None and self.protection not in PROTECTIONS:
            raise ConfigError(f"--protection must be one of {', '.join(PROTECTIONS)}, got {self.protection!r}")
        if self.templates is not None and self.store is not None:
            raise ConfigError("give either --templates or --store, not both")
        if self.store is not None and not self.tenant and not (
                self.store.startswith("advface:") and "tenant=" in self.store):
            raise ConfigError("--store needs --tenant (or an advface:DATA_DIR?tenant=NAME location)")
        if self.store_config is not None and self.store is None:
            raise ConfigError("--config (the sidecar's configuration) is read only with --store")
        flags = [f for f, v in (("--protection", self.protection), ("--rel-l2", self.rel_l2),
                                ("--steps", self.steps), ("--shadow", self.shadows or None)) if v is not None]
        if self.store is not None and flags:
            raise ConfigError(f"{', '.join(flags)}: with --store the audit protects as the store's sidecar does, "
                              "from the protection section of --config; drop these flags")
        if self.rel_l2 is not None and not 0 < self.rel_l2 <= 1:
            raise ConfigError(f"--rel-l2 must be in (0, 1], got {self.rel_l2}")
        for name in ("epochs", "batch_size", "per_identity", "gan_steps", "gan_restarts", "steps", "link_keys"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1")
        if not 16 <= self.image_size <= 256:
            raise ConfigError(f"--image-size must be in [16, 256], got {self.image_size}")
        if not self.attackers:
            raise ConfigError("no attacker selected")
        from advface.audit.attacks.decoder import parse_attacker

        for name in self.attackers:
            if name == "gan-prior" or name == "adaptive":
                continue
            parse_attacker(name.removeprefix("adaptive-"))  # ConfigError for an unknown attacker


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


class _Audit:
    """One audit run: state shared by the stages."""

    def __init__(self, config: AuditConfig) -> None:
        self.config = config
        self.started = time.perf_counter()
        self.result: dict[str, Any] = {"config": self._config_summary(), "missing": []}
        self.artifacts = ReportArtifacts()
        self.cache = Path(config.cache_dir) if config.cache_dir else None

    def _config_summary(self) -> dict[str, Any]:
        c = asdict(self.config)
        c["attackers"] = ",".join(self.config.attackers)
        if self.config.store:
            from advface.reencode.uri import Location

            c["store"] = Location("", "", {}, self.config.store).display()  # no password in the report
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in c.items() if v is not None}

    def missing(self, stage: str, reason: str) -> None:
        self.result["missing"].append({"stage": stage, "reason": reason})

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Run a stage; any failure becomes a ``missing`` entry and the audit goes on."""
        try:
            yield
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded in the report
            detail = str(exc) if isinstance(exc, AdvfaceError) else f"{type(exc).__name__}: {exc}"
            self.missing(name, detail)
            if not isinstance(exc, AdvfaceError):
                tqdm.write(f"audit: stage {name} failed:\n{traceback.format_exc()}")

    # ------------------------------------------------------------------------------------------------ inputs
    def load_inputs(self) -> None:
        from advface.encoders import create_encoder
        from advface.paths import cache_dir

        c = self.config
        self.cache = self.cache or cache_dir()
        name = "dlib-torch" if c.encoder == "dlib" else c.encoder  # same embeddings, batched, differentiable
        self.encoder = create_encoder(name)
        dataset = audit_data.open_dataset(c.data)
        dataset = audit_data.subsample(dataset, c.max_identities, c.max_photos, c.seed)
        self.db = None
        if c.templates is not None:
            self.db = audit_data.load_templates_file(c.templates, self.encoder.dim)
        elif c.store is not None:
            from advface.audit.store import load_templates_store

            self.db = load_templates_store(c.store, c.tenant, self.encoder.dim, self.encoder.metric,
                                           config_path=c.store_config, encoder_name=c.encoder)
        with _env("ADVFACE_CACHE_DIR", str(self.cache)):
            faces = audit_data.dataset_faces(dataset, self.encoder, image_size=c.image_size,
                                             use_cache=c.pairs_cache, workers=c.workers, progress=c.progress)
        self.pairs = faces.pairs
        originals = self.pairs.without_flips()
        self.result["data"] = {
            "dataset": str(c.data), "photos": len(dataset), "identities": len(dataset.identities()),
            "photos_with_face": len(originals), "photos_failed": len(faces.failed),
            "failed_examples": dict(list(faces.failed.items())[:10]), "encoder": self.encoder.fingerprint,
        }
        if faces.failed:
            self.missing("data", f"{len(faces.failed)} photo(s) gave no face (unreadable or no face found), e.g. "
                         + "; ".join(f"{k}: {v}" for k, v in list(faces.failed.items())[:3]))
        evaluation = None
        if self.db is not None:
            id_of = dict(zip(originals.ids.tolist(), originals.identities.tolist()))
            evaluation = {id_of[i] for i in self.db.ids if i in id_of}
            if not evaluation:
                raise ConfigError(f"{self.db.source}: no template id is a photo id of the dataset; template ids "
                                  "must be photo paths relative to the dataset root (e.g. Person/Person_0001.jpg)")
        split = audit_data.make_split(self.pairs, c.seed, c.eval_fraction, evaluation)
        if c.train_identities and len(split.attacker) > c.train_identities:
            ranked = sorted(split.attacker, key=lambda n: hashlib.sha256(f"{c.seed}:{n}".encode()).hexdigest())
            split = replace(split, attacker=frozenset(ranked[: c.train_identities]))
        self.split = split
        self.victims = audit_data.choose_victims(self.pairs, split.evaluation, c.per_identity, c.max_victims)
        if len(self.victims.pairs) == 0:
            raise ConfigError("no evaluation photo: the dataset has too few identities with usable photos")
        if self.db is not None:
            self.rows, self.templates_db, unmatched = audit_data.match_templates(self.db, self.victims)
            self.result["data"]["database"] = {"source": self.db.source, "templates": len(self.db.ids),
                                               "audited": len(self.rows), "not_audited": unmatched}
            self.untransformed_db = None
            if self.db.untransformed is not None:
                index = {photo_id: i for i, photo_id in enumerate(self.db.ids)}
                picked = [index[pid] for pid in self.victims.pairs.ids[self.rows].tolist()]
                self.untransformed_db = self.db.untransformed[picked]
            if self.db.store is not None:
                self.result["data"]["database"].update(self.db.store.describe())
        else:
            self.rows, self.templates_db, self.untransformed_db = np.arange(len(self.victims.pairs)), None, None
        v = self.victims
        self.result["data"].update({
            "split": split.describe(), "victims": len(self.rows),
            "single_photo_identities": len(v.single_photo_identities),
        })
        if v.single_photo_identities:
            self.missing("type2", f"Type II skipped for {len(v.single_photo_identities)} identities with a single "
                         "photo (no other photo to compare with)")
        self.thresholds = attack_thresholds(originals.embeddings, originals.identities, self.encoder.metric, c.seed)
        self.result["thresholds"] = self.thresholds

    # ------------------------------------------------------------------------------------------- protection
    def setup_protection(self) -> None:
        from advface.protect.keyed import KeyedTransform

        c = self.config
        self.protect_fn = self._make_protect()
        raw = self.victims.pairs.embeddings[self.rows]
        self.raw = raw
        transforms = self.db.store.transforms if self.db is not None and self.db.store is not None else None
        if transforms is not None:
            # the store's own keyed transform: stored vectors are T_tenant(AdvFace(z)) ("protected+key", what a
            # thief with the database but without the transform key holds); through T_tenant^-1 they are the
            # AdvFace output ("protected", what a thief with every key or the sidecar's memory holds)
            if c.key_file is not None:
                raise ConfigError("--key-file cannot be used with a store whose --config has a keyed transform: the "
                                  "audit uses the store's own transform (keyed_transform section)")
            tenant = self.db.store.tenant
            self.protected = self.untransformed_db
            self.key_a = transforms.for_tenant(tenant)
            # other tenants of the same deployment (database B of the unlinkability test, one per key pair)
            self.other_key = lambda i: transforms.for_tenant(f"audit-b{i or ''}:{tenant}")
            self.key_a2 = transforms.for_tenant(tenant, version=transforms.version + 1)
            self.keyed = np.asarray(self.templates_db, np.float32)
            norm = transforms.norm
            key_note = (f"the store's keyed transform (tenant {tenant!r}, version {transforms.version}, key id "
                        f"{self.key_a.key_id})")
            templates_note = ("database as stored (protected+key) and through the tenant's inverse transform "
                              "(protected)" + (": with norm equalisation only the direction of the AdvFace output "
                                               "comes back" if norm is not None else ""))
        else:
            self.protected = self.templates_db if self.templates_db is not None else self.protect(raw, c.seed)
            if c.key_file is not None:
                from advface.crypto import load_key_file

                secret, key_note = load_key_file(c.key_file), f"key file {c.key_file}"
            else:
                secret, key_note = os.urandom(32), "ephemeral random key (no --key-file)"
            norm = self._key_norm()
            dim = self.encoder.dim
            self.key_a = KeyedTransform.from_secret(secret, "audit-a", dim, norm=norm)
            self.other_key = lambda i: KeyedTransform.from_secret(secret, f"audit-b{i or ''}", dim, norm=norm)
            self.key_a2 = KeyedTransform.from_secret(secret, "audit-a", dim, version=2, norm=norm)
            self.keyed = self.key_a.apply(self.protected)
            templates_note = "database as stored" if self.db is not None else "protected here"
        self.result["protection"] = {**self.protection_info,
                                     "key": key_note, "key_norm_equalisation": norm, "templates": templates_note,
                                     "store_keyed_transform": transforms is not None}

    def _key_norm(self) -> float | None:
        """Norm equalisation of the keyed transform: the sidecar's calibrated norm for the encoder
        (``advface.protect.tenant_transform``), else the mean norm of the attacker group's raw embeddings."""
        try:
            from advface.protect.tenant_transform import resolve_norm

            return resolve_norm("auto", self.config.encoder)
        except (ImportError, AdvfaceError):
            public = self.pairs.of_identities(self.split.attacker).embeddings
            return float(np.linalg.norm(public, axis=1).mean()) if len(public) else None

    def _protection_spec(self) -> Any:
        """The protection the audit applies (None: none): the store configuration's ``protection`` section when a
        store is audited (what its sidecar ran), else the audit's flags (``--protection``, ``--rel-l2``,
        ``--steps``, ``--shadow``; defaults: plain AdvFace with the shipped shadow, the library's budget and steps)."""
        from advface.protect import IdentityAwareConfig, ProtectionSpec, shipped_shadow_path, spec_from_config

        c = self.config
        store = self.db.store if self.db is not None else None
        if store is not None:
            self.protection_source = "the store's configuration (protection section of --config)"
            return spec_from_config(store.protection, c.encoder)
        self.protection_source = "audit flags"
        method = c.protection or "advface"
        if method == "none":
            return None
        shadows = tuple(str(p) for p in c.shadows) or (str(shipped_shadow_path(c.encoder)),)
        params = {"rel_l2": c.rel_l2 if c.rel_l2 is not None else AdvFaceConfig.rel_l2,
                  "steps": c.steps if c.steps is not None else AdvFaceConfig.steps, "seed": c.seed}
        config = AdvFaceConfig(**params) if method == "advface" else IdentityAwareConfig(**params)
        return ProtectionSpec(method, shadows, config, encoder=c.encoder)

    def _make_protect(self) -> Callable[[np.ndarray, int], np.ndarray]:
        """``protect(z, seed)`` with the protection of :meth:`_protection_spec` (the identity for none); sets
        ``protection_key`` (what the adaptive attacker's cache depends on) and ``protection_info``."""
        from advface.hashing import file_sha256
        from advface.protect import load_protector

        spec = self._protection_spec()
        if spec is None:
            self.protection_key = "none"
            self.protection_info = {"method": "none", "source": self.protection_source}
            return lambda z, seed: np.asarray(z, np.float32).copy()
        protector = load_protector(spec, encoder=self.encoder)  # ConfigError for a shadow of another encoder
        p = spec.config
        jitter = getattr(p, "jitter", None)
        self.protection_key = (f"{spec.method}|{'+'.join(file_sha256(s)[:16] for s in spec.shadows)}|{p.rel_l2}|"
                               f"{p.steps}|{self.config.seed}" + ("|no-jitter" if jitter is False else ""))
        self.protection_info = {"method": spec.method, "rel_l2": p.rel_l2, "steps": p.steps,
                                "shadows": [Path(s).name for s in spec.shadows], "source": self.protection_source,
                                **({"jitter": jitter} if jitter is not None else {})}

        def protect(z: np.ndarray, seed: int) -> np.ndarray:
            seeded = copy.copy(protector)
            seeded.config = replace(p, seed=seed)
            return seeded.protect(z, progress=self._bar)

        return protect

    _bar_obj: Any = None

    def _bar(self, n: int) -> None:
        if self._bar_obj is not None:
            self._bar_obj.update(n)

    def protect(self, z: np.ndarray, seed: int, what: str = "templates") -> np.ndarray:
        with tqdm(total=len(z), desc=f"protect {what} ({self.protection_info['method']})", unit="template",
                  disable=not self.config.progress, leave=False) as bar:
            self._bar_obj = bar
            try:
                return self.protect_fn(z, seed)
            finally:
                self._bar_obj = None

    # --------------------------------------------------------------------------------------------- attacks
    def _evaluate(self, recon_of: Callable[[np.ndarray], np.ndarray], rows: np.ndarray | None = None
                  ) -> dict[str, Any]:
        sel = np.arange(len(self.rows)) if rows is None else rows
        v = self.victims
        own_rows = self.rows[sel]
        other_rows = v.other[own_rows]
        own = v.pairs.embeddings[own_rows]
        other = v.pairs.embeddings[np.maximum(other_rows, 0)]
        originals = v.pairs.faces[own_rows]
        out: dict[str, Any] = {}
        grid: dict[str, np.ndarray] = {}
        sets = [("raw", self.raw), ("protected", self.protected), ("protected+key", self.keyed)]
        for label, templates in sets:
            recon = recon_of(templates[sel])
            out[label] = evaluate_attack(self.encoder, recon, own, other, other_rows >= 0, originals,
                                         self.thresholds)
            grid[label] = recon[:GRID_COLUMNS]
        out["type1_success"] = {k: out[k]["type1_success"] for k, _ in sets}
        out["type2_success"] = {k: out[k]["type2_success"] for k, _ in sets}
        out["_grid"] = grid
        return out

    def run_attacker(self, name: str) -> None:
        from advface.attack_metrics import reconstruct

        c = self.config
        common = dict(image_size=c.image_size, epochs=c.epochs, seed=c.seed, cache_dir=self.cache,
                      batch_size=c.batch_size, progress=c.progress)
        if name == "gan-prior":
            entry = self._gan_prior()
        elif name == "adaptive" or name.startswith("adaptive-"):
            from advface.audit.attacks.adaptive import train_or_load_adaptive

            arch = name.removeprefix("adaptive").removeprefix("-") or "deconv"
            decoder, meta, cached = train_or_load_adaptive(
                arch, self.pairs, self.split, self.encoder, lambda z: self.protect(z, c.seed, "attacker enrolments"),
                self.protection_key, **common)
            entry = self._evaluate(lambda z: reconstruct(decoder, z))
            entry.update(kind="adaptive", arch=arch, loss=meta.get("loss"), cached=cached,
                         trained_on="protected templates of the attacker group")
        else:
            from advface.audit.attacks.decoder import parse_attacker, train_or_load

            attacker = parse_attacker(name)
            decoder, meta, cached = train_or_load(attacker, self.pairs, self.split, self.encoder, **common)
            entry = self._evaluate(lambda z: reconstruct(decoder, z))
            entry.update(kind="decoder", arch=attacker.arch, loss=attacker.loss, cached=cached,
                         trained_on="raw templates of the attacker group")
        grid = entry.pop("_grid")
        self.result.setdefault("attacks", {})[name] = entry
        for label in ("raw", "protected"):
            self.artifacts.grid_rows.append((f"{name} ({label})", grid[label]))

    def _gan_prior(self) -> dict[str, Any]:
        from advface.audit.attacks.gan_prior import GanPriorConfig, invert_templates, load_generator

        c = self.config
        module = self.encoder.torch_module()
        if module is None:
            raise ConfigError(f"the GAN-prior attack needs an encoder with a differentiable module ({c.encoder})")
        generator = load_generator()
        rows = np.arange(min(c.gan_templates, len(self.rows)))
        config = GanPriorConfig(steps=c.gan_steps, restarts=c.gan_restarts, seed=c.seed)
        histories: list[list[float]] = []

        def recon(templates: np.ndarray) -> np.ndarray:
            with tqdm(total=len(templates), desc="GAN-prior search", unit="template", disable=not c.progress,
                      leave=False) as bar:
                res = invert_templates(templates, module, chip_size=self.encoder.chip.size,
                                       metric=self.encoder.metric, config=config, generator=generator,
                                       progress=bar.update)
            histories.append(res.history)
            return res.faces

        entry = self._evaluate(recon, rows)
        self.artifacts.gan_history = histories[0] if histories else []
        entry.update(kind="gan-prior", prior="gan-face-generate DCGAN 64x64 (DigiFace1M)", templates=len(rows),
                     steps=c.gan_steps, restarts=c.gan_restarts,
                     similarity_history_raw=histories[0] if histories else [])
        return entry

    # ---------------------------------------------------------------------------------------------- metrics
    def run_verification(self) -> None:
        from advface.audit.metrics import Verification

        ids = self.victims.pairs.identities[self.rows]
        settings = {"raw": (self.raw, self.raw), "protected": (self.protected, self.raw),
                    "protected+key": (self.keyed, self.key_a.apply(self.raw))}
        out: dict[str, Any] = {}
        for name, (enrolled, probes) in settings.items():
            v: Verification = verification(self.encoder, enrolled, probes, ids, self.config.seed)
            out[name] = v.metrics
            self.artifacts.verifications[name] = v
        out["accuracy_change_points"] = {
            name: round(100 * (out[name]["accuracy_mean"] - out["raw"]["accuracy_mean"]), 3)
            for name in ("protected", "protected+key")}
        out["key_accuracy_change_vs_protected_points"] = round(
            100 * (out["protected+key"]["accuracy_mean"] - out["protected"]["accuracy_mean"]), 3)
        self.result["verification"] = out

    def run_unlinkability(self) -> None:
        c = self.config
        ids = self.victims.pairs.identities[self.rows]
        first: dict[str, int] = {}
        second: dict[str, int] = {}
        for i, name in enumerate(ids.tolist()):
            if name not in first:
                first[name] = i
            elif name not in second:
                second[name] = i
        people = sorted(second)
        if len(people) < 2:
            raise ConfigError("unlinkability needs two or more people with two photos among the evaluation photos")
        a = np.array([first[p] for p in people])
        b = np.array([second[p] for p in people])
        raw_a, raw_b = self.raw[a], self.raw[b]
        prot_a = self.protect(raw_a, c.seed + 1, "database A")
        prot_b = self.protect(raw_b, c.seed + 2, "database B")
        metric = self.encoder.metric
        keyed_a = self.key_a.apply(prot_a)
        settings = {
            "raw": (raw_a, raw_b),
            "advface": (prot_a, prot_b),
            "advface+key": (keyed_a, self.other_key(0).apply(prot_b)),
        }
        details = {}
        for name, (x, y) in settings.items():
            lk = linkage(x, y, metric, c.seed)
            details[name] = lk.metrics
            self.artifacts.linkages[name] = lk
        # D_sys is a property of a random pair of keys: measure it for link_keys pairs (database B under the key of
        # another tenant each time; pair 0 is the one above) and hold the worst to the target
        across = [details["advface+key"]] + [linkage(keyed_a, self.other_key(i).apply(prot_b), metric, c.seed).metrics
                                             for i in range(1, c.link_keys)]
        values = [m["d_sys"] for m in across]
        self.result["unlinkability"] = {
            "d_sys": {k: v["d_sys"] for k, v in details.items()}, "details": details,
            "advface+key_across_keys": {
                "key_pairs": len(values), "d_sys": values, "mean": float(np.mean(values)), "max": float(max(values)),
                "noise_floor_mean": float(np.mean([m["noise_floor"] for m in across])),
                # how many keys read above what an unlinkable system gives 95% of the time at these counts
                "above_noise_p95": sum(m["d_sys"] > m["noise_floor_p95"] for m in across)},
            "protection": self.protection_info["method"],
            "protocol": "database A: first evaluation photo of each person, database B: second photo; protected "
                        "independently (AdvFace seeds differ; keys of two tenants, repeated for "
                        f"{len(values)} pairs of tenant keys); linker: the system's comparator",
            "target_d_sys_max": TARGET_D_SYS,
            "key_meets_target": bool(max(values) <= TARGET_D_SYS),
        }
        from advface.protect.keyed import rekey

        reissued = self.protect(raw_a, c.seed + 3, "re-issued templates")
        revoked_keyed = self.key_a.apply(prot_a)
        renew = {"advface": (prot_a, reissued),
                 "advface+key": (revoked_keyed, rekey(revoked_keyed, self.key_a, self.key_a2))}
        rdetails = {}
        for name, (x, y) in renew.items():
            lk = linkage(x, y, metric, c.seed)
            rdetails[name] = lk.metrics
            self.artifacts.linkages[f"renewal {name}"] = lk
        self.result["renewability"] = {
            "d_sys": {k: v["d_sys"] for k, v in rdetails.items()}, "details": rdetails,
            "protocol": "revoked template vs the re-issued one of the same enrolment: AdvFace re-run with another "
                        "seed; with the key: the protected template re-keyed to key version 2 (advface.protect.keyed."
                        "rekey)",
        }

    # --------------------------------------------------------------------------------------- layered secrets
    def run_thief_scan(self) -> None:
        """The database thief without keys (:mod:`advface.audit.thief`) on the audited store's storage."""
        from advface.audit import thief

        info = self.db.store
        ref = thief.Reference(victims=self.victims.pairs.embeddings, threshold=float(self.thresholds["1e-3"]),
                              metric=self.encoder.metric, stored=self.db.vectors)
        if info.backend == "sqlite":
            scan = thief.scan_sqlite(info.database_file, ref)
        else:
            scan = thief.scan_postgres(str(info.dsn), ref)
        scan.update(encrypted_at_rest=info.encrypted, threshold_fmr="1e-3",
                    summary=f"vectors recovered without keys: {scan['vectors_recovered']} of {scan['rows']} rows")
        self.result["thief_without_keys"] = scan

    def summarise_layers(self) -> None:
        """``layers``: each attacker of the threat model against the layer that should stop it, with the audit's
        numbers (best Type I @FMR 0.1% over the attackers run, vectors recovered without keys)."""
        attacks = self.result.get("attacks", {})

        def best(setting: str, kind: str | None = None) -> dict[str, Any]:
            by = {name: e["type1_success"][setting] for name, e in attacks.items()
                  if isinstance(e.get("type1_success"), dict) and setting in e["type1_success"]
                  and (kind is None or e.get("kind") == kind)}
            return {"templates": setting, "type1_success_max": max(by.values()) if by else None,
                    "type1_success": by}

        store = self.db.store if getattr(self, "db", None) is not None else None
        store_transform = bool(self.result.get("protection", {}).get("store_keyed_transform"))
        thief = self.result.get("thief_without_keys")
        layers: list[dict[str, Any]] = []
        first: dict[str, Any] = {"attacker": "database thief without keys",
                                 "holds": "the database file(s), a backup or a dump; no key",
                                 "layer": "encryption at rest"}
        if thief is not None:
            first.update(vectors_recovered=thief["vectors_recovered"], rows=thief["rows"],
                         encrypted_at_rest=thief["encrypted_at_rest"], note=thief["summary"])
        else:
            first["note"] = ("not measured: no store audited (--store)" if store is None
                             else "not measured: the thief scan failed (see missing)")
        layers.append(first)
        if store is not None and not store_transform:
            second = best("protected")
            second["note"] = ("the store has no keyed transform: the thief holds the stored AdvFace templates "
                              "(protected); protected+key shows what the keyed transform would add")
        else:
            second = best("protected+key")
            second["note"] = ("the store's templates as stored, i.e. after its keyed transform" if store_transform else
                              "keyed transform simulated by the audit on the protected templates")
        layers.append({"attacker": "thief with the database (and the encryption key), without the transform key",
                       "holds": "stored templates", "layer": "keyed per-tenant transform, then AdvFace", **second})
        layers.append({"attacker": "thief with every key, or the sidecar's process memory",
                       "holds": "AdvFace templates", "layer": "AdvFace", **best("protected")})
        insider = best("protected", "adaptive")
        insider["note"] = ("the adaptive attacker: trains on (own embedding, protected template) pairs of its own "
                           "enrolments; a keyed transform does not stop it (its own pairs reveal the linear map)"
                           if insider["type1_success"] else "not measured: no adaptive attacker in --attackers")
        layers.append({"attacker": "insider who can enrol faces and read back stored templates",
                       "holds": "AdvFace templates + its own enrolments", "layer": "AdvFace", **insider})
        layers.append(self._api_only_layer(best("protected", "gan-prior")))
        layers.append({"attacker": "no advface (baseline)", "holds": "raw embeddings", "layer": "none",
                       **best("raw")})
        self.result["layers"] = layers

    @staticmethod
    def _api_only_layer(search: dict[str, Any]) -> dict[str, Any]:
        """The client with API access only: which RPCs return vectors (:mod:`advface.audit.api_surface`), and the
        GAN-prior search on the protected templates as the bound of a score-oracle search."""
        from advface.audit.api_surface import api_exposure

        api = api_exposure()
        leaks = api["stored_vectors"]
        note = ("stored templates returned by the API: " + (", ".join(leaks) if leaks else "none") +
                f" (vectors only in {', '.join(api['caller_input_vectors']) or 'no RPC'}, computed from the caller's "
                f"own input); scores returned by {', '.join(api['score_rpcs'])}: a client searching a face whose "
                "score rises needs one query per step; ")
        if search["type1_success"]:
            note += ("the GAN-prior search with the protected template in hand (gradients, no query limit) bounds "
                     "such a search with the same prior")
        else:
            note += "score-oracle bound not measured: no gan-prior attacker in --attackers"
        return {"attacker": "client with API access only", "holds": "match scores of its own probes",
                "layer": "the API returns no stored template", "api_stored_vector_rpcs": leaks,
                "api": api, **search, "note": note}

    # ----------------------------------------------------------------------------------------------- report
    def finish(self) -> tuple[Path, Path]:
        c = self.config
        if "attacks" in self.result or "thief_without_keys" in self.result:
            self.summarise_layers()
        if c.images and hasattr(self, "rows") and len(self.rows) and self.artifacts.grid_rows:
            self.artifacts.grid_originals = self.victims.pairs.faces[self.rows[:GRID_COLUMNS]]
        if not c.images:
            self.artifacts.grid_rows = []
        self.result["date"] = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        self.result["seconds"] = round(time.perf_counter() - self.started, 1)
        attacks = self.result.get("attacks", {})
        for name in c.attackers:
            if name not in attacks and not any(m["stage"] == f"attacker {name}" for m in self.result["missing"]):
                self.missing(f"attacker {name}", "not run")
        return write_report(self.result, self.artifacts, Path(c.out))


def run_audit(config: AuditConfig) -> tuple[Path, Path, dict[str, Any]]:
    """Run the audit; returns ``(report.html, report.json, result)``. Bad input raises an AdvfaceError after a
    partial report naming the problem was written."""
    config.check()
    audit = _Audit(config)
    thief = config.store is not None
    stages = ["inputs", "protection", *(["database thief"] if thief else []),
              *[f"attacker {a}" for a in config.attackers], "verification", "unlinkability", "report"]
    bar = tqdm(total=len(stages), desc="audit", unit="stage", disable=not config.progress)
    try:
        bar.set_postfix_str("inputs")
        try:
            audit.load_inputs()
            bar.update(1)
            bar.set_postfix_str("protection")
            audit.setup_protection()
            bar.update(1)
        except AdvfaceError as exc:
            audit.missing("inputs", str(exc))
            audit.finish()
            raise
        if thief:
            bar.set_postfix_str("database thief")
            with audit.stage("database thief"):
                audit.run_thief_scan()
            bar.update(1)
        for name in config.attackers:
            bar.set_postfix_str(f"attacker {name}")
            with audit.stage(f"attacker {name}"):
                audit.run_attacker(name)
            bar.update(1)
        bar.set_postfix_str("verification")
        with audit.stage("verification"):
            audit.run_verification()
        bar.update(1)
        bar.set_postfix_str("unlinkability")
        with audit.stage("unlinkability"):
            audit.run_unlinkability()
        bar.update(1)
        html_path, json_path = audit.finish()
        bar.update(1)
    finally:
        bar.close()
    return html_path, json_path, audit.result


__all__ = ["FULL_ATTACKERS", "PROTECTIONS", "QUICK_ATTACKERS", "AuditConfig", "run_audit"]
