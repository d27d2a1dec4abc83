"""AdvFace protection speed: latency for one template, throughput at batch 256, FLOPs per template.

Usage::

    python benchmarks/protect_speed.py --shadow advface/models/shadow_dlib.pt

Templates are random vectors of the encoder's dimension: the cost of protection does not depend on the values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.inversion import load_decoder  # noqa: E402
from advface.protect import AdvFaceConfig, protect_embeddings  # noqa: E402
from advface.protect.shipped import shipped_shadow_path  # noqa: E402
from benchmarks.common import write_results  # noqa: E402


def flops_per_template(shadow: torch.nn.Module, config: AdvFaceConfig, dim: int) -> float:
    """FLOPs of protecting one template: the reference reconstruction plus ``steps`` forward+backward passes."""
    from torch.utils.flop_counter import FlopCounterMode

    z = torch.randn(1, dim)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            shadow(z)
    forward = counter.get_total_flops()
    delta = torch.zeros(1, dim, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        shadow(z + delta).abs().sum().backward()
    return float(forward + config.steps * counter.get_total_flops())


def main() -> None:
    """Measure and write benchmarks/results/protect_speed.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shadow", help="shadow checkpoint (default: the shipped dlib shadow)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20, help="single-template latency samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out")
    args = parser.parse_args()

    shadow, meta = load_decoder(args.shadow or shipped_shadow_path("dlib"), device=args.device)
    config = AdvFaceConfig()
    rng = np.random.default_rng(0)
    z = rng.normal(size=(args.batch, shadow.dim)).astype(np.float32)

    protect_embeddings(z[:4], shadow, config, device=args.device)  # warm up
    latencies = []
    for i in range(args.repeats):
        start = time.perf_counter()
        protect_embeddings(z[i : i + 1], shadow, config, device=args.device)
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    protect_embeddings(z, shadow, config, device=args.device)
    batch_seconds = time.perf_counter() - start
    result = {
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "shadow": {
            "arch": meta.get("arch"),
            "image_size": meta.get("image_size"),
            "parameters": sum(p.numel() for p in shadow.parameters()),
        },
        "config": {"steps": config.steps, "rel_l2": config.rel_l2, "lanes": config.lanes},
        "single_template_ms": {
            "median": 1000 * statistics.median(latencies),
            "p90": 1000 * sorted(latencies)[int(0.9 * (len(latencies) - 1))],
        },
        "batch": args.batch,
        "batch_templates_per_s": args.batch / batch_seconds,
        "gflops_per_template": flops_per_template(shadow.cpu(), config, shadow.dim) / 1e9,
    }
    print(result)
    print("wrote", write_results("protect_speed", result, args.out))


if __name__ == "__main__":
    main()
