"""A PyTorch port of dlib's face-recognition ResNet: the same embeddings, batched, on CUDA, with gradients.

The network is built from the layers :mod:`advface.encoders.dlib_format` reads from dlib's own weights file.
dlib's file does not record which tag a skip or add_prev layer refers to (it is part of dlib's C++ type), so the
layer sequence is matched against the two residual units this network uses and anything else is refused:

- identity unit: ``tag, body..., add_prev`` -- ``body(x) + x``;
- down unit: ``tag, body..., tag, tag, shortcut..., add_prev`` -- ``body(x) + shortcut(x)`` (the first marker
  after the body tags its output, the second skips back to the unit's input).

Additions follow dlib's rule for different shapes: the result has the larger size in every dimension and the
smaller operand is zero-padded at the end (extra channels, bottom rows, right columns).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advface.encoders.base import FaceEncoder
from advface.encoders.dlib_format import DlibLayer, DlibNetwork, read_dlib_network
from advface.encoders.dlib_runtime import DLIB_CHIP, DLIB_DISTANCE_THRESHOLD, DLIB_RESNET_FILE
from advface.encoders.registry import register_encoder
from advface.hashing import file_sha256
from advface.paths import dlib_model_file


def default_device() -> str:
    """``"cuda"`` when available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: sum of two N x C x H x W tensors, the smaller zero-padded at the end of each dimension."""
    if a.shape == b.shape:
        return a + b
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"add_prev: batch sizes differ ({a.shape[0]} vs {b.shape[0]})")
    target = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:], strict=True)]

    def pad(t: torch.Tensor) -> torch.Tensor:
        c, h, w = t.shape[1:]
        return F.pad(t, (0, target[2] - w, 0, target[1] - h, 0, target[0] - c))

    return pad(a) + pad(b)


class Affine(nn.Module):
    """Per-channel ``gamma * x + beta`` (dlib's affine layer; batch norm folded in)."""

    def __init__(self, gamma: np.ndarray, beta: np.ndarray) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.tensor(gamma, dtype=torch.float32).view(1, -1, 1, 1))
        self.beta = nn.Parameter(torch.tensor(beta, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma + self.beta


class GlobalAvgPool(nn.Module):
    """Mean over height and width, flattened to N x C (dlib's ``avg_pool_everything``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class Linear(nn.Module):
    """``x @ W`` with dlib's weight layout (num_inputs x num_outputs), no bias."""

    def __init__(self, weight: np.ndarray) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight


class Residual(nn.Module):
    """``add_prev(body(x), shortcut(x))``; the shortcut is the identity when empty."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Sequential) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_prev(self.body(x), self.shortcut(x))


def _simple_module(layer: DlibLayer) -> nn.Module:
    """The torch module of one layer without graph structure (everything but tag and add_prev)."""
    p = layer.params
    if layer.kind == "con":
        weight = p["weight"]
        conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], stride=p["stride"], padding=p["padding"])
        with torch.no_grad():
            assert conv.bias is not None  # nn.Conv2d has a bias by default
            conv.weight.copy_(torch.from_numpy(weight))
            conv.bias.copy_(torch.from_numpy(p["bias"]))
        return conv
    if layer.kind == "affine":
        if p["mode"] != 0:
            raise ValueError(f"affine layer in mode {p['mode']} is not supported (only per-channel mode 0)")
        return Affine(p["gamma"], p["beta"])
    if layer.kind == "relu":
        return nn.ReLU()
    if layer.kind in ("max_pool", "avg_pool"):
        if p["padding"] != (0, 0):
            raise ValueError(f"{layer.kind} with padding {p['padding']} is not supported")
        if p["window"] == (0, 0):
            if layer.kind != "avg_pool":
                raise ValueError("global max pooling is not supported")
            return GlobalAvgPool()
        pool = nn.MaxPool2d if layer.kind == "max_pool" else nn.AvgPool2d
        return pool(p["window"], stride=p["stride"])
    if layer.kind == "fc":
        return Linear(p["weight"])
    raise ValueError(f"layer {layer.kind!r} out of place in the dlib network")


def _build(layers: list[DlibLayer]) -> nn.Sequential:
    """Turn the forward-order layer list into modules, grouping the residual units (see module docs)."""
    modules: list[nn.Module] = []
    i = 0
    while i < len(layers):
        if layers[i].kind != "tag":
            modules.append(_simple_module(layers[i]))
            i += 1
            continue
        # A residual unit starts at this tag: body up to the next tag or add_prev.
        j = i + 1
        while j < len(layers) and layers[j].kind not in ("tag", "add_prev"):
            j += 1
        body = [_simple_module(layer) for layer in layers[i + 1 : j]]
        shortcut: list[nn.Module] = []
        if j + 1 < len(layers) and layers[j].kind == "tag" and layers[j + 1].kind == "tag":
            k = j + 2
            while k < len(layers) and layers[k].kind not in ("tag", "add_prev"):
                k += 1
            shortcut = [_simple_module(layer) for layer in layers[j + 2 : k]]
            j = k
        if j >= len(layers) or layers[j].kind != "add_prev" or not body:
            raise ValueError(f"unsupported arrangement of tag/skip/add_prev layers at layer {i}")
        modules.append(Residual(nn.Sequential(*body), nn.Sequential(*shortcut)))
        i = j + 1
    return nn.Sequential(*modules)


@contextlib.contextmanager
def _cudnn_without_tf32() -> Iterator[None]:
    """Run cuDNN convolutions in full float32 (TF32, on by default for cuDNN, would cost about 1e-3 of accuracy)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet in PyTorch (inference weights; no batch norm, no training state).

    Input: ``N x 3 x 150 x 150`` float RGB in [0, 1]; output: ``N x 128`` descriptors (not normalised), equal to
    ``dlib.face_recognition_model_v1.compute_face_descriptor`` up to float rounding. On CUDA, convolutions run
    without TF32 while ``strict_fp32`` is true (the default) so the numbers stay dlib's.
    """

    strict_fp32: bool = True
    #: Feature maps that image protection disrupts next to the descriptor (its feature-level term): the output of
    #: the third stage (128 x 8 x 8, after the ReLU of its last residual unit). Chosen by measurement among stages
    #: 1-3 (``benchmarks/image_transfer.py``); mid-level features transfer to other encoders better than the
    #: descriptor alone.
    transfer_layers: tuple[str, ...] = ("net.23",)
    means: torch.Tensor  # registered buffer

    def __init__(self, network: DlibNetwork) -> None:
        super().__init__()
        self.input_size = network.input_size
        self.register_buffer("means", torch.tensor(network.input_means, dtype=torch.float32).view(1, 3, 1, 1))
        self.net = _build(network.layers)
        try:
            for path in self.transfer_layers:
                self.get_submodule(path)
        except AttributeError:  # another layout than dlib's published network: no known feature layer
            self.transfer_layers = ()
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Descriptors of RGB chips with values in [0, 1]."""
        return self.forward_pixels(x * 255.0)

    def forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Descriptors of RGB chips with values in [0, 255] (dlib's input: ``(pixel - mean) / 256``)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != self.input_size:
            height, width = self.input_size
            raise ValueError(f"expected N x 3 x {height} x {width} input, got {tuple(pixels.shape)}")
        x = (pixels - self.means) / 256.0
        if pixels.is_cuda and self.strict_fp32:
            with _cudnn_without_tf32():
                return self.net(x)
        return self.net(x)


@functools.lru_cache(maxsize=4)
def _parsed(path: str, size: int, mtime_ns: int) -> DlibNetwork:
    """The parsed file, memoised per (path, size, mtime) so a replaced file is read again."""
    return read_dlib_network(path)


def _weights_path(path: str | os.PathLike[str] | None) -> Path:
    return Path(path) if path else dlib_model_file(DLIB_RESNET_FILE)


def load_dlib_resnet(
    path: str | os.PathLike[str] | None = None, device: str | torch.device | None = None
) -> DlibResNet:
    """A :class:`DlibResNet` from dlib's weights file (default: the shipped one) on ``device`` (default: CUDA if
    available). The parsed file is cached in-process, so repeated loads only rebuild the module."""
    resolved = _weights_path(path).resolve()
    stat = resolved.stat()
    network = _parsed(str(resolved), stat.st_size, stat.st_mtime_ns)
    return DlibResNet(network).to(device or default_device())


class DlibTorchEncoder(FaceEncoder):
    """dlib's 128-d face encoder run by the PyTorch port: batched, on CUDA when available."""

    name = "dlib-torch"
    dim = 128
    metric = "euclidean"
    chip = DLIB_CHIP
    default_threshold = -DLIB_DISTANCE_THRESHOLD

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.weights_path = _weights_path(path)
        self.device = torch.device(device or default_device())
        self.batch_size = batch_size
        self._module = load_dlib_resnet(self.weights_path, self.device)

    @property
    def fingerprint(self) -> str:
        # Same string as DlibEncoder: both compute the same embedding from the same weights.
        return f"dlib-resnet-v1:{file_sha256(self.weights_path)}"

    def _embed(self, chips: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(chips), self.batch_size):
                batch = torch.from_numpy(chips[start : start + self.batch_size]).to(self.device)
                pixels = batch.permute(0, 3, 1, 2).float()
                out.append(self._module.forward_pixels(pixels).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)

    def torch_module(self, device: str | torch.device | None = None) -> DlibResNet:
        """The port itself (shared when ``device`` is this encoder's), input RGB in [0, 1]."""
        if device is None or torch.device(device) == self.device:
            return self._module
        return load_dlib_resnet(self.weights_path, device)


@register_encoder("dlib-torch")
def _make(path: str | None = None, device: str | None = None, batch_size: int = 64) -> DlibTorchEncoder:
    return DlibTorchEncoder(path, device=device, batch_size=batch_size)
