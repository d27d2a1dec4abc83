"""Seconds per photo of ``advface protect-image`` for each guidance selection, on one CPU thread.

Usage (what produced ``benchmarks/results/protect_image_cost.json``)::

    python benchmarks/protect_image_cost.py --count 3 --guidance encoders encoders,deflection \\
        encoders,deflection,antipure --threads 1

Sample: the first photo of the first ``--count`` LFW people in name order (250x250). Each photo's face is detected
once, outside the timing; every selection then protects it at the default settings (60 steps, EOT, the default
ensemble, the shipped defender surrogate for the diffusion terms), after one untimed warm-up photo that loads the
models. The JSON gives per selection the mean and maximum wall seconds per photo, the mean CPU seconds of this
process per photo (with one torch thread, what the wall time is on an idle machine: other jobs sharing the CPU
inflate the wall time, hardly the CPU time), and the machine's load average at the start and end.
``--antipure-identity`` / ``--decoy-weight`` set the AntiPure identity options
(:class:`~advface.protect.image.antipure.AntiPureConfig`) of every selection, e.g. (what produced
``benchmarks/results/protect_image_cost_antipure_ensemble.json``)::

    python benchmarks/protect_image_cost.py --count 3 --guidance encoders,deflection,antipure \\
        --antipure-identity ensemble --decoy-weight 1 --threads 1 --out ...

``--budget`` / ``--epsilon`` set the budget of every selection (default: the library's). ``--surrogate`` times the
diffusion terms on another defender surrogate than the shipped one (e.g. a 128-px model); either is recorded with
its file's digest under ``settings.surrogate``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.datasets import LFW  # noqa: E402
from advface.images import load_image  # noqa: E402
from advface.protect.image import ImageProtector, ProtectConfig  # noqa: E402
from advface.protect.image.antipure import AntiPureConfig  # noqa: E402
from advface.protect.image.guidance import parse_guidance  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_antipure_arguments,
    add_budget_arguments,
    antipure_from_args,
    budget_from_args,
    surrogate_record,
    write_results,
)


def main() -> None:
    """Measure and write benchmarks/results/protect_image_cost.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3, help="LFW photos, one per person (default 3)")
    parser.add_argument("--guidance", nargs="+", default=[",".join(ProtectConfig.guidance)], help="selections")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    add_budget_arguments(parser)
    parser.add_argument("--surrogate", help="defender surrogate checkpoint (default: the one advface ships)")
    parser.add_argument("--lfw-dir", help="LFW root (default $ADVFACE_LFW_DIR)")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/protect_image_cost.json)")
    add_antipure_arguments(parser)
    args = parser.parse_args()
    antipure = antipure_from_args(args, parser)
    budget = budget_from_args(args, parser)
    torch.set_num_threads(args.threads)
    selections = [parse_guidance(g) for g in args.guidance]

    people: dict[str, str] = {}
    for item in LFW(args.lfw_dir):
        people.setdefault(item.identity, str(item.path))
    paths = [people[name] for name in sorted(people)[: args.count + 1]]
    protector = ImageProtector(surrogate=args.surrogate)
    surrogate = surrogate_record(args.surrogate)
    photos = [load_image(p) for p in paths]
    faces = [protector.find_face(photo, p) for photo, p in zip(photos, paths)]
    load_start = os.getloadavg()[0]
    results = {}
    for guidance in selections:
        config = ProtectConfig(guidance=guidance, antipure=antipure, **budget)
        protector.protect(photos[:1], config, faces=faces[:1])  # warm-up: loads the surrogate, fills caches
        seconds, cpu = [], []
        for photo, face in zip(photos[1:], faces[1:]):
            started, cpu_started = time.perf_counter(), time.process_time()
            protector.protect([photo], config, faces=[face])
            seconds.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
        entry = {
            "seconds_per_photo_mean": sum(seconds) / len(seconds),
            "seconds_per_photo_max": max(seconds),
            "cpu_seconds_per_photo_mean": sum(cpu) / len(cpu),
            "photos": len(seconds),
        }
        results[",".join(guidance)] = entry
        print(
            f"{','.join(guidance)}: {entry['seconds_per_photo_mean']:.1f} s/photo wall, "
            f"{entry['cpu_seconds_per_photo_mean']:.1f} s CPU",
            flush=True,
        )
    payload = {
        "settings": {
            "count": args.count,
            "threads": args.threads,
            "steps": ProtectConfig.steps,
            "budget": args.budget,
            "epsilon_levels": ProtectConfig(**budget).levels,
            **({"encoder_weight": args.encoder_weight} if args.encoder_weight is not None else {}),
            "surrogate": surrogate,
            **(
                {
                    "antipure": {
                        "identity_encoders": antipure.identity_encoders,
                        "decoy_weight": antipure.decoy_weight,
                        "identity_weight": antipure.identity_weight,
                    }
                }
                if antipure != AntiPureConfig()
                else {}
            ),
        },
        "encoders": protector.encoder_names,
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
        "guidance": results,
    }
    print(f"wrote {write_results('protect_image_cost', payload, args.out)}")


if __name__ == "__main__":
    main()
