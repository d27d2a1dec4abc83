"""The approximate (IVF) index option of SQLiteFaissStore: exact for small tenants, equal to exact when every list
is probed, good recall otherwise, deletions and reopening keep it consistent with SQLite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from advface.config import load_config
from advface.errors import ConfigError
from advface.store.sqlite_faiss import IndexOptions, SQLiteFaissStore

DIM = 128


def faces(n: int, seed: int, identities: int = 200) -> np.ndarray:
    """dlib-like vectors: identity centres plus per-photo noise (genuine distance ~0.4, impostor ~0.9)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=0.62 / np.sqrt(2 * DIM), size=(identities, DIM))
    rows = centres[rng.integers(0, identities, n)] + rng.normal(scale=0.4 / np.sqrt(2 * DIM), size=(n, DIM))
    return rows.astype(np.float32)


def fill(store: SQLiteFaissStore, x: np.ndarray, tenant: str = "t") -> None:
    store.add_many(tenant, [(f"s{i:05d}", x[i : i + 1], None) for i in range(len(x))])


def results(store: SQLiteFaissStore, probes: np.ndarray, k: int, tenant: str = "t") -> list[list[str]]:
    return [[m.subject_id for m in store.search(tenant, p, k)] for p in probes]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return faces(4000, 0), faces(50, 1)


def test_small_tenants_stay_exact(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, probes = data
    with (
        SQLiteFaissStore(tmp_path / "flat.db", DIM, "euclidean", use_gpu=False, index=IndexOptions("flat")) as flat,
        SQLiteFaissStore(
            tmp_path / "ivf.db", DIM, "euclidean", use_gpu=False, index=IndexOptions("ivf", min_rows=10_000)
        ) as ivf,
    ):
        fill(flat, x[:1000])
        fill(ivf, x[:1000])
        assert ivf.index_kind("t") == "flat" and ivf.index_kind("nobody") == "flat"
        assert results(ivf, probes, 10) == results(flat, probes, 10)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_ivf_probing_every_list_equals_exact(tmp_path: Path, data: tuple[np.ndarray, np.ndarray], metric: str) -> None:
    x, probes = data
    opts = IndexOptions("ivf", min_rows=500, nlist=16, nprobe=16)
    with (
        SQLiteFaissStore(tmp_path / "flat.db", DIM, metric, use_gpu=False, index=IndexOptions("flat")) as flat,
        SQLiteFaissStore(tmp_path / "ivf.db", DIM, metric, use_gpu=False, index=opts) as ivf,
    ):
        fill(flat, x[:2000])
        fill(ivf, x[:2000])
        assert ivf.index_kind("t") == "ivf"
        exact = [[(m.subject_id, round(m.score, 5)) for m in flat.search("t", p, 10)] for p in probes]
        approx = [[(m.subject_id, round(m.score, 5)) for m in ivf.search("t", p, 10)] for p in probes]
        assert approx == exact


def test_ivf_recall_on_a_larger_set(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, probes = data
    with (
        SQLiteFaissStore(tmp_path / "flat.db", DIM, "euclidean", use_gpu=False, index=IndexOptions("flat")) as flat,
        SQLiteFaissStore(
            tmp_path / "ivf.db", DIM, "euclidean", use_gpu=False, index=IndexOptions("ivf", min_rows=1000, nprobe=32)
        ) as ivf,
    ):
        fill(flat, x)
        fill(ivf, x)
        assert ivf.index_kind("t") == "ivf"
        ti = ivf._tenants["t"]
        assert ti.ivf.nlist == IndexOptions().nlist_for(len(x)) == 63 and ti.ivf.nprobe == 32
        exact, approx = results(flat, probes, 10), results(ivf, probes, 10)
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
        assert recall >= 0.9
        # probing fewer lists finds fewer true neighbours: the index really is approximate
        ti.ivf.nprobe = 1
        sparse = results(ivf, probes, 10)
        assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(sparse, exact)]) < recall


