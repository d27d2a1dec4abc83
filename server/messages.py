"""Conversions between ``advface.v1`` messages and the service layer's values (no logic beyond the mapping)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from advface.api.v1 import advface_pb2 as pb
from advface.errors import ValidationError
from advface.service.image_protection import ProtectedImage
from advface.service.maintenance import MaintenanceJob
from advface.service.templates import Face, ProtectionSummary
from advface.store.base import SubjectInfo

if TYPE_CHECKING:
    from advface.protect.image import ProtectionReport


def face_input(face: pb.Face, what: str) -> Face:
    """A Face message as the service's face: the photo's bytes or the embedding's values."""
    kind = face.WhichOneof("input")
    if kind is None:
        raise ValidationError(f"{what}: give an embedding or an image")
    return bytes(face.image) if kind == "image" else list(face.embedding.values)


def embedding_rows(messages: Sequence[pb.Embedding]) -> list[list[float]]:
    """The values of Embedding messages (validated by the service)."""
    return [list(m.values) for m in messages]


def embeddings(rows: Sequence[Sequence[float]]) -> list[pb.Embedding]:
    """Embedding messages of ``N x D`` values."""
    return [pb.Embedding(values=[float(v) for v in row]) for row in rows]


def timestamp(seconds: float | None) -> Timestamp | None:
    """A Timestamp of Unix seconds; None for none."""
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(round(float(seconds) * 1e9))
    return ts


def subject(info: SubjectInfo) -> pb.Subject:
    """A Subject message (metadata and template ids; never vectors)."""
    msg = pb.Subject(
        subject_id=str(info.subject_id),
        metadata={str(k): str(v) for k, v in (info.metadata or {}).items()},
        template_ids=[str(t) for t in info.template_ids],
    )
    ts = timestamp(info.created_at)
    if ts is not None:
        msg.created_at.CopyFrom(ts)
    return msg


def protection_info(summary: ProtectionSummary) -> pb.ProtectionInfo:
    """A ProtectionInfo message."""
    if summary.enabled:
        info = pb.ProtectionInfo(
            enabled=True,
            method=summary.method,
            rel_l2=summary.rel_l2,
            steps=summary.steps,
            seed=summary.seed,
            lanes=summary.lanes,
            linf=summary.linf,
            shadow_model=summary.shadow_model,
            shadow_sha256=summary.shadow_sha256,
        )
    else:
        info = pb.ProtectionInfo(enabled=False, method="none")
    if summary.keyed_transform:
        info.keyed_transform.CopyFrom(
            pb.KeyedTransformInfo(
                enabled=True,
                version=summary.transform_version,
                norm=summary.transform_norm,
                key_id=summary.transform_key_id,
            )
        )
    return info


def image_report(result: ProtectedImage) -> pb.ImageProtectionReport:
    """An ImageProtectionReport message of a protected photo (infinite PSNR -> 0)."""
    report: ProtectionReport = result.report
    similarity = []
    for name in report.encoders:
        entry = report.similarity[name]
        has_threshold = "score_after" in entry
        similarity.append(
            pb.EncoderSimilarity(
                encoder=name,
                cosine_after=float(entry["cosine_after"]),
                cosine_random=float(entry["cosine_random"]),
                has_threshold=has_threshold,
                score_after=float(entry.get("score_after", 0.0)),
                matched_after=bool(entry.get("matched_after", False)),
            )
        )
    return pb.ImageProtectionReport(
        similarity=similarity,
        psnr=report.psnr if math.isfinite(report.psnr) else 0.0,
        ssim=report.ssim,
        linf_levels=report.linf_levels,
        epsilon=report.epsilon,
        steps=report.steps,
        seconds=report.seconds,
        width=result.width,
        height=result.height,
        grayscale=report.grayscale,
        notes=list(report.notes),
        guidance=list(report.guidance),
    )


def maintenance_job(job: MaintenanceJob) -> pb.MaintenanceJob:
    """A MaintenanceJob message of a maintenance job's state."""
    msg = pb.MaintenanceJob(
        operation=job.operation,
        state=job.state,
        blocks_done=job.blocks_done,
        blocks_total=job.blocks_total,
        blocks_this_job=job.blocks_this_job,
        last_error=job.last_error,
        target_fingerprint=job.target_fingerprint,
        new_keys_dir=job.new_keys_dir,
        fingerprint=job.fingerprint,
        erased=job.erased,
        pending=job.pending,
        already_running=job.already_running,
        unfinished_rotation=job.unfinished_rotation,
    )
    for field, seconds in (("started_at", job.started_at), ("finished_at", job.finished_at)):
        ts = timestamp(seconds)
        if ts is not None:
            getattr(msg, field).CopyFrom(ts)
    return msg
