"""Labeled Faces in the Wild: photos and the official View-2 verification protocol (``pairs.txt``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from advface.datasets.folders import IdentityFolderDataset
from advface.errors import ConfigError
from advface.paths import lfw_dir


@dataclass(frozen=True)
class Pair:
    """One View-2 pair: two photo ids (relative to ``images/``), same person or not, and its fold (0-9)."""

    a: str
    b: str
    same: bool
    fold: int


class LFW(IdentityFolderDataset):
    """LFW at ``root`` (``images/<Person>/<Person>_NNNN.jpg`` + ``pairs.txt``); ``root`` defaults to
    ``$ADVFACE_LFW_DIR``."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.lfw_root = lfw_dir(root)
        super().__init__(self.lfw_root / "images")

    @staticmethod
    def photo_id(name: str, index: int) -> str:
        """Id of photo ``index`` (1-based) of ``name``: ``Name/Name_0001.jpg``."""
        return f"{name}/{name}_{index:04d}.jpg"

    def path(self, photo_id: str) -> Path:
        """Absolute path of a photo id."""
        return self.root / photo_id

    def pairs(self) -> list[Pair]:
        """The 6000 View-2 pairs (10 folds x 300 same + 300 different), validated against the image folder."""
        return read_pairs(self.lfw_root / "pairs.txt", images_root=self.root)


def read_pairs(pairs_file: str | os.PathLike[str], images_root: Path | None = None) -> list[Pair]:
    """Parse an LFW ``pairs.txt``; raise ConfigError on a malformed file or a pair naming a missing photo."""
    lines = [line.split() for line in Path(pairs_file).read_text().splitlines() if line.strip()]
    if not lines or len(lines[0]) != 2:
        raise ConfigError(f"{pairs_file}: first line must be '<folds> <pairs per half>'")
    try:
        n_folds, n_half = int(lines[0][0]), int(lines[0][1])
    except ValueError as exc:
        raise ConfigError(f"{pairs_file}: bad header {lines[0]}") from exc
    body = lines[1:]
    if len(body) != n_folds * 2 * n_half:
        raise ConfigError(f"{pairs_file}: expected {n_folds * 2 * n_half} pairs, found {len(body)}")
    pairs: list[Pair] = []
    for i, fields in enumerate(body):
        fold, within = divmod(i, 2 * n_half)
        try:
            if within < n_half:
                if len(fields) != 3:
                    raise ValueError
                name, i1, i2 = fields
                pair = Pair(LFW.photo_id(name, int(i1)), LFW.photo_id(name, int(i2)), True, fold)
            else:
                if len(fields) != 4:
                    raise ValueError
                n1, i1, n2, i2 = fields
                pair = Pair(LFW.photo_id(n1, int(i1)), LFW.photo_id(n2, int(i2)), False, fold)
        except ValueError as exc:
            raise ConfigError(f"{pairs_file}: malformed line {i + 2}: {' '.join(fields)}") from exc
        if images_root is not None:
            for photo in (pair.a, pair.b):
                if not (images_root / photo).is_file():
                    raise ConfigError(f"{pairs_file}: line {i + 2} names missing photo {photo}")
        pairs.append(pair)
    return pairs
