"""Inversion decoders (embedding -> face image): AdvFace shadow models and reconstruction attackers.

See :mod:`advface.inversion.models` for the architectures and the input normalisation (every decoder
L2-normalises its input embedding and scales it by ``sqrt(dim)``), and :mod:`advface.inversion.checkpoint` for
the file format.
"""

from advface.inversion.checkpoint import (
    FORMAT_TAG,
    FORMAT_VERSION,
    check_compatible,
    load_decoder,
    save_decoder,
)
from advface.inversion.models import (
    DECODERS,
    DeconvDecoder,
    InversionDecoder,
    PixelShuffleDecoder,
    ResUpDecoder,
    available_decoders,
    build_decoder,
    plan_geometry,
)

__all__ = [
    "DECODERS",
    "FORMAT_TAG",
    "FORMAT_VERSION",
    "DeconvDecoder",
    "InversionDecoder",
    "PixelShuffleDecoder",
    "ResUpDecoder",
    "available_decoders",
    "build_decoder",
    "check_compatible",
    "load_decoder",
    "plan_geometry",
    "save_decoder",
]
