"""The sidecar's configuration: one YAML file, environment overrides, frozen dataclasses.

:func:`load_config` reads a YAML file (every section and key optional), applies environment overrides and
validates everything, raising :class:`~advface.errors.ConfigError` with a message naming the file or variable and
the key (``server.port``) for unknown sections or keys, wrong types and bad values. Token values never appear in
messages. :func:`default_config` gives the defaults; ``Config.to_dict()`` the plain-dict (YAML-able) form.

The dataclasses below (:class:`Config`, whose fields are the sections, and one frozen dataclass per section) are
the single source of the defaults. ``docs/configuration.md`` documents every section and key: default, allowed
values, meaning and environment variable (``tests/test_docs.py`` checks it against these dataclasses);
``docs/advface.example.yaml`` is a commented example of every key.

Environment overrides: ``ADVFACE_<SECTION>_<KEY>`` (upper case), e.g. ``ADVFACE_SERVER_PORT=50052``,
``ADVFACE_TLS_CERT_FILE=/etc/advface/cert.pem``, ``ADVFACE_STORE_USE_GPU=false``,
``ADVFACE_KEYED_TRANSFORM_ENABLED=true`` (section names may contain ``_``). Values are converted to the key's
type: integers and numbers as written, booleans from ``true/false/yes/no/on/off/1/0``, ``null``, ``none`` or an
empty value for keys that may be null, ``encoder.name`` as a spec string or a YAML mapping (``{name: onnx, path:
/m.onnx}``). ``auth.tokens`` cannot be set from the environment (use ``ADVFACE_AUTH_TOKENS_FILE``). A variable naming
a known section and an unknown key is an error; other ``ADVFACE_*`` variables (``ADVFACE_LFW_DIR``...) are ignored.
Overrides win over the file; ``$ADVFACE_DATA_DIR`` only changes the default of ``store.data_dir``.

Relative paths in the file (``tls.*``, ``auth.tokens_file``, ``protection.shadow``, ``protection.shadows``,
``store.data_dir``, ``encryption.key_file``, ``encryption.previous_key_files``, ``keyed_transform.secret_file``) are
relative to the file's folder; in variables, to the working directory (list keys in a variable: comma-separated).
``~`` is expanded. Every one of these files but ``store.data_dir`` must exist when the configuration is loaded.

``protection.method: advface-id`` needs a non-empty ``protection.shadows`` and refuses ``protection.shadow``;
``advface`` refuses a non-empty ``shadows`` and ``jitter: false`` (a setting is never silently ignored).
The encoder must have a differentiable torch module for advface-id (checked when the server starts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from advface.errors import ConfigError, ValidationError

log = logging.getLogger(__name__)

ENV_PREFIX = "ADVFACE_"
ENV_DATA_DIR = "ADVFACE_DATA_DIR"
ENV_CONFIG_HOME = "XDG_CONFIG_HOME"
ENV_ENCRYPTION_KEY = "ADVFACE_ENCRYPTION_KEY"  # the key itself (read by advface.crypto), not an override
DEFAULT_DATA_DIR = "~/.local/share/advface"
#: The key folder's default inside ``$XDG_CONFIG_HOME`` (else ``~/.config``): outside the data folder.
DEFAULT_KEYS_SUBDIR = "advface/keys"
ROLES = ("admin", "client")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: protection.method values (advface.protect.methods.METHODS; not imported here: loading a config needs no torch)
PROTECTION_METHODS = ("advface", "advface-id")
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 512


class FrozenMap(Mapping[str, Any]):
    """A read-only mapping (keeps the configuration dataclasses immutable); equal to dicts with the same items."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data = dict(data or {})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenMap, (self._data,))

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))


# --------------------------------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    max_receive_mb: int = 4
    max_send_mb: int = 4
    max_batch: int = 1000
    grace_seconds: float = 5.0
    workers: int = 4
    #: largest photo of any image-taking RPC, width x height (read from the header, before decoding)
    max_image_pixels: int = 12_000_000


@dataclass(frozen=True)
class TokenGrant:
    """What a bearer token may do: ``tenants`` (a tuple of tenant ids, or ``"*"`` for all) and ``role``."""

    tenants: tuple[str, ...] | Literal["*"]
    role: Literal["admin", "client"] = "client"

    def allows(self, tenant: str) -> bool:
        """Whether this token may act on ``tenant``."""
        return self.tenants == "*" or tenant in self.tenants

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class AuthConfig:
    enabled: bool = False
    #: token -> grant: the tokens of the file and of ``tokens_file``, merged
    tokens: Mapping[str, TokenGrant] = field(default_factory=FrozenMap)
    tokens_file: str | None = None
    #: requests per second per token (anonymous callers share one budget when auth is off); 0: no limit
    rate_per_second: float = 1000.0
    #: requests of one token being handled at once; 0: no limit
    max_in_flight: int = 64

    def lookup(self, token: str) -> TokenGrant | None:
        """The grant of ``token`` (None if unknown), comparing against every token in constant time."""
        found = None
        given = token.encode("utf-8", "replace")
        for known, grant in self.tokens.items():
            if hmac.compare_digest(given, known.encode("utf-8")):
                found = grant
        return found


