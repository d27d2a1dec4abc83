"""The keyed per-tenant transform as the sidecar uses it: default norm, one transform per tenant, store markers.

:class:`TenantTransforms` holds the deployment secret and hands out each tenant's
:class:`~advface.protect.keyed.KeyedTransform` (derived on first use, kept in a small LRU cache). The sidecar applies
it to every AdvFace template before storing it and to every probe before matching, so the store only ever holds
``T_tenant(AdvFace(z))``. :func:`advface.service.keys.transforms_from_config` builds it from the ``keyed_transform``
configuration section (the secret: 32 bytes, from the same sources as the encryption key).

Norm equalisation (``norm``): ``"auto"`` (default) uses :data:`CALIBRATED_NORMS` for the encoder, the setting under
which the measured unlinkability D_sys is <= 0.05 (``benchmarks/RESULTS.md``, keyed transform); a number uses that
norm; ``None`` keeps template norms (a pure rotation: every score, and so the calibrated threshold, unchanged, but
D_sys 0.08 and a norm linker at 0.26). Scores change with norm equalisation; the sidecar then reports the threshold
measured by ``benchmarks/keyed_threshold.py``
(:data:`advface.service.thresholds.CALIBRATED_EQUALISED_THRESHOLDS`).

Store bookkeeping: an SQLite store's folder records what its templates were issued under (:data:`MARKER_FILE`:
version, norm, a public check id of the secret; :func:`check_store_marker`, run by the sidecar at start), and
:func:`rotate_store` (``advface rotate-transform``) re-issues every template under a new version, resumably.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from advface.errors import ConfigError
from advface.protect.keyed import KeyedTransform

__all__ = [
    "CALIBRATED_NORMS",
    "TenantTransforms",
    "check_db_store_marker",
    "rotate_store",
    "resolve_norm",
]

#: Norm every template is scaled to before the rotation, per encoder, for ``norm: auto``: the mean norm of the
#: public-half LFW embeddings (``norm_equalisation_norm`` of benchmarks/results/keyed_transform.json, 4 decimals).
CALIBRATED_NORMS: dict[str, float] = {"dlib": 1.4253, "dlib-torch": 1.4253}

_CACHE_SIZE = 256


def resolve_norm(setting: Any, encoder_name: str) -> float | None:
    """The norm of the ``keyed_transform.norm`` setting: ``"auto"`` -> the encoder's calibrated norm, a positive
    number -> itself, None / ``"off"`` -> None (no equalisation). ConfigError for ``auto`` with an uncalibrated
    encoder or a bad value."""
    if setting is None or (isinstance(setting, str) and setting.strip().lower() in ("off", "none", "null", "")):
        return None
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        if encoder_name not in CALIBRATED_NORMS:
            raise ConfigError(
                f"keyed_transform.norm is 'auto' but no norm is calibrated for encoder {encoder_name!r} "
                f"(known: {', '.join(sorted(CALIBRATED_NORMS))}); set keyed_transform.norm to a number (e.g. the "
                "mean norm of the encoder's embeddings of public faces) or null"
            )
        return CALIBRATED_NORMS[encoder_name]
    if isinstance(setting, bool) or not isinstance(setting, (int, float)) or not np.isfinite(setting) or setting <= 0:
        raise ConfigError(f"keyed_transform.norm must be 'auto', a positive number or null, got {setting!r}")
    return float(setting)


class TenantTransforms:
    """Every tenant's keyed transform under one deployment secret, key ``version`` and ``norm``."""

    def __init__(self, secret: bytes, dim: int, *, version: int = 1, norm: float | None = None) -> None:
        # derive one transform now: checks secret length, dim, version and norm (ConfigError at start)
        probe = KeyedTransform.from_secret(secret, "advface-config-check", dim, version=version, norm=norm)
        self._secret = bytes(secret)
        self.dim = int(dim)
        self.version = int(version)
        self.norm = probe.norm
        self._cache: OrderedDict[str, KeyedTransform] = OrderedDict()
        self._lock = threading.Lock()

    def for_tenant(self, tenant: str, version: int | None = None) -> KeyedTransform:
        """The transform of ``tenant`` (under key ``version``; default the current one)."""
        version = self.version if version is None else int(version)
        key = f"{version}\x00{tenant}"
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        made = KeyedTransform.from_secret(self._secret, tenant, self.dim, version=version, norm=self.norm)
        with self._lock:
            self._cache[key] = made
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return made

    def apply(self, tenant: str, vectors: np.ndarray) -> np.ndarray:
        """``T_tenant(vectors)`` (``N x dim`` float32) under the current version."""
        if len(vectors) == 0:
            return np.asarray(vectors, np.float32).reshape(0, self.dim)
        return self.for_tenant(tenant).apply(vectors)

    def key_id(self, tenant: str) -> str:
        """The public id of ``tenant``'s current transform (safe to log and report)."""
        return self.for_tenant(tenant).key_id

    def __repr__(self) -> str:
        norm = "off" if self.norm is None else f"{self.norm:g}"
        return f"TenantTransforms(dim={self.dim}, version={self.version}, norm={norm})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("TenantTransforms holds a secret and cannot be pickled")


