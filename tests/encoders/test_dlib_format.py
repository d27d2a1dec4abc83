"""The reader of dlib's serialized face-recognition ResNet, on the real weights file and on broken copies."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from advface.encoders.dlib_format import DlibNetwork, parse_dlib_network, read_dlib_network
from advface.encoders.dlib_runtime import DLIB_RESNET_FILE
from advface.paths import dlib_model_file


@pytest.fixture(scope="module")
def raw() -> bytes:
    return dlib_model_file(DLIB_RESNET_FILE).read_bytes()


@pytest.fixture(scope="module")
def network(raw: bytes) -> DlibNetwork:
    return parse_dlib_network(raw)


def _int(value: int) -> bytes:
    """dlib's integer encoding (test helper)."""
    magnitude = abs(value)
    payload = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(payload) | (0x80 if value < 0 else 0)]) + payload


def test_reads_the_whole_file(raw: bytes) -> None:
    net = read_dlib_network(dlib_model_file(DLIB_RESNET_FILE))
    assert len(raw) == 22_466_066
    assert net.num_parameters() == 5_614_592  # all learned values; 4 bytes each make up nearly all of the file
    assert net.num_parameters() * 4 < len(raw) < net.num_parameters() * 4 + 20_000


def test_network_structure(network: DlibNetwork) -> None:
    assert network.input_size == (150, 150)
    np.testing.assert_allclose(network.input_means, (122.782, 117.001, 104.298), atol=1e-4)
    assert network.loss["name"] == "loss_metric_2"
    assert network.loss["margin"] == pytest.approx(0.04)
    assert network.loss["distance_threshold"] == pytest.approx(0.6)

    kinds = Counter(layer.kind for layer in network.layers)
    assert kinds == {
        "con": 29,
        "affine": 29,
        "relu": 29,
        "tag": 22,
        "add_prev": 14,
        "avg_pool": 5,
        "max_pool": 1,
        "fc": 1,
    }
    convs = [layer.params for layer in network.layers if layer.kind == "con"]
    stem = convs[0]
    assert stem["weight"].shape == (32, 3, 7, 7) and stem["stride"] == (2, 2) and stem["padding"] == (0, 0)
    assert [c["weight"].shape[0] for c in convs].count(256) == 8
    down = [c for c in convs if c["stride"] == (2, 2)][1:]
    assert [c["weight"].shape[:2] for c in down] == [(64, 32), (128, 64), (256, 128), (256, 256)]
    assert all(c["padding"] == (0, 0) for c in down)
    assert all(c["padding"] == (1, 1) for c in convs if c["stride"] == (1, 1))

    head_pool, fc = network.layers[-2:]
    assert head_pool.kind == "avg_pool" and head_pool.params["window"] == (0, 0)
    assert fc.kind == "fc" and fc.params["weight"].shape == (256, 128)
    for layer in network.layers:
        for value in layer.params.values():
            if isinstance(value, np.ndarray):
                assert value.dtype == np.float32 and np.isfinite(value).all()


def test_truncated_or_padded_file_raises(raw: bytes) -> None:
    for broken in (raw[:-1], raw[: len(raw) // 2], raw[:40], b"", raw + b"\x00"):
        with pytest.raises(ValueError, match="dlib network file"):
            parse_dlib_network(broken)


def test_unknown_layer_tag_raises(raw: bytes) -> None:
    broken = raw.replace(b"relu_", b"rulu_", 1)
    with pytest.raises(ValueError, match="unknown layer tag 'rulu_'"):
        parse_dlib_network(broken)


def test_corrupted_header_raises(raw: bytes) -> None:
    with pytest.raises(ValueError, match="unknown loss layer"):
        parse_dlib_network(raw.replace(b"loss_metric_2", b"loss_metric_9", 1))
    with pytest.raises(ValueError, match="version"):
        parse_dlib_network(b"\x01\x07" + raw[2:])


def test_primitive_encodings() -> None:
    from advface.encoders.dlib_format import _Reader

    r = _Reader(_int(5) + _int(-300) + _int(2**40) + _int(0))
    assert [r.int(), r.int(), r.int(), r.int()] == [5, -300, 2**40, 0]
    assert r.pos == len(r.data)

    floats = [(3, -2), (-5, 1), (1, 32000), (1, 32001), (1, 32002)]
    r = _Reader(b"".join(_int(m) + _int(e) for m, e in floats))
    values = [r.float() for _ in floats]
    assert values[:4] == [0.75, -10.0, math.inf, -math.inf] and math.isnan(values[4])

    r = _Reader(_int(3) + b"abc" + b"10")
    assert (r.string(), r.bool(), r.bool()) == ("abc", True, False)

    data = np.arange(6, dtype="<f4")
    r = _Reader(_int(2) + b"".join(_int(d) for d in (1, 2, 3, 1)) + data.tobytes() + _int(1) + _int(4) * 4)
    np.testing.assert_array_equal(r.tensor(), data.reshape(1, 2, 3, 1))
    assert r.alias() == (4, 4, 4, 4)

    with pytest.raises(ValueError, match="control byte"):
        _Reader(b"\x09" + bytes(9)).int()
    with pytest.raises(ValueError, match="bool"):
        _Reader(b"x").bool()