@dataclass(frozen=True)
class TLSConfig:
    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def mutual(self) -> bool:
        """Clients must present a certificate signed by ``client_ca_file``."""
        return self.client_ca_file is not None


@dataclass(frozen=True)
class EncoderConfig:
    #: a spec string or mapping, as accepted by :func:`advface.encoders.create_encoder`
    name: str | Mapping[str, Any] = "dlib"
    detector: str = "dlib"
    face_policy: str = "largest"


@dataclass(frozen=True)
class ProtectionConfig:
    enabled: bool = True
    method: str = "advface"
    shadow: str | None = None
    shadows: tuple[str, ...] = ()
    jitter: bool = True
    rel_l2: float = 0.1
    steps: int = 3
    #: None: the deployment's own random seed from the key folder (``keys.auto``), else 0
    seed: int | None = None
    slots: int = 0
    threads: int = 0


@dataclass(frozen=True)
class ImageProtectionConfig:
    enabled: bool = True
    steps: int = 60
    max_steps: int = 500
    max_pixels: int = 4_000_000
    #: Guidance terms (``advface protect-image --guidance``); None: the library's default.
    guidance: tuple[str, ...] | None = None
    #: Defender surrogate checkpoint for the deflection and antipure terms; None: the one shipped with advface.
    surrogate: str | None = None
    #: Budget shape (``advface protect-image --budget``: uniform, perceptual, ssim or jnd); None: the library's default.
    budget: str | None = None


def _default_data_dir() -> str:
    return str(Path(DEFAULT_DATA_DIR).expanduser())


def _default_keys_dir() -> str:
    base = os.environ.get(ENV_CONFIG_HOME) or "~/.config"
    return str((Path(base).expanduser() / DEFAULT_KEYS_SUBDIR).absolute())


@dataclass(frozen=True)
class StoreConfig:
    backend: str = "sqlite"
    data_dir: str = field(default_factory=_default_data_dir)
    use_gpu: bool | Literal["auto"] = "auto"
    index: str = "ivf"
    #: PostgreSQL connection string (backend "postgresql"); may hold a password: kept out of repr()
    dsn: str | None = field(default=None, repr=False)
    ivf_min_rows: int = 100_000
    ivf_nlist: int = 0
    ivf_nprobe: int = 128
    #: "encrypted": templates stored as CKKS ciphertexts, matched through the key service (docs/encrypted-matching.md)
    matching: str = "plain"
    encrypted_keys_dir: str | None = None
    keyservice_address: str | None = None
    keyservice_timeout_s: float = 5.0
    #: TLS to the key service: its CA (enables TLS); the sidecar's client certificate and key (mTLS)
    keyservice_ca_file: str | None = None
    keyservice_cert_file: str | None = None
    keyservice_key_file: str | None = None

    @property
    def database_path(self) -> Path:
        """The SQLite template database inside ``data_dir``."""
        return Path(self.data_dir) / "templates.sqlite3"


@dataclass(frozen=True)
class MatchingConfig:
    threshold: float | None = None
    top_k_max: int = 100
    #: failed Verify attempts allowed per (tenant, subject) within verify_window_s; 0: no limit (docs/serve.md)
    verify_max_failures: int = 10
    verify_window_s: float = 900.0
    #: subjects whose failed attempts are tracked at once, per process (an LRU map)
    verify_max_tracked: int = 100_000
    #: failed Verify attempts in a row since the subject's last match after which it is refused until an operator
    #: resets it (re-enrolment); 0: no cap (NIST SP 800-63B 5.2.2: at most 100)
    verify_max_consecutive_failures: int = 100
    #: capped subjects held at once, per process (past it the oldest capped one is released, logged)
    verify_max_capped: int = 100_000
    #: failed Identify calls (no candidate accepted) allowed per caller within identify_window_s; 0: no limit
    identify_max_failures: int = 1000
    identify_window_s: float = 900.0
    #: failed Identify calls in a row since the caller's last accepted candidate before the cap; 0: no cap
    identify_max_consecutive_failures: int = 0
    #: each consecutive lockout (Verify: of a subject; Identify: of a caller) lasts this many times the one before
    lockout_growth: float = 2.0
    #: the longest lockout, seconds (at least verify_window_s and identify_window_s)
    lockout_max_s: float = 86_400.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    json: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class EncryptionConfig:
    key_file: str | None = None
    key_env: str | None = None
    kms_hook: str | None = None
    previous_key_files: tuple[str, ...] = ()
    allow_insecure_key_file: bool = False

    @property
    def enabled(self) -> bool:
        """Whether templates at rest are encrypted (a key source is configured)."""
        return bool(self.key_file or self.key_env or self.kms_hook)


