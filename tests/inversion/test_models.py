"""Inversion decoders: shapes, range, determinism, gradients to the embedding, learning, sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from advface.errors import ConfigError, EmbeddingError
from advface.inversion import DECODERS, InversionDecoder, available_decoders, build_decoder, plan_geometry

ARCHS = ["deconv", "resup", "pixelshuffle", "tokens", "modconv"]
SMALL = {"width": 0.25, "hidden": 64}  # same code paths, a fraction of the compute


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is as fast, and avoids OpenMP spinning when the machine's cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_registry() -> None:
    assert available_decoders() == sorted(ARCHS)
    for arch in ARCHS:
        model = build_decoder(arch, 16, 32, **SMALL)
        assert isinstance(model, InversionDecoder)
        assert isinstance(model, DECODERS[arch])
        assert (model.arch, model.dim, model.image_size) == (arch, 16, 32)


@pytest.mark.parametrize(
    "arch, dim, size, kwargs",
    [
        ("nope", 128, 64, {}),
        ("deconv", 0, 64, {}),
        ("deconv", 128, 8, {}),
        ("deconv", 128, 1024, {}),
        ("deconv", 128, 64.0, {}),
        ("deconv", 128, 64, {"colour": True}),
        ("deconv", 128, 64, {"norm": "layer"}),
        ("deconv", 128, 64, {"refine": -1}),
        ("resup", 128, 64, {"upsample": "cubic"}),
        ("resup", 128, 64, {"width": 0}),
        ("pixelshuffle", 128, 64, {"hidden": -3}),
    ],
)
def test_bad_arguments(arch: str, dim: int, size: int, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        build_decoder(arch, dim, size, **kwargs)


@pytest.mark.parametrize("size", [32, 64, 112, 120, 256])
def test_geometry(size: int) -> None:
    base, k = plan_geometry(size)
    assert 4 <= base < 8 + 1
    assert base * 2**k >= size
    assert base * 2 ** (k - 1) < size


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [32, 64, 112])
def test_shape_range_and_eval_determinism(arch: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_decoder(arch, 128, size).eval()
    z = torch.randn(3, 128) * 1.5
    with torch.no_grad():
        a = model(z)
        b = model(z)
        single = model(z[1:2])
    assert a.shape == (3, 3, size, size)
    assert a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    # eval mode: a sample's output does not depend on the rest of the batch
    torch.testing.assert_close(single[0], a[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [16, 40, 120])
def test_other_sizes(arch: str, size: int) -> None:
    model = build_decoder(arch, 512, size, **SMALL).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 512))
    assert out.shape == (2, 3, size, size)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_input_is_normalised(arch: str) -> None:
    """Only the direction of an embedding matters: raw scale (dlib ~1, ArcFace ~20) gives the same image."""
    torch.manual_seed(0)
    model = build_decoder(arch, 128, 32, **SMALL).eval()
    z = torch.randn(4, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(z), model(z * 25.0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(z), model(z * 0.05), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(z), model(z.double()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradient_reaches_embedding(arch: str, mode: str) -> None:
    """AdvFace needs d loss / d z through the (frozen) shadow model."""
    torch.manual_seed(0)
    model = build_decoder(arch, 128, 32, **SMALL).train(mode == "train")
    for p in model.parameters():
        p.requires_grad_(False)
    z = (torch.randn(4, 128) * 1.5).requires_grad_(True)
    target = torch.rand(4, 3, 32, 32)
    (model(z) - target).abs().sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert (z.grad.norm(dim=1) > 0).all()
    # scale invariance: the gradient is orthogonal to z
    cos = F.cosine_similarity(z.grad, z.detach(), dim=1)
    assert cos.abs().max() < 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_rejects_bad_input(arch: str) -> None:
    model = build_decoder(arch, 128, 32, **SMALL)
    for bad in (torch.randn(2, 64), torch.randn(128), torch.randn(2, 128, 1), torch.ones(2, 128, dtype=torch.long)):
        with pytest.raises(EmbeddingError):
            model(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_learns_tiny_dataset(arch: str) -> None:
    """A few Adam steps fit 8 (embedding, image) pairs better than the best constant image could."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n, size = 8, 32
    z = torch.randn(n, 128, generator=gen)
    images = F.interpolate(torch.rand(n, 3, 4, 4, generator=gen), size=(size, size), mode="bilinear")
    best_constant = float((images - images.median(dim=0, keepdim=True).values).abs().mean())
    model = build_decoder(arch, 128, size, **SMALL).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    with torch.no_grad():
        initial = float((model(z) - images).abs().mean())
    for _ in range(20):
        loss = (model(z) - images).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        final_train = float((model(z) - images).abs().mean())
        final_eval = float((model.eval()(z) - images).abs().mean())
    assert final_train < 0.5 * initial
    assert final_train < 0.75 * best_constant  # it uses the embedding, not just the mean face
    assert final_eval < best_constant


@pytest.mark.parametrize("arch", ARCHS)
def test_default_size_at_64(arch: str) -> None:
    model = build_decoder(arch, 128, 64)
    n = model.num_parameters()
    assert (1_000_000 if arch == "modconv" else 2_000_000) <= n <= 8_000_000, n
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert state_bytes < 25_000_000
    assert (
        build_decoder(arch, 128, 64, width=0.5).num_parameters()
        < n
        < build_decoder(arch, 128, 64, width=1.5).num_parameters()
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_config_rebuilds(arch: str) -> None:
    norm = {"norm": "group"} if arch in ("deconv", "resup", "pixelshuffle") else {}
    model = build_decoder(arch, 96, 48, width=0.5, hidden=32, **norm)
    cfg = model.config()
    assert cfg["arch"] == arch and cfg["dim"] == 96 and cfg["image_size"] == 48
    assert cfg["kwargs"]["width"] == 0.5 and cfg["kwargs"].get("norm", "group") == "group"
    clone = build_decoder(cfg["arch"], cfg["dim"], cfg["image_size"], **cfg["kwargs"])
    clone.load_state_dict(model.state_dict())  # same parameter names and shapes
