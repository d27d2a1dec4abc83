"""Orchestration of ``advface audit``: inputs -> protection -> (database thief) -> attackers -> verification ->
unlinkability -> scenarios -> (encrypted matching) -> layers -> report. Each stage is a function of
:mod:`advface.audit.stages` returning a typed result (:mod:`advface.audit.results`); :func:`run_audit` assembles them
into an :class:`AuditResult`.

Every attacker's reconstructions are also scored by a transfer judge (:mod:`advface.audit.transfer`), a second
encoder untouched by attacker and protection; an unavailable judge is listed under ``missing``.

The report is followed by its reproducibility bundle, ``manifest.json`` (:mod:`advface.audit.manifest`); the verdict
(:mod:`advface.audit.stages.verdict`) is drawn from every stage's result last.

Every stage after the inputs are read runs on its own: a stage that fails (a missing package, an attacker that
cannot train) is recorded under ``missing`` and the report is still written, saying what it lacks. Bad inputs
(no dataset, an empty or mismatched database, no usable photo) stop the audit with a clear error, after writing a
partial report that names the problem.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from advface.audit import FULL_ATTACKERS, PROTECTIONS, QUICK_ATTACKERS
from advface.audit.config import AuditConfig, config_summary
from advface.audit.manifest import RunLog, build_manifest, key_ids
from advface.audit.report import GRID_COLUMNS, ReportArtifacts, write_report
from advface.audit.results import AuditResult
from advface.audit.stages.attackers import run_attacker
from advface.audit.stages.inputs import AuditInputs, load_dataset, select_victims
from advface.audit.stages.layers import summarise_layers
from advface.audit.stages.protection import ProtectionSetup, setup_protection
from advface.audit.stages.thief_scan import scan_store_without_keys
from advface.audit.stages.unlinkability import measure_renewability, measure_unlinkability
from advface.audit.stages.verdict import build_verdict
from advface.audit.stages.verification import measure_utility, run_verification
from advface.audit.transfer import TransferJudge, build_transfer_judge, resolve_transfer_encoder
from advface.errors import AdvfaceError


class _StageRunner:
    """The audit's progress bar over its stages; a stage that fails becomes a ``missing`` entry of ``result``. Each
    stage's duration and outcome go to ``log`` (the manifest's timings and log lines)."""

    def __init__(self, stages: list[str], result: AuditResult, progress: bool, log: RunLog) -> None:
        self.result = result
        self.log = log
        self.bar = tqdm(total=len(stages), desc="audit", unit="stage", disable=not progress)

    @contextlib.contextmanager
    def required(self, name: str) -> Iterator[None]:
        """Show ``name`` on the bar while the block runs; count it done afterwards. Failures propagate."""
        self.bar.set_postfix_str(name)
        started = time.perf_counter()
        try:
            yield
        except BaseException as exc:
            self.log.stage(name, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
            raise
        self.log.stage(name, time.perf_counter() - started)
        self.bar.update(1)

    @contextlib.contextmanager
    def optional(self, name: str) -> Iterator[None]:
        """Like :meth:`required`, but a failure of the block is recorded as missing and the audit goes on."""
        with self.required(name):
            try:
                yield
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded in the report
                detail = str(exc) if isinstance(exc, AdvfaceError) else f"{type(exc).__name__}: {exc}"
                self.result.add_missing(name, detail)
                self.log.line(f"stage {name} failed: {detail}")
                if not isinstance(exc, AdvfaceError):
                    tqdm.write(f"audit: stage {name} failed:\n{traceback.format_exc()}")

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()


def _load_inputs(config: AuditConfig, result: AuditResult) -> AuditInputs:
    """The inputs stage; the dataset's summary is in ``result`` even when choosing the victims then fails."""
    loaded = load_dataset(config)
    result.data = loaded.summary
    result.missing.extend(loaded.notes)
    inputs = select_victims(config, loaded)
    result.data = inputs.summary
    result.missing.extend(inputs.notes)
    result.thresholds = inputs.thresholds
    return inputs


