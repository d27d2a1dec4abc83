"""Face datasets (identity folders, LFW) and the on-disk embedding cache."""

from advface.datasets.folders import IdentityFolderDataset, LabeledImage
from advface.datasets.lfw import LFW, Pair, read_pairs

__all__ = ["IdentityFolderDataset", "LFW", "LabeledImage", "Pair", "read_pairs"]
