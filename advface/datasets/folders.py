"""Identity-folder datasets: ``root/<identity>/<image>``, the layout of LFW, VGGFace2, CASIA-WebFace, ..."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from advface.errors import ConfigError
from advface.images import IMAGE_SUFFIXES


@dataclass(frozen=True)
class LabeledImage:
    """One photo of a dataset: its path, its id (path relative to the root) and its identity."""

    path: Path
    id: str
    identity: str


class IdentityFolderDataset:
    """Photos grouped in one sub-folder per identity; identities and photos in sorted order."""

    def __init__(self, root: str | os.PathLike[str], *, min_images: int = 1) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"dataset folder {self.root} not found")
        items: list[LabeledImage] = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if len(photos) >= min_images:
                items.extend(LabeledImage(p, p.relative_to(self.root).as_posix(), folder.name) for p in photos)
        if not items:
            raise ConfigError(f"no images found in identity folders under {self.root}")
        self.items: list[LabeledImage] = items

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):  # noqa: ANN204
        return iter(self.items)

    def identities(self) -> list[str]:
        """Sorted distinct identities."""
        return sorted({item.identity for item in self.items})

    def by_identity(self) -> dict[str, list[LabeledImage]]:
        """Photos grouped by identity."""
        groups: dict[str, list[LabeledImage]] = {}
        for item in self.items:
            groups.setdefault(item.identity, []).append(item)
        return groups
