"""Inputs stage: read the dataset and the database under audit (:func:`load_dataset`), then choose the people and
templates audited (:func:`select_victims`). Bad input raises a ConfigError / EmbeddingError; the two steps are
separate so that a report written after a failure of the second still describes the dataset."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from advface.audit import data as audit_data
from advface.audit.config import AuditConfig
from advface.audit.data import TemplateDatabase, Victims
from advface.audit.metrics import attack_thresholds
from advface.audit.results import DatabaseSummary, DatasetSummary, Missing
from advface.datasets.folders import IdentityFolderDataset
from advface.datasets.pairs import FacePairs
from advface.datasets.splits import IdentitySplit
from advface.encoders.base import FaceEncoder
from advface.errors import ConfigError

#: Photos without a face named in the report.
FAILED_EXAMPLES = 10


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Set the environment variable ``name`` to ``value`` (None: leave it) for the duration of the block."""
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


@dataclass
class LoadedDataset:
    """The dataset's (embedding, face) pairs, the database under audit and what the report says about them."""

    encoder: FaceEncoder
    pairs: FacePairs
    db: TemplateDatabase | None
    #: Cache of pairs and trained attackers.
    cache: Path
    summary: DatasetSummary
    notes: list[Missing] = field(default_factory=list)
    #: The (subsampled) dataset the pairs were built from.
    dataset: IdentityFolderDataset | None = None


@dataclass
class AuditInputs:
    """What the later stages work on: the victims, their templates under audit and the decision thresholds."""

    encoder: FaceEncoder
    pairs: FacePairs
    split: IdentitySplit
    victims: Victims
    #: Rows of ``victims.pairs`` audited (those with a template in the database, all without one).
    rows: np.ndarray
    db: TemplateDatabase | None
    #: The database's templates of ``rows`` as stored, and through the store's inverse keyed transform (None
    #: without a database / without a store transform).
    templates_db: np.ndarray | None
    untransformed_db: np.ndarray | None
    #: FMR label -> threshold on the encoder's score.
    thresholds: dict[str, float]
    cache: Path
    summary: DatasetSummary
    notes: list[Missing] = field(default_factory=list)
    #: The (subsampled) dataset the pairs were built from (the transfer judge embeds its photos too).
    dataset: IdentityFolderDataset | None = None

    @property
    def raw(self) -> np.ndarray:
        """Raw embeddings of the audited photos."""
        return self.victims.pairs.embeddings[self.rows]

    @property
    def identities(self) -> np.ndarray:
        """Identities of the audited photos."""
        return self.victims.pairs.identities[self.rows]

    @property
    def store(self) -> Any:
        """The audited store's :class:`advface.audit.store.StoreInfo`, None without a store."""
        return self.db.store if self.db is not None else None


def _open_database(config: AuditConfig, encoder: FaceEncoder) -> TemplateDatabase | None:
    """The templates under audit: ``--templates`` or ``--store``, None with neither."""
    if config.templates is not None:
        return audit_data.load_templates_file(config.templates, encoder.dim)
    if config.store is not None:
        from advface.audit.store import load_templates_store

        return load_templates_store(
            config.store,
            config.tenant,
            encoder.dim,
            encoder.metric,
            config_path=config.store_config,
            encoder_name=config.encoder,
        )
    return None


