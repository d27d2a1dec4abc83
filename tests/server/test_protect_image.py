"""The ProtectImage RPC on a real sidecar: a real LFW photo protected with few steps (PNG, size, budget, identity
similarity drops, determinism), bad inputs and their codes, auth, and the disabled switch."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from sidecar_harness import ServerThread, make_config

from advface.client import AdvFaceClient, AdvFaceRpcError
from advface.images import load_image
from advface.protect.image import ProtectConfig
from server.logs import LOGGER_NAME

ADMIN = "admin-token-0123456789abcdef"
ACME = "acme-token-0123456789abcdef"
TOKENS = {ADMIN: {"tenants": "*", "role": "admin"}, ACME: {"tenants": ["acme"], "role": "client"}}
STEPS = 3
MAX_PIXELS = 300 * 300  # LFW photos are 250 x 250


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("protect_image")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[ServerThread]:
    config = make_config(
        folder,
        auth={"enabled": True, "tokens": TOKENS},
        image_protection={"enabled": True, "steps": 20, "max_steps": 50, "max_pixels": MAX_PIXELS},
    )
    srv = ServerThread(config)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[AdvFaceClient]:
    with server.client(token=ACME) as c:  # a client token limited to one tenant may protect images
        yield c


@pytest.fixture(scope="module")
def photo(lfw_dir: Path) -> bytes:
    person = sorted(p for p in (lfw_dir / "images").iterdir() if p.is_dir())[0]
    return sorted(person.glob("*.jpg"))[0].read_bytes()


def _code(call) -> grpc.StatusCode:  # noqa: ANN001
    with pytest.raises(AdvFaceRpcError) as err:
        call()
    return err.value.code()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_protects_a_real_photo(server: ServerThread, client: AdvFaceClient, photo: bytes, folder: Path) -> None:
    before = _snapshot(folder)
    records = _Records()
    logger = logging.getLogger(LOGGER_NAME)
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    try:
        png, report = client.protect_image(photo, steps=STEPS, seed=7)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert _snapshot(folder) == before  # nothing of the photo (or anything else) written to disk
    access = [r for r in records.records if getattr(r, "fields", {}).get("rpc") == "ProtectImage"]
    assert len(access) == 1 and access[0].fields["code"] == "OK"
    for record in records.records:  # log lines name the call, never its data
        assert set(getattr(record, "fields", {})) <= {
            "rpc",
            "code",
            "latency_ms",
            "items",
            "encoders",
            "notes",
            "seconds",
        }, record.fields

    decoded = Image.open(io.BytesIO(png))
    assert decoded.format == "PNG"
    assert "exif" not in decoded.info
    clean = load_image(photo)
    protected = np.asarray(decoded.convert("RGB"))
    assert protected.shape == clean.shape
    linf = int(np.abs(protected.astype(np.int16) - clean.astype(np.int16)).max())
    assert 0 < linf <= ProtectConfig().levels  # within the default budget
    assert report["linf_levels"] == linf
    assert report["steps"] == STEPS
    assert (report["width"], report["height"]) == (clean.shape[1], clean.shape[0])
    assert report["psnr"] > 30 and 0.9 < report["ssim"] <= 1
    encoders = [s["encoder"] for s in report["similarity"]]
    assert "dlib-torch" in encoders
    models = os.environ.get("ADVFACE_MODELS_DIR")
    if models and (Path(models) / "mobilefacenet_128d.onnx").is_file():
        assert "mobilefacenet" in encoders
    for entry in report["similarity"]:  # protection hides identity far better than random noise of the same budget
        assert entry["cosine_after"] < entry["cosine_random"] - 0.03, entry

    # independent check: the server's own encoder, detecting the face again on each photo
    servicer = server.servicer
    with servicer.service.face_lock:
        embed = lambda img: servicer.service.encoder.embed(servicer.service.chipper.chips(img, "t")[0][1])[0]  # noqa: E731
        z_clean, z_protected = embed(clean), embed(protected)
        noisy = np.clip(clean.astype(np.int16) + np.random.default_rng(0).integers(-8, 9, clean.shape), 0, 255)
        z_noisy = embed(noisy.astype(np.uint8))
    assert _cosine(z_clean, z_protected) < _cosine(z_clean, z_noisy) - 0.02

    again, _ = client.protect_image(photo, steps=STEPS, seed=7)
    assert again == png  # same photo, options and seed -> same PNG


def test_smaller_budget_and_epsilon_fraction(client: AdvFaceClient, photo: bytes) -> None:
    png, report = client.protect_image(photo, epsilon="2/255", steps=1)
    protected = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert int(np.abs(protected.astype(np.int16) - load_image(photo).astype(np.int16)).max()) <= 2
    assert report["linf_levels"] <= 2 and report["epsilon"] == pytest.approx(2 / 255)


def test_bad_inputs(client: AdvFaceClient, photo: bytes) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: client.protect_image(b"")) == invalid
    assert _code(lambda: client.protect_image(b"not an image at all")) == invalid
    assert _code(lambda: client.protect_image(photo[: len(photo) // 3])) == invalid  # truncated JPEG
    assert _code(lambda: client.protect_image(_png(Image.new("RGB", (400, 400), "grey")))) == invalid  # > max_pixels
    assert _code(lambda: client.protect_image(_png(Image.new("RGB", (250, 250), "grey")), steps=1)) == invalid
    tiny = _png(Image.open(io.BytesIO(photo)).resize((60, 60)))
    with pytest.raises(AdvFaceRpcError) as err:
        client.protect_image(tiny, steps=1)
    assert err.value.code() == invalid and "face" in err.value.details()
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    assert _code(lambda: client.protect_image(gif.getvalue())) == invalid  # animated
    for options in (
        {"epsilon": 0.0},
        {"epsilon": 0.5},
        {"epsilon": float("nan")},
        {"epsilon": 0.5 / 255},
        {"steps": 0},
        {"steps": 51},
        {"target_similarity": 1.5},
    ):
        with pytest.raises(AdvFaceRpcError) as err:
            client.protect_image(photo, **options)
        assert err.value.code() == invalid, options


def test_auth(server: ServerThread, photo: bytes) -> None:
    with server.client() as anonymous:
        assert _code(lambda: anonymous.protect_image(photo, steps=1)) == grpc.StatusCode.UNAUTHENTICATED
    with server.client(token="wrong-token-0123456789abcdef") as wrong:
        assert _code(lambda: wrong.protect_image(photo, steps=1)) == grpc.StatusCode.UNAUTHENTICATED
    with server.client(token=ADMIN) as admin:
        png, _ = admin.protect_image(photo, steps=1)
        assert png.startswith(b"\x89PNG")


def test_disabled(start_server, tmp_path: Path, photo: bytes) -> None:  # noqa: ANN001
    srv = start_server(make_config(tmp_path, image_protection={"enabled": False}))
    with srv.client() as c:
        assert _code(lambda: c.protect_image(photo, steps=1)) == grpc.StatusCode.FAILED_PRECONDITION
    assert not srv.servicer.service.image_protection.loaded  # the ensemble is never loaded when disabled


def test_guidance_selection(start_server, tmp_path: Path, photo: bytes) -> None:  # noqa: ANN001
    import torch

    from advface.generative.autoencoder import FaceAutoencoder
    from advface.generative.config import AutoencoderConfig, DenoiserConfig
    from advface.generative.denoiser import LatentDenoiser
    from advface.generative.model import IdentityGenerator, save_generator

    torch.manual_seed(0)
    tiny = IdentityGenerator(
        FaceAutoencoder(AutoencoderConfig(image_size=16, width=8)),
        LatentDenoiser(DenoiserConfig(latent_size=4, cond_dim=128, width=8, multipliers=(1, 2), tokens=2)),
        {"encoder": "dlib", "role": "defender"},
    )
    surrogate = save_generator(tmp_path / "surrogate.pt", tiny)
    srv = start_server(make_config(tmp_path / "a", image_protection={"surrogate": str(surrogate)}))
    with srv.client() as c:
        _, report = c.protect_image(photo, steps=1)
        assert report["guidance"] == ["encoders", "deflection", "antipure"]  # the library's default
        _, report = c.protect_image(photo, steps=1, guidance=["encoders"])
        assert report["guidance"] == ["encoders"]
        assert _code(lambda: c.protect_image(photo, steps=1, guidance=["nope"])) == grpc.StatusCode.INVALID_ARGUMENT
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    srv = start_server(
        make_config(tmp_path / "b", image_protection={"surrogate": str(broken), "guidance": ["encoders", "deflection"]})
    )
    with srv.client() as c:  # the server's default needs the surrogate it cannot load: refused, never downgraded
        assert _code(lambda: c.protect_image(photo, steps=1)) == grpc.StatusCode.FAILED_PRECONDITION
        _, report = c.protect_image(photo, steps=1, guidance=["encoders"])
        assert report["guidance"] == ["encoders"]
