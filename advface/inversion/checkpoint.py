"""Save and load inversion decoders (shadow models and attackers) with their metadata.

File format: ``torch.save`` of a plain dict, loadable with ``torch.load(path, weights_only=True)``::

    {
        "format": "advface-inversion",
        "version": 1,
        "arch": "deconv",              # a name in advface.inversion.DECODERS
        "dim": 128,                    # embedding dimension
        "image_size": 64,              # output side in pixels
        "kwargs": {...},               # the decoder's constructor keyword arguments (numbers, strings, bools)
        "state_dict": {...},           # CPU tensors
        "metadata": {...},             # free-form, JSON-able
    }

Metadata keys used across advface (all optional except those filled in here):

- ``encoder`` (name, e.g. ``"dlib"``), ``encoder_fingerprint`` (:attr:`FaceEncoder.fingerprint`),
  ``embedding_dim`` and ``image_size`` (filled from the model when missing; must agree with it; ``dim`` is
  accepted as an alias of ``embedding_dim`` and must agree too), ``arch`` (same);
- ``role`` (``"shadow"`` or ``"attacker"``), ``training_data`` and ``split`` (which identities/images were used),
  ``metrics`` (dict), ``seed``, ``loss`` (e.g. ``"l1"``), ``epochs``;
- ``created`` (ISO-8601 UTC time, filled when missing).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from advface.errors import ConfigError
from advface.inversion.models import DECODERS, InversionDecoder, build_decoder

FORMAT_TAG = "advface-inversion"
FORMAT_VERSION = 1


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def _json_default(value: Any) -> Any:
    """Numpy scalars and arrays, tensors and paths, as JSON values; anything else is refused."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars/arrays, torch tensors
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _prepare_metadata(model: InversionDecoder, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    meta = dict(metadata or {})
    if "dim" in meta and meta["dim"] != model.dim:  # an alias some callers use for embedding_dim
        raise ConfigError(f"metadata dim={meta['dim']!r} disagrees with the model (dim={model.dim!r})")
    for key, value in (("arch", model.arch), ("embedding_dim", model.dim), ("image_size", model.image_size)):
        if key in meta and meta[key] != value:
            raise ConfigError(f"metadata {key}={meta[key]!r} disagrees with the model ({key}={value!r})")
        meta[key] = value
    meta.setdefault("created", _now())
    try:
        # Round trip through JSON: checks JSON-ability and leaves only dicts, lists, str, numbers, bools, None
        # (what torch.load(weights_only=True) accepts).
        return json.loads(json.dumps(meta, allow_nan=True, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"decoder metadata must be JSON-serialisable: {exc}") from exc


def save_decoder(path: str | Path, model: InversionDecoder, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` and ``metadata`` to ``path`` atomically (temporary file + ``os.replace``); returns the path.

    ``metadata`` is copied, completed (``arch``, ``embedding_dim``, ``image_size``, ``created``) and stored; it is
    also set as ``model.metadata``.
    """
    if not isinstance(model, InversionDecoder):
        raise ConfigError(f"save_decoder expects an InversionDecoder, got {type(model).__name__}")
    path = Path(path)
    meta = _prepare_metadata(model, metadata)
    state = {name: tensor.detach().to("cpu").clone() for name, tensor in model.state_dict().items()}
    config = model.config()
    payload = {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "arch": config["arch"],
        "dim": config["dim"],
        "image_size": config["image_size"],
        "kwargs": config["kwargs"],
        "state_dict": state,
        "metadata": meta,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    model.metadata = meta
    return path


def _read_payload(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: inversion decoder file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (zip/pickle/EOF/runtime errors all mean "unusable file")
        raise ConfigError(f"{path}: corrupt, truncated or not an advface inversion decoder file ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_TAG:
        tag = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ConfigError(f"{path}: not an advface inversion decoder file (format {tag!r}, expected {FORMAT_TAG!r})")
    version = payload.get("version")
    if version != FORMAT_VERSION:
        raise ConfigError(f"{path}: unsupported inversion decoder file version {version!r} (expected {FORMAT_VERSION})")
    missing = [k for k in ("arch", "dim", "image_size", "kwargs", "state_dict", "metadata") if k not in payload]
    if missing:
        raise ConfigError(f"{path}: inversion decoder file lacks {', '.join(missing)}")
    if not isinstance(payload["kwargs"], dict) or not isinstance(payload["metadata"], dict):
        raise ConfigError(f"{path}: 'kwargs' and 'metadata' must be dicts")
    if not isinstance(payload["state_dict"], Mapping):
        raise ConfigError(f"{path}: 'state_dict' must be a mapping of tensors")
    return payload


def load_decoder(path: str | Path, device: str | torch.device | None = None) -> tuple[InversionDecoder, dict]:
    """Load a decoder saved by :func:`save_decoder`; returns ``(model in eval mode on device, metadata)``.

    Raises :class:`~advface.errors.ConfigError` for a missing, corrupt or truncated file, a wrong format tag or
    version, an unknown architecture and weights that do not fit the architecture.
    """
    path = Path(path)
    payload = _read_payload(path)
    arch = payload["arch"]
    if not isinstance(arch, str) or arch not in DECODERS:
        known = ", ".join(sorted(DECODERS))
        raise ConfigError(f"{path}: unknown inversion decoder architecture {arch!r}; known: {known}")
    try:
        model = build_decoder(arch, payload["dim"], payload["image_size"], **payload["kwargs"])
    except ConfigError as exc:
        raise ConfigError(f"{path}: cannot rebuild the decoder: {exc}") from exc
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: weights do not match a {arch!r} decoder of this configuration: {exc}") from exc
    metadata = dict(payload["metadata"])
    model.metadata = metadata
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, metadata


def check_compatible(
    metadata_or_model: Mapping[str, Any] | InversionDecoder, encoder_fingerprint: str | None, dim: int
) -> None:
    """Raise :class:`~advface.errors.ConfigError` if a decoder was trained for another encoder or dimension.

    ``metadata_or_model`` is a loaded model (its ``dim`` and ``metadata``) or a metadata dict (its
    ``embedding_dim`` and ``encoder_fingerprint``). The fingerprints are compared when both are known; the
    dimension whenever the decoder's is known.
    """
    if isinstance(metadata_or_model, InversionDecoder):
        meta: Mapping[str, Any] = metadata_or_model.metadata
        trained_dim: Any = metadata_or_model.dim
    elif isinstance(metadata_or_model, Mapping):
        meta = metadata_or_model
        trained_dim = meta.get("embedding_dim", meta.get("dim"))
    else:
        raise ConfigError(
            f"check_compatible expects decoder metadata or an InversionDecoder, got {type(metadata_or_model).__name__}"
        )
    name = meta.get("encoder")
    what = f"inversion decoder trained for encoder {name!r}" if name else "inversion decoder"
    if trained_dim is not None and trained_dim != dim:
        raise ConfigError(f"{what} expects {trained_dim}-dimensional embeddings, but the encoder gives {dim}")
    trained_fp = meta.get("encoder_fingerprint")
    if trained_fp is not None and encoder_fingerprint is not None and trained_fp != encoder_fingerprint:
        raise ConfigError(
            f"{what} was trained for encoder fingerprint {trained_fp!r}, not {encoder_fingerprint!r}; "
            "train a shadow model for this encoder"
        )
