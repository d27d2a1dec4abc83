"""benchmarks/photo_quality.py: variant specs become the configs they name."""

from __future__ import annotations

import pytest

from advface.protect.image import ProtectConfig
from benchmarks.photo_quality import variant_config


def test_ssim_variant_with_the_whole_photo_constraint_and_a_larger_ball() -> None:
    base = ProtectConfig(steps=60, guidance=("encoders",))
    config = variant_config("ssim:photo_target=0.97,levels=16", base)
    assert config.budget == "ssim" and config.levels == 16 and config.steps == 60
    assert config.ssim.photo_target == pytest.approx(0.97) and config.ssim.target == pytest.approx(0.97)
    assert config.guidance == ("encoders",)
    assert variant_config("ssim", base).ssim.whole_photo_target == pytest.approx(0.97)  # on, at the face target
    assert variant_config("ssim:whole_photo=0", base).ssim.whole_photo_target is None  # the face box alone
    assert variant_config("ssim:target=0.95,whole_photo=true", base).ssim.whole_photo_target == pytest.approx(0.95)
    config.validate()


def test_unknown_or_misplaced_keys_are_refused() -> None:
    base = ProtectConfig()
    with pytest.raises(SystemExit, match="photo_targt"):
        variant_config("ssim:photo_targt=0.97", base)
    with pytest.raises(SystemExit, match="photo_target"):
        variant_config("uniform:photo_target=0.97", base)  # the uniform budget has no SSIM constraint
    with pytest.raises(SystemExit, match="whole_photo"):
        variant_config("ssim:whole_photo=maybe", base)
