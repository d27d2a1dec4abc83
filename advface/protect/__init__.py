"""Template protection: AdvFace adversarial perturbation of templates against a shadow inversion model.

- :class:`AdvFaceConfig` -- steps, relative L2 budget, optional L-inf box, step size, seed, batch size;
- :func:`protect_embeddings` -- protect an ``N x D`` array against a shadow decoder;
- :class:`Protector` -- shadow + config + device, loadable from a checkpoint (what the server uses);
- :func:`perturbation_stats` -- how far protected templates moved;
- :func:`shipped_shadow_path` -- the shadow model advface ships for an encoder;
- :class:`IdentityAwareConfig`, :func:`protect_identity_aware` -- identity-aware AdvFace (an ensemble of shadows,
  identity objective through the encoder's torch module);
- :data:`METHODS`, :class:`ProtectionSpec`, :func:`load_protector`, :class:`TemplateProtector` -- a protector of
  either method built from its recipe (what the sidecar and ``advface reencode`` use);
- :func:`trained_with_identity_loss` -- whether a shadow checkpoint's metadata says it learnt an identity loss.
"""

from advface.protect.advface import AdvFaceConfig, Protector, perturbation_stats, protect_embeddings
from advface.protect.identity_aware import IdentityAwareConfig, protect_identity_aware
from advface.protect.methods import (
    METHODS,
    ProtectionSpec,
    TemplateProtector,
    load_protector,
    trained_with_identity_loss,
)
from advface.protect.shipped import SHIPPED_MODELS_DIR, shipped_shadow_path

__all__ = [
    "METHODS",
    "SHIPPED_MODELS_DIR",
    "AdvFaceConfig",
    "IdentityAwareConfig",
    "ProtectionSpec",
    "Protector",
    "TemplateProtector",
    "perturbation_stats",
    "protect_embeddings",
    "load_protector",
    "protect_identity_aware",
    "shipped_shadow_path",
    "trained_with_identity_loss",
]
