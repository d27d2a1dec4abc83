"""Face encoders: a common interface (:class:`FaceEncoder`) and a registry (:func:`create_encoder`)."""

from advface.encoders.base import ChipSpec, FaceEncoder, Metric, pair_scores, validate_embeddings
from advface.encoders.registry import (
    available_encoders,
    create_encoder,
    create_encoder_with_models,
    register_encoder,
)

__all__ = [
    "ChipSpec",
    "FaceEncoder",
    "Metric",
    "available_encoders",
    "create_encoder",
    "create_encoder_with_models",
    "pair_scores",
    "register_encoder",
    "validate_embeddings",
]
