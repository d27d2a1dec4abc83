"""What the sidecar's API hands a client: which RPC responses carry vectors (the client with API access only).

Read from the compiled ``advface.v1`` descriptors (the API as deployed, not its documentation): every response
message is walked recursively and each repeated ``float``/``double`` field (an embedding) is listed with its path.
A template can only leak through such a field; scores and thresholds are scalars, reported separately.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

#: RPCs whose vectors are computed from the caller's own input (never a stored template).
CALLER_INPUT_RPCS = frozenset({"Protect"})

_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)


def _is_repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.29; `label` is deprecated there
    if repeated is not None:
        return bool(repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _matching_fields(
    message: Descriptor, match: Callable[[FieldDescriptor], bool], prefix: str = "", seen: frozenset[str] = frozenset()
) -> list[str]:
    """Paths (``a.b.values``) of the fields reachable from ``message`` for which ``match`` is true; a message type
    already on the path is not entered again (recursive messages)."""
    out: list[str] = []
    for field in message.fields:
        path = f"{prefix}{field.name}"
        if match(field):
            out.append(path)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name not in seen:
            out.extend(_matching_fields(field.message_type, match, f"{path}.", seen | {message.full_name}))
    return out


def vector_fields(message: Descriptor) -> list[str]:
    """Paths of the repeated float/double fields (embeddings) reachable from ``message``."""
    return _matching_fields(message, lambda f: f.type in _FLOATS and _is_repeated(f))


def scalar_score_fields(message: Descriptor) -> list[str]:
    """Paths of the single (not repeated) float/double fields named ``score`` reachable from ``message``."""
    return _matching_fields(message, lambda f: f.name == "score" and f.type in _FLOATS and not _is_repeated(f))


def api_exposure() -> dict[str, Any]:
    """Per RPC of ``advface.v1.AdvFace``: the vector fields and score fields of its response. ``stored_vectors``:
    RPCs returning vectors that are not computed from the caller's own input (must stay empty)."""
    from advface.api.v1 import SERVICE_NAME
    from advface.api.v1 import advface_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name[SERVICE_NAME.rsplit(".", 1)[-1]]
    rpcs = {}
    for method in service.methods:
        rpcs[method.name] = {
            "vectors": vector_fields(method.output_type),
            "scores": scalar_score_fields(method.output_type),
        }
    stored = sorted(name for name, r in rpcs.items() if r["vectors"] and name not in CALLER_INPUT_RPCS)
    return {
        "service": SERVICE_NAME,
        "rpcs": rpcs,
        "stored_vectors": stored,
        "caller_input_vectors": sorted(n for n, r in rpcs.items() if r["vectors"] and n in CALLER_INPUT_RPCS),
        "score_rpcs": sorted(n for n, r in rpcs.items() if r["scores"]),
    }
