"""Info reports the limits the server enforces (issue #19): pixel limits, batch, metadata, embedding norms, per-caller
rate and in-flight limits -- each checked against the configuration given and against what the server then refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from sidecar_harness import ServerThread, make_config, random_embedding

from advface.client import AdvFaceRpcError
from advface.config import Config

StartServer = Callable[[Config], ServerThread]


def test_info_reports_the_configured_limits_and_the_server_keeps_them(
    start_server: StartServer, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path,
        server={"max_batch": 3, "max_image_pixels": 2_000_000},
        image_protection={"max_pixels": 1_500_000},
        auth={"rate_per_second": 250.0, "max_in_flight": 7},
    )
    server = start_server(config)
    with server.client() as client:
        limits = client.info()["limits"]
        assert limits["max_batch"] == 3 and limits["top_k_max"] == 10
        assert limits["max_image_pixels"] == 2_000_000
        assert limits["max_protect_image_pixels"] == 1_500_000  # the smaller of the two limits
        assert (limits["max_metadata_keys"], limits["max_metadata_key_chars"]) == (32, 64)
        assert limits["max_metadata_value_chars"] == 1024
        assert limits["rate_per_second"] == pytest.approx(250.0) and limits["max_in_flight"] == 7
        assert 0 < limits["min_embedding_norm"] < 1e-6 and limits["max_embedding_norm"] == pytest.approx(1e3)
        # what Info reports is what the server enforces
        x = random_embedding(0)
        keys = {f"k{i}": "v" for i in range(limits["max_metadata_keys"])}
        client.enroll("ok", embedding=x, metadata=keys)
        for bad in (
            lambda: client.enroll("more-keys", embedding=x, metadata={**keys, "one-more": "v"}),
            lambda: client.enroll("long-key", embedding=x, metadata={"k" * 65: "v"}),
            lambda: client.enroll("long-value", embedding=x, metadata={"k": "v" * 1025}),
            lambda: client.enroll("big", embedding=x / np.linalg.norm(x) * limits["max_embedding_norm"] * 1.01),
        ):
            with pytest.raises(AdvFaceRpcError) as err:
                bad()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        client.enroll("at-the-norm-limit", embedding=x / np.linalg.norm(x) * limits["max_embedding_norm"] * 0.99)
        assert client.info()["counts"]["tenant_subjects"] == 2


def test_info_reports_no_protect_image_limit_when_it_is_off_and_unlimited_rates(
    start_server: StartServer, tmp_path: Path
) -> None:
    config = make_config(tmp_path, image_protection={"enabled": False}, auth={"rate_per_second": 0, "max_in_flight": 0})
    with start_server(config).client() as client:
        limits = client.info()["limits"]
    assert limits["max_protect_image_pixels"] == 0
    assert limits["max_image_pixels"] == 12_000_000  # the default (server.max_image_pixels)
    assert limits["rate_per_second"] == 0 and limits["max_in_flight"] == 0  # 0: no limit
