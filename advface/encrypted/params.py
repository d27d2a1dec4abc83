"""CKKS parameters of encrypted matching, their checks, and the SEAL context built from them.

Defaults (chosen by measurement, see docs/encrypted-matching.md): ring degree N = 8192 (4096 slots), one 60-bit
data prime plus one 60-bit special prime (120 bits: 128-bit security for N = 8192 by the HE standard, which SEAL
enforces). Stored ciphertexts live at the single data prime (128 KiB each), so a template costs ``32 * columns``
bytes; a probe multiplies them without rescaling: templates are encoded at scale ``2**template_scale_bits``, probe
coefficients at ``2**probe_scale_bits``, and a score comes out at the product scale, which must stay below the
data prime with room for the largest score (:attr:`CkksParams.value_bound`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from advface.encrypted._seal import require
from advface.errors import ConfigError

__all__ = ["CkksParams", "make_context"]

_DEGREES = (4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class CkksParams:
    """Parameters of one key pair. Frozen: a gallery and its keys must agree on every field."""

    poly_modulus_degree: int = 8192
    #: bit sizes of the primes: one data prime, then the special (key-switching) prime
    coeff_bits: tuple[int, ...] = (60, 60)
    template_scale_bits: int = 33
    probe_scale_bits: int = 19
    #: largest template / probe norm accepted (Euclidean scores need ``(2 * max_norm) ** 2`` of headroom)
    max_norm: float = 4.0

    def __post_init__(self) -> None:
        if self.poly_modulus_degree not in _DEGREES:
            raise ConfigError(f"CKKS poly_modulus_degree must be one of {_DEGREES}, got {self.poly_modulus_degree}")
        bits = tuple(self.coeff_bits)
        if len(bits) != 2 or not all(isinstance(b, int) and 20 <= b <= 60 for b in bits):
            raise ConfigError(f"CKKS coeff_bits must be two prime sizes in [20, 60] (data, special), got {bits}")
        object.__setattr__(self, "coeff_bits", bits)
        for name in ("template_scale_bits", "probe_scale_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 8 <= value <= 50:
                raise ConfigError(f"CKKS {name} must be an integer in [8, 50], got {value!r}")
        if not (isinstance(self.max_norm, (int, float)) and 0 < self.max_norm <= 1e3):
            raise ConfigError(f"CKKS max_norm must be in (0, 1000], got {self.max_norm!r}")
        headroom = bits[0] - 1 - self.template_scale_bits - self.probe_scale_bits
        if headroom < math.log2(self.value_bound) + 1:
            raise ConfigError(
                f"CKKS scales leave {headroom} bits below the {bits[0]}-bit data prime; scores up to "
                f"{self.value_bound:g} need {math.ceil(math.log2(self.value_bound)) + 1}: lower the scale bits "
                "or max_norm"
            )

    @property
    def slots(self) -> int:
        """Values per ciphertext (templates per block)."""
        return self.poly_modulus_degree // 2

    @property
    def template_scale(self) -> float:
        return float(2**self.template_scale_bits)

    @property
    def probe_scale(self) -> float:
        return float(2**self.probe_scale_bits)

    @property
    def score_scale(self) -> float:
        """The scale of every score ciphertext (template scale times probe scale)."""
        return float(2 ** (self.template_scale_bits + self.probe_scale_bits))

    @property
    def value_bound(self) -> float:
        """Largest magnitude of a score value: minus a squared distance of two vectors of norm ``max_norm``."""
        return max(1.0, (2.0 * self.max_norm) ** 2)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["coeff_bits"] = list(self.coeff_bits)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> CkksParams:
        """Parameters from :meth:`to_dict`'s form; ConfigError for unknown or missing fields."""
        if not isinstance(data, dict):
            raise ConfigError(f"CKKS parameters must be a mapping, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown CKKS parameter(s): {', '.join(unknown)}")
        try:
            values = dict(data)
            if "coeff_bits" in values:
                values["coeff_bits"] = tuple(values["coeff_bits"])
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"invalid CKKS parameters: {exc}") from None

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the parameters."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def make_context(params: CkksParams) -> Any:
    """The SEAL context of ``params`` (128-bit security enforced); ConfigError when SEAL rejects them."""
    seal = require()
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    try:
        parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_bits)))
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"CKKS coefficient modulus {params.coeff_bits}: {exc}") from None
    context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise ConfigError(
            f"CKKS parameters rejected by SEAL ({context.parameters_error_message()}): N="
            f"{params.poly_modulus_degree}, primes {params.coeff_bits} bits"
        )
    return context