MARKER_FILE = "keyed_transform.json"
_CHECK_TENANT = "advface-transform-check"


def marker(transforms: TenantTransforms | None) -> dict[str, Any]:
    """What a store's templates were issued under: ``{"enabled", "version", "norm", "check_id"}`` (``check_id``: the
    public key id of a fixed check tenant, so a changed secret is detected without storing anything secret)."""
    if transforms is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "version": transforms.version,
        "norm": transforms.norm,
        "dim": transforms.dim,
        "check_id": transforms.key_id(_CHECK_TENANT),
    }


def check_store_marker(data_dir: str | os.PathLike[str], transforms: TenantTransforms | None, templates: int) -> None:
    """Compare the transform configuration with the one ``data_dir``'s templates were issued under (its
    :data:`MARKER_FILE`), and record it when the store is empty or agrees. ConfigError when they differ (another
    secret, version or norm; the transform turned on for a store of untransformed templates, or off for a
    transformed one): matching would silently fail otherwise."""
    path = Path(data_dir).expanduser() / MARKER_FILE
    wanted = marker(transforms)
    recorded: dict[str, Any] | None = None
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: unreadable keyed-transform marker ({exc})") from None
    if _compare_marker(recorded, wanted, templates, f"the store in {path.parent}") and (
        transforms is not None or path.is_file()
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)


def check_db_store_marker(store: Any, transforms: TenantTransforms | None, templates: int) -> None:
    """:func:`check_store_marker` for a store that keeps the marker in its own database (the PostgreSQL store:
    ``store.read_transform_marker()`` / ``store.write_transform_marker()``), so every replica sees it."""
    recorded = store.read_transform_marker()
    wanted = marker(transforms)
    if _compare_marker(recorded, wanted, templates, f"the store {store!r}") and (
        transforms is not None or recorded is not None
    ):
        store.write_transform_marker(wanted)


def _compare_marker(recorded: dict[str, Any] | None, wanted: dict[str, Any], templates: int, where: str) -> bool:
    """ConfigError when a store of ``templates`` templates issued under ``recorded`` cannot be matched with the
    configuration ``wanted``; True when the recorded marker should be (re)written."""
    if templates > 0:
        if recorded is None:
            recorded = {"enabled": False}  # templates stored before the transform existed in this store
        if recorded != wanted:

            def say(m: dict[str, Any]) -> str:
                if "rotating_to" in m:
                    return (
                        f"partly re-issued to keyed transform version {m['rotating_to'].get('version')} "
                        "(an unfinished `advface rotate-transform`: run it again to finish)"
                    )
                if not m.get("enabled"):
                    return "without the keyed transform"
                norm = "off" if m.get("norm") is None else f"{m['norm']:g}"
                return f"under keyed transform version {m.get('version')}, norm {norm}, check id {m.get('check_id')}"

            raise ConfigError(
                f"{where} holds {templates} templates issued {say(recorded)}, but the "
                f"configuration asks for templates {say(wanted)}; restore the secret / keyed_transform settings they "
                "were issued under, or re-issue them (from raw templates: re-encoding, then enrol again)"
            )
    return recorded != wanted


