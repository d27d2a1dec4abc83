"""Conversions between the key service's messages (``advface.keyservice.v1``) and the library's dataclasses."""

from __future__ import annotations

from advface.api.keyservice.v1 import keyservice_pb2 as pb
from advface.encrypted.binding import BoundRequest, RequestItem
from advface.encrypted.keyservice import Decision, VerifyDecision

__all__ = [
    "decision_from_message",
    "decision_to_message",
    "request_from_message",
    "request_to_message",
    "verify_from_message",
    "verify_to_message",
]


def request_to_message(request: BoundRequest) -> pb.BoundRequest:
    return pb.BoundRequest(
        op=request.op,
        tenant=request.tenant,
        fingerprint=request.fingerprint,
        nonce=request.nonce,
        issued_ms=request.issued_ms,
        top_k=request.top_k,
        items=[pb.RequestItem(ciphertext=i.ciphertext, slots=i.slots, groups=i.groups) for i in request.items],
        mac=request.mac,
        target=request.target,
    )


def request_from_message(message: pb.BoundRequest) -> BoundRequest:
    items = tuple(
        RequestItem(bytes(i.ciphertext), tuple(int(s) for s in i.slots), tuple(int(g) for g in i.groups))
        for i in message.items
    )
    return BoundRequest(
        message.op,
        message.tenant,
        message.fingerprint,
        message.nonce,
        int(message.issued_ms),
        int(message.top_k),
        items,
        message.mac,
        message.target,
    )


def decision_to_message(decision: Decision) -> pb.Decision:
    out = pb.Decision(item=decision.item, slot=decision.slot)
    if decision.score is not None:
        out.score = decision.score
    return out


def decision_from_message(message: pb.Decision) -> Decision:
    return Decision(int(message.item), int(message.slot), message.score if message.HasField("score") else None)


def verify_to_message(decision: VerifyDecision) -> pb.VerifyReply:
    reply = pb.VerifyReply(match=decision.match)
    if decision.best is not None:
        reply.best.CopyFrom(decision_to_message(decision.best))
    return reply


def verify_from_message(message: pb.VerifyReply) -> VerifyDecision:
    best = decision_from_message(message.best) if message.match and message.HasField("best") else None
    return VerifyDecision(bool(message.match), best)
