"""advface.config: defaults, YAML loading, validation messages, environment overrides, the example file."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import yaml

from advface.config import (
    AuthConfig,
    Config,
    ServerConfig,
    StoreConfig,
    TokenGrant,
    default_config,
    load_config,
)
from advface.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "advface.example.yaml"
TOKEN_A = "a" * 16 + "-client-token"
TOKEN_B = "b" * 32


def _write(tmp_path: Path, text: str, name: str = "advface.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults() -> None:
    cfg = default_config(env={})
    assert cfg == load_config(None, env={}) == Config()
    assert cfg.server == ServerConfig("127.0.0.1", 50051, 4, 4, 1000, 5.0, 4)
    assert (cfg.auth.enabled, dict(cfg.auth.tokens), cfg.auth.tokens_file) == (False, {}, None)
    assert (cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.client_ca_file, cfg.tls.enabled) == (None, None, None, False)
    assert (cfg.encoder.name, cfg.encoder.detector, cfg.encoder.face_policy) == ("dlib", "dlib", "largest")
    p = cfg.protection
    assert (p.enabled, p.method, p.shadow, p.rel_l2, p.steps, p.seed) == (True, "advface", None, 0.1, 3, None)
    assert cfg.store.backend == "sqlite" and cfg.store.use_gpu == "auto"
    assert cfg.store.data_dir == str(Path("~/.local/share/advface").expanduser())
    assert cfg.store.database_path == Path(cfg.store.data_dir) / "templates.sqlite3"
    assert (cfg.matching.threshold, cfg.matching.top_k_max) == (None, 100)
    assert (cfg.logging.level, cfg.logging.json) == ("INFO", True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.auth.tokens["x"] = None  # type: ignore[index]
    assert default_config(env={"ADVFACE_DATA_DIR": "/srv/advface"}).store.data_dir == "/srv/advface"
    assert load_config(None, env={"ADVFACE_DATA_DIR": "/srv/advface"}).store.data_dir == "/srv/advface"


def test_yaml_load(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / "certs" / name).write_text("PEM")
    path = _write(
        tmp_path,
        f"""
server: {{host: 0.0.0.0, port: 6000, workers: 8, grace_seconds: 1}}
auth:
  enabled: true
  tokens:
    {TOKEN_A}: {{tenants: [shop-eu, shop-us]}}
    {TOKEN_B}: {{tenants: "*", role: admin}}
tls: {{cert_file: certs/cert.pem, key_file: certs/key.pem, client_ca_file: certs/ca.pem}}
encoder: {{name: {{name: onnx, path: /m/w600k.onnx}}, detector: "scrfd:/m/scrfd.onnx", face_policy: best-score}}
protection: {{rel_l2: 0.05, steps: 0, seed: 18446744073709551615}}
store: {{data_dir: data, use_gpu: false}}
logging: {{level: debug, json: false}}
matching:
  threshold: 0.35
  top_k_max: 10
