"""The sidecar with the keyed per-tenant transform on (``keyed_transform`` section): same decisions as without it,
stored templates are ``T_tenant(AdvFace(z))`` (per tenant, never the AdvFace output itself), Info reports it, and
misconfiguration stops the sidecar at start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sidecar_harness import DIM, ServerThread, make_config

from advface.crypto import generate_key, write_key_file
from advface.errors import ConfigError
from advface.protect.keyed import KeyedTransform
from advface.protect.tenant_transform import CALIBRATED_NORMS
from advface.service.thresholds import CALIBRATED_EQUALISED_THRESHOLDS
from advface.testing.synthetic import dlib_like_people

PEOPLE = 5


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "transform.key"
    write_key_file(path, generate_key())
    return path


def _decisions(server: ServerThread, enrolled: np.ndarray, probes: np.ndarray, tenant: str = "t") -> dict:
    """Enrol ``enrolled``; verify every probe against its owner and the next person; identify every probe."""
    out: dict = {"verify": [], "identify": []}
    with server.client() as client:
        client.enroll_batch([(f"p{i}", e) for i, e in enumerate(enrolled)], tenant=tenant)
        for i, probe in enumerate(probes):
            for j in (i, (i + 1) % len(probes)):
                r = client.verify(f"p{j}", embedding=probe, tenant=tenant)
                out["verify"].append((r.match, r.score))
            out["identify"].append(
                [(m.subject_id, m.score, m.match) for m in client.identify(embedding=probe, top_k=3, tenant=tenant)]
            )
    return out


def _ranked(run: dict) -> list:
    return [[(subject, match) for subject, _, match in result] for result in run["identify"]]


def test_same_decisions_with_and_without_the_transform(
    tmp_path: Path,
    start_server,
    secret_file: Path,  # type: ignore[no-untyped-def]
) -> None:
    enrolled, probes = dlib_like_people(PEOPLE)
    runs = {}
    for name, section in (("off", None), ("rotation", {"norm": None}), ("auto", {})):
        extra = (
            {}
            if section is None
            else {"keyed_transform": {"enabled": True, "secret_file": str(secret_file), **section}}
        )
        server = start_server(make_config(tmp_path / name, **extra))
        runs[name] = _decisions(server, enrolled, probes)
        runs[name]["threshold"] = server.servicer.service.threshold.value
        server.stop()
    off, rot, auto = runs["off"], runs["rotation"], runs["auto"]
    # the setup is meaningful: every owner accepted, every other person rejected, without the transform
    assert [m for m, _ in off["verify"]] == [True, False] * PEOPLE
    # a pure rotation keeps every score (float32 rounding) and the calibrated threshold
    assert rot["threshold"] == off["threshold"]
    np.testing.assert_allclose([s for _, s in rot["verify"]], [s for _, s in off["verify"]], atol=1e-5)
    assert [m for m, _ in rot["verify"]] == [m for m, _ in off["verify"]]
    assert _ranked(rot) == _ranked(off)
    # norm equalisation changes scores and the threshold, not the decisions
    assert auto["threshold"] == CALIBRATED_EQUALISED_THRESHOLDS[("dlib-torch", True)][0]
    assert [m for m, _ in auto["verify"]] == [m for m, _ in off["verify"]]
    # same best candidate and same accepted candidates (which rejected ones fill the top 3 may change)
    assert [r[0] for r in _ranked(auto)] == [r[0] for r in _ranked(off)]
    assert [{c for c, m in r if m} for r in _ranked(auto)] == [{c for c, m in r if m} for r in _ranked(off)]


def test_stored_templates_are_tenant_transformed(
    tmp_path: Path,
    start_server,
    secret_file: Path,  # type: ignore[no-untyped-def]
) -> None:
    enrolled, probes = dlib_like_people(PEOPLE, 1)
    server: ServerThread = start_server(
        make_config(tmp_path, keyed_transform={"enabled": True, "secret_file": str(secret_file), "version": 2})
    )
    service = server.servicer.service
    z = enrolled[:1]
    with server.client() as client:
        client.enroll("same", embedding=z[0], tenant="acme")
        client.enroll("same", embedding=z[0], tenant="globex")
        returned = client.protect(z, tenant="acme")
        info_acme, info_globex = client.info("acme"), client.info("globex")
        # deletion is unaffected
        client.enroll("other", embedding=enrolled[1], tenant="acme")
        assert client.delete(subject_id="same", tenant="acme") == 1
        assert [m.subject_id for m in client.identify(embedding=probes[0], top_k=3, tenant="acme")] == ["other"]
        assert client.verify("same", embedding=probes[0], tenant="globex").match
    stored_globex = np.asarray(service.store.subject_vectors("globex", "same"))
    advface = service.protector.protect(z)  # what AdvFace alone gives (deterministic for a seed)
    secret = Path(secret_file)
    from advface.crypto import load_key_file

    key = load_key_file(secret)
    norm = CALIBRATED_NORMS["dlib-torch"]
    t_acme = KeyedTransform.from_secret(key, "acme", DIM, version=2, norm=norm)
    t_globex = KeyedTransform.from_secret(key, "globex", DIM, version=2, norm=norm)
    np.testing.assert_allclose(stored_globex, t_globex.apply(advface), atol=1e-5)
    np.testing.assert_allclose(returned, t_acme.apply(advface), atol=1e-5)  # Protect: the tenant's transform
    assert not np.allclose(returned, stored_globex, atol=1e-2)  # one input, two tenants, two unrelated vectors
    assert not np.allclose(stored_globex, advface, atol=1e-2)  # not the AdvFace output itself
    assert not np.allclose(stored_globex * np.linalg.norm(advface) / norm, advface, atol=1e-2)
    np.testing.assert_allclose(t_globex.invert(stored_globex), advface * norm / np.linalg.norm(advface), atol=1e-5)

    kt = info_acme["protection"]["keyed_transform"]
    assert kt["enabled"] and kt["version"] == 2 and kt["norm"] == pytest.approx(norm, rel=1e-6)
    assert kt["key_id"] == t_acme.key_id != info_globex["protection"]["keyed_transform"]["key_id"] == t_globex.key_id
    assert info_acme["threshold"]["source"] == "calibrated"
    assert "keyed_threshold" in info_acme["threshold"]["description"]
    assert key.hex() not in repr(info_acme) and secret.read_text().strip() not in repr(info_acme)


def test_info_when_off(server: ServerThread, client) -> None:  # type: ignore[no-untyped-def]
    kt = client.info()["protection"]["keyed_transform"]
    assert kt == {"enabled": False, "version": 0, "norm": 0.0, "key_id": ""}
    assert server.servicer.service.transforms is None


def test_misconfiguration_stops_the_sidecar(
    tmp_path: Path,
    start_server,
    secret_file: Path,  # type: ignore[no-untyped-def]
) -> None:
    with pytest.raises(ConfigError, match="no secret is configured"):
        make_config(tmp_path / "a", keyed_transform={"enabled": True})
    with pytest.raises(ConfigError, match="environment variable ADVFACE_NO_SUCH_SECRET"):
        start_server(
            make_config(tmp_path / "b", keyed_transform={"enabled": True, "secret_env": "ADVFACE_NO_SUCH_SECRET"})
        )
    loose = tmp_path / "loose.key"
    loose.write_bytes(Path(secret_file).read_bytes())
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        start_server(make_config(tmp_path / "c", keyed_transform={"enabled": True, "secret_file": str(loose)}))
    # a norm no threshold was measured for: refused unless the operator sets the threshold
    with pytest.raises(ConfigError, match="set matching.threshold"):
        start_server(
            make_config(tmp_path / "d", keyed_transform={"enabled": True, "secret_file": str(secret_file), "norm": 3.0})
        )
    server = start_server(
        make_config(
            tmp_path / "e",
            keyed_transform={"enabled": True, "norm": 3.0, "secret_file": str(secret_file)},
            matching={"threshold": -1.2},
        )
    )
    with server.client() as client:
        info = client.info()
    assert info["threshold"]["source"] == "config" and info["protection"]["keyed_transform"]["norm"] == 3.0


def test_store_remembers_what_its_templates_were_issued_under(
    tmp_path: Path,
    start_server,
    secret_file: Path,  # type: ignore[no-untyped-def]
) -> None:
    other = tmp_path / "other.key"
    write_key_file(other, generate_key())
    on = {"enabled": True, "secret_file": str(secret_file)}
    enrolled, probes = dlib_like_people(PEOPLE, 2)
    # templates stored without the transform: turning it on is refused (matching would silently fail)
    server = start_server(make_config(tmp_path / "plain"))
    with server.client() as client:
        client.enroll("p0", embedding=enrolled[0])
    server.stop()
    with pytest.raises(ConfigError, match="issued without the keyed transform"):
        start_server(make_config(tmp_path / "plain", keyed_transform=on))
    # templates stored under one secret / version: another secret, version or norm, or turning it off, is refused
    server = start_server(make_config(tmp_path / "keyed", keyed_transform=on))
    with server.client() as client:
        client.enroll("p0", embedding=enrolled[0])
    server.stop()
    for changed, match in (
        ({"secret_file": str(other)}, "check id"),
        ({"version": 2}, "version 2"),
        ({"norm": None, "enabled": True}, "norm off"),
    ):
        with pytest.raises(ConfigError, match=match):
            start_server(make_config(tmp_path / "keyed", keyed_transform={**on, **changed}))
    with pytest.raises(ConfigError, match="asks for templates without the keyed transform"):
        start_server(make_config(tmp_path / "keyed"))
    server = start_server(make_config(tmp_path / "keyed", keyed_transform=on))  # the same settings: fine
    with server.client() as client:
        assert client.verify("p0", embedding=probes[0]).match


def test_rotate_transform_cli_reissues_a_sidecar_store(
    tmp_path: Path,
    start_server,
    secret_file: Path,
    capsys: pytest.CaptureFixture[str],  # type: ignore[no-untyped-def]
) -> None:
    from advface.cli.main import main

    key = tmp_path / "enc.key"
    write_key_file(key, generate_key())
    on = {"enabled": True, "secret_file": str(secret_file)}
    enc = {"key_file": str(key)}
    enrolled, probes = dlib_like_people(PEOPLE, 3)
    server = start_server(make_config(tmp_path / "srv", keyed_transform=on, encryption=enc))
    before = _decisions(server, enrolled, probes, tenant="acme")
    stored_before = np.asarray(server.servicer.service.store.subject_vectors("acme", "p0"))
    server.stop()
    config_file = tmp_path / "srv" / "advface.yaml"
    assert main(["rotate-transform", "--config", str(config_file), "--new-version", "2", "-q"]) == 0
    assert f"re-issued {PEOPLE} templates" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="issued under keyed transform version 2"):
        start_server(make_config(tmp_path / "srv", keyed_transform=on, encryption=enc))  # still version 1
    server = start_server(make_config(tmp_path / "srv", keyed_transform={**on, "version": 2}, encryption=enc))
    stored_after = np.asarray(server.servicer.service.store.subject_vectors("acme", "p0"))
    with server.client() as client:  # same scores and decisions under the new version; stored vectors renewed
        for i, probe in enumerate(probes):
            r = client.verify(f"p{i}", embedding=probe, tenant="acme")
            assert (r.match, r.score) == pytest.approx(before["verify"][2 * i], abs=1e-5)
        assert [m.subject_id for m in client.identify(embedding=probes[1], top_k=1, tenant="acme")] == ["p1"]
    assert not np.allclose(stored_before, stored_after, atol=1e-2)
    server.stop()
    capsys.readouterr()
    assert main(["rotate-transform", "--config", str(config_file), "--new-version", "2", "-q"]) == 2
    assert "nothing to do" in capsys.readouterr().err
