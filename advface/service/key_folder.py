"""The key folder: a deployment's secrets, kept apart from its data, created on first start.

With ``keys.auto`` (the default) :func:`resolve_key_folder` makes sure ``keys.dir`` (default
``$XDG_CONFIG_HOME/advface/keys``, else ``~/.config/advface/keys``; mode 0700) holds three secrets (32 random
bytes each, base64 text, mode 0600, each written atomically: a crash never leaves a partial key):

- ``encryption.key``: the template-encryption key, used when the ``encryption`` section names no key source;
- ``transform.key``: the keyed-transform secret, used when ``keyed_transform`` names no secret and is not turned
  off (``enabled: false``);
- ``protection-seed.key``: its first 8 bytes are the deployment's AdvFace seed when ``protection.seed`` is unset, so
  that two deployments never issue the same protected template for the same embedding.

A copied data folder is then ciphertext under a key it does not hold. Sections that name their own key source keep
it; the folder must lie outside ``store.data_dir`` (a copy of the data folder must not carry its keys).

Stores made before (or without) the key folder keep opening as they were: a store that already exists is never
switched to encryption or to the keyed transform behind the operator's back. :func:`resolve_key_folder` then logs a
warning with the migration commands (``advface rotate-key`` encrypts a store, ``advface rotate-transform`` re-issues
its templates under the transform). An encrypted store whose key folder lost ``encryption.key`` is refused with
a ConfigError instead of getting a new, useless key.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from advface.config import Config
from advface.crypto import generate_key, load_key_file
from advface.errors import ConfigError

log = logging.getLogger(__name__)

ENCRYPTION_KEY = "encryption.key"
TRANSFORM_KEY = "transform.key"
SEED_KEY = "protection-seed.key"
KEY_NAMES = (ENCRYPTION_KEY, TRANSFORM_KEY, SEED_KEY)


@dataclass(frozen=True)
class StoreHistory:
    """What an existing store was made with: ``encrypted`` templates, the keyed ``transformed`` marker."""

    encrypted: bool
    transformed: bool


class KeyFolder:
    """A folder of secrets (see module docs): created 0700, every file 0600, refused when others can read it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().absolute()

    def file(self, name: str) -> Path:
        """The path of secret ``name`` (one of :data:`KEY_NAMES`)."""
        return self.path / name

    def has(self, name: str) -> bool:
        """Whether secret ``name`` exists."""
        return self.file(name).is_file()

    def ensure(self, names: tuple[str, ...] = KEY_NAMES) -> list[str]:
        """Create the folder and the missing secrets among ``names``; returns the names created. ConfigError when
        the folder cannot be made private or others may read it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create key folder {self.path}: {exc.strerror or exc}") from None
        self.check_private()
        created = []
        for name in names:
            if not self.has(name) and self._create(name):
                created.append(name)
        return created

    def check_private(self) -> None:
        """ConfigError when the folder is not a directory or group / others have any access to it."""
        try:
            st = self.path.stat()
        except OSError as exc:
            raise ConfigError(f"key folder {self.path}: {exc.strerror or exc}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"key folder {self.path} is not a directory")
        if os.name == "posix" and st.st_mode & 0o077:
            raise ConfigError(
                f"key folder {self.path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run `chmod 700 {self.path}`"
            )

    def _create(self, name: str) -> bool:
        """Write a new secret atomically (temporary file, fsync, hard link: never replaces one another process
        made meanwhile); False when another process won the race."""
        final = self.file(name)
        tmp = self.path / f".{name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, base64.b64encode(generate_key()) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, final)
            created = True
        except FileExistsError:
            created = False
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _fsync_dir(self.path)
        return created

    def seed(self) -> int:
        """The deployment's AdvFace seed: the first 8 bytes of :data:`SEED_KEY`, big-endian."""
        return int.from_bytes(load_key_file(self.file(SEED_KEY))[:8], "big")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def store_history(config: Config) -> StoreHistory | None:
    """What the configured store was made with, read without opening it; None when there is no store yet."""
    section = config.store
    if section.backend == "postgresql":
        from advface.errors import DatabaseUnavailableError
        from advface.store.postgres import PostgresStore
        from advface.store.postgres.maintenance import TRANSFORM_MARKER_KEY

        if not section.dsn:
            return None
        try:
            meta = PostgresStore.read_meta(section.dsn)
        except DatabaseUnavailableError:
            raise
        except ConfigError:
            return None
        try:
            marker = json.loads(meta.get(TRANSFORM_MARKER_KEY) or "{}")
        except ValueError:
            raise ConfigError("the PostgreSQL store's keyed-transform marker is unreadable") from None
        return StoreHistory(encrypted=meta.get("encryption", "none") != "none", transformed=bool(marker.get("enabled")))
    from advface.protect.tenant_transform import read_marker
    from advface.store.sqlite_faiss import SQLiteFaissStore

    database = section.database_path.expanduser()
    if not database.is_file():
        return None
    meta = SQLiteFaissStore.read_meta(database)
    marker = read_marker(Path(section.data_dir).expanduser()) or {}
    return StoreHistory(encrypted=meta.get("encryption", "none") != "none", transformed=bool(marker.get("enabled")))