def _transfer_judge(config: AuditConfig, inputs: AuditInputs, name: str) -> TransferJudge:
    """The transfer judge ``name`` on the audit's dataset (its pairs cached in the audit's cache)."""
    from advface.audit.stages.inputs import _env

    if inputs.dataset is None:  # pragma: no cover - load_dataset always keeps it
        raise ValueError("the transfer judge needs the audit's dataset")
    with _env("ADVFACE_CACHE_DIR", str(inputs.cache)):
        return build_transfer_judge(
            name,
            inputs.dataset,
            inputs.encoder.chip,
            seed=config.seed,
            use_cache=config.pairs_cache,
            workers=config.workers,
            progress=config.progress,
        )


def _seeds(config: AuditConfig, result: AuditResult) -> dict[str, int | None]:
    """Every seed the run used, by what it seeds."""
    s = config.seed
    split = result.data.split if result.data is not None and result.data.split is not None else {}
    return {
        "audit": s,
        "identity split": split.get("seed"),
        "protection of the audited templates and attacker enrolments": s,
        "unlinkability database A": s + 1,
        "unlinkability database B": s + 2,
        "renewability re-issued templates": s + 3,
    }


def _key_ids(config: AuditConfig, protection: ProtectionSetup | None) -> dict[str, str]:
    """The key ids of the keyed transforms the run used (none before the protection stage), and with ``--scheme`` /
    ``--protect-cmd`` a fingerprint of the scheme's key of each protection seed."""
    if protection is None:
        return {}
    keys = {"database A (protected+key)": protection.key_a, "database A re-keyed (version 2)": protection.key_a2}
    keys.update({f"database B of key pair {i}": protection.other_key(i) for i in range(config.link_keys)})
    ids = key_ids(keys)
    if config.scheme is not None or config.protect_cmd is not None:
        from advface.audit.schemes import scheme_key_id

        ids.update({f"scheme key of seed {s}": scheme_key_id(s) for s in range(config.seed, config.seed + 4)})
    return ids


def _write_manifest(
    config: AuditConfig,
    result: AuditResult,
    paths: tuple[Path, Path],
    protection: ProtectionSetup | None,
    log: RunLog,
) -> Path:
    """Write ``manifest.json`` beside the report (:mod:`advface.audit.manifest`)."""
    import json

    cache_keys = {
        name: key for name, attack in result.attacks.items() if (key := getattr(attack, "cache_key", None)) is not None
    }
    manifest = build_manifest(
        config=config,
        config_summary=result.config,
        report_files={"html": paths[0], "json": paths[1]},
        keys=_key_ids(config, protection),
        cache_keys=cache_keys,
        seeds=_seeds(config, result),
        run_log=log,
        file_hashes=config.manifest_hashes,
    )
    path = paths[1].parent / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def _finish(
    config: AuditConfig,
    result: AuditResult,
    artifacts: ReportArtifacts,
    inputs: AuditInputs | None,
    started: float,
    log: RunLog,
    protection: ProtectionSetup | None = None,
) -> tuple[Path, Path]:
    """Summarise the layers and the verdict, date the result, name the attackers that did not run, write the report
    and its manifest."""
    c = config
    if result.attacks or result.thief_without_keys is not None:
        result.layers = summarise_layers(result, inputs.store if inputs is not None else None)
    result.verdict = build_verdict(result, c.target_type1, inputs is not None and inputs.store is not None)
    if c.images and inputs is not None and len(inputs.rows) and artifacts.grid_rows:
        artifacts.grid_originals = inputs.victims.pairs.faces[inputs.rows[:GRID_COLUMNS]]
    if not c.images:
        artifacts.grid_rows = []
    result.date = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    result.seconds = round(time.perf_counter() - started, 1)
    for name in c.attackers:
        if name not in result.attacks and not any(m.stage == f"attacker {name}" for m in result.missing):
            result.add_missing(f"attacker {name}", "not run")
    paths = write_report(result, artifacts, Path(c.out))
    if c.pdf:
        from advface.audit.pdf import write_pdf

        write_pdf(result, Path(c.out) / "report.pdf")
    try:
        _write_manifest(c, result, paths, protection, log)
    except OSError as exc:  # the report is written; say why its bundle is not
        tqdm.write(f"audit: manifest.json not written: {exc}")
    return paths