""",
    )
    cfg = load_config(path, env={})
    assert (cfg.server.host, cfg.server.port, cfg.server.workers, cfg.server.grace_seconds) == ("0.0.0.0", 6000, 8, 1.0)
    assert isinstance(cfg.server.grace_seconds, float)
    assert cfg.auth.enabled and cfg.auth.tokens[TOKEN_A] == TokenGrant(("shop-eu", "shop-us"), "client")
    assert cfg.auth.lookup(TOKEN_B) == TokenGrant("*", "admin") and cfg.auth.lookup(TOKEN_B).is_admin
    assert cfg.auth.lookup("nope") is None
    assert cfg.auth.tokens[TOKEN_A].allows("shop-eu") and not cfg.auth.tokens[TOKEN_A].allows("other")
    assert cfg.auth.tokens[TOKEN_B].allows("anything")
    assert cfg.tls.cert_file == str(tmp_path / "certs" / "cert.pem")  # relative to the file's folder
    assert cfg.tls.enabled and cfg.tls.mutual
    assert dict(cfg.encoder.name) == {"name": "onnx", "path": "/m/w600k.onnx"}
    assert (cfg.encoder.detector, cfg.encoder.face_policy) == ("scrfd:/m/scrfd.onnx", "best-score")
    assert (cfg.protection.rel_l2, cfg.protection.steps, cfg.protection.seed) == (0.05, 0, 2**64 - 1)
    assert cfg.store.data_dir == str(tmp_path / "data") and cfg.store.use_gpu is False
    assert (cfg.matching.threshold, cfg.matching.top_k_max) == (0.35, 10)
    assert (cfg.logging.level, cfg.logging.json) == ("DEBUG", False)

    # to_dict is plain YAML that loads back to the same Config; pickling works
    dumped = _write(tmp_path, yaml.safe_dump(cfg.to_dict()), "dumped.yaml")
    assert load_config(dumped, env={}) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    redacted = cfg.to_dict(redact_secrets=True)
    assert TOKEN_A not in str(redacted) and TOKEN_B not in str(redacted)
    assert all(k.startswith("<redacted") for k in redacted["auth"]["tokens"])
    with pytest.raises(ConfigError):  # redacted output is not loadable as tokens
        load_config(_write(tmp_path, yaml.safe_dump(redacted), "redacted.yaml"), env={})


def test_empty_file_and_empty_sections(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, ""), env={}) == Config()
    assert load_config(_write(tmp_path, "server:\nstore: {}\n"), env={}) == Config()


def test_tokens_file(tmp_path: Path) -> None:
    tokens = _write(tmp_path, f"tokens:\n  {TOKEN_B}: {{tenants: [t1], role: admin}}\n", "tokens.yaml")
    tokens.chmod(0o600)
    path = _write(
        tmp_path, f"auth:\n  enabled: true\n  tokens_file: tokens.yaml\n  tokens: {{{TOKEN_A}: {{tenants: '*'}}}}"
    )
    cfg = load_config(path, env={})
    assert set(cfg.auth.tokens) == {TOKEN_A, TOKEN_B} and cfg.auth.tokens_file == str(tokens)
    assert load_config(_write(tmp_path, yaml.safe_dump(cfg.to_dict()), "d.yaml"), env={}) == cfg
    conflicting = _write(
        tmp_path, f"auth: {{tokens_file: tokens.yaml, tokens: {{{TOKEN_B}: {{tenants: [t2]}}}}}}", "c.yaml"
    )
    with pytest.raises(ConfigError, match="different grant") as info:
        load_config(conflicting, env={})
    assert TOKEN_B not in str(info.value)
    bad = _write(tmp_path, f"{TOKEN_A}: {{tenants: [t1]}}\n", "bad_tokens.yaml")
    with pytest.raises(ConfigError, match="one key, 'tokens'"):
        load_config(_write(tmp_path, "auth: {tokens_file: bad_tokens.yaml}", "b.yaml"), env={})
    assert bad.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a list", "top level must be a mapping"),
        ("servr: {port: 1}", "unknown section 'servr'"),
        ("server: {prot: 1}", r"server\.prot: unknown key; known: host, port"),
        ("server: 5", "server: expected a mapping"),
        ("server: {port: '50051'}", r"server\.port: expected an integer, got '50051'"),
        ("server: {port: true}", r"server\.port: expected an integer"),
        ("server: {port: 70000}", r"server\.port: must be in \[0, 65535\]"),
        ("server: {workers: 0}", r"server\.workers: must be in \[1, 1024\]"),
        ("server: {max_receive_mb: 4096}", r"server\.max_receive_mb"),
        ("server: {grace_seconds: -1}", r"server\.grace_seconds"),
        ("server: {grace_seconds: .nan}", r"server\.grace_seconds: must be a finite number"),
        ("server: {host: ''}", r"server\.host: must not be empty"),
        ("server: {host: 'a b'}", r"server\.host: invalid host"),
        ("auth: {enabled: 'yes'}", r"auth\.enabled: expected true or false"),
        ("auth: {enabled: true}", r"auth\.enabled is true but no tokens"),
        ("auth: {tokens: [a, b]}", r"auth\.tokens: expected a mapping"),
        ("auth: {tokens: {short: {tenants: '*'}}}", r"auth\.tokens: token #1 is 5 characters long"),
        (f"auth: {{tokens: {{'{'x' * 15} y': {{tenants: '*'}}}}}}", "token #1 must be printable ASCII"),
        (f"auth: {{tokens: {{{TOKEN_A}: {{role: admin}}}}}}", "token #1: 'tenants' is missing"),
        (f"auth: {{tokens: {{{TOKEN_A}: {{tenants: []}}}}}}", "token #1: tenants must be a non-empty list"),
        (f"auth: {{tokens: {{{TOKEN_A}: {{tenants: shop}}}}}}", "token #1: tenants must be a non-empty list"),
        (f"auth: {{tokens: {{{TOKEN_A}: {{tenants: ['']}}}}}}", "token #1: tenant must not be empty"),
        (f"auth: {{tokens: {{{TOKEN_A}: {{tenants: '*', role: root}}}}}}", "token #1: role must be one of admin"),
        (f"auth: {{tokens: {{{TOKEN_A}: {{tenants: '*', rol: admin}}}}}}", r"token #1: unknown key\(s\) \['rol'\]"),
        ("auth: {tokens_file: missing.yaml}", r"auth\.tokens_file: file .*missing\.yaml not found"),
        ("tls: {cert_file: /nonexistent/cert.pem}", r"tls\.cert_file: file /nonexistent/cert\.pem not found"),
        ("encoder: {name: 12}", r"encoder\.name: expected an encoder spec"),
        ("encoder: {name: {path: x.onnx}}", r"encoder\.name: .*needs a 'name'"),
        ("encoder: {detector: mtcnn}", r"encoder\.detector: unknown detector 'mtcnn'"),
        ("encoder: {detector: 'dlib:upsample=x'}", r"encoder\.detector: bad detector option 'upsample=x'"),
        ("encoder: {face_policy: biggest}", r"encoder\.face_policy: unknown face policy 'biggest'"),
        ("protection: {method: blur}", r"protection\.method: must be one of advface"),
        ("protection: {rel_l2: 0}", r"protection\.rel_l2: must be a finite number in \(0, 1\]"),
        ("protection: {rel_l2: 1.5}", r"protection\.rel_l2"),
        ("protection: {steps: -1}", r"protection\.steps"),
        ("protection: {seed: -1}", r"protection\.seed"),
        ("protection: {steps: 2.5}", r"protection\.steps: expected an integer, got 2\.5 \(float\)"),
        ("protection: {shadow: /nonexistent.pt}", r"protection\.shadow: file /nonexistent\.pt not found"),
        ("store: {backend: postgres}", r"store\.backend: must be one of sqlite"),
        ("store: {use_gpu: maybe}", r"store\.use_gpu: expected 'auto', true or false"),
        ("store: {data_dir: 3}", r"store\.data_dir: expected a string"),
        ("matching: {threshold: high}", r"matching\.threshold: expected a number"),
        ("matching: {top_k_max: 0}", r"matching\.top_k_max"),
        ("logging: {level: LOUD}", r"logging\.level: must be one of DEBUG"),
        ("logging: {json: 1}", r"logging\.json: expected true or false"),
        ("server: {port: [1", "invalid YAML"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, env={})
    assert TOKEN_A not in str(info.value)
    if "YAML" not in message:
        assert str(path) in str(info.value)


def test_tls_pairs(tmp_path: Path) -> None:
    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("PEM")
    with pytest.raises(ConfigError, match="cert_file and tls.key_file must be given together"):
        load_config(_write(tmp_path, "tls: {cert_file: c.pem}"), env={})
    with pytest.raises(ConfigError, match="client_ca_file .* needs"):
        load_config(_write(tmp_path, "tls: {client_ca_file: ca.pem}"), env={})
    cfg = load_config(_write(tmp_path, "tls: {cert_file: c.pem, key_file: k.pem}"), env={})
    assert cfg.tls.enabled and not cfg.tls.mutual


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="configuration file .* not found"):
        load_config("/nonexistent/advface.yaml", env={})


def test_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tok.yaml").write_text(f"tokens: {{{TOKEN_A}: {{tenants: [x]}}}}\n")
    (tmp_path / "tok.yaml").chmod(0o600)
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, "server: {port: 6000, host: 0.0.0.0}\nmatching: {threshold: 0.5}\n")
    env = {
        "ADVFACE_SERVER_PORT": "50052",
        "ADVFACE_SERVER_GRACE_SECONDS": "2.5",
        "ADVFACE_AUTH_ENABLED": "yes",
        "ADVFACE_AUTH_TOKENS_FILE": "tok.yaml",  # relative to the working directory
        "ADVFACE_STORE_USE_GPU": "false",
        "ADVFACE_STORE_DATA_DIR": "/srv/x",
        "ADVFACE_DATA_DIR": "/ignored/when/store/data_dir/is/set",
        "ADVFACE_MATCHING_THRESHOLD": "null",
        "ADVFACE_ENCODER_NAME": "{name: onnx, path: /m.onnx}",
        "ADVFACE_LOGGING_JSON": "0",
        "ADVFACE_LOGGING_LEVEL": "warning",
        "ADVFACE_PROTECTION_SEED": "7",
        "ADVFACE_LFW_DIR": "/not/config",  # other advface variables are ignored
        "ADVFACE_MODELS_DIR": "/not/config",
        "HOME_PORT": "1",
    }
    cfg = load_config(path, env=env)
    assert (cfg.server.port, cfg.server.host, cfg.server.grace_seconds) == (50052, "0.0.0.0", 2.5)
    assert cfg.auth.enabled and set(cfg.auth.tokens) == {TOKEN_A}
    assert cfg.auth.tokens_file == str(tmp_path / "tok.yaml")
    assert cfg.store.use_gpu is False and cfg.store.data_dir == "/srv/x"
    assert cfg.matching.threshold is None
    assert dict(cfg.encoder.name) == {"name": "onnx", "path": "/m.onnx"}
    assert (cfg.logging.json, cfg.logging.level, cfg.protection.seed) == (False, "WARNING", 7)
    assert load_config(None, env={"ADVFACE_STORE_USE_GPU": "auto", "ADVFACE_TLS_CERT_FILE": ""}) == Config(
        store=StoreConfig(use_gpu="auto")
    )
    assert load_config(None, env={"ADVFACE_ENCODER_NAME": "onnx:/m.onnx"}).encoder.name == "onnx:/m.onnx"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ADVFACE_SERVER_PORT": "fifty"}, r"ADVFACE_SERVER_PORT \(override of server\.port\): expected an integer"),
        ({"ADVFACE_SERVER_PORT": "-1"}, r"ADVFACE_SERVER_PORT .*must be in \[0, 65535\]"),
        ({"ADVFACE_SERVER_PROT": "1"}, r"ADVFACE_SERVER_PROT: unknown configuration key server\.prot"),
        ({"ADVFACE_SERVER": "1"}, r"ADVFACE_SERVER: unknown configuration key"),
        ({"ADVFACE_AUTH_ENABLED": "maybe"}, r"ADVFACE_AUTH_ENABLED .*expected true or false"),
        ({"ADVFACE_AUTH_TOKENS": "x"}, r"ADVFACE_AUTH_TOKENS .*cannot be set from the environment"),
        ({"ADVFACE_MATCHING_THRESHOLD": "high"}, r"ADVFACE_MATCHING_THRESHOLD .*expected a number"),
        ({"ADVFACE_STORE_USE_GPU": "sometimes"}, r"ADVFACE_STORE_USE_GPU .*expected true or false"),
        ({"ADVFACE_ENCODER_NAME": "{name: [unclosed"}, r"ADVFACE_ENCODER_NAME .*not a YAML mapping"),
        ({"ADVFACE_TLS_CERT_FILE": "/nonexistent.pem"}, r"ADVFACE_TLS_CERT_FILE .*not found"),
    ],
)
def test_env_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, env=env)


def test_example_file_loads_and_documents_every_key() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg == default_config(env={})
    text = EXAMPLE.read_text()
    data = yaml.safe_load(text)
    defaults = Config().to_dict()
    assert set(data) == set(defaults)
    for section, values in defaults.items():
        assert set(data[section]) == set(values), section
        for key in values:  # every key has a comment line right above it
            lines = text.splitlines()
            index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
            assert lines[index - 1].strip().startswith("#"), key


def test_auth_lookup_is_exact() -> None:
    auth = AuthConfig(enabled=True, tokens={TOKEN_A: TokenGrant(("t",))})
    assert auth.lookup(TOKEN_A) == TokenGrant(("t",), "client")
    assert auth.lookup(TOKEN_A[:-1]) is None and auth.lookup(TOKEN_A + "x") is None and auth.lookup("") is None
    assert auth.lookup("é" * 20) is None
