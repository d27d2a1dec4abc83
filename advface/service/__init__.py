"""The service layer: a validated :class:`~advface.config.Config` in, a running template pipeline out.

The one place that turns configuration into objects, shared by the gRPC sidecar (``server/``), ``advface
reencode`` and ``advface audit``:

- :mod:`~advface.service.templates` -- :class:`TemplateService`: enrol / verify / identify / delete / protect on
  arrays, photo bytes and ids (validation, deadlines, worker threads, protection batching);
- :mod:`~advface.service.stores` -- :func:`open_store`, :func:`check_transform_marker`, :func:`open_checked_store`;
- :mod:`~advface.service.protection` -- :func:`protection_spec`, :func:`build_protector`, protection parallelism;
- :mod:`~advface.service.keys` -- :func:`cipher_from_config`, :func:`load_transform_secret`,
  :func:`transforms_from_config`;
- :mod:`~advface.service.thresholds` -- :func:`resolve_threshold` and the calibrated thresholds;
- :mod:`~advface.service.validation` -- request checks (ids, tenants, metadata, embeddings, batch sizes);
- :mod:`~advface.service.batcher` -- :class:`ProtectionBatcher`;
- :mod:`~advface.service.image_protection` -- :class:`ImageProtectionService` (photos, on request);
- :mod:`~advface.service.maintenance` -- :class:`MaintenanceService` (an encrypted store's key-pair rotation and
  forced erasure as background jobs, for the admin RPCs).

Names are loaded from their modules on first use, so ``from advface.service import open_store`` does not load the
encoders and torch that :class:`TemplateService` needs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Candidate": "templates",
    "EnrolItem": "templates",
    "Face": "templates",
    "ProtectionSummary": "templates",
    "TemplateService": "templates",
    "Verification": "templates",
    "check_transform_marker": "stores",
    "open_checked_store": "stores",
    "open_store": "stores",
    "build_protector": "protection",
    "protection_parallelism": "protection",
    "protection_spec": "protection",
    "cipher_from_config": "keys",
    "load_transform_secret": "keys",
    "transforms_from_config": "keys",
    "CALIBRATED_THRESHOLDS": "thresholds",
    "Threshold": "thresholds",
    "resolve_threshold": "thresholds",
    "DEFAULT_TENANT": "validation",
    "check_embeddings": "validation",
    "check_tenant": "validation",
    "ProtectionBatcher": "batcher",
    "ImageProtectionService": "image_protection",
    "ProtectedImage": "image_protection",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'advface.service' has no attribute {name!r}")
    return getattr(importlib.import_module(f"advface.service.{module}"), name)
