"""Decision thresholds: which score counts as a match, and where that number comes from.

:func:`resolve_threshold` picks, in order: ``matching.threshold`` from the configuration; with a norm-equalising
keyed transform, the threshold measured for it (:data:`CALIBRATED_EQUALISED_THRESHOLDS`); for templates protected
with plain AdvFace, :data:`CALIBRATED_THRESHOLDS`; else the encoder's published threshold for raw embeddings
(flagged ``uncalibrated`` for identity-aware AdvFace, for which no threshold was measured). Scores are on the
"higher = more similar" scale (dlib: minus the Euclidean distance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from advface.encoders.base import FaceEncoder
from advface.errors import ConfigError
from advface.protect.tenant_transform import CALIBRATED_NORMS, TenantTransforms

#: Thresholds for AdvFace-protected templates matched against raw probes, per encoder.
#: Value: budget_sweep[rel_l2=0.1].utility.protected.threshold_at_far_1e-3 of benchmarks/results/advface_lfw_steps3.json
#: (LFW View-2, 3,000 impostor pairs, protected template of photo a vs raw probe of photo b, default protection:
#: shipped shadow, rel_l2 0.1, 3 steps), rounded to 4 decimals; recompute with benchmarks/advface_lfw.py --budgets 0.1.
CALIBRATED_THRESHOLDS: dict[str, float] = {
    "dlib": -0.5710,
    "dlib-torch": -0.5710,
}
#: How each value of CALIBRATED_THRESHOLDS was obtained (Info's threshold description). Update them together.
CALIBRATED_NOTES: dict[str, str] = {
    name: (
        "FAR 0.1% on LFW View-2 impostor pairs, AdvFace-protected template (shipped shadow, rel_l2 0.1, 3 steps) "
        "vs raw probe: Euclidean distance 0.5710 (benchmarks/results/advface_lfw_steps3.json, 2026-11-23); "
        "at this threshold TAR was 91.9%"
    )
    for name in ("dlib", "dlib-torch")
}

_EQ_NOTE = (
    "FAR 0.1% on LFW View-2 impostor pairs, {what} of photo a vs raw probe of photo b, both norm-equalised to "
    "1.4253 and rotated by the keyed transform: Euclidean distance {d} (benchmarks/keyed_threshold.py -> "
    "benchmarks/results/keyed_threshold.json, 2026-11-23); at this threshold TAR was {tar}"
)
#: Thresholds with the norm-equalised keyed transform at the norm of CALIBRATED_NORMS, per (encoder, AdvFace
#: protection on): FAR 0.1% on LFW View-2 impostor pairs, template of photo a (AdvFace-protected when protection is
#: on) vs raw probe of photo b, both norm-equalised (``threshold_at_far_1e-3`` of
#: benchmarks/results/keyed_threshold.json, runs "advface + norm-equalised keyed rotation" and "raw + norm-equalised
#: keyed rotation", 4 decimals). Only valid for the norm of CALIBRATED_NORMS.
CALIBRATED_EQUALISED_THRESHOLDS: dict[tuple[str, bool], tuple[float, str]] = {
    (name, True): (
        -0.5874,
        _EQ_NOTE.format(
            what="AdvFace-protected template (shipped shadow, rel_l2 0.1, 3 steps)", d="0.5874", tar="94.7%"
        ),
    )
    for name in ("dlib", "dlib-torch")
} | {
    (name, False): (-0.5849, _EQ_NOTE.format(what="raw template (protection off)", d="0.5849", tar="95.2%"))
    for name in ("dlib", "dlib-torch")
}


@dataclass(frozen=True)
class Threshold:
    """A decision threshold with its provenance: ``source`` is ``config``, ``calibrated``, ``encoder-default`` or
    ``uncalibrated``; ``description`` says how it was obtained."""

    value: float
    source: str
    description: str


def _uncalibrated_note(fallback: str) -> str:
    return (
        "protection.method advface-id has no calibrated threshold (plain AdvFace's calibration does not apply); "
        "using the one for unprotected templates -- measure one for your shadows and budget "
        f"(benchmarks/identity_aware.py) and set matching.threshold. Fallback: {fallback}"
    )


def keyed_threshold(transforms: TenantTransforms | None, encoder_name: str, protected: bool) -> Threshold | None:
    """The threshold a keyed transform calls for, or None when the one without it still holds (no transform, or a
    pure rotation: scores unchanged). ConfigError when norm equalisation is on with a norm or encoder no threshold
    was measured for (set matching.threshold)."""
    if transforms is None or transforms.norm is None:
        return None
    norm = CALIBRATED_NORMS.get(encoder_name)
    found = CALIBRATED_EQUALISED_THRESHOLDS.get((encoder_name, bool(protected)))
    if found is None or norm is None or abs(transforms.norm - norm) > 1e-9:
        raise ConfigError(
            f"keyed_transform.norm {transforms.norm:g} changes scores and no decision threshold was measured for it "
            f"with encoder {encoder_name!r}{' and AdvFace' if protected else ''}; set matching.threshold (measure "
            "it like benchmarks/keyed_threshold.py), use norm: auto, or norm: null (pure rotation, scores unchanged)"
        )
    value, note = found
    return Threshold(value, "calibrated", note)


def resolve_threshold(
    configured: float | None, encoder: FaceEncoder, method: str, transforms: TenantTransforms | None = None
) -> Threshold:
    """The decision threshold for templates protected with ``method`` (``advface``, ``advface-id`` or ``none``)
    and matched through ``transforms`` (None: no keyed transform); see the module docs for the order.
    ConfigError when no threshold is known."""
    if configured is not None:
        value = float(configured)
        if not math.isfinite(value):
            raise ConfigError(f"matching.threshold must be a finite number, got {configured!r}")
        return Threshold(value, "config", "matching.threshold from the server configuration")
    protected = method != "none"
    # measured for plain AdvFace (or none): advface-id gets the unprotected one, flagged as such
    keyed = keyed_threshold(transforms, encoder.name, method == "advface")
    if keyed is not None:
        if method == "advface-id":
            return Threshold(keyed.value, "uncalibrated", _uncalibrated_note(keyed.description))
        return keyed
    if method == "advface" and encoder.name in CALIBRATED_THRESHOLDS:
        return Threshold(CALIBRATED_THRESHOLDS[encoder.name], "calibrated", CALIBRATED_NOTES[encoder.name])
    if encoder.default_threshold is not None:
        note = f"the published threshold of encoder {encoder.name} for raw embeddings"
        if protected and method != "advface":
            return Threshold(float(encoder.default_threshold), "uncalibrated", _uncalibrated_note(note))
        return Threshold(float(encoder.default_threshold), "encoder-default", note)
    raise ConfigError(f"no decision threshold is known for encoder {encoder.name}: set matching.threshold")
