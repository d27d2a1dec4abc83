"""ArcFace-style ONNX face encoders (MobileFaceNet, InsightFace recognition packs) run by onnxruntime.

Input chips are ``S x S`` RGB crops aligned on the ArcFace template; pixels are normalised per channel as
``(pixel - mean) / std`` (in 0..255 units) with one of the presets in :data:`NORMALIZATIONS`:

- ``"imagenet"``: pixel/255 then ImageNet mean/std (``mobilefacenet_128d.onnx``);
- ``"arcface"``: ``(pixel - 127.5) / 127.5`` (InsightFace's ``ArcFaceONNX`` convention);
- ``"none"``: raw pixels, for graphs that normalise inside (MXNet exports that begin with ``Sub``/``Mul`` nodes).

Left unset, the preset is chosen from the file: ``mobilefacenet*`` -> imagenet, a graph that starts with
``Sub`` and ``Mul`` -> none, anything else -> arcface.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from advface.encoders.base import ChipSpec, FaceEncoder
from advface.encoders.onnx_torch import onnx_to_torch
from advface.encoders.registry import register_encoder
from advface.errors import ConfigError
from advface.hashing import file_sha256
from advface.paths import model_file

MOBILEFACENET_FILE = "mobilefacenet_128d.onnx"
DEFAULT_CHIP_SIZE = 112

#: Presets: name -> (per-channel mean, per-channel std), in 0..255 pixel units, RGB order.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    "arcface": ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

ChannelOrder = Literal["rgb", "bgr"]


def default_normalization(path: str | os.PathLike[str]) -> str:
    """The preset for a model file: imagenet for ``mobilefacenet*``, none for self-normalising graphs, else arcface."""
    if Path(path).name.lower().startswith("mobilefacenet"):
        return "imagenet"
    try:
        graph = onnx.load(os.fspath(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - unreadable files are reported by onnxruntime with a clearer message
        return "arcface"
    head = {node.op_type for node in graph.node[:8]}
    return "none" if {"Sub", "Mul"} <= head else "arcface"


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build offers it, with CPU as fallback."""
    available = ort.get_available_providers()
    return (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available
        else ["CPUExecutionProvider"]
    )


