"""Reading photos for protection and writing protected PNGs.

Reading refuses what cannot be protected as one still photo (animated or multi-frame files) and records what was
changed on the way in (EXIF orientation applied, CMYK converted, grey kept grey). Writing is lossless PNG without
any of the input's metadata, through a temporary file renamed into place, so an interrupted run never leaves a
half-written output (which a resumed run would otherwise skip).
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from advface.errors import ImageError
from advface.images import MAX_PIXELS, frame_count, load_image

#: PIL modes of grey photos: they are protected with one perturbation shared by the channels and written grey.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
_EXIF_ORIENTATION = 0x0112


@dataclass
class LoadedPhoto:
    """A decoded photo: ``image`` (RGB uint8, orientation applied), whether it is grey, and what was changed."""

    image: np.ndarray
    grayscale: bool
    notes: list[str] = field(default_factory=list)


def load_for_protection(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> LoadedPhoto:
    """Decode ``path`` for protection; ImageError for unreadable, corrupt, oversized or animated/multi-frame files."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(name, f"cannot read file ({exc.strerror or exc})") from exc
    return decode_for_protection(data, name, max_pixels=max_pixels)


def decode_for_protection(data: bytes, name: str = "image", *, max_pixels: int = MAX_PIXELS) -> LoadedPhoto:
    """Decode encoded image ``data`` in memory, as :func:`load_for_protection` (``name`` only labels errors)."""
    notes: list[str] = []
    try:
        with Image.open(io.BytesIO(data)) as probe:
            frames = frame_count(probe)
            mode = probe.mode
            orientation = probe.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - load_image below gives the precise message
        frames, mode, orientation = 1, "", 1
    if frames > 1:
        raise ImageError(name, f"animated or multi-frame image ({frames} frames); protect each frame as a still photo")
    image = load_image(data, max_pixels=max_pixels)
    gray = mode in GRAY_MODES
    if mode == "CMYK":
        notes.append("converted from CMYK to RGB")
    if gray:
        notes.append("grey photo: protected and written grey")
    if orientation not in (1, None):
        notes.append(f"EXIF orientation {orientation} applied")
    return LoadedPhoto(image, gray, notes)


def save_png(image: np.ndarray, path: str | os.PathLike[str], grayscale: bool = False) -> None:
    """Write ``image`` (RGB uint8) as a PNG without metadata, atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = Image.fromarray(image[:, :, 0] if grayscale else image, mode="L" if grayscale else "RGB")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            pil.save(fh, format="PNG", optimize=False, compress_level=6)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_png(image: np.ndarray, grayscale: bool = False) -> bytes:
    """``image`` (RGB uint8) as PNG bytes, in memory, without metadata (grey photos as one-channel PNGs)."""
    pil = Image.fromarray(image[:, :, 0] if grayscale else image, mode="L" if grayscale else "RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()
