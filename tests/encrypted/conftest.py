"""Shared fixtures of the encrypted-matching tests: one key pair per session (key generation takes ~20 ms, but
galleries and key services built on it are reused where a test does not change them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from encrypted_helpers import Backend

from advface.encrypted.keys import SecretKeys, generate_keys, new_binding_key


@pytest.fixture(scope="session")
def keys() -> SecretKeys:
    return generate_keys()


@pytest.fixture(scope="session")
def binding_key() -> bytes:
    return new_binding_key()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each encrypted-store backend: SQLite files in tmp_path, or a fresh PostgreSQL database (tests/conftest.py's
    embedded server, started only for these cases)."""
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgresql" else None
    return Backend(request.param, tmp_path, dsn)
