from __future__ import annotations

import pytest

from advface.encrypted.params import CkksParams, make_context
from advface.errors import ConfigError


def test_defaults_are_valid_and_secure() -> None:
    params = CkksParams()
    assert params.slots == 4096
    assert params.score_scale == params.template_scale * params.probe_scale
    context = make_context(params)
    assert context.parameters_set()


def test_round_trip_and_digest() -> None:
    params = CkksParams(template_scale_bits=32, probe_scale_bits=19)
    again = CkksParams.from_dict(params.to_dict())
    assert again == params
    assert again.digest() == params.digest() != CkksParams().digest()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"poly_modulus_degree": 1000}, "poly_modulus_degree"),
        ({"coeff_bits": (60,)}, "coeff_bits"),
        ({"coeff_bits": (61, 60)}, "coeff_bits"),
        ({"template_scale_bits": 4}, "template_scale_bits"),
        ({"template_scale_bits": 40, "probe_scale_bits": 19}, "bits below"),
        ({"max_norm": 0}, "max_norm"),
        ({"max_norm": 100.0}, "bits below"),
    ],
)
def test_bad_parameters_are_named(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CkksParams(**fields)


def test_unknown_fields_refused() -> None:
    with pytest.raises(ConfigError, match="unknown CKKS parameter"):
        CkksParams.from_dict({"poly_modulus_degree": 8192, "bootstrapping": True})
    with pytest.raises(ConfigError, match="mapping"):
        CkksParams.from_dict([1, 2])


def test_insecure_modulus_refused_by_seal() -> None:
    # 120 bits of modulus exceed the 109 that N = 4096 allows at 128-bit security
    with pytest.raises(ConfigError, match="rejected by SEAL"):
        make_context(CkksParams(poly_modulus_degree=4096))