def test_deletion_reopen_retrain_and_drop(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    path = tmp_path / "ivf.db"
    opts = IndexOptions("ivf", min_rows=400, nprobe=64, retrain_factor=2.0)
    with SQLiteFaissStore(path, DIM, "euclidean", use_gpu=False, index=opts) as store:
        fill(store, x[:399])
        assert store.index_kind("t") == "flat"
        store.add_many("t", [("s00399", x[399:400], None)])
        ti = store._tenants["t"]
        assert store.index_kind("t") == "ivf" and ti.ivf.ntotal == 400 and ti.ivf_trained_rows == 400
        store.add_many("t", [("bulk", x[400:799], None)])  # one subject, 399 templates
        assert ti.ivf_trained_rows == 400 and ti.ivf.ntotal == 799  # added, not retrained yet
        store.add_many("t", [("s00799", x[799:800], None)])
        assert ti.ivf_trained_rows == 800  # grown retrain_factor times: retrained
        # a deleted subject leaves the IVF index too and is never found again
        assert store.search("t", x[5], 1)[0].subject_id == "s00005"
        store.delete_subject("t", "s00005")
        assert ti.ivf.ntotal == 799 == store.index_size("t") == store.count("t")
        assert all(m.subject_id != "s00005" for m in store.search("t", x[5], 20))
    with SQLiteFaissStore(path, DIM, "euclidean", use_gpu=False, index=opts) as store:
        ti = store._tenants["t"]
        assert store.index_kind("t") == "ivf" and ti.ivf.ntotal == 799 and ti.ivf_trained_rows == 799
        assert all(m.subject_id != "s00005" for m in store.search("t", x[5], 20))
        assert store.search("t", x[500], 1)[0].subject_id == "bulk"
        assert store.delete_subject("t", "bulk") == 399
        assert store.index_kind("t") == "ivf" and ti.ivf.ntotal == 400  # still above min_rows / 2
        store.delete_subject("t", "s00799")
        for i in range(200, 400):
            store.delete_template("t", store.get_subject("t", f"s{i:05d}").template_ids[0])
        assert store.index_kind("t") == "flat" and store.index_size("t") == 199  # below min_rows / 2: exact
        assert store.search("t", x[7], 1)[0].subject_id == "s00007"


def test_index_options_and_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="index must be one of flat, ivf"):
        IndexOptions("hnsw")
    with pytest.raises(ConfigError, match="nprobe must be an integer >= 1"):
        IndexOptions("ivf", nprobe=0)
    assert IndexOptions().nlist_for(1_000_000) == 1000 and IndexOptions(nlist=50).nlist_for(1000) == 25
    cfg = load_config(None, env={})
    assert (cfg.store.index, cfg.store.ivf_min_rows, cfg.store.ivf_nlist, cfg.store.ivf_nprobe) == (
        "ivf",
        IndexOptions().min_rows,
        0,
        IndexOptions().nprobe,
    )
    cfg = load_config(None, env={"ADVFACE_STORE_INDEX": "flat", "ADVFACE_STORE_IVF_NPROBE": "8"})
    assert cfg.store.index == "flat" and cfg.store.ivf_nprobe == 8
    path = tmp_path / "c.yaml"
    path.write_text("store: {index: hnsw}")
    with pytest.raises(ConfigError, match=r"store\.index: must be one of flat, ivf"):
        load_config(path, env={})
    path.write_text("store: {ivf_nprobe: 0}")
    with pytest.raises(ConfigError, match=r"store\.ivf_nprobe: must be in \[1, 65536\]"):
        load_config(path, env={})


def test_server_opens_the_configured_index(tmp_path: Path) -> None:
    from advface.service import open_store

    path = tmp_path / "c.yaml"
    path.write_text(f"store: {{data_dir: {tmp_path / 'data'}, index: ivf, ivf_min_rows: 300, ivf_nprobe: 7}}")
    store = open_store(load_config(path, env={}), DIM, "euclidean")
    try:
        assert store.index_options == IndexOptions("ivf", min_rows=300, nprobe=7)
        fill(store, faces(300, 3))
        assert store.index_kind("t") == "ivf" and store._tenants["t"].ivf.nprobe == 7
    finally:
        store.close()
