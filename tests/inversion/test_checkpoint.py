"""Decoder checkpoints: round trip, file format, errors, encoder compatibility."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
import torch

from advface.errors import ConfigError
from advface.inversion import (
    FORMAT_TAG,
    FORMAT_VERSION,
    InversionDecoder,
    build_decoder,
    check_compatible,
    load_decoder,
    save_decoder,
)

ARCHS = ["deconv", "resup", "pixelshuffle"]
SMALL = {"width": 0.25, "hidden": 64}
META = {
    "encoder": "dlib",
    "encoder_fingerprint": "dlib:abc123",
    "training_data": "lfw",
    "split": {"train": "people A-M", "test": "people N-Z"},
    "metrics": {"l1": 0.123, "ssim": 0.5},
    "seed": 7,
    "loss": "l1",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trained(arch: str, dim: int = 128, size: int = 32, **kwargs) -> InversionDecoder:
    """A small decoder after one training step (non-trivial BatchNorm statistics)."""
    torch.manual_seed(0)
    model = build_decoder(arch, dim, size, **{**SMALL, **kwargs}).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = (model(torch.randn(4, dim)) - torch.rand(4, 3, size, size)).abs().mean()
    loss.backward()
    optimiser.step()
    return model.eval()


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "shadow.pt"
    save_decoder(path, _trained("deconv"), META)
    return path


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip(tmp_path: Path, arch: str) -> None:
    model = _trained(arch, dim=64, size=40, norm="group" if arch == "deconv" else "batch")
    path = save_decoder(tmp_path / "sub" / f"{arch}.pt", model, META)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind

    loaded, meta = load_decoder(path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config() == model.config()
    z = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(loaded(z), model(z))
    for key, value in META.items():
        assert meta[key] == value
    assert (meta["arch"], meta["embedding_dim"], meta["image_size"]) == (arch, 64, 40)
    assert dt.datetime.fromisoformat(meta["created"]).tzinfo is not None
    assert loaded.metadata == meta and model.metadata == meta


def test_file_format(saved: Path) -> None:
    payload = torch.load(saved, weights_only=True)
    assert payload["format"] == FORMAT_TAG == "advface-inversion"
    assert payload["version"] == FORMAT_VERSION == 1
    assert (payload["arch"], payload["dim"], payload["image_size"]) == ("deconv", 128, 32)
    assert payload["kwargs"] == {"width": 0.25, "hidden": 64, "norm": "batch", "refine": 0}
    assert all(t.device.type == "cpu" for t in payload["state_dict"].values())
    assert payload["metadata"]["encoder_fingerprint"] == "dlib:abc123"


def test_created_kept_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_decoder(path, _trained("resup"), {"created": "2020-01-01T00:00:00+00:00"})
    save_decoder(path, _trained("resup"), {"created": "2021-01-01T00:00:00+00:00", "seed": 1})
    model, meta = load_decoder(path, device="cpu")
    assert meta["created"] == "2021-01-01T00:00:00+00:00" and meta["seed"] == 1
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_bad_metadata(tmp_path: Path) -> None:
    model = _trained("deconv")
    with pytest.raises(ConfigError, match="JSON"):
        save_decoder(tmp_path / "a.pt", model, {"blob": object()})
    save_decoder(tmp_path / "np.pt", model, {"metrics": {"l1": np.float32(0.25)}, "ids": np.arange(3), "p": tmp_path})
    meta = load_decoder(tmp_path / "np.pt")[1]
    assert meta["metrics"] == {"l1": 0.25} and meta["ids"] == [0, 1, 2] and meta["p"] == str(tmp_path)
    (tmp_path / "np.pt").unlink()
    with pytest.raises(ConfigError, match="embedding_dim"):
        save_decoder(tmp_path / "b.pt", model, {"embedding_dim": 512})
    with pytest.raises(ConfigError, match="dim"):
        save_decoder(tmp_path / "b.pt", model, {"dim": 512})
    with pytest.raises(ConfigError):
        save_decoder(tmp_path / "c.pt", torch.nn.Linear(2, 2), {})  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_decoder(tmp_path / "absent.pt")
    with pytest.raises(ConfigError, match="not a file"):
        load_decoder(tmp_path)


@pytest.mark.parametrize("keep", [0, 10, 0.5, 0.99])
def test_truncated_file(saved: Path, keep: float) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(ConfigError, match="corrupt"):
        load_decoder(saved)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint\n" * 100)
    with pytest.raises(ConfigError, match="corrupt"):
        load_decoder(path)


def test_unsafe_pickle_refused(tmp_path: Path) -> None:
    """Arbitrary objects are refused (weights_only loading), not executed."""
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT_TAG, "version": 1, "payload": dt.timedelta(days=1)}, path)
    with pytest.raises(ConfigError, match="corrupt"):
        load_decoder(path)


def _rewrite(path: Path, **changes) -> None:
    payload = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is ...:
            del payload[key]
        else:
            payload[key] = value
    torch.save(payload, path)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"format": "something-else"}, "not an advface inversion"),
        ({"format": ...}, "not an advface inversion"),
        ({"version": 2}, "version"),
        ({"state_dict": ...}, "lacks state_dict"),
        ({"arch": "unet"}, "unknown inversion decoder architecture"),
        ({"kwargs": {"width": 0.25, "hidden": 64, "colour": 1}}, "cannot rebuild"),
        ({"dim": 512}, "do not match"),
        ({"image_size": 64}, "do not match"),
        ({"kwargs": {"width": 0.5, "hidden": 64}}, "do not match"),
        ({"metadata": ["not", "a", "dict"]}, "must be dicts"),
    ],
)
def test_wrong_contents(saved: Path, changes: dict, match: str) -> None:
    _rewrite(saved, **changes)
    with pytest.raises(ConfigError, match=match):
        load_decoder(saved)


def test_state_dict_missing_and_extra_keys(saved: Path) -> None:
    payload = torch.load(saved, weights_only=True)
    state = payload["state_dict"]
    name = next(iter(state))
    _rewrite(saved, state_dict={k: v for k, v in state.items() if k != name})
    with pytest.raises(ConfigError, match="do not match"):
        load_decoder(saved)
    _rewrite(saved, state_dict={**state, "extra.weight": torch.zeros(3)})
    with pytest.raises(ConfigError, match="do not match"):
        load_decoder(saved)


def test_plain_state_dict_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(_trained("deconv").state_dict(), path)
    with pytest.raises(ConfigError, match="not an advface inversion"):
        load_decoder(path)


def test_check_compatible(saved: Path) -> None:
    model, meta = load_decoder(saved)
    for target in (model, meta):
        check_compatible(target, "dlib:abc123", 128)
        check_compatible(target, None, 128)  # fingerprint unknown on the encoder side
        with pytest.raises(ConfigError, match="fingerprint"):
            check_compatible(target, "dlib:other", 128)
        with pytest.raises(ConfigError, match="512"):
            check_compatible(target, "dlib:abc123", 512)
    # fingerprint unknown on the decoder side: only the dimension is checked
    check_compatible({"embedding_dim": 128}, "anything", 128)
    with pytest.raises(ConfigError):
        check_compatible({"embedding_dim": 128}, "anything", 64)
    fresh = build_decoder("resup", 64, 32, **SMALL)  # never saved: no metadata
    check_compatible(fresh, "x", 64)
    with pytest.raises(ConfigError):
        check_compatible(fresh, "x", 128)
    with pytest.raises(ConfigError):
        check_compatible("metadata.json", "x", 128)  # type: ignore[arg-type]
