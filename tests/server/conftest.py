"""Fixtures of the sidecar tests (see sidecar_harness.py): servers started per test or shared by a module."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

pytest.importorskip("grpc")

from sidecar_harness import ServerThread, make_config

from advface.client import AdvFaceClient
from advface.config import Config


@pytest.fixture
def start_server() -> Iterator[Callable[[Config], ServerThread]]:
    """``start_server(config)`` -> a running ServerThread, stopped at the end of the test."""
    servers: list[ServerThread] = []

    def start(config: Config) -> ServerThread:
        server = ServerThread(config)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """One plain server (auth off) shared by a test module."""
    srv = ServerThread(make_config(tmp_path_factory.mktemp("server")))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[AdvFaceClient]:
    with server.client() as c:
        yield c
