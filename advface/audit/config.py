"""Settings of an audit run (:class:`AuditConfig`, the flags of ``advface audit``) and the summary of them the report
starts with."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from advface.audit import FULL_ATTACKERS, MATCHINGS, PROTECTIONS, QUICK_ATTACKERS, TARGET_TYPE1
from advface.errors import ConfigError


@dataclass
class AuditConfig:
    """Everything an audit run depends on (see ``advface audit --help``)."""

    data: Path
    out: Path
    encoder: str = "dlib"
    #: Second encoder judging every reconstruction (``auto``: MobileFaceNet for dlib, dlib otherwise; ``none``).
    transfer_encoder: str = "auto"
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
    #: ``diffusion`` attacker: a trained generator checkpoint to use instead of training one (None: train), and
    #: the scale of its reconstruction guidance by the encoder's torch module (None: 0, no guidance).
    generator: Path | None = None
    diffusion_guidance: float | None = None
    #: ``manifest.json``: the SHA-256 of every dataset file, not only the hash over their names and sizes.
    manifest_hashes: bool = False
    #: The verdict's irreversibility target: best Type I success at FMR 0.1% at most this (both judges).
    target_type1: float = TARGET_TYPE1
    #: Another protection scheme under audit (:mod:`advface.audit.schemes`): ``biohash``, ``MODULE:ATTR`` or an entry
    #: point name; or a shell command with ``{in}`` / ``{out}`` embeddings files and an optional ``{key}`` file.
    scheme: str | None = None
    protect_cmd: str | None = None
    #: The scheme's templates are compared with raw probes (True), not with probes through the scheme (None/False).
    raw_probes: bool | None = None
    #: A reference scheme (biohash, mlphash, polyprotect) hashes templates minus the public mean of the defender
    #: group's raw templates (True) or as they come (False); None: ``advface.audit.schemes.CENTRE_DEFAULT``.
    scheme_centre: bool | None = None
    #: Scenarios (``scenarios`` of report.json): run them; the pool of the attacker group's (raw, protected) pairs
    #: (full disclosure fits on all of it, known pairs on the first k); the known-pairs k; the score-exposure victims
    #: and query budget per victim and way of querying.
    scenarios: bool = True
    scenario_pool: int = 2048
    known_pairs_k: tuple[int, ...] = (1, 4, 16, 64, 256, 1024)
    score_victims: int = 16
    score_budget: int = 2000
    #: Also write ``report.pdf`` (needs the ``pdf`` extra, fpdf2).
    pdf: bool = False
    #: ``encrypted``: also the thief with the database and the sidecar's memory under encrypted matching
    #: (``encrypted_matching`` of report.json; needs the ``encrypted`` extra and Linux's /proc); ``plain``: not.
    matching: str = "plain"

    @classmethod
    def quick_mode(cls, data: Path, out: Path, **overrides: Any) -> AuditConfig:
        """Small subsets for a run of minutes on a CPU: 40 identities (6 photos each), 32x32 decoders trained two
        epochs in batches of 16, 2 victim photos per person, GAN prior on 4 templates with 2 restarts of 8 steps;
        scenarios on a pool of 256 pairs, k up to 64, score exposure of 4 victims with 500 queries."""
        base: dict[str, Any] = {
            "quick": True,
            "attackers": QUICK_ATTACKERS,
            "image_size": 32,
            "epochs": 2,
            "batch_size": 16,
            "max_identities": 40,
            "max_photos": 6,
            "per_identity": 2,
            "max_victims": 40,
            "gan_templates": 4,
            "gan_steps": 8,
            "gan_restarts": 2,
            "link_keys": 3,
            "eval_fraction": 0.5,
            "scenario_pool": 256,
            "known_pairs_k": (1, 4, 16, 64),
            "score_victims": 4,
            "score_budget": 500,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(data=data, out=out, **base)

    def check(self) -> None:
        """ConfigError for contradictory or out-of-range settings."""
        if self.protection is not None and self.protection not in PROTECTIONS:
            raise ConfigError(f"--protection must be one of {', '.join(PROTECTIONS)}, got {self.protection!r}")
        if self.templates is not None and self.store is not None:
            raise ConfigError("give either --templates or --store, not both")
        if (
            self.store is not None
            and not self.tenant
            and not (self.store.startswith("advface:") and "tenant=" in self.store)
        ):
            raise ConfigError("--store needs --tenant (or an advface:DATA_DIR?tenant=NAME location)")
        if self.store_config is not None and self.store is None:
            raise ConfigError("--config (the sidecar's configuration) is read only with --store")
        flags = [
            f
            for f, v in (
                ("--protection", self.protection),
                ("--rel-l2", self.rel_l2),
                ("--steps", self.steps),
                ("--shadow", self.shadows or None),
            )
            if v is not None
        ]
        if self.scheme is not None or self.protect_cmd is not None:
            which = "--scheme" if self.scheme is not None else "--protect-cmd"
            if self.scheme is not None and self.protect_cmd is not None:
                raise ConfigError("give either --scheme or --protect-cmd, not both")
            if self.store is not None or flags:
                raise ConfigError(
                    f"{which} replaces the protection: not with --store or {', '.join(flags) or '--store'}"
                )
            if self.protect_cmd is not None and ("{in}" not in self.protect_cmd or "{out}" not in self.protect_cmd):
                raise ConfigError("--protect-cmd needs {in} and {out} in the command")
        elif self.raw_probes:
            raise ConfigError("--raw-probes is for --scheme / --protect-cmd")
        if self.scheme_centre is not None:
            from advface.audit.schemes import SCHEMES

            if self.scheme not in SCHEMES:
                other = self.scheme or ("--protect-cmd" if self.protect_cmd else "advface's protection")
                names = ", ".join(SCHEMES)
                raise ConfigError(
                    f"--centre / --no-centre are options of the reference schemes ({names}), not of {other}"
                )
        if self.store is not None and flags:
            raise ConfigError(
                f"{', '.join(flags)}: with --store the audit protects as the store's sidecar does, "
                "from the protection section of --config; drop these flags"
            )
        if self.matching not in MATCHINGS:
            raise ConfigError(f"--matching must be one of {', '.join(MATCHINGS)}, got {self.matching!r}")
        if self.matching == "encrypted":
            from advface.encrypted._seal import require

            require()  # before hours of work: a clear error when the encrypted extra is missing
        if not 0 <= self.target_type1 <= 1:
            raise ConfigError(f"--target-type1 must be in [0, 1], got {self.target_type1}")
        if self.rel_l2 is not None and not 0 < self.rel_l2 <= 1:
            raise ConfigError(f"--rel-l2 must be in (0, 1], got {self.rel_l2}")
        if self.pdf:
            from advface.audit.pdf import require_fpdf

            require_fpdf()  # before hours of work: a clear error when the extra is missing
        if not self.known_pairs_k or min(self.known_pairs_k) < 1:
            raise ConfigError(f"--known-pairs-k needs values >= 1, got {self.known_pairs_k}")
        for name in (
            "epochs",
            "batch_size",
            "per_identity",
            "gan_steps",
            "gan_restarts",
            "steps",
            "link_keys",
            "scenario_pool",
            "score_victims",
            "score_budget",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1")
        if not 16 <= self.image_size <= 256:
            raise ConfigError(f"--image-size must be in [16, 256], got {self.image_size}")
        if not self.transfer_encoder:
            raise ConfigError("--transfer-encoder needs an encoder name, 'auto' or 'none'")
        if not self.attackers:
            raise ConfigError("no attacker selected")
        from advface.audit.attacks.decoder import parse_attacker

        if self.diffusion_guidance is not None and self.diffusion_guidance < 0:
            raise ConfigError(f"--diffusion-guidance must be >= 0, got {self.diffusion_guidance}")
        if self.generator is not None and not Path(self.generator).is_file():
            raise ConfigError(f"--generator: no file {self.generator}")
        for name in self.attackers:
            if name in ("gan-prior", "adaptive", "diffusion"):
                continue
            parse_attacker(name.removeprefix("adaptive-"))  # ConfigError for an unknown attacker


def config_summary(config: AuditConfig) -> dict[str, Any]:
    """The settings as the report shows them: every field that is set, paths as text, the attackers joined by commas
    and a store location without its password."""
    summary = asdict(config)
    summary["attackers"] = ",".join(config.attackers)
    if config.store:
        from advface.reencode.uri import Location

        summary["store"] = Location("", "", {}, config.store).display()  # no password in the report
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in summary.items() if v is not None}