@dataclass(frozen=True)
class KeysConfig:
    """The key folder (:mod:`advface.service.key_folder`): with ``auto`` the first start creates the encryption
    key, the keyed-transform secret and the AdvFace seed there, and every section that names no key of its own uses
    them."""

    auto: bool = True
    dir: str = field(default_factory=_default_keys_dir)


@dataclass(frozen=True)
class KeyedTransformConfig:
    #: None: on with the key folder's secret when ``keys.auto`` (a new store), else off
    enabled: bool | None = None
    secret_file: str | None = None
    secret_env: str | None = None
    kms_hook: str | None = None
    allow_insecure_secret_file: bool = False
    #: "auto" (the encoder's calibrated norm, advface.protect.tenant_transform), a positive number, or None (off)
    norm: float | str | None = "auto"
    version: int = 1


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    protection: ProtectionConfig = field(default_factory=ProtectionConfig)
    image_protection: ImageProtectionConfig = field(default_factory=ImageProtectionConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    keyed_transform: KeyedTransformConfig = field(default_factory=KeyedTransformConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self, *, redact_secrets: bool = False) -> dict[str, Any]:
        """Plain nested dicts (YAML-able; :func:`load_config` reads it back to an equal Config). With
        ``redact_secrets`` token values are replaced by ``<redacted ...>`` labels (for logs; not loadable)."""
        out: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            out[section.name] = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        tokens = {}
        for i, (token, grant) in enumerate(self.auth.tokens.items()):
            key = token
            if redact_secrets:
                key = f"<redacted #{i} sha256:{hashlib.sha256(token.encode()).hexdigest()[:8]}>"
            tenants = grant.tenants if grant.tenants == "*" else list(grant.tenants)
            tokens[key] = {"tenants": tenants, "role": grant.role}
        out["auth"]["tokens"] = tokens
        if redact_secrets and self.store.dsn is not None:
            from advface.store.postgres import redact_dsn

            out["store"]["dsn"] = redact_dsn(self.store.dsn)
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------- validation


class _Where:
    """Where a value came from, for error messages: ``file.yaml: server.port`` or ``ADVFACE_SERVER_PORT``."""

    def __init__(self, source: str, key: str, env_var: str | None = None, base_dir: Path | None = None) -> None:
        self.source, self.key, self.env_var, self.base_dir = source, key, env_var, base_dir

    def error(self, problem: str) -> ConfigError:
        if self.env_var:
            return ConfigError(f"{self.env_var} (override of {self.key}): {problem}")
        return ConfigError(f"{self.source}: {self.key}: {problem}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _int(value: Any, where: _Where, lo: int, hi: int) -> int:
    if where.env_var and isinstance(value, str):
        try:
            value = int(value.strip(), 10)
        except ValueError:
            raise where.error(f"expected an integer, got {value!r}") from None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise where.error(f"expected an integer, got {value!r} ({_type_name(value)})")
    number = int(value)
    if not lo <= number <= hi:
        raise where.error(f"must be in [{lo}, {hi}], got {value}")
    return number


def _float(value: Any, where: _Where, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if where.env_var and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise where.error(f"expected a number, got {value!r}") from None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise where.error(f"expected a number, got {value!r} ({_type_name(value)})")
    value = float(value)
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise where.error(f"must be a finite number in {bracket}{lo:g}, {hi:g}], got {value}")
    return value


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _bool(value: Any, where: _Where) -> bool:
    if where.env_var and isinstance(value, str):
        if value.strip().lower() in _TRUE:
            return True
        if value.strip().lower() in _FALSE:
            return False
        raise where.error(f"expected true or false, got {value!r}")
    if not isinstance(value, bool):
        raise where.error(f"expected true or false, got {value!r} ({_type_name(value)})")
    return value


def _is_null(value: Any, where: _Where) -> bool:
    if value is None:
        return True
    return bool(where.env_var) and isinstance(value, str) and value.strip().lower() in ("", "null", "none", "~")


def _str(value: Any, where: _Where, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str):
        raise where.error(f"expected a string, got {value!r} ({_type_name(value)})")
    if where.env_var:
        value = value.strip()
    if not value:
        raise where.error("must not be empty")
    if choices is not None and value not in choices:
        raise where.error(f"must be one of {', '.join(choices)}; got {value!r}")
    return value


def _path(value: Any, where: _Where, *, must_exist: bool) -> str:
    text = _str(value, where)
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = (where.base_dir if where.base_dir is not None and not where.env_var else Path.cwd()) / path
    if must_exist and not path.is_file():
        raise where.error(f"file {path} not found")
    return str(path)


def _optional_path(value: Any, where: _Where) -> str | None:
    return None if _is_null(value, where) else _path(value, where, must_exist=True)


def _host(value: Any, where: _Where) -> str:
    host = _str(value, where)
    if any(c.isspace() for c in host) or not host.isprintable():
        raise where.error(f"invalid host {host!r}")
    return host


def _encoder_spec(value: Any, where: _Where) -> str | Mapping[str, Any]:
    if where.env_var and isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise where.error(f"not a YAML mapping: {exc}") from None
    from advface.encoders.registry import parse_encoder_spec

    if not isinstance(value, (str, Mapping)):
        raise where.error(f"expected an encoder spec string or mapping, got {value!r} ({_type_name(value)})")
    try:
        parse_encoder_spec(value)
    except ConfigError as exc:
        raise where.error(str(exc)) from None
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise where.error("encoder mapping keys must be strings")
        return FrozenMap(value)
    return value.strip()


def _detector(value: Any, where: _Where) -> str:
    from advface.faces.detect import parse_detector_spec

    spec = _str(value, where)
    try:
        parse_detector_spec(spec)
    except ConfigError as exc:
        raise where.error(str(exc)) from None
    return spec


def _face_policy(value: Any, where: _Where) -> str:
    from advface.faces.pipeline import FacePolicy

    text = _str(value, where)
    try:
        return FacePolicy.parse(text).value
    except ConfigError as exc:
        raise where.error(str(exc)) from None


def _use_gpu(value: Any, where: _Where) -> bool | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if where.env_var and isinstance(value, str):
        return _bool(value, where)
    if not isinstance(value, bool):
        raise where.error(f"expected 'auto', true or false, got {value!r} ({_type_name(value)})")
    return value


def _dsn(value: Any, where: _Where) -> str | None:
    """A PostgreSQL connection string (URL or key=value form); never echoed in errors (it may hold a password)."""
    if _is_null(value, where):
        return None
    if not isinstance(value, str) or not value.strip():
        raise where.error(f"expected a PostgreSQL connection string, got {_type_name(value)}")
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(value.strip())
    except Exception:  # noqa: BLE001 - psycopg's message may quote the string (and its password)
        raise where.error(
            "not a valid PostgreSQL connection string (postgresql://user@host:5432/db or 'host=... dbname=...')"
        ) from None
    return value.strip()


def _data_dir(value: Any, where: _Where) -> str:
    return _path(value, where, must_exist=False)


def _log_level(value: Any, where: _Where) -> str:
    return _str(value.upper() if isinstance(value, str) else value, where, LOG_LEVELS)


def _threshold(value: Any, where: _Where) -> float | None:
    return None if _is_null(value, where) else _float(value, where, -1e9, 1e9)


def _shadow(value: Any, where: _Where) -> str | None:
    return _optional_path(value, where)


def _existing_paths(value: Any, where: _Where, what: str) -> tuple[str, ...]:
    """A list of existing files (``what``): a YAML list, or comma-separated in an environment variable; null: ()."""
    if _is_null(value, where):
        return ()
    if where.env_var and isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise where.error(f"expected a list of {what}, got {_type_name(value)}")
    return tuple(_path(v, where, must_exist=True) for v in value)


def _guidance(value: Any, where: _Where) -> tuple[str, ...] | None:
    """Image-protection guidance terms: a YAML list or a comma-separated string; null: the library's default."""
    if _is_null(value, where):
        return None
    if not isinstance(value, (str, list, tuple)):
        raise where.error(f"expected a list of guidance terms, got {_type_name(value)}")
    from advface.protect.image.guidance import parse_guidance

    try:
        return parse_guidance(value if isinstance(value, str) else [_str(v, where) for v in value])
    except ConfigError as exc:
        raise where.error(str(exc)) from None


def _budget(value: Any, where: _Where) -> str | None:
    """Image-protection budget shape (uniform, perceptual, ssim, jnd); null: the library's default."""
    if _is_null(value, where):
        return None
    from advface.protect.image.perceptual import BUDGETS

    return _str(value, where, BUDGETS)


def _shadow_list(value: Any, where: _Where) -> tuple[str, ...]:
    paths = _existing_paths(value, where, "shadow checkpoint paths")
    if len(set(paths)) != len(paths):
        raise where.error("lists the same shadow checkpoint twice")
    return paths


def _env_name(value: Any, where: _Where) -> str | None:
    if _is_null(value, where):
        return None
    name = _str(value, where)
    if not name.replace("_", "").isalnum() or not name.isascii() or name[0].isdigit():
        raise where.error(f"{name!r} is not an environment variable name")
    return name


def _kms_hook(value: Any, where: _Where) -> str | None:
    if _is_null(value, where):
        return None
    spec = _str(value, where)
    module, sep, func = spec.partition(":")
    if not sep or not func.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
        raise where.error(f"expected 'package.module:function', got {spec!r}")
    return spec


def _key_files(value: Any, where: _Where) -> tuple[str, ...]:
    return _existing_paths(value, where, "key files")


def _transform_norm(value: Any, where: _Where) -> float | str | None:
    if _is_null(value, where) or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, str) and not where.env_var:
        raise where.error(f"expected 'auto', a positive number or null, got {value!r}")
    return _float(value, where, 0.0, 1e6, lo_open=True)


def _no_env(value: Any, where: _Where) -> Any:
    if where.env_var:
        raise where.error("cannot be set from the environment; use ADVFACE_AUTH_TOKENS_FILE")
    return value  # validated with the grants, below


_Check = Callable[[Any, _Where], Any]

#: section -> key -> validator (each converts environment strings itself)
_KEYS: dict[str, dict[str, _Check]] = {
    "server": {
        "host": _host,
        "port": lambda v, w: _int(v, w, 0, 65535),
        "max_receive_mb": lambda v, w: _int(v, w, 1, 2047),
        "max_send_mb": lambda v, w: _int(v, w, 1, 2047),
        "max_batch": lambda v, w: _int(v, w, 1, 1_000_000),
        "grace_seconds": lambda v, w: _float(v, w, 0.0, 3600.0),
        "workers": lambda v, w: _int(v, w, 1, 1024),
        "max_image_pixels": lambda v, w: _int(v, w, 1, 80_000_000),
    },
    "auth": {
        "enabled": _bool,
        "tokens": _no_env,
        "tokens_file": _optional_path,
        "rate_per_second": lambda v, w: _float(v, w, 0.0, 1e6),
        "max_in_flight": lambda v, w: _int(v, w, 0, 1_000_000),
    },
    "tls": {
        "cert_file": _optional_path,
        "key_file": _optional_path,
        "client_ca_file": _optional_path,
    },
    "encoder": {
        "name": _encoder_spec,
        "detector": _detector,
        "face_policy": _face_policy,
    },
    "protection": {
        "enabled": _bool,
        "method": lambda v, w: _str(v, w, PROTECTION_METHODS),
        "shadow": _shadow,
        "shadows": _shadow_list,
        "jitter": _bool,
        "rel_l2": lambda v, w: _float(v, w, 0.0, 1.0, lo_open=True),
        "steps": lambda v, w: _int(v, w, 0, 100_000),
        "seed": lambda v, w: None if _is_null(v, w) else _int(v, w, 0, 2**64 - 1),
        "slots": lambda v, w: _int(v, w, 0, 1024),
        "threads": lambda v, w: _int(v, w, 0, 1024),
    },
    "image_protection": {
        "enabled": _bool,
        "steps": lambda v, w: _int(v, w, 1, 100_000),
        "max_steps": lambda v, w: _int(v, w, 1, 100_000),
        "max_pixels": lambda v, w: _int(v, w, 1, 40_000_000),
        "guidance": _guidance,
        "surrogate": _optional_path,
        "budget": _budget,
    },
    "store": {
        "backend": lambda v, w: _str(v, w, ("sqlite", "postgresql")),
        "dsn": _dsn,
        "data_dir": _data_dir,
        "use_gpu": _use_gpu,
        "index": lambda v, w: _str(v, w, ("flat", "ivf")),
        "ivf_min_rows": lambda v, w: _int(v, w, 1, 10**9),
        "ivf_nlist": lambda v, w: _int(v, w, 0, 65536),
        "ivf_nprobe": lambda v, w: _int(v, w, 1, 65536),
        "matching": lambda v, w: _str(v, w, ("plain", "encrypted")),
        "encrypted_keys_dir": lambda v, w: None if _is_null(v, w) else _path(v, w, must_exist=False),
        "keyservice_address": lambda v, w: None if _is_null(v, w) else _host(v, w),
        "keyservice_timeout_s": lambda v, w: _float(v, w, 0.0, 600.0, lo_open=True),
        "keyservice_ca_file": _optional_path,
        "keyservice_cert_file": _optional_path,
        "keyservice_key_file": _optional_path,
    },
    "matching": {
        "threshold": _threshold,
        "top_k_max": lambda v, w: _int(v, w, 1, 10_000),
        "verify_max_failures": lambda v, w: _int(v, w, 0, 1_000_000),
        "verify_window_s": lambda v, w: _float(v, w, 0.0, 31_536_000.0, lo_open=True),
        "verify_max_tracked": lambda v, w: _int(v, w, 1, 100_000_000),
        "verify_max_consecutive_failures": lambda v, w: _int(v, w, 0, 1_000_000_000),
        "verify_max_capped": lambda v, w: _int(v, w, 1, 100_000_000),
        "identify_max_failures": lambda v, w: _int(v, w, 0, 1_000_000),
        "identify_window_s": lambda v, w: _float(v, w, 0.0, 31_536_000.0, lo_open=True),
        "identify_max_consecutive_failures": lambda v, w: _int(v, w, 0, 1_000_000_000),
        "lockout_growth": lambda v, w: _float(v, w, 1.0, 1000.0),
        "lockout_max_s": lambda v, w: _float(v, w, 0.0, 31_536_000.0, lo_open=True),
    },
    "logging": {
        "level": _log_level,
        "json": _bool,
    },
    "encryption": {
        "key_file": _optional_path,
        "key_env": _env_name,
        "kms_hook": _kms_hook,
        "previous_key_files": _key_files,
        "allow_insecure_key_file": _bool,
    },
    "keyed_transform": {
        "enabled": lambda v, w: None if _is_null(v, w) else _bool(v, w),
        "secret_file": _optional_path,
        "secret_env": _env_name,
        "kms_hook": _kms_hook,
        "allow_insecure_secret_file": _bool,
        "norm": _transform_norm,
        "version": lambda v, w: _int(v, w, 1, 2**31 - 1),
    },
    "keys": {
        "auto": _bool,
        "dir": lambda v, w: _default_keys_dir() if _is_null(v, w) else _data_dir(v, w),
    },
    "metrics": {
        "enabled": _bool,
        "host": _host,
        "port": lambda v, w: _int(v, w, 0, 65535),
    },
}
assert set(_KEYS) == set(SECTIONS)


def _check_token(token: Any, where: _Where, index: int) -> str:
    if not isinstance(token, str):
        raise where.error(f"token #{index} must be a string, got {_type_name(token)}")
    if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
        raise where.error(
            f"token #{index} is {len(token)} characters long; tokens need {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS}"
        )
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token) or token.startswith("<"):
        raise where.error(f"token #{index} must be printable ASCII without whitespace (and not start with '<')")
    return token


def _grants(value: Any, where: _Where) -> dict[str, TokenGrant]:
    """Validate a ``token -> {tenants, role}`` mapping; errors name tokens by position, never by value."""
    from advface.store.base import check_id

    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise where.error(f"expected a mapping of token -> {{tenants, role}}, got {_type_name(value)}")
    out: dict[str, TokenGrant] = {}
    for index, (token, grant) in enumerate(value.items(), start=1):
        token = _check_token(token, where, index)
        if not isinstance(grant, Mapping):
            raise where.error(f"token #{index}: expected a mapping with 'tenants' and 'role'")
        unknown = set(grant) - {"tenants", "role"}
        if unknown:
            raise where.error(f"token #{index}: unknown key(s) {sorted(map(str, unknown))}; known: tenants, role")
        if "tenants" not in grant:
            raise where.error(f"token #{index}: 'tenants' is missing (a list of tenant ids, or \"*\")")
        tenants = grant["tenants"]
        if tenants == "*":
            parsed: tuple[str, ...] | Literal["*"] = "*"
        else:
            if isinstance(tenants, str) or not isinstance(tenants, (list, tuple)) or not tenants:
                raise where.error(f'token #{index}: tenants must be a non-empty list of tenant ids or "*"')
            try:
                parsed = tuple(check_id(t, "tenant") for t in tenants)
            except ValidationError as exc:
                raise where.error(f"token #{index}: {exc}") from None
        role = grant.get("role", "client")
        if role not in ROLES:
            raise where.error(f"token #{index}: role must be one of {', '.join(ROLES)}; got {role!r}")
        out[token] = TokenGrant(parsed, role)
    return out


def _read_yaml(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None


def _tokens_file(path: str, where: _Where) -> dict[str, TokenGrant]:
    file = Path(path)
    mode = file.stat().st_mode
    if mode & 0o077:
        log.warning("tokens file %s can be read by other users (mode %o): restrict it to 0600", file, mode & 0o777)
    data = _read_yaml(file, "tokens file")
    if not isinstance(data, Mapping) or set(data) != {"tokens"}:
        raise ConfigError(f"{file}: a tokens file holds one key, 'tokens' (a mapping of token -> {{tenants, role}})")
    return _grants(data["tokens"], _Where(str(file), "tokens"))


# --------------------------------------------------------------------------------------------------- loading


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, tuple[str, str]]]:
    """``ADVFACE_<SECTION>_<KEY>`` variables: section -> key -> (variable, value)."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var == ENV_ENCRYPTION_KEY:
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        # the longest section name the variable starts with (section names may hold "_": keyed_transform)
        section = max((s for s in _KEYS if rest == s or rest.startswith(s + "_")), key=len, default="")
        if not section:
            section = rest.partition("_")[0]
        key = rest[len(section) + 1 :]
        sep = "_" if rest.startswith(section + "_") else ""
        if section not in _KEYS:
            continue  # ADVFACE_LFW_DIR, ADVFACE_DATA_DIR, ... belong to other parts of advface
        if not sep or key not in _KEYS[section]:
            known = ", ".join(f"{ENV_PREFIX}{section.upper()}_{k.upper()}" for k in _KEYS[section])
            raise ConfigError(f"{var}: unknown configuration key {section}.{key or '?'}; known: {known}")
        out.setdefault(section, {})[key] = (var, env[var])
    return out


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] = os.environ) -> Config:
    """Read the YAML file ``path`` (None: no file), apply ``ADVFACE_<SECTION>_<KEY>`` overrides from ``env`` and
    validate; ConfigError names the file or variable and the key of the first problem (see module docs)."""
    raw: Any = {}
    source, base_dir = "<defaults>", None
    if path is not None:
        file = Path(path).expanduser()
        source, base_dir = str(file), file.resolve().parent
        raw = _read_yaml(file, "configuration file")
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: the top level must be a mapping of sections, got {_type_name(raw)}")
    for section, given in raw.items():
        if section not in _KEYS:
            raise ConfigError(f"{source}: unknown section {section!r}; known: {', '.join(_KEYS)}")
        if given is not None and not isinstance(given, Mapping):
            raise ConfigError(f"{source}: {section}: expected a mapping of keys, got {_type_name(given)}")
        for key in given or {}:
            if key not in _KEYS[section]:
                raise ConfigError(f"{source}: {section}.{key}: unknown key; known: {', '.join(_KEYS[section])}")
    overrides = _env_overrides(env)

    sections: dict[str, Any] = {}
    for section, checks in _KEYS.items():
        file_values = raw.get(section) or {}
        values: dict[str, Any] = {}
        for key, check in checks.items():
            if key in overrides.get(section, {}):
                var, value = overrides[section][key]
                values[key] = check(value, _Where(source, f"{section}.{key}", env_var=var))
            elif key in file_values:
                values[key] = check(file_values[key], _Where(source, f"{section}.{key}", base_dir=base_dir))
        sections[section] = values

    # store.data_dir: default from $ADVFACE_DATA_DIR
    if "data_dir" not in sections["store"] and env.get(ENV_DATA_DIR):
        sections["store"]["data_dir"] = _data_dir(env[ENV_DATA_DIR], _Where(source, "store.data_dir", ENV_DATA_DIR))

    # auth: inline tokens + tokens_file, merged
    auth = sections["auth"]
    tokens = _grants(auth.get("tokens"), _Where(source, "auth.tokens"))
    if auth.get("tokens_file"):
        for token, grant in _tokens_file(auth["tokens_file"], _Where(source, "auth.tokens_file")).items():
            if token in tokens and tokens[token] != grant:
                raise ConfigError(f"{auth['tokens_file']}: a token also in auth.tokens has a different grant")
            tokens[token] = grant
    auth["tokens"] = FrozenMap(tokens)
    if auth.get("enabled") and not tokens:
        raise ConfigError(
            f"{source}: auth.enabled is true but no tokens are configured (auth.tokens, auth.tokens_file)"
        )

    store = sections["store"]
    if store.get("backend") == "postgresql" and not store.get("dsn"):
        raise ConfigError(
            f"{source}: store.backend is postgresql but store.dsn is not set (or set ADVFACE_STORE_DSN), e.g. "
            "postgresql://advface@db.example:5432/advface"
        )

    matching = sections["matching"]
    longest = max(
        matching.get("verify_window_s", MatchingConfig.verify_window_s),
        matching.get("identify_window_s", MatchingConfig.identify_window_s),
    )
    if matching.get("lockout_max_s", MatchingConfig.lockout_max_s) < longest:
        raise ConfigError(
            f"{source}: matching.lockout_max_s must be at least matching.verify_window_s and "
            f"matching.identify_window_s ({longest:g})"
        )

    tls = sections["tls"]
    if (tls.get("cert_file") is None) != (tls.get("key_file") is None):
        raise ConfigError(f"{source}: tls.cert_file and tls.key_file must be given together")
    if tls.get("client_ca_file") is not None and tls.get("cert_file") is None:
        raise ConfigError(f"{source}: tls.client_ca_file (mutual TLS) needs tls.cert_file and tls.key_file")

    enc = sections["encryption"]
    sources = [k for k in ("key_file", "key_env", "kms_hook") if enc.get(k)]
    if len(sources) > 1:
        raise ConfigError(
            f"{source}: encryption: set only one of key_file, key_env, kms_hook (got {', '.join(sources)})"
        )
    if enc.get("previous_key_files") and not sources:
        raise ConfigError(
            f"{source}: encryption.previous_key_files needs a current key (key_file, key_env or kms_hook)"
        )
    if not sources and env.get(ENV_ENCRYPTION_KEY):
        raise ConfigError(
            f"{ENV_ENCRYPTION_KEY} is set but encryption is not configured; set encryption.key_env: "
            f"{ENV_ENCRYPTION_KEY} (or ADVFACE_ENCRYPTION_KEY_ENV={ENV_ENCRYPTION_KEY}) to encrypt templates at rest"
        )

    _check_protection_method(sections["protection"], source)

    image = sections["image_protection"]
    if image.get("steps", ImageProtectionConfig.steps) > image.get("max_steps", ImageProtectionConfig.max_steps):
        raise ConfigError(f"{source}: image_protection.steps must not exceed image_protection.max_steps")

    kt = sections["keyed_transform"]
    kt_sources = [k for k in ("secret_file", "secret_env", "kms_hook") if kt.get(k)]
    if len(kt_sources) > 1:
        raise ConfigError(
            f"{source}: keyed_transform: set only one of secret_file, secret_env, kms_hook "
            f"(got {', '.join(kt_sources)})"
        )
    if kt.get("enabled") and not kt_sources:
        raise ConfigError(
            f"{source}: keyed_transform.enabled is true but no secret is configured (keyed_transform.secret_file, "
            "secret_env or kms_hook; create one with `advface keygen`)"
        )
    if kt_sources and kt.get("enabled") is False:
        raise ConfigError(
            f"{source}: keyed_transform.{kt_sources[0]} is set but keyed_transform.enabled is false; set enabled: "
            "true (or remove the secret) -- the transform is never turned off silently"
        )
    if kt_sources:
        kt["enabled"] = True  # a configured secret means the transform is on (enabled left unset)

    return Config(**{name: SECTIONS[name](**values) for name, values in sections.items()})


def _check_protection_method(prot: Mapping[str, Any], source: str) -> None:
    """Each protection method's keys only: advface-id needs ``shadows`` (not ``shadow``); advface refuses
    ``shadows`` and ``jitter`` other than their defaults."""
    method = prot.get("method", ProtectionConfig.method)
    if method == "advface-id":
        if not prot.get("shadows"):
            raise ConfigError(
                f"{source}: protection.method is advface-id but protection.shadows is empty; list the shadow "
                "checkpoints of the ensemble (e.g. trained with `advface train-shadow --id-weight 1`)"
            )
        if prot.get("shadow") is not None:
            raise ConfigError(
                f"{source}: protection.shadow is for method advface; advface-id takes its ensemble from "
                "protection.shadows"
            )
    else:
        # (the defaults, shadows: [] and jitter: true, are accepted: Config.to_dict() writes them)
        wrong = [k for k, default in (("shadows", ()), ("jitter", True)) if prot.get(k, default) != default]
        if wrong:
            raise ConfigError(
                f"{source}: protection.{wrong[0]} is only used by protection.method advface-id (method is "
                f"{method}); remove it or set method: advface-id"
            )


def default_config(env: Mapping[str, str] = os.environ) -> Config:
    """The defaults (``store.data_dir`` from ``$ADVFACE_DATA_DIR`` when set); no file, no other overrides."""
    data_dir = env.get(ENV_DATA_DIR)
    if not data_dir:
        return Config()
    return Config(store=StoreConfig(data_dir=str(Path(data_dir).expanduser().absolute())))
