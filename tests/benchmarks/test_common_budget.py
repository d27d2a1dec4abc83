"""benchmarks/common.py: the budget flags shared by the photo-protection benchmarks."""

from __future__ import annotations

import argparse

import pytest

from advface.protect.image import ProtectConfig
from benchmarks.common import add_budget_arguments, budget_from_args, budget_tag
from benchmarks.photo_quality import variant_config


def _parse(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_budget_arguments(parser)
    return budget_from_args(parser.parse_args(list(argv)), parser)


def test_defaults_are_the_library_s_and_each_shape_has_its_own_epsilon() -> None:
    budget = _parse()
    assert budget == {"budget": ProtectConfig.budget, "epsilon": None, "encoder_weight": None}
    assert ProtectConfig(**budget).levels == ProtectConfig().levels == 12  # ssim at 12/255
    assert ProtectConfig(**_parse("--budget", "uniform")).levels == 8
    custom = _parse("--budget", "ssim", "--epsilon", "8/255")
    assert custom["epsilon"] == pytest.approx(8 / 255) and ProtectConfig(**custom).levels == 8


@pytest.mark.parametrize("epsilon", ["0", "2", "nan", "x/255", "0.5/255"])
def test_bad_epsilon_is_a_usage_error(epsilon: str) -> None:
    with pytest.raises(SystemExit):
        _parse("--epsilon", epsilon)


def test_cache_tag_keeps_the_uniform_caches_and_separates_the_others() -> None:
    assert budget_tag(ProtectConfig(budget="uniform")) == ""
    assert budget_tag(ProtectConfig()) == "-ssim"
    assert budget_tag(ProtectConfig(budget="jnd")) == "-jnd"


def test_encoder_weight_flag_and_its_cache_tag() -> None:
    assert ProtectConfig(**_parse("--encoder-weight", "8")).effective_encoder_weight == 8.0
    assert ProtectConfig(**_parse()).effective_encoder_weight == 3.0  # ssim's own
    # the shape's own weight, given or not, keeps the shape's cache name; another weight gets its own
    assert budget_tag(ProtectConfig(**_parse("--encoder-weight", "3"))) == "-ssim"
    assert budget_tag(ProtectConfig(**_parse("--encoder-weight", "8"))) == "-ssim-ew8"
    assert budget_tag(ProtectConfig(**_parse("--budget", "uniform", "--encoder-weight", "2.5"))) == "-ew2.5"
    with pytest.raises(SystemExit):
        _parse("--encoder-weight", "-1")


def test_photo_quality_variants_take_each_shape_s_own_epsilon_unless_levels_is_given() -> None:
    base = ProtectConfig(steps=60)
    assert variant_config("uniform", base).levels == 8
    assert variant_config("ssim", base).levels == 12
    assert variant_config("ssim:levels=8", base).levels == 8
    assert variant_config("jnd:target=1.5", base).levels == 8


def test_photo_quality_variants_take_the_encoder_weight() -> None:
    base = ProtectConfig(steps=60)
    assert variant_config("ssim:encoder_weight=3", base).encoder_weight == 3.0
    assert variant_config("uniform", base).encoder_weight == base.encoder_weight
