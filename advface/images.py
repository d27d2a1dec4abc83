"""Reading images safely: any common format in, RGB uint8 out, with a clear error otherwise."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from advface.errors import ImageError

#: Images above this many pixels are refused before decoding (decompression bombs, huge scans); the library's
#: default (the sidecar uses its own, smaller ``server.max_image_pixels``).
MAX_PIXELS = 40_000_000
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})


def load_image(source: str | os.PathLike[str] | bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file (path or bytes) to an ``H x W x 3`` RGB uint8 array.

    EXIF orientation is applied; grayscale, palette, RGBA (composited on white)
    and 16-bit images are converted. Raises :class:`ImageError` naming the source for unreadable, truncated,
    non-image, oversized (> ``max_pixels``) or animated / multi-frame input (GIF, APNG, WebP, multi-page TIFF:
    :func:`frame_count`), so no caller silently uses a first frame.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise ImageError(name, f"cannot read file ({exc.strerror or exc})") from exc
    if not data:
        raise ImageError(name, "empty file")
    with _reading(name):
        image = _open_checked(data, name, max_pixels)
        frames = frame_count(image)
        if frames > 1:
            raise ImageError(name, f"animated or multi-frame image ({frames} frames); send one still photo")
        image.load()
    return _to_rgb(ImageOps.exif_transpose(image) or image)


@contextlib.contextmanager
def _reading(name: str) -> Iterator[None]:
    """Turn every way Pillow fails on bad input into an ImageError naming ``name`` (decompression-bomb warnings
    are errors inside)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(name, f"not a readable image ({exc.__class__.__name__})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(name, f"corrupt or truncated image ({exc})") from exc


def _open_checked(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """The lazily opened image of ``data`` (header read, no pixel decoded); ImageError over ``max_pixels``."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            name, f"image too large ({width}x{height} = {width * height} px > the limit of {max_pixels} px)"
        )
    return image


def image_size(data: bytes, *, max_pixels: int = MAX_PIXELS, name: str = "<bytes>") -> tuple[int, int]:
    """``(width, height)`` of encoded image ``data`` read from its header alone, nothing decoded (microseconds for
    any size): ImageError when ``data`` is empty, its header unreadable or the image over ``max_pixels``, so a
    decompression bomb or a huge scan is refused before a worker spends time or memory on it. :func:`load_image`
    makes the same check (and the rest of its checks) before it decodes."""
    if not data:
        raise ImageError(name, "empty file")
    with _reading(name), _open_checked(data, name, max_pixels) as image:
        return image.size


def frame_count(image: Image.Image) -> int:
    """Frames of an opened image that would each be a picture: ``n_frames``, except 1 for a JPEG with a
    multi-picture (MPO) extension, whose first frame is the photo (cameras append previews or depth maps)."""
    if image.format == "MPO":
        return 1
    return int(getattr(image, "n_frames", 1) or 1)


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def iter_image_files(paths: list[str | os.PathLike[str]], *, recursive: bool = True) -> list[tuple[Path, str]]:
    """Expand files and folders into ``(path, id)`` pairs, sorted within each folder.

    A file given directly keeps the id it was given as; a file found inside a folder gets its path relative to
    that folder as id. Folders contribute files with known image suffixes only. Missing paths raise ImageError.
    """
    out: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            for file in sorted(p for p in path.glob(pattern) if p.is_file()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    out.append((file, file.relative_to(path).as_posix()))
        elif path.exists():
            out.append((path, str(raw)))
        else:
            raise ImageError(str(raw), "no such file or folder")
    return out
