"""A re-encoding run from start to end: check, protect chunk by chunk (resumably), write, verify, swap.

Order of work, so that nothing half-written ever looks complete:

1. open the source and destination; refuse an existing destination (unless ``overwrite``) and an empty source;
2. protect chunk after chunk with the chosen engine; each chunk's protected templates go to a part file in the
   work folder and the chunk is committed to the journal (:mod:`advface.reencode.progress`);
3. write the destination from the parts, atomically (:mod:`advface.reencode.sinks`);
4. verify it against the source (:mod:`advface.reencode.verify`) and save the summary as JSON;

(A streaming destination, advface's own store (:mod:`advface.reencode.store_io`), takes each chunk in step 2 in
place of a part file, idempotently; step 3 is then only closing it.)

5. with ``swap``, and only when verification passed, replace the source by the destination;
6. remove the work folder.

A run killed anywhere before 6 is resumed by the same command (same parameters); the output is identical to an
uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from advface.errors import ConfigError, EmbeddingError
from advface.hashing import file_sha256
from advface.paths import cache_dir
from advface.protect import AdvFaceConfig, IdentityAwareConfig, ProtectionSpec, TemplateProtector, load_protector
from advface.reencode.chunk import check_chunk, reencode_chunk
from advface.reencode.progress import JOURNAL, Journal, write_part
from advface.reencode.sinks import PartSet, Sink, open_sink
from advface.reencode.sources import RawChunk, Source, open_source
from advface.reencode.store_io import STORE_PART, AdvfaceStoreSource
from advface.reencode.uri import Location, parse_location
from advface.reencode.verify import VerifyOptions, verify


@dataclass
class JobOptions:
    """What ``advface reencode`` was asked to do (see the CLI for each flag)."""

    source: str
    dest: str
    shadow: Path  # advface's shadow; with advface-id the ensemble's first (messages only)
    config: AdvFaceConfig | IdentityAwareConfig
    verify: VerifyOptions
    chunk_size: int = 1024
    engine: str = "local"
    num_cpus: int | None = None
    ray_address: str | None = None
    device: str | None = None
    overwrite: bool = False
    restart: bool = False
    swap: bool = False
    work_dir: Path | None = None
    summary: Path | None = None
    quiet: bool = False
    #: the sidecar's configuration file an ``advface:`` store is opened from (None: defaults)
    store_config: Path | None = None
    #: protection method (advface.protect.METHODS); advface-id uses ``shadows`` and ``encoder``'s torch module
    method: str = "advface"
    shadows: tuple[Path, ...] = ()
    encoder: str = "dlib"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ConfigError(f"chunk size must be an integer >= 1, got {self.chunk_size!r}")
        if self.engine not in ("local", "ray"):
            raise ConfigError(f"engine must be local or ray, got {self.engine!r}")


def default_work_dir(dest: Location) -> Path:
    """Beside a file destination (``.NAME.reencode``), else ``~/.cache/advface/reencode/<hash of the dest>``."""
    if dest.scheme in ("npz", "npy", "parquet"):
        path = Path(dest.path)
        return path.with_name(f".{path.name}.reencode")
    return cache_dir() / "reencode" / hashlib.sha256(dest.text.encode()).hexdigest()[:16]


def default_summary_path(dest: Location) -> Path:
    """``DEST.verify.json`` beside a file destination, else ``reencode-<table>.verify.json`` (an advface store:
    ``reencode-advface-<tenant>.verify.json``) here."""
    if dest.scheme in ("npz", "npy", "parquet"):
        path = Path(dest.path)
        return path.with_name(path.name + ".verify.json")
    if dest.scheme == "advface":
        return Path(f"reencode-advface-{re.sub(r'[^A-Za-z0-9_.-]', '_', dest.options['tenant'])[:64]}.verify.json")
    return Path(f"reencode-{dest.options['table']}.verify.json")


def _journal_value(work_dir: Path, key: str) -> Any:
    """A value of an existing journal's ``meta`` table, read without creating or changing anything (None: none)."""
    path = work_dir / JOURNAL
    if not path.is_file():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return None if row is None else json.loads(row[0])


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _remove_work_dir(path: Path) -> None:
    if path.is_dir():
        if not (path / JOURNAL).exists() and any(path.iterdir()):
            raise ConfigError(f"{path} is not a re-encoding work folder (no {JOURNAL}); not removing it")
        shutil.rmtree(path)


