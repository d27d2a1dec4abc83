"""Image-level protection of enrolment photos against face encoders (IDGuardian-style identity confusion, with EOT).

- :func:`protect_image` / :class:`ImageProtector` -- PGD on the full photo under an L-inf budget against an ensemble;
- :mod:`~advface.protect.image.purify` and :mod:`~advface.protect.image.denoiser` -- purifications for evaluation;
- :mod:`~advface.protect.image.io` -- reading photos for protection (animated, CMYK, grey) and writing PNGs.
"""

from advface.protect.image.core import ImageProtector, ProtectConfig, ProtectionReport, protect_image
from advface.protect.image.ensemble import DEFAULT_ENCODERS, build_ensemble
from advface.protect.image.transforms import EOTConfig

__all__ = [
    "DEFAULT_ENCODERS",
    "EOTConfig",
    "ImageProtector",
    "ProtectConfig",
    "ProtectionReport",
    "build_ensemble",
    "protect_image",
]
