"""The sidecar's image protection (the ``ProtectImage`` RPC): request options, the lazily loaded protector, the reply.

The encoder ensemble of :class:`advface.protect.image.ImageProtector` (dlib-torch + MobileFaceNet; dlib only, with a
note in every report, when MobileFaceNet's model file is not in ``$ADVFACE_MODELS_DIR``) takes seconds and hundreds
of MB to load, so it is built on the first call, once per server, and never when ``image_protection.enabled`` is
false. Calls are run one at a time (one lock): a protection already uses every torch thread, and the detector and
models are not shared across threads. The photo lives only in memory: nothing of it is written to disk or logs.

Deadlines: the call is refused (DEADLINE_EXCEEDED) when the client's deadline has passed before the optimisation
starts, including after waiting for the lock. The library's PGD loop has no time budget, so a started optimisation
runs its steps to the end (its result is then dropped by gRPC if the client has gone); clients bound the time with
``steps`` (and ``target_similarity``), and the server with ``image_protection.max_steps`` and ``max_pixels``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from advface.api.v1 import advface_pb2 as pb
from advface.config import section_value
from advface.errors import ConfigError
from server.logs import LOGGER_NAME, log

if TYPE_CHECKING:
    from advface.protect.image import ImageProtector, ProtectConfig, ProtectionReport

#: Default L-inf budget (the papers' 8/255) and the largest a request may ask for.
DEFAULT_EPSILON = 8 / 255
MAX_EPSILON = 32 / 255
MIN_EPSILON = 1 / 255
#: Face detection policies the image protector accepts (it protects one face per photo): "all" becomes "largest".
_ONE_FACE_POLICIES = ("largest", "center", "best-score", "single")

_logger = logging.getLogger(LOGGER_NAME)


class ImageProtectionFailure(Exception):
    """Ends a ProtectImage call with ``code`` and ``details`` (mapped to the servicer's RpcFailure)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _invalid(details: str) -> ImageProtectionFailure:
    return ImageProtectionFailure(grpc.StatusCode.INVALID_ARGUMENT, details)


@dataclass
class ProtectedImage:
    """A protected photo: the PNG bytes and the report message."""

    png: bytes
    report: pb.ImageProtectionReport


class ImageProtection:
    """Image protection of one server: options checking, the lazily built protector, one protection at a time."""

    def __init__(
        self,
        enabled: bool = True,
        steps: int = 60,
        max_steps: int = 500,
        max_pixels: int = 4_000_000,
        detector: str = "dlib",
        face_policy: str = "largest",
    ) -> None:
        if not 1 <= steps <= max_steps:
            raise ConfigError(f"image_protection.steps must be in [1, max_steps={max_steps}], got {steps}")
        self.enabled = bool(enabled)
        self.steps = int(steps)
        self.max_steps = int(max_steps)
        self.max_pixels = int(max_pixels)
        self.detector = detector
        self.face_policy = face_policy if face_policy in _ONE_FACE_POLICIES else "largest"
        self._lock = threading.Lock()
        self._protector: ImageProtector | None = None
        #: seconds the ensemble took to load (None until loaded)
        self.load_seconds: float | None = None

    @classmethod
    def from_config(cls, section: Any, detector: str, face_policy: str) -> ImageProtection:
        """From the config's ``image_protection`` section (a dataclass, a mapping or None: the defaults)."""

        def opt(name: str, default: Any) -> Any:
            return section_value(section, name, default)

        return cls(
            enabled=bool(opt("enabled", True)), steps=int(opt("steps", 60)), max_steps=int(opt("max_steps", 500)),
            max_pixels=int(opt("max_pixels", 4_000_000)), detector=detector, face_policy=face_policy,
        )

    @property
    def loaded(self) -> bool:
        """Whether the encoder ensemble has been built."""
        return self._protector is not None

    # ------------------------------------------------------------------ request options (event loop, cheap)

    def options(self, request: pb.ProtectImageRequest) -> ProtectConfig:
        """The request's ProtectConfig; ImageProtectionFailure(INVALID_ARGUMENT) for out-of-range options."""
        from advface.protect.image import ProtectConfig

        if not request.image:
            raise _invalid("image is empty")
        epsilon = request.epsilon if request.HasField("epsilon") else DEFAULT_EPSILON
        if not (math.isfinite(epsilon) and MIN_EPSILON - 1e-9 <= epsilon <= MAX_EPSILON + 1e-9):
            raise _invalid(f"epsilon must be in [1/255, 32/255] (0..1 pixel scale), got {epsilon:g}")
        steps = int(request.steps) if request.HasField("steps") else self.steps
        if not 1 <= steps <= self.max_steps:
            raise _invalid(f"steps must be in [1, {self.max_steps}], got {steps}")
        target = request.target_similarity if request.HasField("target_similarity") else None
        if target is not None and not (math.isfinite(target) and -1 <= target <= 1):
            raise _invalid(f"target_similarity must be in [-1, 1], got {target:g}")
        config = ProtectConfig(epsilon=float(epsilon), steps=steps, seed=int(request.seed), target_similarity=target)
        try:
            config.validate()
        except ConfigError as exc:  # pragma: no cover - the checks above are stricter
            raise _invalid(str(exc)) from None
        return config

    # ------------------------------------------------------------------ protection (worker thread)

    def _load(self) -> ImageProtector:
        """The protector, built on first use (call with the lock held)."""
        if self._protector is None:
            from advface.protect.image import ImageProtector

            started = time.perf_counter()
            try:
                self._protector = ImageProtector(detector=self.detector, policy=self.face_policy)
            except Exception as exc:  # noqa: BLE001 - a server-side problem, not the request's
                log(_logger, logging.ERROR, "image protection unavailable", error=f"{type(exc).__name__}: {exc}")
                raise ImageProtectionFailure(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "image protection is unavailable on this server: its encoder ensemble could not be loaded",
                ) from None
            self.load_seconds = time.perf_counter() - started
            log(_logger, logging.INFO, "image protection loaded", encoders=self._protector.encoder_names,
                notes=self._protector.notes, seconds=round(self.load_seconds, 2))
        return self._protector

    def protect(self, data: bytes, config: ProtectConfig, deadline: float | None) -> ProtectedImage:
        """Decode ``data``, protect its face, encode the PNG. ``deadline``: ``time.monotonic()`` value after which
        the optimisation is not started (DEADLINE_EXCEEDED). ImageError for bad photos (no face, tiny face...)."""
        from advface.protect.image.io import decode_for_protection, encode_png

        photo = decode_for_protection(data, "image", max_pixels=self.max_pixels)
        with self._lock:
            protector = self._load()
            if deadline is not None and time.monotonic() >= deadline:
                raise ImageProtectionFailure(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before protecting the image"
                )
            face = protector.find_face(photo.image, "image")
            protected, report = protector.protect(
                [photo.image], config, ["image"], faces=[face], grayscale=[photo.grayscale]
            )[0]
        png = encode_png(protected, grayscale=photo.grayscale)
        report.notes = photo.notes + report.notes
        height, width = protected.shape[:2]
        return ProtectedImage(png, report_message(report, width, height))


def report_message(report: ProtectionReport, width: int, height: int) -> pb.ImageProtectionReport:
    """The ProtectionReport as an ImageProtectionReport message (infinite PSNR -> 0)."""
    similarity = []
    for name in report.encoders:
        entry = report.similarity[name]
        has_threshold = "score_after" in entry
        similarity.append(pb.EncoderSimilarity(
            encoder=name, cosine_after=float(entry["cosine_after"]), cosine_random=float(entry["cosine_random"]),
            has_threshold=has_threshold, score_after=float(entry.get("score_after", 0.0)),
            matched_after=bool(entry.get("matched_after", False)),
        ))
    return pb.ImageProtectionReport(
        similarity=similarity, psnr=report.psnr if math.isfinite(report.psnr) else 0.0, ssim=report.ssim,
        linf_levels=report.linf_levels, epsilon=report.epsilon, steps=report.steps, seconds=report.seconds,
        width=width, height=height, grayscale=report.grayscale, notes=list(report.notes),
    )
