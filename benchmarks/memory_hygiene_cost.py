"""What the encrypted-matching path's memory hygiene costs per call (:mod:`advface.encrypted.memory`).

Usage (seconds)::

    python benchmarks/memory_hygiene_cost.py --repeats 20000

Times, on the calling thread, :func:`~advface.encrypted.memory.clear_vector_registers` (one 1 KiB memmove of zeros)
and :func:`~advface.encrypted.memory.scrub_caches` with the numpy buckets of a 128-d float32 and float64 row (what
the template service's worker threads run after each protection), each the median of five rounds of ``--repeats``
calls (``scrub_caches`` a hundredth as many: it is a thousand times slower). With ``store.matching: encrypted`` the
template service clears the registers once per buffer-zeroing step of a call (``TemplateService._forget``: a few per
Enroll or Verify) and once inside each ``scrub_caches``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.encrypted.memory import clear_vector_registers, scrub_caches  # noqa: E402
from benchmarks.common import write_results  # noqa: E402

DIM = 128


def per_call_us(fn: object, repeats: int) -> float:
    """Median over five rounds of the mean time of one call, in microseconds."""
    rounds = [timeit.timeit(fn, number=repeats) / repeats for _ in range(5)]  # type: ignore[arg-type]
    return round(statistics.median(rounds) * 1e6, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20000, help="calls per round (default 20000)")
    parser.add_argument("--out", help="results file (default benchmarks/results/memory_hygiene_cost.json)")
    args = parser.parse_args(argv)
    if args.repeats < 100:
        parser.error("--repeats must be at least 100")
    payload = {
        "repeats": args.repeats,
        "clear_vector_registers_us": per_call_us(clear_vector_registers, args.repeats),
        "scrub_caches_us": per_call_us(lambda: scrub_caches((4 * DIM, 8 * DIM)), args.repeats // 100),
    }
    print(payload)
    print("wrote", write_results("memory_hygiene_cost", payload, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
