import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from advface.errors import ImageError
from advface.images import iter_image_files, load_image


def _save(img: Image.Image, path: Path, fmt: str = "PNG", **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


def test_color_modes_become_rgb(tmp_path: Path):
    gray = _save(Image.new("L", (20, 10), 100), tmp_path / "g.png")
    rgba = _save(Image.new("RGBA", (20, 10), (10, 20, 30, 0)), tmp_path / "a.png")
    deep = _save(Image.fromarray(np.full((10, 20), 65535, np.uint16)), tmp_path / "d.png")
    for path in (gray, rgba, deep):
        arr = load_image(path)
        assert arr.shape == (10, 20, 3) and arr.dtype == np.uint8
    assert (load_image(gray) == 100).all()
    assert (load_image(rgba) == 255).all()  # fully transparent -> white background
    assert (load_image(deep) == 255).all()


def test_exif_orientation_is_applied(tmp_path: Path):
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    path = _save(img, tmp_path / "o.jpg", "JPEG", exif=exif.tobytes())
    assert load_image(path).shape == (30, 10, 3)


def test_bad_files_raise_clear_errors(tmp_path: Path):
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.new("RGB", (200, 200), (1, 2, 3)).save(buf, "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    cases = {
        "text.jpg": "not a readable image",
        "empty.jpg": "empty file",
        "trunc.jpg": "truncated",
        "missing.jpg": "cannot read file",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageError, match=reason) as info:
            load_image(tmp_path / name)
        assert name in str(info.value)


def test_huge_images_are_refused_before_decoding(tmp_path: Path):
    path = _save(Image.new("L", (8000, 6000)), tmp_path / "huge.png")
    with pytest.raises(ImageError, match="too large"):
        load_image(path)
    assert load_image(path, max_pixels=50_000_000).shape == (6000, 8000, 3)


def test_iter_image_files(tmp_path: Path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for rel in ("d/b.jpg", "d/a.png", "d/sub/c.JPG", "d/notes.txt"):
        (tmp_path / rel).write_bytes(b"x")
    found = iter_image_files([tmp_path / "d", tmp_path / "d" / "a.png"])
    assert [i for _p, i in found] == ["a.png", "b.jpg", "sub/c.JPG", str(tmp_path / "d" / "a.png")]
    with pytest.raises(ImageError, match="no such file"):
        iter_image_files([tmp_path / "nope"])
