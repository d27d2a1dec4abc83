"""Run the advface gRPC sidecar (API ``advface.v1.AdvFace``, see ``proto/advface/v1/advface.proto``).

Without ``--config`` it serves on 127.0.0.1:50051 with the dlib encoder, AdvFace protection with the shadow model
shipped for it, and the SQLite template store in the data folder (``--data-dir``, else ``$ADVFACE_DATA_DIR``, else
``~/.local/share/advface``). ``protection.method: advface-id`` with ``protection.shadows`` in the file selects
identity-aware AdvFace (docs/advface.example.yaml). ``ADVFACE_<SECTION>_<KEY>`` variables override the file; the
flags override both. ``--metrics-port`` moves the Prometheus endpoint (0: any free port, reported in the ``metrics
serving`` log line).
Prints ``advface serving on HOST:PORT`` on stdout once requests are accepted (the standard gRPC health service
then reports SERVING); SIGTERM or SIGINT stops it gracefully (``server.grace_seconds``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

NAME = "serve"
HELP = "run the gRPC sidecar (protected enrolment, verification, identification)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``advface serve``."""
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML configuration file (default: built-in defaults)")
    parser.add_argument("--host", help="address to listen on (overrides server.host; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on, 0 for any free one (overrides server.port)")
    parser.add_argument("--data-dir", metavar="DIR", help="folder of the template store (overrides store.data_dir)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="port of the Prometheus endpoint, 0 for any free one, reported in the 'metrics serving' log line "
        "(overrides metrics.port; the endpoint stays off with metrics.enabled: false)",
    )


def configure(args: argparse.Namespace) -> Any:
    """The configuration ``advface serve`` runs with: the file (or defaults), environment overrides, flags."""
    from advface.config import load_config
    from advface.errors import ConfigError

    config = load_config(args.config)
    server = config.server
    if args.host is not None:
        if not args.host.strip():
            raise ConfigError("--host must not be empty")
        server = dataclasses.replace(server, host=args.host.strip())
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
        server = dataclasses.replace(server, port=args.port)
    store = config.store
    if args.data_dir is not None:
        store = dataclasses.replace(store, data_dir=str(Path(args.data_dir).expanduser().absolute()))
    metrics = config.metrics
    metrics_port = getattr(args, "metrics_port", None)
    if metrics_port is not None:
        if not 0 <= metrics_port <= 65535:
            raise ConfigError(f"--metrics-port must be in [0, 65535], got {metrics_port}")
        metrics = dataclasses.replace(metrics, port=metrics_port)
    return dataclasses.replace(config, server=server, store=store, metrics=metrics)


def run(args: argparse.Namespace) -> int:
    """Execute ``advface serve``."""
    config = configure(args)  # faiss is imported quietly (advface._faiss): no loader lines before the JSON log
    from server.app import serve  # grpc is imported only here

    def ready(sidecar: Any) -> None:
        print(f"advface serving on {sidecar.address}", flush=True)

    serve(config, ready=ready)
    return 0