def run_audit(config: AuditConfig) -> tuple[Path, Path, AuditResult]:
    """Run the audit; returns ``(report.html, report.json, result)``. Bad input raises an AdvfaceError after a
    partial report naming the problem was written."""
    config.check()
    started = time.perf_counter()
    result = AuditResult(config=config_summary(config))
    artifacts = ReportArtifacts()
    scan_store = config.store is not None
    transfer_name = resolve_transfer_encoder(config.transfer_encoder, config.encoder)
    stage_names = [
        "inputs",
        "protection",
        *(["transfer judge"] if transfer_name else []),
        *(["database thief"] if scan_store else []),
        *[f"attacker {a}" for a in config.attackers],
        "verification",
        "utility",
        "unlinkability",
        *(["scenarios"] if config.scenarios else []),
        *(["encrypted matching"] if config.matching == "encrypted" else []),
        "report",
    ]
    log = RunLog()
    log.capture()
    stages = _StageRunner(stage_names, result, config.progress, log)
    inputs: AuditInputs | None = None
    protection: ProtectionSetup | None = None
    try:
        try:
            with stages.required("inputs"):
                inputs = _load_inputs(config, result)
            if config.generator is not None and "diffusion" in config.attackers:
                from advface.audit.attacks.diffusion import load_given_generator

                # another encoder's model, or one trained on audited people: a clear error
                load_given_generator(config.generator, inputs.encoder, inputs.pairs, inputs.split)
            with stages.required("protection"):
                protection = setup_protection(config, inputs)
                result.protection = protection.result
        except AdvfaceError as exc:
            result.add_missing("inputs", str(exc))
            _finish(config, result, artifacts, inputs, started, log, protection)
            raise
        judge: TransferJudge | None = None
        if transfer_name:
            with stages.optional("transfer judge"):
                judge = _transfer_judge(config, inputs, transfer_name)
                result.transfer = judge.summary()
        if scan_store:
            with stages.optional("database thief"):
                result.thief_without_keys = scan_store_without_keys(inputs)
        for name in config.attackers:
            with stages.optional(f"attacker {name}"):
                result.attacks[name] = run_attacker(name, config, inputs, protection, artifacts, judge)
        with stages.optional("verification"):
            result.verification = run_verification(config, inputs, protection, artifacts)
        with stages.optional("utility"):
            result.utility = measure_utility(inputs, protection)
        with stages.optional("unlinkability"):
            result.unlinkability, database_a = measure_unlinkability(config, inputs, protection, artifacts)
            system_thresholds = (
                {k: m.threshold_at_far_1e_3 for k, m in result.verification.by_templates.items()}
                if result.verification is not None
                else None
            )
            result.renewability = measure_renewability(
                config, inputs, protection, database_a, artifacts, system_thresholds
            )
        if config.scenarios:
            with stages.optional("scenarios"):
                from advface.audit.stages.scenarios import run_scenarios

                result.scenarios = run_scenarios(config, inputs, protection, result, judge)
        if config.matching == "encrypted":
            with stages.optional("encrypted matching"):
                from advface.audit.stages.encrypted_matching import measure_encrypted_matching

                result.encrypted_matching = measure_encrypted_matching(config, inputs, protection, result, judge)
        with stages.required("report"):
            html_path, json_path = _finish(config, result, artifacts, inputs, started, log, protection)
    finally:
        stages.close()
        log.release()
    return html_path, json_path, result


__all__ = ["FULL_ATTACKERS", "PROTECTIONS", "QUICK_ATTACKERS", "AuditConfig", "AuditResult", "run_audit"]