class Job:
    """One run; :meth:`run`, :meth:`dry_run` or :meth:`verify_only`."""

    def __init__(self, options: JobOptions) -> None:
        self.o = options
        self.src_loc = parse_location(options.source)
        self.dst_loc = parse_location(options.dest)
        if self.src_loc.text == self.dst_loc.text or (
            self.src_loc.scheme == self.dst_loc.scheme
            and self.src_loc.path == self.dst_loc.path
            and self.src_loc.options.get("table") == self.dst_loc.options.get("table")
            and self.src_loc.options.get("tenant") == self.dst_loc.options.get("tenant")
        ):
            raise ConfigError("source and destination are the same; write to a new one (use --swap to replace)")
        self.work_dir = options.work_dir or default_work_dir(self.dst_loc)
        self.summary_path = options.summary or default_summary_path(self.dst_loc)

    # ------------------------------------------------------------------ protection

    def protection_spec(self) -> ProtectionSpec:
        """What both engines build their protector from (absolute shadow paths: Ray actors load them too).
        advface-id checks its shadows against the encoder; advface, as before, does not load the encoder."""
        shadows = self.o.shadows if self.o.method == "advface-id" else (self.o.shadow,)
        return ProtectionSpec(
            self.o.method,
            tuple(str(Path(p).expanduser().resolve()) for p in shadows),
            self.o.config,
            encoder=self.o.encoder,
            check_encoder=self.o.method == "advface-id",
        )

    def protector(self) -> TemplateProtector:
        """The protector (loads the shadows) on ``--device``, else CUDA when present, else the CPU."""
        import torch

        device = self.o.device or ("cuda" if torch.cuda.is_available() else None)
        return load_protector(self.protection_spec(), device=device)

    def params(self) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one."""
        cfg = asdict(self.o.config)
        cfg.pop("batch_size")  # does not change the output
        out = {
            "source": self.src_loc.text,
            "dest": self.dst_loc.text,
            "chunk_size": self.o.chunk_size,
            "protection": cfg,
            "shadow_sha256": file_sha256(self.o.shadow),
        }
        if self.o.method != "advface":  # (plain AdvFace keeps the keys of earlier journals)
            out |= {
                "method": self.o.method,
                "encoder": self.o.encoder,
                "shadows_sha256": [file_sha256(p) for p in self.o.shadows],
            }
        if "advface" in (self.src_loc.scheme, self.dst_loc.scheme):
            out["store_config"] = str(self.o.store_config.resolve()) if self.o.store_config else None
        return out

    def _uses_store(self) -> bool:
        return "advface" in (self.src_loc.scheme, self.dst_loc.scheme)

    def _open_source(self, loc: Location, dim: int | None = None, untransform: bool = False) -> Source:
        return open_source(loc, store_config=self.o.store_config, dim=dim, untransform=untransform)

    def _open_sink(self, dim: int | None) -> Sink:
        return open_sink(self.dst_loc, overwrite=self.o.overwrite, store_config=self.o.store_config, dim=dim)

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        """Re-encode, write, verify (and swap); returns the verification summary."""
        o = self.o
        if o.swap and self.dst_loc.scheme == "advface":
            raise ConfigError("--swap is not supported with an advface store destination (it is filled in place)")
        protector = self.protector() if self.dst_loc.scheme == "advface" else None
        sink = self._open_sink(protector.dim if protector is not None else None)
        try:
            if sink.streaming:
                # an unfinished run to this destination already started writing it: its subjects are ours
                sink.check_writable(resuming=not o.restart and _journal_value(self.work_dir, "dest_started") is True)
            else:
                sink.check_writable()
            if o.swap and self.src_loc.scheme != self.dst_loc.scheme:
                raise ConfigError("--swap needs source and destination of one kind (and, for tables, one database)")
            if protector is None:
                protector = self.protector()
            return self._run(sink, protector)
        finally:
            sink.close()

    def _run(self, sink: Sink, protector: TemplateProtector) -> dict[str, Any]:
        o = self.o
        with self._open_source(self.src_loc, protector.dim) as source:
            total = source.count()
            if total == 0:
                raise EmbeddingError(f"source {self.src_loc.display()} is empty: nothing to re-encode")
            if o.restart:
                _remove_work_dir(self.work_dir)
            journal = Journal(self.work_dir, self.params())
            try:
                journal.put("chunk_size", o.chunk_size)
                resume = journal.resume()
                if journal.get("id_kind") is None:
                    journal.put("id_kind", source.id_kind)
                if resume.chunks:
                    _log(f"resuming: {resume.rows} of {total} templates already done ({resume.chunks} chunks)")
                if sink.streaming and not journal.get("dest_started"):
                    sink.begin()
                    journal.put("dest_started", True)
                started = time.perf_counter()
                with tqdm(
                    total=total,
                    initial=resume.rows,
                    unit="template",
                    desc=f"reencode ({o.engine})",
                    disable=o.quiet,
                    dynamic_ncols=True,
                    smoothing=0.05,
                ) as bar:

                    def commit(index: int, raw: RawChunk, ids: list[str], protected: Any) -> None:
                        if sink.streaming:  # into the destination (idempotently), no part file
                            sink.write_chunk(ids, protected)
                            part = Path(STORE_PART)
                        else:
                            part = write_part(self.work_dir, index, ids, protected)
                        journal.commit_chunk(index, ids, raw.cursor, part)
                        bar.update(len(ids))

                    self._engine(protector).run(self._chunks(source, resume, protector.dim), commit)
                seconds = time.perf_counter() - started
                done = journal.resume()
                if done.rows != total:
                    _log(f"note: the source counted {total} rows but {done.rows} were read (changed meanwhile?)")
                if sink.streaming:
                    _log(f"protected and stored {done.rows - resume.rows} templates in {seconds:.1f} s")
                    sink.finish()
                else:
                    parts = PartSet(
                        count=done.rows,
                        dim=protector.dim,
                        id_kind=str(journal.get("id_kind")),
                        max_id_chars=journal.max_id_chars(),
                        chunks=journal.parts,
                    )
                    _log(
                        f"protected {done.rows - resume.rows} templates in {seconds:.1f} s; writing "
                        f"{self.dst_loc.display()}"
                    )
                    sink.write(parts)
            finally:
                journal.close()
            summary = self._verify(source, protector.dim)
        summary["reencode"] = {
            "engine": o.engine,
            "chunk_size": o.chunk_size,
            "templates": done.rows,
            "resumed_from": resume.rows,
            "protect_seconds": round(seconds, 3),
            "templates_per_second": round((done.rows - resume.rows) / seconds, 3) if seconds else None,
        }
        if o.swap:
            if summary["passed"]:
                sink.swap_into(self.src_loc)
                summary["swapped"] = True
                _log(f"swapped: {self.src_loc.display()} now holds the protected templates")
            else:
                summary["swapped"] = False
                _log("verification failed: --swap not done; the source is unchanged")
        self._save_summary(summary)
        _remove_work_dir(self.work_dir)
        return summary

    def _engine(self, protector: TemplateProtector) -> Any:
        if self.o.engine == "ray":
            from advface.reencode.engine_ray import RayEngine

            return RayEngine(
                self.protection_spec(),
                protector.dim,
                num_cpus=self.o.num_cpus,
                address=self.o.ray_address,
                device=self.o.device,
            )
        from advface.reencode.engine_local import LocalEngine

        return LocalEngine(protector)

    def _chunks(self, source: Source, resume: Any, dim: int) -> Iterator[tuple[int, RawChunk]]:
        index = resume.chunks
        for raw in source.chunks(self.o.chunk_size, resume.rows, resume.cursor):
            where = f"{self.src_loc.display()} (rows {resume.rows + 1}.., chunk {index})"
            if raw.vectors.ndim == 2 and len(raw.ids) and raw.vectors.shape[1] != dim:
                raise EmbeddingError(
                    f"{self.src_loc.display()}: templates have dimension {raw.vectors.shape[1]} "
                    f"but the shadow model {self.o.shadow} takes {dim} (wrong --encoder/--shadow?)"
                )
            raw.vectors = check_chunk(raw.ids, raw.vectors, dim, where)
            yield index, raw
            index += 1

    # ------------------------------------------------------------------ verify, dry run

    def _verify(self, source: Source, dim: int | None = None) -> dict[str, Any]:
        options = self.o.verify
        with (
            self._open_source(self.dst_loc, dim, untransform=True) as dest,
            tqdm(total=source.count(), unit="template", desc="verify", disable=self.o.quiet, dynamic_ncols=True) as bar,
        ):
            if isinstance(dest, AdvfaceStoreSource) and dest.encrypted:  # ids, and matching through the key service
                summary = dest.verify_against(source, options, progress=bar.update)
                self._print_summary(summary)
                return summary
            if getattr(dest, "norm_equalised", False):  # advface store: only directions come back
                options = replace(options, direction_only=True)
            summary = verify(source, dest, options, progress=bar.update)
        self._print_summary(summary)
        return summary

    def verify_only(self) -> dict[str, Any]:
        """Verify an existing destination against the source; saves and returns the summary."""
        dim = self.protector().dim if self._uses_store() else None
        with self._open_source(self.src_loc, dim) as source:
            summary = self._verify(source, dim)
        self._save_summary(summary)
        return summary

    def dry_run(self, sample: int = 32) -> dict[str, Any]:
        """Time the protection of ``sample`` source templates and estimate the whole run; writes nothing."""
        protector = self.protector()
        sink = self._open_sink(protector.dim)
        try:
            if sink.streaming:
                sink.check_writable(
                    resuming=not self.o.restart and _journal_value(self.work_dir, "dest_started") is True
                )
            else:
                sink.check_writable()
        finally:
            sink.close()
        with self._open_source(self.src_loc, protector.dim) as source:
            total = source.count()
            if total == 0:
                raise EmbeddingError(f"source {self.src_loc.display()} is empty: nothing to re-encode")
            raw = next(iter(source.chunks(min(sample, total))))
        if raw.vectors.shape[1] != protector.dim:
            raise EmbeddingError(
                f"{self.src_loc.display()}: templates have dimension {raw.vectors.shape[1]} "
                f"but the shadow model {self.o.shadow} takes {protector.dim} "
                "(wrong --encoder/--shadow?)"
            )
        vectors = check_chunk(raw.ids, raw.vectors, protector.dim, self.src_loc.display())
        reencode_chunk(raw.ids[:1], vectors[:1], protector)  # warm-up (first call allocates)
        started = time.perf_counter()
        reencode_chunk(raw.ids, vectors, protector)
        seconds = time.perf_counter() - started
        rate = len(raw.ids) / seconds
        workers = (self.o.num_cpus or 1) if self.o.engine == "ray" else 1
        estimate = total / (rate * workers)
        out = {
            "templates": total,
            "sample": len(raw.ids),
            "sample_seconds": round(seconds, 3),
            "templates_per_second_per_worker": round(rate, 3),
            "workers": workers,
            "estimated_seconds": round(estimate, 1),
            "engine": self.o.engine,
        }
        _log(
            f"dry run: {len(raw.ids)} templates in {seconds:.2f} s = {rate:.1f}/s per worker; {total} templates "
            f"with {workers} worker(s) (assuming linear scaling): about {_duration(estimate)}. Nothing written."
        )
        return out

    def _print_summary(self, s: dict[str, Any]) -> None:
        m = s["matching"]
        if s.get("encrypted"):
            match = (
                f"{m['match_fraction']:.4f} of {m['sample']} sampled match their source (the key service decides)"
                if m.get("passed") is not None
                else m.get("note", "not checked")
            )
            _log(
                f"verify (encrypted store): {'PASSED' if s['passed'] else 'FAILED'}: {s['destination_count']}/"
                f"{s['source_count']} templates, {s['missing']} missing, {s['extra']} extra; budget {s['budget']}; "
                f"matching: {match}"
            )
            for failure in s["failures"]:
                _log(f"  - {failure}")
            return
        match = (
            f"{m.get('match_fraction', float('nan')):.4f} of {m['sample']} sampled match their source "
            f"({m['metric']} threshold {m['threshold']})"
            if m.get("passed") is not None
            else m.get("note", "not checked")
        )
        _log(
            f"verify: {'PASSED' if s['passed'] else 'FAILED'}: {s['destination_count']}/{s['source_count']} "
            f"templates, rel-L2 max {s['rel_l2_max']:.5f} (budget {s['options']['rel_l2']}), "
            f"{s['over_budget']} over budget, {s['nonfinite_vectors']} NaN/Inf; matching: {match}"
        )
        for failure in s["failures"]:
            _log(f"  - {failure}")

    def _save_summary(self, summary: dict[str, Any]) -> None:
        self.summary_path.parent.mkdir(parents=True, exist_ok=True)
        self.summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        _log(f"summary saved to {self.summary_path}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
