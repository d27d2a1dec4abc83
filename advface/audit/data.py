"""Inputs of an audit: the face dataset (identity folders, optionally subsampled), its (embedding, face) pairs, the
identity-disjoint split, the victims (evaluation photos with another photo of the same person when there is one)
and the template database under audit (an embeddings file with ids here; a template store is read by
:mod:`advface.audit.store`, the way the sidecar opens it).

Template ids of a database must be the dataset's photo ids (the path relative to the dataset root, e.g.
``Aaron_Peirsol/Aaron_Peirsol_0001.jpg``) so that each template can be paired with the photo it came from.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from advface.datasets.folders import IdentityFolderDataset
from advface.datasets.pairs import FacePairs, build_face_pairs
from advface.datasets.splits import IdentitySplit, split_identities
from advface.encoders.base import FaceEncoder
from advface.errors import AdvfaceError, ConfigError, EmbeddingError


def open_dataset(path: str | Path) -> IdentityFolderDataset:
    """Identity folders at ``path``; an LFW root (``images/`` + ``pairs.txt``) is read from its ``images/``."""
    root = Path(path).expanduser()
    if (root / "images").is_dir() and (root / "pairs.txt").is_file():
        root = root / "images"
    return IdentityFolderDataset(root)


def _rank(names: list[str], seed: int) -> list[str]:
    return sorted(names, key=lambda n: hashlib.sha256(f"audit:{seed}:{n}".encode()).hexdigest())


def subsample(
    dataset: IdentityFolderDataset, max_identities: int, max_photos: int, seed: int = 0
) -> IdentityFolderDataset:
    """At most ``max_identities`` identities (about 60% of them with two or more photos when the dataset has
    enough, so that Type II and unlinkability have people to work with) and ``max_photos`` photos each; 0: all."""
    groups = dataset.by_identity()
    if max_identities and len(groups) > max_identities:
        multi = _rank([n for n, items in groups.items() if len(items) >= 2], seed)
        single = _rank([n for n, items in groups.items() if len(items) < 2], seed)
        n_multi = min(len(multi), max(round(0.6 * max_identities), max_identities - len(single)))
        chosen = set(multi[:n_multi] + single[: max_identities - n_multi])
    else:
        chosen = set(groups)
    items = [it for name in sorted(chosen) for it in (groups[name][:max_photos] if max_photos else groups[name])]
    subset = copy.copy(dataset)
    subset.items = items
    return subset


@dataclass
class DatasetFaces:
    """Pairs of the dataset (with mirrored copies) and the photos that gave no face chip (id -> reason)."""

    pairs: FacePairs
    failed: dict[str, str] = field(default_factory=dict)


def _failure_reason(path: Path) -> str:
    from advface.images import load_image

    try:
        load_image(path)
    except AdvfaceError as exc:
        return f"unreadable image: {getattr(exc, 'reason', exc)}"
    except Exception as exc:  # noqa: BLE001 - any decoder failure means unreadable
        return f"unreadable image: {exc}"
    return "no face found"


def dataset_faces(
    dataset: IdentityFolderDataset,
    encoder: FaceEncoder,
    *,
    image_size: int,
    use_cache: bool,
    workers: int = 1,
    progress: bool = True,
) -> DatasetFaces:
    """Detect, align and embed every photo (cached pairs when ``use_cache``); ConfigError when no photo is usable."""
    try:
        pairs = build_face_pairs(
            dataset, encoder, image_size=image_size, use_cache=use_cache, workers=workers, progress=progress
        )
    except ValueError as exc:  # np.stack of nothing: no photo gave a face
        if "at least one array" not in str(exc):
            raise
        raise ConfigError(
            f"no usable face in the {len(dataset)} photos under {dataset.root} (unreadable images or no face found)"
        ) from exc
    found = set(pairs.ids[~pairs.flipped].tolist())
    failed = {item.id: _failure_reason(item.path) for item in dataset if item.id not in found}
    return DatasetFaces(pairs, failed)


def make_split(pairs: FacePairs, seed: int, eval_fraction: float, evaluation: set[str] | None = None) -> IdentitySplit:
    """Identity-disjoint defender / attacker / evaluation groups (:func:`advface.datasets.splits.split_identities`);
    with ``evaluation`` (the people of an audited database) those form the evaluation group and the other
    identities are dealt alternately to defender and attacker in hash order."""
    names = pairs.identities[~pairs.flipped].tolist()
    if evaluation is None:
        split = split_identities(names, seed=seed, eval_fraction=eval_fraction)
    else:
        rest = _rank(sorted(set(names) - evaluation), seed)
        split = IdentitySplit(frozenset(rest[0::2]), frozenset(rest[1::2]), frozenset(evaluation), seed)
    if not split.attacker:
        if evaluation is not None:
            raise ConfigError(
                "the attacker group is empty: every identity of the dataset has a template in the "
                "audited database, and attackers must train on people outside it (use a dataset with "
                "more people than the database, or audit a part of the database)"
            )
        raise ConfigError("too few identities: the attacker group is empty (use a dataset with more people)")
    return split


@dataclass
class Victims:
    """Evaluation photos: their pairs rows (no mirrored copies), the index of another photo of the same person
    (-1 when the person has a single photo: Type II impossible) and the identities without a second photo."""

    pairs: FacePairs
    other: np.ndarray
    single_photo_identities: list[str]

    @property
    def has_other(self) -> np.ndarray:
        """Rows whose person has another photo."""
        return self.other >= 0


def choose_victims(
    pairs: FacePairs, identities: frozenset[str] | set[str], per_identity: int, max_victims: int = 0
) -> Victims:
    """Up to ``per_identity`` photos of each identity (sorted), at most ``max_victims`` in all (0: no cap); each
    paired with the next photo of the same person among those chosen (like ``benchmarks/advface_lfw.py``), except
    that identities with one photo are kept (Type I only) and counted."""
    originals = pairs.without_flips().of_identities(identities)
    keep: list[int] = []
    singles: list[str] = []
    for name in sorted(identities):
        rows = np.flatnonzero(originals.identities == name)
        if len(rows) == 1:
            singles.append(name)
        keep.extend(rows[: max(per_identity, 1)].tolist())
        if max_victims and len(keep) >= max_victims:
            keep = keep[:max_victims]
            break
    subset = originals.subset(np.asarray(keep, dtype=int))
    other = np.full(len(subset), -1, dtype=int)
    for i, name in enumerate(subset.identities):
        rows = np.flatnonzero(subset.identities == name)
        if len(rows) >= 2:
            other[i] = rows[(np.searchsorted(rows, i) + 1) % len(rows)]
    singles = sorted(set(singles) & set(subset.identities.tolist()))
    return Victims(subset, other, singles)


@dataclass
class TemplateDatabase:
    """Templates under audit: ids (dataset photo ids) and vectors, where they came from."""

    ids: list[str]
    vectors: np.ndarray
    source: str
    #: Read from a template store (:mod:`advface.audit.store`): how it was opened and its layers; None for a file.
    store: Any = None
    #: Store with a keyed transform: the stored vectors through the tenant's inverse transform (what a thief holding
    #: the transform key, or the sidecar's memory, sees); None otherwise.
    untransformed: np.ndarray | None = None


def check_db(ids: list[str], vectors: np.ndarray, dim: int, source: str) -> TemplateDatabase:
    """A :class:`TemplateDatabase` of ``ids`` and ``vectors``; EmbeddingError when empty, of another dimension than
    the encoder's ``dim`` or not finite."""
    vectors = np.asarray(vectors)
    if len(ids) == 0:
        raise EmbeddingError(f"{source}: the template database is empty")
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise EmbeddingError(
            f"{source}: templates have dimension {vectors.shape[-1] if vectors.ndim else '?'} "
            f"but the encoder produces {dim}-d embeddings (wrong encoder or database?)"
        )
    if not np.all(np.isfinite(vectors)):
        raise EmbeddingError(f"{source}: templates contain NaN or Inf")
    return TemplateDatabase(list(ids), vectors.astype(np.float32), source)


def load_templates_file(path: str | Path, dim: int) -> TemplateDatabase:
    """Templates from an embeddings file (``advface.embeddings_file``)."""
    from advface.embeddings_file import load_embeddings

    data = load_embeddings(path)
    return check_db(data.ids, data.embeddings, dim, str(path))


def match_templates(db: TemplateDatabase, victims: Victims) -> tuple[np.ndarray, np.ndarray, int]:
    """``(victim rows with a template, their templates, templates matching no victim photo)``."""
    index = {photo_id: i for i, photo_id in enumerate(db.ids)}
    rows = np.array([i for i, pid in enumerate(victims.pairs.ids.tolist()) if pid in index], dtype=int)
    if len(rows) == 0:
        raise ConfigError(
            f"{db.source}: no template id is the id of an evaluation photo of the dataset; template "
            "ids must be photo paths relative to the dataset root (e.g. Person/Person_0001.jpg)"
        )
    vectors = db.vectors[[index[pid] for pid in victims.pairs.ids[rows].tolist()]]
    return rows, vectors, len(db.ids) - len(rows)
