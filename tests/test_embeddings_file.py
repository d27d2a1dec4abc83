from pathlib import Path

import numpy as np
import pytest

from advface.embeddings_file import EmbeddingsFile, load_embeddings, save_embeddings
from advface.errors import EmbeddingError


def test_roundtrip(tmp_path: Path):
    data = EmbeddingsFile(["a.jpg", "b/c.jpg"], np.ones((2, 4)), "dlib", "fp", {"bad.jpg": "no face found"})
    out = save_embeddings(tmp_path / "e.npz", data)
    back = load_embeddings(out)
    assert back.ids == ["a.jpg", "b/c.jpg"]
    assert back.embeddings.dtype == np.float32 and back.embeddings.shape == (2, 4)
    assert back.encoder == "dlib" and back.fingerprint == "fp"
    assert back.failed == {"bad.jpg": "no face found"}
    with np.load(out) as npz:  # the documented layout, readable without advface
        assert npz["ids"].tolist() == ["a.jpg", "b/c.jpg"]


def test_rejects_inconsistent_data(tmp_path: Path):
    with pytest.raises(EmbeddingError):
        EmbeddingsFile(["a"], np.ones((2, 4)))
    with pytest.raises(EmbeddingError, match="unique"):
        EmbeddingsFile(["a", "a"], np.ones((2, 4)))
    np.savez(tmp_path / "x.npz", foo=np.ones(3))
    with pytest.raises(EmbeddingError, match="not an embeddings file"):
        load_embeddings(tmp_path / "x.npz")
    (tmp_path / "y.npz").write_text("garbage")
    with pytest.raises(EmbeddingError):
        load_embeddings(tmp_path / "y.npz")
