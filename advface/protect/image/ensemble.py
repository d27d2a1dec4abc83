"""The ensemble of differentiable face encoders that image protection attacks (pluggable by encoder spec)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from advface.encoders.base import ChipSpec, FaceEncoder
from advface.encoders.registry import create_encoder
from advface.errors import ConfigError

log = logging.getLogger(__name__)

#: The default ensemble: dlib's ResNet (PyTorch port) and MobileFaceNet (ONNX converted to PyTorch).
DEFAULT_ENCODERS: tuple[str, ...] = ("dlib-torch", "mobilefacenet")


@dataclass
class EnsembleMember:
    """One encoder of the ensemble: its standard pipeline (``encoder``) and its differentiable module."""

    name: str
    encoder: FaceEncoder
    module: torch.nn.Module

    @property
    def chip(self) -> ChipSpec:
        """The aligned chip this encoder expects."""
        return self.encoder.chip

    @property
    def feature_layers(self) -> tuple[str, ...]:
        """Submodule paths of intermediate feature maps for the feature-level term (the module's
        ``transfer_layers``; empty when it names none, as for ONNX graphs)."""
        return tuple(getattr(self.module, "transfer_layers", ()))


EncoderSpec = str | Mapping[str, Any] | FaceEncoder


def _spec_name(spec: EncoderSpec) -> str:
    if isinstance(spec, FaceEncoder):
        return spec.name
    if isinstance(spec, Mapping):
        return str(spec.get("name"))
    return str(spec)


def build_ensemble(
    specs: Sequence[EncoderSpec] | None = None, device: str | torch.device = "cpu"
) -> tuple[list[EnsembleMember], list[str]]:
    """Encoders for ``specs`` (default :data:`DEFAULT_ENCODERS`) as ``(members, notes)``.

    With the default list, an encoder whose model file is missing (MobileFaceNet without ``$ADVFACE_MODELS_DIR``) is
    left out and a note says so; an encoder named explicitly must load (ConfigError otherwise). Every member must
    offer a differentiable module (:meth:`FaceEncoder.torch_module`).
    """
    explicit = specs is not None
    wanted: Sequence[EncoderSpec] = list(specs) if specs is not None else list(DEFAULT_ENCODERS)
    if not wanted:
        raise ConfigError("image protection needs at least one encoder")
    members: list[EnsembleMember] = []
    notes: list[str] = []
    for spec in wanted:
        try:
            if isinstance(spec, FaceEncoder):
                encoder = spec
            elif _spec_name(spec) == "dlib-torch":
                encoder = create_encoder(spec, device=str(device))
            else:
                encoder = create_encoder(spec)
        except ConfigError as exc:
            if explicit:
                raise
            note = f"encoder {_spec_name(spec)!r} left out of the ensemble: {exc}"
            log.warning(note)
            notes.append(note)
            continue
        module = encoder.torch_module(str(device))
        if module is None:
            raise ConfigError(f"encoder {encoder.name!r} has no differentiable module; it cannot guide protection")
        module = module.to(device).eval()
        module.requires_grad_(False)
        members.append(EnsembleMember(_spec_name(spec), encoder, module))
    if not members:
        raise ConfigError("no encoder of the ensemble could be loaded: " + "; ".join(notes))
    return members, notes
