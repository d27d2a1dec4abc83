from pathlib import Path

import numpy as np

from advface.datasets.cache import CachedResult, EmbeddingCache


def test_cache_roundtrip_and_isolation_by_pipeline(tmp_path: Path):
    with EmbeddingCache(tmp_path) as cache:
        key = EmbeddingCache.content_key(b"image bytes")
        other = EmbeddingCache.content_key(b"other image")
        vec = np.arange(128, dtype=np.float32)
        cache.put_many("enc-a", {key: CachedResult(vec, None), other: CachedResult(None, "no face found")})
        got = cache.get_many("enc-a", [key, other, "absent"])
        assert np.array_equal(got[key].embedding, vec)
        assert got[other].embedding is None and got[other].error == "no face found"
        assert "absent" not in got
        assert cache.get_many("enc-b", [key]) == {}
        assert cache.count("enc-a") == 2
    # persists across instances
    with EmbeddingCache(tmp_path) as cache:
        assert cache.count() == 2
        cache.clear("enc-a")
        assert cache.count() == 0


def test_cache_key_depends_on_content_only():
    assert EmbeddingCache.content_key(b"a") == EmbeddingCache.content_key(b"a")
    assert EmbeddingCache.content_key(b"a") != EmbeddingCache.content_key(b"b")
