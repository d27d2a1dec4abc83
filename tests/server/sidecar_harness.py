"""The test harness of the sidecar tests: a REAL server (grpc.aio in a background thread with its own event loop)
on a free loopback port, configured through a YAML file and :func:`advface.config.load_config`.

Speed: the encoder is ``dlib-torch`` (same embeddings as ``dlib``, loads in 0.1 s) and protection runs 2 ascent
steps (the default is 10); everything else is the default configuration.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from advface.client import AdvFaceClient
from advface.config import Config, load_config
from server.app import Sidecar

DIM = 128
ADMIN_TOKEN = "admin-token-0123456789abcdef"
ACME_TOKEN = "acme-token-0123456789abcdef"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) and key != "tokens" else value
    return out


def make_config(folder: Path, **sections: dict) -> Config:
    """A Config for tests: loopback, any free port, small batches, fast encoder and protection, data in
    ``folder/data``; ``sections`` override keys (``server={"max_batch": 3}``). The key folder is off (plain AdvFace
    templates, seed 0) unless ``keys={"auto": True, ...}``: test_secure_defaults.py covers the defaults."""
    base = {
        "server": {"host": "127.0.0.1", "port": 0, "max_batch": 5, "grace_seconds": 1.0, "workers": 2},
        "encoder": {"name": "dlib-torch", "detector": "dlib", "face_policy": "largest"},
        "protection": {"enabled": True, "steps": 2, "rel_l2": 0.1, "seed": 0},
        "store": {"data_dir": str(folder / "data"), "use_gpu": False},
        "matching": {"top_k_max": 10},
        "logging": {"level": "INFO", "json": True},
        "metrics": {"port": 0},
        "keys": {"auto": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "advface.yaml"
    path.write_text(yaml.safe_dump(_merge(base, sections)))
    return load_config(path, env={})


class ServerThread:
    """A Sidecar running on its own event loop in a daemon thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.sidecar: Sidecar | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._grace = 0.0
        self._thread = threading.Thread(target=self._run, name="advface-test-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(120):
            raise TimeoutError("server did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _main(self) -> None:
        try:
            self._stop = asyncio.Event()
            self.sidecar = Sidecar(self.config)
            await self.sidecar.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await self.sidecar.stop(self._grace)

    @property
    def address(self) -> str:
        assert self.sidecar is not None
        return self.sidecar.address

    @property
    def servicer(self) -> Any:
        assert self.sidecar is not None
        return self.sidecar.servicer

    def client(self, **kwargs: Any) -> AdvFaceClient:
        kwargs.setdefault("timeout", 60.0)
        return AdvFaceClient(self.address, **kwargs)

    def stop(self, grace: float = 0.0) -> None:
        if self._thread.is_alive() and self._stop is not None:
            self._grace = grace
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(60)
            assert not self._thread.is_alive(), "server did not stop"


def random_embedding(seed: int) -> np.ndarray:
    """A dlib-like 128-d vector (norm about 1)."""
    v = np.random.default_rng(seed).normal(size=DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)
