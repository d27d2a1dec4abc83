"""dlib's ResNet face encoder through the dlib runtime (the default encoder; CPU, one chip at a time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from advface.encoders.base import ChipSpec, FaceEncoder
from advface.encoders.registry import register_encoder
from advface.hashing import file_sha256
from advface.paths import dlib_model_file

DLIB_RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
#: dlib's chip: ``dlib.get_face_chip(img, shape5, size=150, padding=0.25)``.
DLIB_CHIP = ChipSpec(kind="dlib", size=150, padding=0.25)
#: dlib's published decision rule: same person when the Euclidean distance is below 0.6.
DLIB_DISTANCE_THRESHOLD = 0.6


class DlibEncoder(FaceEncoder):
    """dlib's 128-d face encoder (LFW 99.38% as published by dlib), run by dlib itself."""

    name = "dlib"
    dim = 128
    metric = "euclidean"
    chip = DLIB_CHIP
    default_threshold = -DLIB_DISTANCE_THRESHOLD

    def __init__(self, path: str | Path | None = None) -> None:
        import dlib

        self.weights_path = Path(path) if path else dlib_model_file(DLIB_RESNET_FILE)
        self._model = dlib.face_recognition_model_v1(str(self.weights_path))

    @property
    def fingerprint(self) -> str:
        return f"dlib-resnet-v1:{file_sha256(self.weights_path)}"

    def _embed(self, chips: np.ndarray) -> np.ndarray:
        vectors = self._model.compute_face_descriptor(list(chips))
        return np.asarray([np.asarray(v) for v in vectors], dtype=np.float32)

    def torch_module(self, device: str | None = None):  # noqa: ANN201 - see FaceEncoder
        """The PyTorch port of the same weights (see :mod:`advface.encoders.dlib_torch`)."""
        from advface.encoders.dlib_torch import load_dlib_resnet

        return load_dlib_resnet(self.weights_path, device=device)


@register_encoder("dlib")
def _make_dlib(path: str | None = None) -> DlibEncoder:
    return DlibEncoder(path)
