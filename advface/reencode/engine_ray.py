"""The Ray engine: Ray Data ``map_batches`` over a pool of actors, each loading the protector once.

The source is read by the driver in *windows* of a few chunks (memory stays bounded, progress is committed per
chunk as on the local engine); each window becomes a small Ray dataset (rows: position, id, vector) mapped by
:class:`ProtectActor` (a callable class: :func:`reencode_chunk` on its batch) and collected back in position order.
Ray Data builds the actor pool per dataset, so the protector (the shadow; for advface-id every shadow of the
ensemble and the encoder's torch module) is loaded once per actor per window, from its picklable
:class:`~advface.protect.ProtectionSpec`: windows are
``window_chunks`` chunks long to amortise that. Without a cluster address Ray starts locally with ``num_cpus``
CPUs; actors take one CPU (and one GPU when the cluster has GPUs) and run torch on one thread.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from advface.errors import ConfigError
from advface.protect import ProtectionSpec
from advface.reencode.engine_local import Commit
from advface.reencode.sources import RawChunk

log = logging.getLogger(__name__)


class ProtectActor:
    """Ray Data callable class: loads the protector once (per actor), protects each batch it is given."""

    def __init__(self, spec: ProtectionSpec, dim: int, device: str, threads: int) -> None:
        from advface.protect import load_protector
        from advface.threads import apply_threads

        apply_threads(threads)
        self.protector = load_protector(spec, device=device)
        if self.protector.dim != dim:
            raise ConfigError(f"protector takes dimension {self.protector.dim}, the templates have {dim}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from advface.reencode.chunk import reencode_chunk

        ids = [str(i) for i in batch["id"].tolist()]
        _, protected = reencode_chunk(ids, np.asarray(batch["vector"], np.float32), self.protector)
        return {"pos": batch["pos"], "vector": protected}


class RayEngine:
    """Protect chunks on a Ray cluster (local unless ``address``) with ``num_cpus`` single-CPU actors."""

    name = "ray"

    def __init__(
        self,
        spec: ProtectionSpec,
        dim: int,
        *,
        num_cpus: int | None = None,
        address: str | None = None,
        window_chunks: int | None = None,
        device: str | None = None,
    ) -> None:
        try:
            import ray  # noqa: F401
            import ray.data  # noqa: F401
        except ImportError as exc:  # pragma: no cover - ray is a dependency
            raise ConfigError(f"--engine ray needs Ray Data installed ({exc})") from None
        self.spec = spec
        self.dim = dim
        self.num_cpus = num_cpus
        self.address = address
        self.window_chunks = window_chunks
        self.device = device

    def _start(self) -> tuple[int, int]:
        import ray

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "ignore_reinit_error": True,
                "configure_logging": False,
            }
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                ray.init(num_cpus=self.num_cpus or os.cpu_count() or 1, **kwargs)
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        return max(cpus, 1), gpus

    def run(self, chunks: Iterator[tuple[int, RawChunk]], commit: Commit) -> None:
        """Protect the chunks window by window; ``commit`` each in order."""
        import pyarrow as pa
        import ray
        import ray.data
        from ray.data.extensions import ArrowTensorArray

        cpus, gpus = self._start()
        actors = gpus if gpus else cpus
        device = self.device or ("cuda" if gpus else "cpu")
        window = self.window_chunks or max(2 * actors, 8)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = True
        kwargs = {"spec": self.spec, "dim": self.dim, "device": device, "threads": 1}
        try:
            while True:
                batch = list(itertools.islice(chunks, window))
                if not batch:
                    return
                sizes = [len(raw.ids) for _, raw in batch]
                ids = [i for _, raw in batch for i in raw.ids]
                vectors = np.concatenate([raw.vectors for _, raw in batch]).astype(np.float32)
                table = pa.table(
                    {
                        "pos": np.arange(len(ids), dtype=np.int64),
                        "id": pa.array(ids, pa.string()),
                        "vector": ArrowTensorArray.from_numpy(vectors),
                    }
                )
                per_actor = max(1, -(-len(ids) // actors))
                rows = min(per_actor, max(sizes))
                blocks = [table.slice(start, rows) for start in range(0, len(ids), rows)]  # one block per batch
                ds = ray.data.from_arrow(blocks).map_batches(
                    ProtectActor,
                    fn_constructor_kwargs=kwargs,
                    batch_size=rows,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=min(actors, len(blocks))),
                    num_cpus=0 if gpus else 1,
                    num_gpus=1 if gpus else 0,
                )
                protected = np.empty_like(vectors)
                got = 0
                for out in ds.iter_batches(batch_format="numpy", batch_size=None):
                    protected[out["pos"]] = out["vector"]
                    got += len(out["pos"])
                if got != len(ids):
                    raise RuntimeError(f"Ray returned {got} of {len(ids)} rows")
                start = 0
                for (index, raw), n in zip(batch, sizes, strict=True):
                    commit(index, raw, raw.ids, protected[start : start + n])
                    start += n
        finally:
            if not self.address:
                ray.shutdown()