def load_dataset(config: AuditConfig) -> LoadedDataset:
    """Open the encoder, the (subsampled) dataset and the database under audit; detect, align and embed every
    photo. A photo without a face is a note, not an error."""
    from advface.encoders import create_encoder
    from advface.paths import cache_dir

    c = config
    cache = Path(c.cache_dir) if c.cache_dir else cache_dir()
    encoder = create_encoder("dlib-torch" if c.encoder == "dlib" else c.encoder)  # same embeddings, batched
    dataset = audit_data.open_dataset(c.data)
    dataset = audit_data.subsample(dataset, c.max_identities, c.max_photos, c.seed)
    db = _open_database(c, encoder)
    with _env("ADVFACE_CACHE_DIR", str(cache)):
        faces = audit_data.dataset_faces(
            dataset, encoder, image_size=c.image_size, use_cache=c.pairs_cache, workers=c.workers, progress=c.progress
        )
    failed = list(faces.failed.items())
    summary = DatasetSummary(
        dataset=str(c.data),
        photos=len(dataset),
        identities=len(dataset.identities()),
        photos_with_face=len(faces.pairs.without_flips()),
        photos_failed=len(faces.failed),
        failed_examples=dict(failed[:FAILED_EXAMPLES]),
        encoder=encoder.fingerprint,
    )
    notes = []
    if failed:
        notes.append(
            Missing(
                "data",
                f"{len(failed)} photo(s) gave no face (unreadable or no face found), e.g. "
                + "; ".join(f"{k}: {v}" for k, v in failed[:3]),
            )
        )
    return LoadedDataset(encoder, faces.pairs, db, cache, summary, notes, dataset)


def _split(config: AuditConfig, pairs: FacePairs, db: TemplateDatabase | None) -> IdentitySplit:
    """Identity split; the evaluation group is the database's people when a database is audited."""
    evaluation = None
    if db is not None:
        originals = pairs.without_flips()
        id_of = dict(zip(originals.ids.tolist(), originals.identities.tolist()))
        evaluation = {id_of[i] for i in db.ids if i in id_of}
        if not evaluation:
            raise ConfigError(
                f"{db.source}: no template id is a photo id of the dataset; template ids "
                "must be photo paths relative to the dataset root (e.g. Person/Person_0001.jpg)"
            )
    split = audit_data.make_split(pairs, config.seed, config.eval_fraction, evaluation)
    if config.train_identities and len(split.attacker) > config.train_identities:
        ranked = sorted(split.attacker, key=lambda n: hashlib.sha256(f"{config.seed}:{n}".encode()).hexdigest())
        split = replace(split, attacker=frozenset(ranked[: config.train_identities]))
    return split


def select_victims(config: AuditConfig, loaded: LoadedDataset) -> AuditInputs:
    """Split the identities, choose the victims (evaluation photos), pair them with the database's templates and fix
    the decision thresholds on clean embeddings."""
    c, db = config, loaded.db
    split = _split(c, loaded.pairs, db)
    victims = audit_data.choose_victims(loaded.pairs, split.evaluation, c.per_identity, c.max_victims)
    if len(victims.pairs) == 0:
        raise ConfigError("no evaluation photo: the dataset has too few identities with usable photos")
    database = templates_db = untransformed_db = None
    if db is not None:
        rows, templates_db, unmatched = audit_data.match_templates(db, victims)
        database = DatabaseSummary(
            db.source, len(db.ids), len(rows), unmatched, db.store.describe() if db.store is not None else None
        )
        if db.untransformed is not None:
            index = {photo_id: i for i, photo_id in enumerate(db.ids)}
            untransformed_db = db.untransformed[[index[pid] for pid in victims.pairs.ids[rows].tolist()]]
    else:
        rows = np.arange(len(victims.pairs))
    summary = replace(
        loaded.summary,
        database=database,
        split=split.describe(),
        victims=len(rows),
        single_photo_identities=len(victims.single_photo_identities),
    )
    notes = []
    if victims.single_photo_identities:
        notes.append(
            Missing(
                "type2",
                f"Type II skipped for {len(victims.single_photo_identities)} identities with "
                "a single photo (no other photo to compare with)",
            )
        )
    originals = loaded.pairs.without_flips()
    thresholds = attack_thresholds(originals.embeddings, originals.identities, loaded.encoder.metric, c.seed)
    return AuditInputs(
        loaded.encoder,
        loaded.pairs,
        split,
        victims,
        rows,
        db,
        templates_db,
        untransformed_db,
        thresholds,
        loaded.cache,
        summary,
        notes,
        loaded.dataset,
    )
