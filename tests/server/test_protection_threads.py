"""protection.slots / protection.threads: how many protections run at once and with how many torch threads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sidecar_harness import make_config

from advface.config import load_config
from advface.errors import ConfigError


def test_slots_and_threads_from_config(tmp_path: Path, start_server) -> None:  # noqa: ANN001
    before = torch.get_num_threads()
    try:
        server = start_server(make_config(tmp_path / "a", protection={"slots": 1, "threads": 2}))
        assert server.servicer.service.batcher.slots == 1
        # torch's thread count is per thread, taken from the global setting when a thread first uses torch:
        # what the protection workers see
        assert (
            server.servicer.service.protection_threads
            == 2
            == server.servicer.service.pool.submit(torch.get_num_threads).result()
        )
        # auto: slots = min(workers, cores), one torch thread each
        torch.set_num_threads(1)
        server = start_server(make_config(tmp_path / "b", server={"workers": 1}))
        assert server.servicer.service.batcher.slots == 1 and server.servicer.service.protection_threads == 1
        assert server.servicer.service.pool.submit(torch.get_num_threads).result() == 1
    finally:
        torch.set_num_threads(before)


def test_slots_and_threads_validation(tmp_path: Path) -> None:
    cfg = load_config(None, env={"ADVFACE_PROTECTION_SLOTS": "2", "ADVFACE_PROTECTION_THREADS": "1"})
    assert (cfg.protection.slots, cfg.protection.threads) == (2, 1)
    assert (load_config(None, env={}).protection.slots, load_config(None, env={}).protection.threads) == (0, 0)
    path = tmp_path / "c.yaml"
    path.write_text("protection: {threads: -1}")
    with pytest.raises(ConfigError, match=r"protection\.threads: must be in \[0, 1024\]"):
        load_config(path, env={})


def test_large_batch_uses_every_slot_with_the_same_templates(tmp_path: Path, start_server) -> None:  # noqa: ANN001
    import threading

    import numpy as np
    from sidecar_harness import random_embedding

    server = start_server(make_config(tmp_path, server={"max_batch": 40, "workers": 2}, protection={"slots": 2}))
    batcher = server.servicer.service.batcher
    protect = batcher._protect
    lock, active, most = threading.Lock(), [0], [0]

    def counting(x: np.ndarray) -> np.ndarray:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return protect(x)
        finally:
            with lock:
                active[0] -= 1

    batcher._protect = counting
    raw = np.stack([random_embedding(100 + i) for i in range(40)])
    with server.client() as c:
        c.enroll_batch([(f"p{i}", raw[i]) for i in range(40)], tenant="big")
    assert batcher.calls == 2 and batcher.rows == 40 and most[0] == 2  # chunks of 32 and 8, at the same time
    store = server.servicer.service.store
    stored = np.stack([store.subject_vectors("big", f"p{i}")[0] for i in range(40)])
    np.testing.assert_array_equal(stored, server.servicer.service.protector.protect(raw))