def resolve_key_folder(config: Config, *, create: bool = True) -> Config:
    """``config`` with the key folder's secrets filled in where ``keys.auto`` says so (see module docs): the
    ``encryption`` key file, the ``keyed_transform`` secret (``enabled`` resolved to true or false) and
    ``protection.seed``. ``create``: make the folder and missing secrets (first start); else missing ones are a
    ConfigError. Without ``keys.auto``: unset ``keyed_transform.enabled`` becomes false, nothing else changes."""
    keys = config.keys
    transform = config.keyed_transform
    if not keys.auto:
        return dataclasses.replace(
            config, keyed_transform=dataclasses.replace(transform, enabled=bool(transform.enabled))
        )
    folder = KeyFolder(keys.dir)
    _check_outside(folder.path, Path(config.store.data_dir).expanduser().absolute(), config.store.backend)
    history = store_history(config)
    use_encryption = not config.encryption.enabled and (history is None or history.encrypted)
    use_transform = transform.enabled is None and (history is None or history.transformed)
    use_seed = config.protection.seed is None
    wanted = tuple(
        name
        for name, use in ((ENCRYPTION_KEY, use_encryption), (TRANSFORM_KEY, use_transform), (SEED_KEY, use_seed))
        if use
    )
    if history is not None and history.encrypted and use_encryption and not folder.has(ENCRYPTION_KEY):
        raise ConfigError(
            f"the template store is encrypted but the key folder {folder.path} holds no {ENCRYPTION_KEY}: restore "
            "the key folder from its backup (or point keys.dir / encryption.key_file at the key)"
        )
    if history is not None and history.transformed and use_transform and not folder.has(TRANSFORM_KEY):
        raise ConfigError(
            f"the store's templates were issued under a keyed transform but the key folder {folder.path} holds no "
            f"{TRANSFORM_KEY}: restore the key folder from its backup (or configure keyed_transform's secret)"
        )
    if create:
        created = folder.ensure(wanted)
        if created:
            log.warning(
                "created %s in the key folder %s: back it up apart from the data folder -- without it the stored "
                "templates cannot be read or matched",
                ", ".join(created),
                folder.path,
            )
    else:
        missing = [name for name in wanted if name != SEED_KEY and not folder.has(name)]
        if missing and history is not None:
            raise ConfigError(f"the key folder {folder.path} lacks {', '.join(missing)} (keys.dir)")
        # no store yet: nothing to read, so nothing is demanded (the reader reports the missing store)
        use_encryption = use_encryption and folder.has(ENCRYPTION_KEY)
        use_transform = use_transform and folder.has(TRANSFORM_KEY)
        use_seed = use_seed and folder.has(SEED_KEY)
        if any(folder.has(name) for name in wanted):
            folder.check_private()
    if history is not None and not history.encrypted and not config.encryption.enabled:
        log.warning(
            "the template store holds unencrypted templates (made before the key folder); it keeps opening as it "
            "is. Encrypt it with `advface rotate-key --config ... --new-key-file %s` (sidecar stopped), then set "
            "encryption.key_file to that file",
            folder.file(ENCRYPTION_KEY),
        )
    if history is not None and not history.transformed and transform.enabled is None:
        log.warning(
            "the store's templates were issued without the keyed transform (made before the key folder); they keep "
            "matching as they are. To issue them under the transform, re-encode them from raw templates into a new "
            "store (`advface reencode`, docs/encryption-and-keys.md)"
        )
    encryption = config.encryption
    if use_encryption:
        encryption = dataclasses.replace(encryption, key_file=str(folder.file(ENCRYPTION_KEY)))
    if use_transform:
        transform = dataclasses.replace(transform, enabled=True, secret_file=str(folder.file(TRANSFORM_KEY)))
    elif transform.enabled is None:
        transform = dataclasses.replace(transform, enabled=False)
    protection = config.protection
    if use_seed:
        protection = dataclasses.replace(protection, seed=folder.seed())
    return dataclasses.replace(config, encryption=encryption, keyed_transform=transform, protection=protection)


def _check_outside(keys_dir: Path, data_dir: Path, backend: str) -> None:
    if backend != "sqlite":
        return
    for a, b in ((keys_dir, data_dir), (data_dir, keys_dir)):
        if a == b or b in a.parents:
            raise ConfigError(
                f"keys.dir {keys_dir} and store.data_dir {data_dir} overlap: keep the key folder outside the data "
                "folder (a copy of the data must not carry its keys)"
            )
