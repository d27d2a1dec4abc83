"""Shared fixtures: where the real data and models are.

Data and model folders come from ``ADVFACE_LFW_DIR`` / ``ADVFACE_MODELS_DIR``. A test that needs one skips when it
is not configured, except under ``CI=true`` where a missing dataset or model is an error (the run must fail).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The test process forks children (pg_ctl, advface serve) while gRPC servers and channels run in it; none of those
# children use gRPC, so gRPC's fork handlers (which can abort a child forked while gRPC threads are busy) stay off.
# Set before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

# The key folder's default ($XDG_CONFIG_HOME/advface/keys): a private temporary folder for the whole run, never the
# user's own keys. Tests of the key folder itself name theirs (keys.dir).
_CONFIG_HOME = tempfile.mkdtemp(prefix="advface-test-config-")
os.environ["XDG_CONFIG_HOME"] = _CONFIG_HOME
atexit.register(shutil.rmtree, _CONFIG_HOME, ignore_errors=True)

from advface.paths import ENV_LFW_DIR, ENV_MODELS_DIR  # noqa: E402 - after the environment is set


def _require(env: str, check) -> Path:  # noqa: ANN001
    value = os.environ.get(env)
    if value and check(Path(value)):
        return Path(value)
    message = f"{env} is not set or does not point at the expected folder ({value!r})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true requires real data: {message}")
    pytest.skip(message)


@pytest.fixture(scope="session")
def lfw_dir() -> Path:
    """The LFW root folder (images/ + pairs.txt)."""
    return _require(ENV_LFW_DIR, lambda p: (p / "pairs.txt").is_file() and (p / "images").is_dir())


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The folder holding mobilefacenet_128d.onnx and scrfd_2.5g_bnkps.onnx."""
    return _require(ENV_MODELS_DIR, lambda p: (p / "mobilefacenet_128d.onnx").is_file())


@pytest.fixture(scope="session")
def lfw_sample(lfw_dir: Path) -> list[Path]:
    """60 real LFW photos: the first two images of the first 30 people with two or more (sorted by name)."""
    files: list[Path] = []
    for person in sorted((lfw_dir / "images").iterdir()):
        photos = sorted(person.glob("*.jpg"))
        if len(photos) >= 2:
            files.extend(photos[:2])
        if len(files) >= 60:
            break
    return files


@pytest.fixture(scope="session")
def postgres_server():  # noqa: ANN201
    """A real PostgreSQL + pgvector server on 127.0.0.1 for the whole session (advface.testing.postgres).

    Skips when no binaries are found, except under CI=true where that fails the run. Tests create their own
    database with ``postgres_server.create_database(name)`` so that they never see each other's tables.
    """
    from advface.testing.postgres import LocalPostgres, PostgresUnavailable

    try:
        server = LocalPostgres()
    except PostgresUnavailable as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true requires PostgreSQL: {exc}")
        pytest.skip(str(exc))
    with server:
        yield server


@pytest.fixture()
def postgres_dsn(postgres_server, request) -> str:  # noqa: ANN001
    """The DSN of a fresh database (with pgvector) on the session's server, named after the test."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:8]
    return postgres_server.create_database(name)
