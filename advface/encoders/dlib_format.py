"""Reader for dlib's serialized face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``).

Turns the file into a plain description, :class:`DlibNetwork`: the layers in forward order (input side first),
each a :class:`DlibLayer` with a ``kind`` and its parameters as numpy arrays / Python numbers. Nothing here
depends on dlib or torch. The reader is strict: an unknown layer tag, a malformed value or bytes left over
at the end raise :class:`ValueError`.

Format (dlib's ``serialize``): integers are a control byte (low 4 bits: payload size, 0x80: negative) followed by
the little-endian magnitude; floats are two integers ``m, e`` with value ``m * 2**e`` (``e`` = 32000/32001/32002
for +inf/-inf/NaN); strings are a length then raw bytes; bools one ASCII byte; tensors a version (2), four
dimensions and raw float32 data; alias shapes a version (1) and four dimensions. Layers are nested from the
outermost inwards, each writing its own details after the layers below it.
"""

from __future__ import annotations

import builtins
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_INF_EXP, _NINF_EXP, _NAN_EXP = 32000, 32001, 32002
_MAX_DEPTH = 900  # nesting levels; this network has about 120


@dataclass
class DlibLayer:
    """One computational layer: ``kind`` is one of ``con``, ``affine``, ``relu``, ``max_pool``, ``avg_pool``,
    ``add_prev``, ``fc`` or ``tag`` (dlib's tag and skip layers serialize identically, so both read as ``tag``)."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DlibNetwork:
    """A parsed network: input description, layers in forward order, and the loss layer's settings."""

    input_means: tuple[float, float, float]
    input_size: tuple[int, int]
    layers: list[DlibLayer]
    loss: dict[str, Any]

    def num_parameters(self) -> int:
        """Total number of learned values (filters, biases, affine gammas/betas, fc weights)."""
        return sum(int(v.size) for layer in self.layers for v in layer.params.values() if isinstance(v, np.ndarray))


