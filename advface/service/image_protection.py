"""Protecting photos on request (the sidecar's ``ProtectImage``): options, the lazily loaded protector, one at a time.

The encoder ensemble of :class:`advface.protect.image.ImageProtector` (dlib-torch + MobileFaceNet; dlib only, with a
note in every report, when MobileFaceNet's model file is not in ``$ADVFACE_MODELS_DIR``) takes seconds and hundreds
of MB to load, so it is built on the first call, once per service, and never when ``image_protection.enabled`` is
false. Calls are run one at a time (one lock): a protection already uses every torch thread, and the detector and
models are not shared across threads. The photo lives only in memory: nothing of it is written to disk or logs.

Deadlines: a call is refused (DeadlineExceededError) when its deadline has passed before the optimisation starts,
including after waiting for the lock, and a started optimisation stops at the first step after its deadline passes
or its caller goes away (``abandoned``), so a gone client does not hold the one protection slot; callers bound the
time with ``steps`` (and ``target_similarity``), the operator with ``image_protection.max_steps`` and
``max_pixels``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from advface.config import ImageProtectionConfig
from advface.errors import ConfigError, DeadlineExceededError, PreconditionError, ValidationError

if TYPE_CHECKING:
    from advface.protect.image import ImageProtector, ProtectConfig, ProtectionReport

#: The range of L-inf budgets a request may ask for (unset: the budget shape's default,
#: :data:`advface.protect.image.core.SHAPE_DEFAULTS`).
MAX_EPSILON = 32 / 255
MIN_EPSILON = 1 / 255
#: Face detection policies the image protector accepts (it protects one face per photo): "all" becomes "largest".
_ONE_FACE_POLICIES = ("largest", "center", "best-score", "single")

#: Logger of the service layer (structured fields in ``extra={"fields": {...}}``; the sidecar formats them).
LOGGER_NAME = "advface.service"
_logger = logging.getLogger(LOGGER_NAME)


@dataclass
class ProtectedImage:
    """A protected photo: the lossless PNG, the protection report and the image size."""

    png: bytes
    report: ProtectionReport
    width: int
    height: int


class ImageProtectionService:
    """Image protection of one service: option checks, the lazily built protector, one protection at a time."""

    def __init__(self, config: ImageProtectionConfig, detector: str = "dlib", face_policy: str = "largest") -> None:
        if not 1 <= config.steps <= config.max_steps:
            raise ConfigError(
                f"image_protection.steps must be in [1, max_steps={config.max_steps}], got {config.steps}"
            )
        self.config = config
        self.detector = detector
        self.face_policy = face_policy if face_policy in _ONE_FACE_POLICIES else "largest"
        self._lock = threading.Lock()
        self._protector: ImageProtector | None = None
        #: seconds the ensemble took to load (None until loaded)
        self.load_seconds: float | None = None

    @property
    def enabled(self) -> bool:
        """Whether photos may be protected on this service."""
        return self.config.enabled

    @property
    def loaded(self) -> bool:
        """Whether the encoder ensemble has been built."""
        return self._protector is not None

    def options(
        self,
        image: bytes,
        epsilon: float | None = None,
        steps: int | None = None,
        seed: int = 0,
        target_similarity: float | None = None,
        guidance: Sequence[str] | None = None,
    ) -> ProtectConfig:
        """The protection options of one request (None or empty: the default); PreconditionError when image
        protection is disabled, ValidationError for an empty photo, out-of-range options or unknown guidance."""
        from advface.protect.image import ProtectConfig
        from advface.protect.image.guidance import parse_guidance

        if not self.enabled:
            raise PreconditionError("image protection is disabled on this server")
        if not image:
            raise ValidationError("image is empty")
        if epsilon is not None and not (math.isfinite(epsilon) and MIN_EPSILON - 1e-9 <= epsilon <= MAX_EPSILON + 1e-9):
            raise ValidationError(f"epsilon must be in [1/255, 32/255] (0..1 pixel scale), got {epsilon:g}")
        steps = self.config.steps if steps is None else int(steps)
        if not 1 <= steps <= self.config.max_steps:
            raise ValidationError(f"steps must be in [1, {self.config.max_steps}], got {steps}")
        if target_similarity is not None and not (math.isfinite(target_similarity) and -1 <= target_similarity <= 1):
            raise ValidationError(f"target_similarity must be in [-1, 1], got {target_similarity:g}")
        try:
            terms = parse_guidance(guidance) if guidance else (self.config.guidance or ProtectConfig.guidance)
        except ConfigError as exc:
            raise ValidationError(str(exc)) from None
        options = ProtectConfig(
            epsilon=None if epsilon is None else float(epsilon),
            steps=steps,
            seed=int(seed),
            target_similarity=target_similarity,
            guidance=terms,
            budget=self.config.budget or ProtectConfig.budget,
        )
        try:
            options.validate()
        except ConfigError as exc:  # pragma: no cover - the checks above are stricter
            raise ValidationError(str(exc)) from None
        return options

    def _load(self) -> ImageProtector:
        """The protector, built on first use (call with the lock held)."""
        if self._protector is None:
            from advface.protect.image import ImageProtector

            started = time.perf_counter()
            try:
                self._protector = ImageProtector(
                    detector=self.detector, policy=self.face_policy, surrogate=self.config.surrogate
                )
            except Exception as exc:  # noqa: BLE001 - a server-side problem, not the request's
                _logger.error(
                    "image protection unavailable", extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}}
                )
                raise PreconditionError(
                    "image protection is unavailable on this server: its encoder ensemble could not be loaded"
                ) from None
            self.load_seconds = time.perf_counter() - started
            _logger.info(
                "image protection loaded",
                extra={
                    "fields": {
                        "encoders": self._protector.encoder_names,
                        "notes": self._protector.notes,
                        "seconds": round(self.load_seconds, 2),
                    }
                },
            )
        return self._protector

    def protect(
        self,
        data: bytes,
        options: ProtectConfig,
        deadline: float | None = None,
        abandoned: threading.Event | None = None,
    ) -> ProtectedImage:
        """Decode ``data``, protect its face, encode the PNG. ``deadline``: ``time.monotonic()`` value after which
        the optimisation stops (DeadlineExceededError), as it does once ``abandoned`` is set. ImageError for bad
        photos (no face, tiny face, too many pixels...)."""

        def should_stop() -> bool:
            return (deadline is not None and time.monotonic() >= deadline) or (
                abandoned is not None and abandoned.is_set()
            )

        from advface.protect.image.io import decode_for_protection, encode_png

        photo = decode_for_protection(data, "image", max_pixels=self.config.max_pixels)
        with self._lock:
            protector = self._load()
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceededError("deadline exceeded before protecting the image")
            try:
                protector.check_guidance(options)
            except ConfigError as exc:
                _logger.error("image protection guidance unavailable", extra={"fields": {"error": str(exc)}})
                raise PreconditionError(
                    f"guidance {', '.join(options.guidance)} is unavailable on this server: its defender surrogate "
                    "could not be loaded"
                ) from None
            face = protector.find_face(photo.image, "image")
            protected, report = protector.protect(
                [photo.image], options, ["image"], faces=[face], grayscale=[photo.grayscale], should_stop=should_stop
            )[0]
        png = encode_png(protected, grayscale=photo.grayscale)
        report.notes = photo.notes + report.notes
        height, width = protected.shape[:2]
        return ProtectedImage(png, report, width, height)