class NormalizedEncoder(nn.Module):
    """Wraps a converted graph: ``[0, 1]`` RGB input -> ``(pixel - mean) / std`` -> ``N x dim`` embeddings."""

    mean: torch.Tensor  # registered buffers
    std: torch.Tensor

    def __init__(self, core: nn.Module, mean: np.ndarray, std: np.ndarray, channel_order: ChannelOrder = "rgb") -> None:
        super().__init__()
        self.core = core
        self.flip = channel_order == "bgr"
        self.register_buffer("mean", torch.as_tensor(mean / 255.0, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(std / 255.0, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.flip:
            x = x.flip(1)
        out = self.core(x)
        return out.reshape(out.shape[0], -1)


class OnnxEncoder(FaceEncoder):
    """An ONNX face encoder (input ``N x 3 x S x S``, output ``N x dim``, cosine metric) run by onnxruntime."""

    metric = "cosine"

    def __init__(
        self,
        path: str | os.PathLike[str],
        normalization: str | None = None,
        providers: str | Sequence[str] | None = None,
        batch_size: int = 64,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channel_order: ChannelOrder = "rgb",
    ) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ConfigError(f"ONNX model file {self.path} not found")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if channel_order not in ("rgb", "bgr"):
            raise ConfigError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        self.batch_size = int(batch_size)
        self.channel_order: ChannelOrder = channel_order
        self._session = self._open_session(providers)
        self._set_normalization(normalization, mean, std)
        self._read_signature()
        self.name = f"onnx:{self.path.name}"

    # ------------------------------------------------------------------------------------------- setup

    def _open_session(self, providers: str | Sequence[str] | None) -> ort.InferenceSession:
        wanted = [providers] if isinstance(providers, str) else list(providers or default_providers())
        try:
            session = ort.InferenceSession(str(self.path), providers=wanted)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own unrelated exception types
            raise ConfigError(f"{self.path} is not a loadable ONNX model: {exc}") from exc
        #: The execution providers the session actually uses.
        self.providers: list[str] = session.get_providers()
        return session

    def _set_normalization(
        self, normalization: str | None, mean: Sequence[float] | None, std: Sequence[float] | None
    ) -> None:
        if normalization is not None and normalization not in NORMALIZATIONS:
            raise ConfigError(f"unknown normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")
        preset = normalization or default_normalization(self.path)
        base_mean, base_std = NORMALIZATIONS[preset]
        self.mean = self._channels("mean", mean if mean is not None else base_mean)
        self.std = self._channels("std", std if std is not None else base_std)
        if np.any(self.std == 0):
            raise ConfigError("std must be non-zero")
        if mean is None and std is None:
            self.normalization = preset
        else:
            self.normalization = "mean={}/std={}".format(
                ",".join(f"{v:g}" for v in self.mean), ",".join(f"{v:g}" for v in self.std)
            )

    @staticmethod
    def _channels(what: str, values: Sequence[float]) -> np.ndarray:
        arr = np.asarray(values, np.float32).reshape(-1)
        if arr.size == 1:
            arr = np.repeat(arr, 3)
        if arr.size != 3:
            raise ConfigError(f"{what} needs 1 or 3 values, got {list(values)}")
        return arr

    def _read_signature(self) -> None:
        """Check the graph is ``N x 3 x S x S`` -> ``N x ...``; set the chip size, batch mode and ``dim``."""
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1:
            raise ConfigError(f"{self.path}: expected one graph input, found {len(inputs)}")
        inp = inputs[0]
        shape = list(inp.shape)
        if inp.type != "tensor(float)" or len(shape) != 4 or shape[1] != 3:
            raise ConfigError(f"{self.path}: input {inp.name!r} must be float N x 3 x S x S, got {inp.type} {shape}")
        height, width = (d if isinstance(d, int) and d > 0 else None for d in shape[2:])
        if height is not None and width is not None and height != width:
            raise ConfigError(f"{self.path}: input {inp.name!r} must be square, got {height} x {width}")
        size = height or width or DEFAULT_CHIP_SIZE
        self.chip = ChipSpec(kind="arcface", size=size)
        self.input_name = inp.name
        #: The graph's fixed batch, or None when the batch is dynamic.
        self.fixed_batch: int | None = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        out_shape = list(outputs[0].shape)
        if len(out_shape) >= 2 and all(isinstance(d, int) and d > 0 for d in out_shape[1:]):
            self.dim = math.prod(out_shape[1:])
        else:  # dimension not declared: run one blank chip
            self.dim = self._run(np.zeros((1, size, size, 3), np.uint8)).shape[1]

    # ------------------------------------------------------------------------------------------- use

    @property
    def fingerprint(self) -> str:
        order = "" if self.channel_order == "rgb" else f":{self.channel_order}"
        return f"onnx:{file_sha256(self.path)}:{self.normalization}{order}"

    def preprocess(self, chips: np.ndarray) -> np.ndarray:
        """``N x S x S x 3`` RGB uint8 -> the graph's ``N x 3 x S x S`` float32 input."""
        x = (chips.astype(np.float32) - self.mean) / self.std
        if self.channel_order == "bgr":
            x = x[..., ::-1]
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def _run(self, chips: np.ndarray) -> np.ndarray:
        """Run the graph on a batch it accepts (any size if dynamic, ``fixed_batch`` otherwise, zero-padded)."""
        x = self.preprocess(chips)
        n = len(x)
        if self.fixed_batch is not None and n < self.fixed_batch:
            x = np.concatenate([x, np.zeros((self.fixed_batch - n, *x.shape[1:]), np.float32)])
        out = self._session.run(None, {self.input_name: x})[0]
        return np.asarray(out, np.float32).reshape(len(x), -1)[:n]

    def _embed(self, chips: np.ndarray) -> np.ndarray:
        step = self.fixed_batch or self.batch_size
        return np.concatenate([self._run(chips[i : i + step]) for i in range(0, len(chips), step)])

    def torch_module(self, device: str | None = None) -> NormalizedEncoder:
        """The graph converted to PyTorch (:func:`~advface.encoders.onnx_torch.onnx_to_torch`), any batch size.

        Input ``N x 3 x S x S`` float RGB in [0, 1]; normalisation happens inside. Weights are frozen
        (``requires_grad=False``) and the module is in eval mode; gradients flow to the input.
        """
        core = onnx_to_torch(self.path)
        module = NormalizedEncoder(core, self.mean, self.std, self.channel_order).eval()
        module.requires_grad_(False)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return module.to(device)


register_encoder("onnx")(OnnxEncoder)


@register_encoder("mobilefacenet")
def _make_mobilefacenet(
    models_dir: str | None = None, providers: str | Sequence[str] | None = None, batch_size: int = 64
) -> OnnxEncoder:
    return OnnxEncoder(model_file(MOBILEFACENET_FILE, models_dir), "imagenet", providers, batch_size)
