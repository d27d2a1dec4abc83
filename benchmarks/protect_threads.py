"""Protection throughput by torch thread setting, with and without competing CPU jobs; advface-id's determinism.

Usage::

    python benchmarks/protect_threads.py --note "what else ran on the machine"

For each load condition -- ``background`` (whatever the machine runs anyway: the load average is recorded, and
``--note`` says what it was) and ``competing`` (``--competitors`` extra ``python -c 'while True: pass'``
processes) -- plain AdvFace (shipped dlib shadow, default parameters) protects up to ``--count`` random dlib-like
templates, stopping after the first chunk that ends past ``--max-seconds``, in these modes:

- ``before_default``: the code before ``--threads`` (lanes one after another on the calling thread) with torch's
  default thread count (one per core): what ``advface protect`` did;
- ``before_1``: the same with one torch thread (``OMP_NUM_THREADS=1``);
- ``after_threads_1``: ``advface protect`` now, default ``--threads 1``;
- ``after_threads_N``: now with ``--threads N`` (N = cores): N lanes at once, each on one torch thread.

Then identity-aware AdvFace (dlib's torch module, the shipped shadow as a one-member ensemble, default parameters
but ``--id-steps``) on ``--id-count`` templates: the largest coordinate difference between 1 and N torch threads
before and after, and the seconds per template of each mode (the cost of computing every lane on one thread).
Each mode is measured ``--repeats`` times, the modes interleaved; the best repeat is reported next to every
repeat's value (the machine's other work only ever slows a run down). Writes
``benchmarks/results/protect_threads.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.inversion import load_decoder  # noqa: E402
from advface.protect import AdvFaceConfig, IdentityAwareConfig, protect_embeddings, protect_identity_aware  # noqa: E402
from advface.protect import ascent as ascent_module  # noqa: E402
from advface.protect.shipped import shipped_shadow_path  # noqa: E402
from advface.threads import apply_threads, torch_threads  # noqa: E402
from benchmarks.common import write_results  # noqa: E402

CORES = os.cpu_count() or 1


@contextlib.contextmanager
def before(threads: int) -> Iterator[None]:
    """The code before this change: every lane on the calling thread, one after another, torch on ``threads``."""

    def sequential(fn: Callable[[Any], np.ndarray], lanes: Any, device: torch.device) -> list[np.ndarray]:
        return [fn(lane) for lane in lanes]

    with (
        mock.patch.object(ascent_module, "run_lanes", sequential),
        torch_threads(threads),
    ):
        yield


@contextlib.contextmanager
def after(threads: int) -> Iterator[None]:
    """Now: ``--threads`` sets torch's thread count, protection runs that many single-threaded lanes at once."""
    with torch_threads(threads):
        yield


@contextlib.contextmanager
def competitors(n: int) -> Iterator[None]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(2.0)  # let the scheduler see them
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def timed(protect: Callable[[np.ndarray], np.ndarray], z: np.ndarray, chunk: int, max_seconds: float) -> dict:
    """Protect ``z`` chunk by chunk until done or past ``max_seconds``; templates per second and the outputs."""
    load_before = os.getloadavg()
    outs = []
    start = time.perf_counter()
    done = 0
    while done < len(z):
        outs.append(protect(z[done : done + chunk]))
        done += len(outs[-1])
        if time.perf_counter() - start > max_seconds:
            break
    seconds = time.perf_counter() - start
    return {
        "templates": done,
        "seconds": round(seconds, 3),
        "templates_per_second": round(done / seconds, 2),
        "finished": done == len(z),
        "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "_out": np.concatenate(outs),
    }


def _best(runs: list[dict[str, Any]], key: str, higher: bool) -> dict[str, Any]:
    """The best of the repeats (the one least disturbed by the machine's other work), with every repeat's value."""
    best = (max if higher else min)(runs, key=lambda r: r[key])
    return {**best, f"{key}_every_repeat": [r[key] for r in runs]}


