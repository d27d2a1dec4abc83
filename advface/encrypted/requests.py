"""The sidecar's side of a key-service call: score a probe, bind the request, map decisions back to slots."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from advface.encrypted.binding import BoundRequest, RequestItem, bind
from advface.encrypted.gallery import EncryptedGallery, RefreshJob, SlotRef
from advface.encrypted.keyservice import Decision

__all__ = ["PreparedRequest", "prepare_refresh", "prepare_rotate", "prepare_scores"]


@dataclass(frozen=True)
class PreparedRequest:
    """A bound request and the gallery block behind each of its items."""

    request: BoundRequest
    blocks: tuple[int, ...]

    def ref(self, decision: Decision) -> SlotRef:
        """The gallery slot a released decision is about."""
        return SlotRef(self.blocks[decision.item], decision.slot)


def prepare_scores(
    gallery: EncryptedGallery,
    binding_key: bytes,
    op: str,
    tenant: str,
    probe: Any,
    *,
    refs: Sequence[SlotRef] | None = None,
    groups: Mapping[SlotRef, int] | None = None,
    top_k: int = 1,
    threads: int = 1,
    clock: Callable[[], float] = time.time,
) -> PreparedRequest:
    """Score ``probe`` (against ``refs``, or every live template) and bind a ``verify`` or ``identify`` request.
    ``groups`` numbers the slots of one subject alike (Identify then releases subjects, not templates)."""
    scored = gallery.score(probe, refs, threads=threads)
    items = []
    for s in scored:
        slot_groups = tuple(groups[SlotRef(s.block, slot)] for slot in s.slots) if groups is not None else ()
        items.append(RequestItem(s.to_bytes(), s.slots, slot_groups))
    request = bind(binding_key, op, tenant, gallery.keys.fingerprint, items, top_k=top_k, clock=clock)
    return PreparedRequest(request, tuple(s.block for s in scored))


def prepare_refresh(
    gallery: EncryptedGallery, binding_key: bytes, tenant: str, job: RefreshJob, clock: Callable[[], float] = time.time
) -> BoundRequest:
    """The bound ``refresh`` request of a refresh job (masked columns, slots to zero)."""
    items = [RequestItem(data, job.zero_slots) for data in job.masked]
    return bind(binding_key, "refresh", tenant, gallery.keys.fingerprint, items, clock=clock)


def prepare_rotate(
    gallery: EncryptedGallery,
    binding_key: bytes,
    tenant: str,
    job: RefreshJob,
    target: str,
    clock: Callable[[], float] = time.time,
) -> BoundRequest:
    """The bound ``rotate`` request of a refresh job: re-encrypt under key pair ``target`` (its fingerprint)."""
    items = [RequestItem(data, job.zero_slots) for data in job.masked]
    return bind(binding_key, "rotate", tenant, gallery.keys.fingerprint, items, clock=clock, target=target)
