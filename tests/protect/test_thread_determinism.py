"""Protection does not depend on torch's thread count (tolerance 0), and runs its lanes on single-threaded workers.

Identity-aware AdvFace used to: a multi-threaded team resizes the shadow's faces to the encoder's chip with other
last-bit rounding, dlib's max-pooling then picks other maxima among near-ties and the sign steps diverge (up to
0.023 per coordinate between 1 and 2 threads; ``benchmarks/protect_threads.py``). Now every lane is computed by
one thread on one torch thread, ``threads`` lanes at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from advface.inversion import build_decoder, load_decoder
from advface.protect import (
    AdvFaceConfig,
    IdentityAwareConfig,
    protect_embeddings,
    protect_identity_aware,
    shipped_shadow_path,
)
from advface.threads import torch_threads


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _templates(n: int, dim: int = 128) -> np.ndarray:
    return (np.random.default_rng(3).standard_normal((n, dim)) * 0.09).astype(np.float32)


@pytest.fixture(scope="module")
def dlib_module() -> nn.Module:
    from advface.encoders import create_encoder

    return create_encoder("dlib").torch_module("cpu")


def _by_threads(protect, counts=(1, 2)) -> dict[int, np.ndarray]:  # noqa: ANN001
    out = {}
    for n in counts:
        with torch_threads(n):
            out[n] = protect()
    return out


def test_identity_aware_same_output_at_1_and_2_threads(dlib_module: nn.Module) -> None:
    """The shipped 64x64 shadow (resized to dlib's 150x150 chip) and dlib's ResNet (with 16 templates and 10 steps
    the code before differed by 0.016 between 1 and 2 threads)."""
    shadow, _ = load_decoder(shipped_shadow_path("dlib"), device="cpu")
    z = _templates(8)
    config = IdentityAwareConfig(steps=3, lanes=4)
    out = _by_threads(lambda: protect_identity_aware(z, [shadow], dlib_module, config, chip_size=150))
    np.testing.assert_array_equal(out[1], out[2])
    assert not np.array_equal(out[1], z)


def test_identity_aware_ensemble_same_output_at_1_2_and_3_threads(dlib_module: nn.Module) -> None:
    """Two tiny 16x16 shadows: the code before (lanes on the calling thread, torch's team) differed by 0.025
    between 1 and 2 threads on exactly these inputs."""
    torch.manual_seed(0)
    shadows = [build_decoder(arch, 128, 16, width=0.05, hidden=0) for arch in ("deconv", "resup")]
    z = _templates(10)
    config = IdentityAwareConfig(steps=2, lanes=2, batch_size=6)
    out = _by_threads(lambda: protect_identity_aware(z, shadows, dlib_module, config, chip_size=150), (1, 2, 3))
    np.testing.assert_array_equal(out[1], out[2])
    np.testing.assert_array_equal(out[1], out[3])


def test_plain_advface_same_output_at_1_and_2_threads() -> None:
    shadow, _ = load_decoder(shipped_shadow_path("dlib"), device="cpu")
    z = _templates(20)
    out = _by_threads(lambda: protect_embeddings(z, shadow, AdvFaceConfig(steps=3)))
    np.testing.assert_array_equal(out[1], out[2])
    images = np.random.default_rng(0).integers(0, 256, (20, 40, 40, 3), dtype=np.uint8)  # enrolment photos too
    out = _by_threads(lambda: protect_embeddings(z, shadow, AdvFaceConfig(steps=2), target_images=images))
    np.testing.assert_array_equal(out[1], out[2])


class _Recording(nn.Module):
    """A shadow that notes which thread ran each call, and with how many torch threads."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.dim = inner.dim
        self.calls: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.calls.append((threading.get_ident(), torch.get_num_threads()))
        return self.inner(z)


def test_lanes_run_on_single_threaded_workers() -> None:
    torch.manual_seed(0)
    shadow = _Recording(build_decoder("deconv", 16, 16, width=0.05, hidden=0))
    z = _templates(32, dim=16)
    with torch_threads(2):
        protect_embeddings(z, shadow, AdvFaceConfig(steps=2, lanes=2))
        assert torch.get_num_threads() == 2
    assert {count for _, count in shadow.calls} == {1}
    assert threading.get_ident() not in {ident for ident, _ in shadow.calls}
    shadow.calls.clear()
    with torch_threads(1):  # one thread: the caller computes the lanes itself
        protect_embeddings(z[:4], shadow, AdvFaceConfig(steps=1, lanes=2))
    assert {ident for ident, _ in shadow.calls} == {threading.get_ident()}