def plain_rows(shadow: torch.nn.Module, z: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    config = AdvFaceConfig()
    modes = {
        "before_default": lambda: before(CORES),
        "before_1": lambda: before(1),
        "after_threads_1": lambda: after(1),
        f"after_threads_{CORES}": lambda: after(CORES),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    for _ in range(args.repeats):  # modes interleaved, so that a change of the machine's load hits them all
        for name, context in modes.items():
            with context():
                protect_embeddings(z[:4], shadow, config)  # warm-up
                row = timed(lambda b: protect_embeddings(b, shadow, config), z, args.chunk, args.max_seconds)
            print(name, {k: v for k, v in row.items() if k != "_out"}, flush=True)
            runs[name].append(row)
    reference = runs["after_threads_1"][0]["_out"]
    rows: dict[str, Any] = {}
    for name, repeats in runs.items():
        same = all(np.array_equal(r.pop("_out"), reference[: r["templates"]]) for r in repeats)
        rows[name] = {**_best(repeats, "templates_per_second", higher=True), "same_output_as_after_threads_1": same}
    return rows


def identity_rows(shadow: torch.nn.Module, z: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    from advface.encoders import create_encoder

    module = create_encoder("dlib").torch_module("cpu")
    config = IdentityAwareConfig(steps=args.id_steps)
    x = z[: args.id_count]
    modes = {
        "before_1": lambda: before(1),
        f"before_{CORES}": lambda: before(CORES),
        "after_threads_1": lambda: after(1),
        f"after_threads_{CORES}": lambda: after(CORES),
    }
    outs: dict[str, list[np.ndarray]] = {name: [] for name in modes}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, context in modes.items():
            with context():
                start = time.perf_counter()
                outs[name].append(protect_identity_aware(x, [shadow], module, config, chip_size=150))
                seconds = time.perf_counter() - start
            runs[name].append(
                {"seconds_per_template": round(seconds / len(x), 3), "loadavg_1min_after": os.getloadavg()[0]}
            )
            print("advface-id", name, runs[name][-1], flush=True)
    first = {name: o[0] for name, o in outs.items()}
    return {
        "templates": len(x),
        "config": {"steps": config.steps, "rel_l2": config.rel_l2, "lanes": config.lanes, "ensemble": 1},
        "max_abs_diff_1_vs_N_threads_before": float(np.abs(first["before_1"] - first[f"before_{CORES}"]).max()),
        "max_abs_diff_1_vs_N_threads_after": float(
            np.abs(first["after_threads_1"] - first[f"after_threads_{CORES}"]).max()
        ),
        "after_equals_before_1_thread": bool(np.array_equal(first["after_threads_1"], first["before_1"])),
        "every_repeat_same_output": all(all(np.array_equal(o, v[0]) for o in v) for v in outs.values()),
        "modes": {name: _best(r, "seconds_per_template", higher=False) for name, r in runs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=178, help="templates per plain-AdvFace measurement")
    parser.add_argument("--chunk", type=int, default=32, help="templates per protect call")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="stop a measurement after this")
    parser.add_argument("--competitors", type=int, default=CORES, help="busy-loop processes of 'competing'")
    parser.add_argument("--id-count", type=int, default=16, help="advface-id templates (0: skip advface-id)")
    parser.add_argument("--id-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="measurements per mode (the best is reported)")
    parser.add_argument("--note", default="", help="what else ran on the machine during 'background'")
    parser.add_argument("--out")
    args = parser.parse_args()

    apply_threads(0)  # torch's default, as every run of the code before started
    shadow, _ = load_decoder(shipped_shadow_path("dlib"), device="cpu")
    z = (np.random.default_rng(0).standard_normal((args.count, shadow.dim)) * 0.09).astype(np.float32)
    result: dict[str, Any] = {
        "note": args.note,
        "cores": CORES,
        "shadow": str(shipped_shadow_path("dlib").name),
        "repeats": args.repeats,
        "plain_advface": {"config": {"steps": 3, "rel_l2": 0.1, "lanes": 4}},
    }
    result["plain_advface"]["background"] = plain_rows(shadow, z, args)
    with competitors(args.competitors):
        result["plain_advface"]["competing"] = {"busy_loops": args.competitors, **plain_rows(shadow, z, args)}
    if args.id_count:
        result["identity_aware_background"] = identity_rows(shadow, z, args)
    print("wrote", write_results("protect_threads", result, args.out))


if __name__ == "__main__":
    main()