class _Reader:
    """Cursor over the file's bytes with dlib's primitive decoders."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def fail(self, message: str) -> ValueError:
        return ValueError(f"dlib network file: {message} (at byte {self.pos} of {len(self.data)})")

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"unexpected end of file (wanted {n} more bytes)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        control = self.take(1)[0]
        size = control & 0x0F
        if size > 8 or control & 0x70:
            raise self.fail(f"bad integer control byte 0x{control:02x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        if exponent == _INF_EXP:
            return math.inf
        if exponent == _NINF_EXP:
            return -math.inf
        if exponent == _NAN_EXP:
            return math.nan
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError as exc:
            raise self.fail(f"float {mantissa} * 2^{exponent} out of range") from exc

    def string(self) -> str:
        length = self.int()
        if length < 0:
            raise self.fail(f"negative string length {length}")
        raw = bytes(self.take(length))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise self.fail(f"non-ASCII string {raw[:40]!r}") from exc

    def bool(self) -> bool:
        byte = self.take(1)[0]
        if byte not in (ord("0"), ord("1")):
            raise self.fail(f"bad bool byte 0x{byte:02x}")
        return byte == ord("1")

    def version(self, expected: builtins.int, what: str) -> None:
        got = self.int()
        if got != expected:
            raise self.fail(f"{what}: expected version {expected}, got {got}")

    def dims(self) -> tuple[builtins.int, builtins.int, builtins.int, builtins.int]:
        dims = (self.int(), self.int(), self.int(), self.int())
        if any(d < 0 for d in dims):
            raise self.fail(f"negative tensor dimension in {dims}")
        return dims

    def tensor(self) -> np.ndarray:
        """A version-2 tensor as a float32 array of shape (num_samples, k, nr, nc)."""
        self.version(2, "tensor")
        dims = self.dims()
        count = math.prod(dims)
        raw = self.take(4 * count)
        return np.frombuffer(raw, dtype="<f4", count=count).astype(np.float32).reshape(dims)

    def alias(self) -> tuple[builtins.int, builtins.int, builtins.int, builtins.int]:
        """A shape-only tensor (an alias into a layer's params)."""
        self.version(1, "alias tensor")
        return self.dims()


def _read_con(r: _Reader) -> dict[str, Any]:
    params = r.tensor()
    num_filters = r.int()
    nr, nc, stride_y, stride_x, pad_y, pad_x = (r.int() for _ in range(6))
    filters_shape, bias_shape = r.alias(), r.alias()
    for _ in range(4):  # learning-rate and weight-decay multipliers
        r.float()
    n_in = filters_shape[1]
    expected_filters = (num_filters, n_in, nr, nc)
    if filters_shape != expected_filters or math.prod(bias_shape) != num_filters:
        raise r.fail(f"con_4 shapes disagree: filters {filters_shape}, biases {bias_shape}, {num_filters} filters")
    flat = params.reshape(-1)
    n_weights = math.prod(expected_filters)
    if flat.size != n_weights + num_filters:
        raise r.fail(f"con_4 params hold {flat.size} values, expected {n_weights + num_filters}")
    return {
        "weight": flat[:n_weights].reshape(expected_filters),
        "bias": flat[n_weights:].copy(),
        "stride": (stride_y, stride_x),
        "padding": (pad_y, pad_x),
    }


def _read_affine(r: _Reader) -> dict[str, Any]:
    params = r.tensor().reshape(-1)
    gamma_shape, beta_shape = r.alias(), r.alias()
    mode = r.int()
    n = math.prod(gamma_shape)
    if math.prod(beta_shape) != n or params.size != 2 * n:
        raise r.fail(f"affine_ params hold {params.size} values for shapes {gamma_shape} and {beta_shape}")
    return {"gamma": params[:n].copy(), "beta": params[n:].copy(), "mode": mode}


def _read_pool(r: _Reader) -> dict[str, Any]:
    nr, nc, stride_y, stride_x, pad_y, pad_x = (r.int() for _ in range(6))
    return {"window": (nr, nc), "stride": (stride_y, stride_x), "padding": (pad_y, pad_x)}


def _read_fc(r: _Reader) -> dict[str, Any]:
    num_outputs, num_inputs = r.int(), r.int()
    params = r.tensor().reshape(-1)
    r.alias(), r.alias()  # weights and biases views
    bias_mode = r.int()
    for _ in range(4):
        r.float()
    if bias_mode != 1:  # dlib's FC_NO_BIAS; this reader supports only the bias-free head
        raise r.fail(f"fc_2 with bias mode {bias_mode} is not supported")
    if params.size != num_inputs * num_outputs:
        raise r.fail(f"fc_2 params hold {params.size} values, expected {num_inputs}x{num_outputs}")
    return {"weight": params.reshape(num_inputs, num_outputs)}


_DETAIL_READERS = {
    "con_4": ("con", _read_con),
    "affine_": ("affine", _read_affine),
    "relu_": ("relu", lambda r: {}),
    "max_pool_2": ("max_pool", _read_pool),
    "avg_pool_2": ("avg_pool", _read_pool),
    "add_prev_": ("add_prev", lambda r: {}),
    "fc_2": ("fc", _read_fc),
}


def _read_details(r: _Reader) -> DlibLayer:
    tag = r.string()
    if tag not in _DETAIL_READERS:
        raise r.fail(f"unknown layer tag {tag!r}")
    kind, read = _DETAIL_READERS[tag]
    return DlibLayer(kind, read(r))


def _skip_layer_state(r: _Reader) -> None:
    """The bookkeeping every computational layer writes after its details: three bools and three tensors."""
    for _ in range(3):
        r.bool()
    for _ in range(3):
        r.tensor()


def _read_subnet(r: _Reader, layers: list[DlibLayer], net_input: dict[str, Any], depth: int = 0) -> None:
    """Read one layer and, first, everything below it; append the layers in forward order."""
    if depth > _MAX_DEPTH:
        raise r.fail("layers nested too deeply")
    version = r.int()
    if version == 1:  # tag or skip layer: only the subnet
        _read_subnet(r, layers, net_input, depth + 1)
        layers.append(DlibLayer("tag"))
    elif version == 2:  # ordinary layer: subnet, details, state
        _read_subnet(r, layers, net_input, depth + 1)
        layers.append(_read_details(r))
        _skip_layer_state(r)
    elif version == 3:  # bottom layer: input layer, details, state, sample expansion factor
        name = r.string()
        if name != "input_rgb_image_sized":
            raise r.fail(f"unknown input layer {name!r}")
        net_input["means"] = (r.float(), r.float(), r.float())
        net_input["size"] = (r.int(), r.int())
        layers.append(_read_details(r))
        _skip_layer_state(r)
        r.int()
    else:
        raise r.fail(f"unknown layer version {version}")


def parse_dlib_network(data: bytes) -> DlibNetwork:
    """Parse the bytes of a dlib ``loss_metric`` network file; raises ValueError unless it is read exactly."""
    r = _Reader(data)
    r.version(1, "loss layer")
    loss_name = r.string()
    if loss_name != "loss_metric_2":
        raise r.fail(f"unknown loss layer {loss_name!r}")
    loss = {"name": loss_name, "margin": r.float(), "distance_threshold": r.float()}
    layers: list[DlibLayer] = []
    net_input: dict[str, Any] = {}
    _read_subnet(r, layers, net_input)
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} unread bytes after the network")
    return DlibNetwork(net_input["means"], net_input["size"], layers, loss)


def read_dlib_network(path: str | os.PathLike[str]) -> DlibNetwork:
    """Read and parse a dlib network file (see :func:`parse_dlib_network`)."""
    return parse_dlib_network(Path(path).read_bytes())
