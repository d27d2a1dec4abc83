from pathlib import Path

import pytest

from advface.datasets import LFW, IdentityFolderDataset, read_pairs
from advface.errors import ConfigError


def test_lfw_view2_pairs(lfw_dir: Path):
    lfw = LFW(lfw_dir)
    pairs = lfw.pairs()
    assert len(pairs) == 6000
    assert sum(p.same for p in pairs) == 3000
    assert sorted({p.fold for p in pairs}) == list(range(10))
    for fold in range(10):
        in_fold = [p for p in pairs if p.fold == fold]
        assert len(in_fold) == 600 and sum(p.same for p in in_fold) == 300
    assert all(p.a.split("/")[0] == p.b.split("/")[0] for p in pairs if p.same)
    assert all(p.a.split("/")[0] != p.b.split("/")[0] for p in pairs if not p.same)
    assert lfw.path(pairs[0].a).is_file()


def test_lfw_images_and_identities(lfw_dir: Path):
    lfw = LFW(lfw_dir)
    assert len(lfw) == 13233
    assert len(lfw.identities()) == 5749
    assert sum(len(v) >= 2 for v in lfw.by_identity().values()) == 1680


def test_lfw_needs_a_location(monkeypatch):
    monkeypatch.delenv("ADVFACE_LFW_DIR", raising=False)
    with pytest.raises(ConfigError, match="ADVFACE_LFW_DIR"):
        LFW()


def _make_folder(root: Path) -> None:
    for person, n in (("Ann", 2), ("Bob", 1)):
        (root / person).mkdir(parents=True)
        for i in range(1, n + 1):
            (root / person / f"{person}_{i:04d}.jpg").write_bytes(b"x")


def test_read_pairs_validates(tmp_path: Path):
    _make_folder(tmp_path / "images")
    good = tmp_path / "pairs.txt"
    good.write_text("1\t1\nAnn\t1\t2\nAnn\t1\tBob\t1\n")
    pairs = read_pairs(good, images_root=tmp_path / "images")
    assert [(p.a, p.b, p.same, p.fold) for p in pairs] == [
        ("Ann/Ann_0001.jpg", "Ann/Ann_0002.jpg", True, 0),
        ("Ann/Ann_0001.jpg", "Bob/Bob_0001.jpg", False, 0),
    ]
    missing = tmp_path / "missing.txt"
    missing.write_text("1\t1\nAnn\t1\t3\nAnn\t1\tBob\t1\n")
    with pytest.raises(ConfigError, match="missing photo"):
        read_pairs(missing, images_root=tmp_path / "images")
    short = tmp_path / "short.txt"
    short.write_text("1\t1\nAnn\t1\t2\n")
    with pytest.raises(ConfigError, match="expected 2 pairs"):
        read_pairs(short)
    bad = tmp_path / "bad.txt"
    bad.write_text("1\t1\nAnn\tone\t2\nAnn\t1\tBob\t1\n")
    with pytest.raises(ConfigError, match="malformed line 2"):
        read_pairs(bad)


def test_identity_folder_dataset(tmp_path: Path):
    _make_folder(tmp_path)
    ds = IdentityFolderDataset(tmp_path)
    assert [i.id for i in ds] == ["Ann/Ann_0001.jpg", "Ann/Ann_0002.jpg", "Bob/Bob_0001.jpg"]
    assert ds.identities() == ["Ann", "Bob"]
    assert len(IdentityFolderDataset(tmp_path, min_images=2)) == 2
    with pytest.raises(ConfigError):
        IdentityFolderDataset(tmp_path / "nope")