def read_marker(data_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The recorded :data:`MARKER_FILE` of ``data_dir`` (None when there is none)."""
    path = Path(data_dir).expanduser() / MARKER_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable keyed-transform marker ({exc})") from None


def _write_marker(data_dir: str | os.PathLike[str], value: dict[str, Any]) -> None:
    path = Path(data_dir).expanduser() / MARKER_FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(value, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def rotate_store(
    store: Any,
    data_dir: str | os.PathLike[str] | None,
    old: TenantTransforms,
    new: TenantTransforms,
    *,
    batch_size: int = 1000,
    progress: bool = False,
) -> int:
    """Re-issue every template of ``store`` from ``old`` to ``new``: ``new.apply(old.invert(v))`` per tenant.
    Returns the templates rewritten by this call. The marker is the file in ``data_dir`` (SQLite store), or, with
    ``data_dir=None``, the one the store keeps in its database (PostgreSQL store: ``read_transform_marker``).

    Resumable: the store records the job and its last committed row in the same transaction as each batch, and the
    folder's marker says "re-issue under way" until the end (the sidecar refuses to start meanwhile); a crash (even
    kill -9) loses at most one uncommitted batch, and calling again with the same arguments finishes the job. Both
    transforms must be invertible for what matching uses: ``old.invert`` returns the norm-equalised vector when
    ``old.norm`` is set, so going from a norm-equalised transform to ``norm=None`` is refused (the original norms
    are gone); any other change of norm is fine. ConfigError when the store was not issued under ``old``.
    """
    if old.dim != new.dim:
        raise ConfigError(f"cannot re-issue {old.dim}-d templates under a {new.dim}-d transform")
    if old.norm is not None and new.norm is None:
        raise ConfigError(
            "cannot re-issue norm-equalised templates without norm equalisation: their original norms are not "
            "stored (re-encode from raw templates instead, or keep a norm)"
        )
    before, after = marker(old), marker(new)
    if before == after:
        raise ConfigError("the new transform equals the old one (same secret, version and norm): nothing to do")
    rotating = {"enabled": True, "rotating_from": before, "rotating_to": after}
    job = f"keyed transform {before['check_id']}/{before['version']} -> {after['check_id']}/{after['version']}"
    where = f"the store in {data_dir}" if data_dir is not None else f"the store {store!r}"

    def write(value: dict[str, Any]) -> None:
        if data_dir is None:
            store.write_transform_marker(value)
        else:
            _write_marker(data_dir, value)

    recorded = read_marker(data_dir) if data_dir is not None else store.read_transform_marker()
    unfinished = store.transform_job()
    if recorded == after and unfinished is None:
        return 0  # already done
    if recorded == before or (recorded is None and store.count() == 0):
        if unfinished is not None:
            raise ConfigError(f"the store has another unfinished re-issue job: {unfinished!r}")
        write(rotating)
    elif recorded not in (rotating, after) and recorded is not None and "rotating_to" in recorded:
        raise ConfigError(
            f"{where} has an unfinished re-issue from version "
            f"{recorded['rotating_from'].get('version')} to {recorded['rotating_to'].get('version')}; run that one "
            "again (same secrets, versions and norms) to finish it first"
        )
    elif recorded not in (rotating, after):
        raise ConfigError(
            f"{where} was not issued under the given old transform (version {old.version}, "
            f"check id {before['check_id']}); its marker says: {recorded}"
        )

    def reissue(tenant: str, vectors: np.ndarray) -> np.ndarray:
        return new.for_tenant(tenant).apply(old.for_tenant(tenant).invert(vectors))

    done = store.transform_vectors(reissue, job=job, batch_size=batch_size, progress=progress)
    write(after)
    store.finish_transform_job(job)
    return done
