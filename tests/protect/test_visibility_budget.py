"""JND budget of image protection: the torch visibility map against the numpy model, its gradient, the pooled
statistics, the constraint end to end on a real LFW photo, and refused settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from advface.cli.main import build_parser
from advface.cli.protect_image import run
from advface.config import load_config
from advface.errors import ConfigError
from advface.protect.image import ImageProtector, ProtectConfig
from advface.protect.image.jnd_budget import JndBudget, face_statistic, pooled_statistic
from advface.protect.image.ssim_budget import update_multipliers
from advface.protect.image.visibility import VisibilityModel, visibility
from advface.protect.image.visibility_torch import VisibilityMap

#: Largest difference (JND) allowed between the float32 torch map and the float64 numpy map (measured: about 5e-5
#: at 8 levels of noise on an LFW photo, map values up to 4.7).
MAP_TOLERANCE = 1e-3


def _tensor(img: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].to(dtype) / 255.0


def _noisy(img: np.ndarray, levels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(np.int16) + rng.integers(-levels, levels + 1, size=img.shape), 0, 255).astype(np.uint8)


def test_torch_map_equals_the_numpy_map(photo: np.ndarray) -> None:
    box = (60.0, 70.0, 185.0, 200.0)
    for levels, model in ((2, VisibilityModel()), (8, VisibilityModel()), (6, VisibilityModel(colour=False))):
        noisy = _noisy(photo, levels, levels)
        reference = visibility(photo, noisy, box, model)
        seen = VisibilityMap(_tensor(photo), model)
        got = seen.map(_tensor(noisy))[0].double().numpy()
        assert reference.map.max() > 0.5  # a change the model sees
        assert np.abs(got - reference.map).max() < MAP_TOLERANCE
        power = seen.power(_tensor(noisy))
        params = JndBudget(model=model)
        assert float(pooled_statistic(power, params)[0]) == pytest.approx(reference.pooled, abs=MAP_TOLERANCE)
        assert float(face_statistic(power, [box], params)[0]) == pytest.approx(reference.pooled_face, abs=MAP_TOLERANCE)
        top = float(face_statistic(power, [box], dataclasses.replace(params, statistic="top"))[0])
        assert (
            reference.p95_face is not None and reference.p95_face <= top <= reference.map.max()
        )  # the mean of the top 5 % is at least the p95
    # float64 throughout: the same map to float rounding (the band-energy blur is scipy's sampled kernel)
    noisy = _noisy(photo, 4, 0)
    got64 = VisibilityMap(_tensor(photo, torch.float64)).map(_tensor(noisy, torch.float64))[0].numpy()
    assert np.abs(got64 - visibility(photo, noisy).map).max() < 1e-8


def test_batched_photos_keep_their_own_clean_terms(photo: np.ndarray) -> None:
    other = np.ascontiguousarray(photo[::-1, ::-1])
    noisy = [_noisy(photo, 5, 1), _noisy(other, 5, 2)]
    seen = VisibilityMap(torch.cat([_tensor(photo), _tensor(other)]))
    maps = seen.map(torch.cat([_tensor(n) for n in noisy])).numpy()
    for got, clean, changed in zip(maps, (photo, other), noisy):
        assert np.abs(got - visibility(clean, changed).map).max() < MAP_TOLERANCE


def test_gradient_is_finite_at_zero_change_and_lowers_visibility(photo: np.ndarray) -> None:
    x = _tensor(photo)
    seen = VisibilityMap(x)
    for statistic in ("pooled", "top"):
        params = JndBudget(statistic=statistic)
        delta = torch.zeros_like(x, requires_grad=True)
        stat = pooled_statistic(seen.power(x + delta), params)
        (grad,) = torch.autograd.grad(stat.sum(), delta)
        assert torch.isfinite(grad).all()
        assert float(stat.detach()[0]) < 0.01  # no change: (near) invisible, the epsilon's floor only
        assert float(seen.map(x + delta).detach().max()) < 0.01
    delta = (_tensor(_noisy(photo, 6, 3)) - x).requires_grad_(True)
    stat = pooled_statistic(seen.power(x + delta), JndBudget())
    (grad,) = torch.autograd.grad(stat.sum(), delta)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    with torch.no_grad():
        lowered = pooled_statistic(seen.power((x + delta - 1e-3 * grad / grad.abs().max()).clamp(0, 1)), JndBudget())
    assert float(lowered[0]) < float(stat.detach()[0])


def test_multipliers_follow_a_lower_is_better_constraint() -> None:
    params = JndBudget(target=1.0, margin=0.05)
    now = torch.tensor([2.0, 0.5, 0.97])  # above, below, inside the margin (counts as above)
    updated = update_multipliers(torch.ones(3), -now, params, -params.target)
    assert updated[0] > 1 and updated[1] < 1 and updated[2] > 1


def test_jnd_budget_keeps_the_face_at_its_target(dlib_protector: ImageProtector, photo: np.ndarray) -> None:
    uniform = ProtectConfig(steps=15, guidance=("encoders",), budget="uniform")
    target = 1.5
    constrained = dataclasses.replace(uniform, budget="jnd", jnd=JndBudget(target=target))
    (_, ur), (j, jr) = (dlib_protector.protect([photo], c)[0] for c in (uniform, constrained))
    box = dlib_protector.find_face(photo).box
    assert ur.vis_pooled_face > 2.5  # the uniform budget is far above the target on this photo
    assert jr.vis_pooled_face <= target and jr.vis_pooled <= target
    reference = visibility(photo, j, box)
    assert jr.vis_pooled_face == pytest.approx(reference.pooled_face, abs=1e-9)
    assert jr.vis_p95_face == pytest.approx(reference.p95_face, abs=1e-9)
    assert jr.budget == "jnd" and jr.to_dict()["vis_pooled_face"] == round(jr.vis_pooled_face, 4)
    assert np.abs(j.astype(np.int16) - photo.astype(np.int16)).max() <= constrained.levels  # inside the ball
    sim = jr.similarity["dlib-torch"]
    assert sim["cosine_after"] < sim["cosine_random"] - 0.05  # it still protects, more than noise of the budget


def test_bad_settings_are_refused_before_anything_is_read_or_written(tmp_path: Path) -> None:
    for bad in (
        JndBudget(target=0.0),
        JndBudget(target=float("nan")),
        JndBudget(photo_target=-1.0),
        JndBudget(margin=-0.1),
        JndBudget(margin=2.0),
        JndBudget(statistic="p95"),
        JndBudget(top_share=0.0),
        JndBudget(sign_share=1.0),
        JndBudget(rate=0.0),
        JndBudget(multiplier=1000.0),
        JndBudget(model=VisibilityModel(beta=0.0)),
    ):
        with pytest.raises(ConfigError, match="jnd"):
            ProtectConfig(budget="jnd", jnd=bad).validate()
    ProtectConfig(budget="jnd").validate()
    assert JndBudget().whole_photo_target == JndBudget().target
    assert JndBudget(whole_photo=False).whole_photo_target is None
    parser = build_parser()
    base = ["protect-image", "a.jpg", "--out", str(tmp_path)]
    for extra, message in (
        (["--jnd-target", "1.5"], "--budget jnd"),
        (["--jnd-photo-target", "1.5"], "--budget jnd"),
        (["--jnd-face-box-only"], "--budget jnd"),
        (["--jnd-statistic", "top"], "--budget jnd"),
        (["--budget", "jnd", "--jnd-target", "0"], "target"),
        (["--budget", "jnd", "--jnd-photo-target", "nan"], "photo_target"),
        (["--budget", "jnd", "--jnd-face-box-only", "--jnd-photo-target", "2"], "contradict"),
    ):
        with pytest.raises(ConfigError, match=message):
            run(parser.parse_args(base + extra))
    assert not any(tmp_path.iterdir())


def test_server_config_accepts_the_jnd_budget(tmp_path: Path) -> None:
    path = tmp_path / "advface.yaml"
    path.write_text("image_protection:\n  budget: jnd\n")
    assert load_config(path, env={}).image_protection.budget == "jnd"
    path.write_text("image_protection:\n  budget: jnd-ish\n")
    with pytest.raises(ConfigError, match="budget"):
        load_config(path, env={})
