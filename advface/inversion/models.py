"""Inversion decoders: networks that map face embeddings back to face images.

They serve two roles: the defender's *shadow* model ``S`` of AdvFace (trained with the L1 loss
``sum_i |x_i - S(z_i)|``, then differentiated with respect to ``z`` to build adversarial features) and the
*attackers* of reconstruction audits (several architectures, so an audit does not only test the shadow model).

Every decoder takes an ``N x dim`` float batch of **raw** embeddings and returns ``N x 3 x image_size x
image_size`` RGB in [0, 1] (a sigmoid ends every network): the face chip the encoder sees, resized to
``image_size``.

Input normalisation
-------------------
Each decoder first L2-normalises its input and multiplies it by ``sqrt(dim)``, so every coordinate is of order 1
whatever the encoder's scale (dlib's 128-d vectors have norms of order 1; MobileFaceNet's and ArcFace-style
encoders' are unnormalised, with their own typical norms). The decoder therefore sees only the *direction* of an
embedding; its gradient with respect to the raw input is orthogonal to that input (scaling an embedding does not
change the image). That is what face matchers compare too (cosine, or Euclidean distance between vectors of
similar norm).

Geometry
--------
The networks start from a ``base x base`` feature map (``base`` in [4, 8]) and double it ``k`` times with
``image_size ~ base * 2**k`` (64 -> 4 * 2**4, 112 -> 7 * 2**4, 128 -> 4 * 2**5). Sizes that are not of that
form (e.g. 120) are produced slightly larger and resized to ``image_size`` with bilinear interpolation (before
the final sigmoid). Channels fall as the resolution grows (``channels * resolution`` is about constant), so
compute and parameter counts hardly depend on ``image_size``; most parameters sit in the fully connected stem,
where they cost little compute. ``width`` scales every channel count (``width=2`` for a GPU).

Architectures (:data:`DECODERS`, :func:`build_decoder`):

- ``"deconv"``: NbNet-style: MLP stem to the base map, then ``ConvTranspose2d(4, stride 2)`` + BatchNorm +
  LeakyReLU stages (optionally followed by ``refine`` 3x3 conv layers each), the last transposed convolution
  writing RGB directly;
- ``"resup"``: MLP stem, then stages of 1x1 channel reduction + nearest-neighbour upsampling + a residual block of
  two 3x3 convolutions (GroupNorm by default); the image comes from a bilinear upsample and a 3x3 convolution;
- ``"pixelshuffle"``: MLP stem, then stages of 3x3 convolution to ``4 * channels`` + ``PixelShuffle(2)`` and a
  residual block at the low resolutions; a final sub-pixel convolution writes RGB;
- ``"tokens"``: transformer: MLP stem to a grid of tokens at twice the base resolution, learned positions,
  ``depth`` pre-norm self-attention blocks, then bilinear-upsample + 3x3 convolution stages;
- ``"modconv"``: StyleGAN2-like: an MLP maps the embedding to a style that modulates (and demodulates) every 3x3
  convolution of a synthesis network grown from a learned constant map, with RGB skip outputs summed over scales.

Defaults at 64x64 (embedding dim 128): ``deconv`` 2.9 M parameters, 0.17 GFLOP per image for forward + backward;
``resup`` 2.9 M, 0.15 GFLOP; ``pixelshuffle`` 3.5 M, 0.24 GFLOP (float32 files of 11-14 MB). On a CPU whose cores
are busy, one torch thread (``torch.set_num_threads(1)``) is much faster than OpenMP threads competing for them.

Decoders are deterministic in eval mode (BatchNorm uses its running statistics, there is no dropout). Each one
records ``arch``, ``dim``, ``image_size`` and its constructor keyword arguments (:meth:`InversionDecoder.config`)
so :mod:`advface.inversion.checkpoint` can rebuild it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from advface.errors import ConfigError, EmbeddingError

#: Smallest and largest ``image_size`` accepted (any integer in between works; multiples of 8 are typical).
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 512

_NORMS = ("batch", "group", "none")


def plan_geometry(image_size: int) -> tuple[int, int]:
    """``(base, k)``: start from a ``base x base`` map (4 <= base <= 8) and upsample ``k`` times by 2.

    ``base * 2**k >= image_size``, with equality when ``image_size`` is ``base * 2**k`` for an integer base in
    [4, 8) (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, ...).
    """
    k = max(1, int(math.floor(math.log2(image_size / 4))))
    base = math.ceil(image_size / 2**k)
    return base, k


def _round8(x: float) -> int:
    return max(8, int(round(x / 8)) * 8)


def _make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.Identity()


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


class InversionDecoder(nn.Module):
    """Base class: ``N x dim`` raw embeddings -> ``N x 3 x image_size x image_size`` RGB in [0, 1].

    Subclasses set ``arch``, pass their keyword arguments to ``super().__init__`` (they are recorded for
    checkpoints) and implement :meth:`decode` (normalised embeddings -> RGB logits at ``base * 2**k`` pixels).
    ``metadata`` holds what :func:`advface.inversion.load_decoder` read with the weights (empty otherwise).
    """

    arch: ClassVar[str] = ""

    def __init__(self, dim: int, image_size: int, **kwargs: Any) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"{self.arch or type(self).__name__}: embedding dim must be a positive int, got {dim!r}")
        if (
            isinstance(image_size, bool)
            or not isinstance(image_size, int)
            or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE
        ):
            raise ConfigError(
                f"{self.arch or type(self).__name__}: image_size must be an int in "
                f"[{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size!r}"
            )
        for key, value in kwargs.items():
            if not (value is None or isinstance(value, (bool, int, float, str))):
                raise ConfigError(f"{self.arch}: keyword argument {key}={value!r} is not a plain number/string/bool")
        self.dim = dim
        self.image_size = image_size
        self.kwargs: dict[str, Any] = dict(kwargs)
        self.metadata: dict[str, Any] = {}

    # -- interface -------------------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised ``N x dim`` embeddings -> ``N x 3 x S x S`` RGB logits (``S = base * 2**k``)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """What rebuilds this network: ``{"arch", "dim", "image_size", "kwargs"}``."""
        return {"arch": self.arch, "dim": self.dim, "image_size": self.image_size, "kwargs": dict(self.kwargs)}

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- forward ---------------------------------------------------------------------------------------------
    def normalize_input(self, z: torch.Tensor) -> torch.Tensor:
        """``sqrt(dim) * z / |z|`` row by row (see the module docs)."""
        return F.normalize(z, p=2.0, dim=1, eps=1e-12) * math.sqrt(self.dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise EmbeddingError(f"{self.arch} decoder expects N x {self.dim} embeddings, got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise EmbeddingError(f"{self.arch} decoder expects floating-point embeddings, got {z.dtype}")
        param = next(self.parameters())
        x = self.decode(self.normalize_input(z.to(param.dtype)))
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
            )
        return torch.sigmoid(x)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"arch={self.arch!r}, dim={self.dim}, image_size={self.image_size}{extra}"


class _Stem(nn.Module):
    """``N x dim`` -> ``N x channels x base x base``: Linear (-> LeakyReLU -> Linear), then norm + activation."""

    def __init__(self, dim: int, hidden: int, channels: int, base: int, norm: str) -> None:
        super().__init__()
        out = channels * base * base
        if hidden > 0:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), _act(), nn.Linear(hidden, out))
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, out))
        self.channels, self.base = channels, base
        self.post = nn.Sequential(_make_norm(norm, channels), _act())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.post(self.mlp(z).view(-1, self.channels, self.base, self.base))


class _ResBlock(nn.Module):
    """``x + conv(act(norm(conv(x))))`` style block: two 3x3 convolutions with norms, activation after the sum."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=bias),
            _make_norm(norm, channels),
            _act(),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=bias),
            _make_norm(norm, channels),
        )
        self.act = _act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class _ScheduledDecoder(InversionDecoder):
    """Shared plumbing: geometry, channel schedule (``channels * resolution ~ width * _CR``) and the stem."""

    #: channels * resolution product at width 1 (sets compute and capacity of the convolutional part).
    _CR: ClassVar[int] = 1024
    _MAX_CHANNELS: ClassVar[int] = 512
    _MIN_CHANNELS: ClassVar[int] = 16

    def _setup(self, width: float, hidden: int, norm: str) -> list[int]:
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0.05 <= width <= 16:
            raise ConfigError(f"{self.arch}: width must be a number in [0.05, 16], got {width!r}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ConfigError(f"{self.arch}: hidden must be an int >= 0, got {hidden!r}")
        if norm not in _NORMS:
            raise ConfigError(f"{self.arch}: norm must be one of {_NORMS}, got {norm!r}")
        self.base, self.k = plan_geometry(self.image_size)
        lo, hi = _round8(self._MIN_CHANNELS * min(width, 1.0)), _round8(self._MAX_CHANNELS * width)
        # channels[i] at resolution base * 2**i, i = 0..k (the last one is the full-resolution width).
        channels = [min(hi, max(lo, _round8(width * self._CR / (self.base * 2**i)))) for i in range(self.k + 1)]
        self.channels = channels
        self.stem = _Stem(self.dim, hidden, channels[0], self.base, norm)
        return channels


class DeconvDecoder(_ScheduledDecoder):
    """NbNet-style decoder: transposed convolutions (kernel 4, stride 2) + BatchNorm + LeakyReLU.

    ``refine`` adds that many 3x3 conv + norm + activation layers after each intermediate stage.
    """

    arch = "deconv"
    _CR = 1024

    def __init__(
        self, dim: int, image_size: int, *, width: float = 1.0, hidden: int = 512, norm: str = "batch", refine: int = 0
    ) -> None:
        super().__init__(dim, image_size, width=width, hidden=hidden, norm=norm, refine=refine)
        if isinstance(refine, bool) or not isinstance(refine, int) or not 0 <= refine <= 4:
            raise ConfigError(f"deconv: refine must be an int in [0, 4], got {refine!r}")
        ch = self._setup(width, hidden, norm)
        bias = norm == "none"
        stages: list[nn.Module] = []
        for i in range(self.k - 1):
            layers: list[nn.Module] = [
                nn.ConvTranspose2d(ch[i], ch[i + 1], 4, 2, 1, bias=bias),
                _make_norm(norm, ch[i + 1]),
                _act(),
            ]
            for _ in range(refine):
                layers += [nn.Conv2d(ch[i + 1], ch[i + 1], 3, 1, 1, bias=bias), _make_norm(norm, ch[i + 1]), _act()]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.to_rgb = nn.ConvTranspose2d(ch[self.k - 1], 3, 4, 2, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_rgb(self.stages(self.stem(z)))


class _ResUpStage(nn.Module):
    """1x1 channel reduction at low resolution, nearest upsample x2, residual block."""

    def __init__(self, c_in: int, c_out: int, norm: str, mode: str) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.mode = mode
        self.block = _ResBlock(c_out, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        if self.mode == "nearest":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.block(x)


class ResUpDecoder(_ScheduledDecoder):
    """Upsample + residual 3x3 blocks (GroupNorm by default, so training and eval behave alike)."""

    arch = "resup"
    _CR = 640

    def __init__(
        self,
        dim: int,
        image_size: int,
        *,
        width: float = 1.0,
        hidden: int = 1024,
        norm: str = "group",
        upsample: str = "nearest",
    ) -> None:
        super().__init__(dim, image_size, width=width, hidden=hidden, norm=norm, upsample=upsample)
        if upsample not in ("nearest", "bilinear"):
            raise ConfigError(f"resup: upsample must be 'nearest' or 'bilinear', got {upsample!r}")
        ch = self._setup(width, hidden, norm)
        self.stages = nn.Sequential(*[_ResUpStage(ch[i], ch[i + 1], norm, upsample) for i in range(self.k - 1)])
        self.to_rgb = nn.Conv2d(ch[self.k - 1], 3, 3, 1, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(z))
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.to_rgb(x)


class _ShuffleStage(nn.Module):
    """3x3 conv to ``4 * c_out`` channels, PixelShuffle(2), norm, activation, optional residual block."""

    def __init__(self, c_in: int, c_out: int, norm: str, block: bool) -> None:
        super().__init__()
        bias = norm == "none"
        self.up = nn.Sequential(
            nn.Conv2d(c_in, 4 * c_out, 3, 1, 1, bias=bias), nn.PixelShuffle(2), _make_norm(norm, c_out), _act()
        )
        self.block = _ResBlock(c_out, norm) if block else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.up(x))


class PixelShuffleDecoder(_ScheduledDecoder):
    """Sub-pixel convolution (PixelShuffle) upsampling with residual blocks at resolutions <= ``block_max_res``."""

    arch = "pixelshuffle"
    _CR = 640

    def __init__(
        self,
        dim: int,
        image_size: int,
        *,
        width: float = 1.0,
        hidden: int = 1024,
        norm: str = "batch",
        block_max_res: int = 16,
    ) -> None:
        super().__init__(dim, image_size, width=width, hidden=hidden, norm=norm, block_max_res=block_max_res)
        if isinstance(block_max_res, bool) or not isinstance(block_max_res, int) or block_max_res < 0:
            raise ConfigError(f"pixelshuffle: block_max_res must be an int >= 0, got {block_max_res!r}")
        ch = self._setup(width, hidden, norm)
        self.stages = nn.Sequential(
            *[
                _ShuffleStage(ch[i], ch[i + 1], norm, self.base * 2 ** (i + 1) <= block_max_res)
                for i in range(self.k - 1)
            ]
        )
        self.to_rgb = nn.Sequential(nn.Conv2d(ch[self.k - 1], 3 * 4, 3, 1, 1), nn.PixelShuffle(2))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_rgb(self.stages(self.stem(z)))


class _TransformerBlock(nn.Module):
    """Pre-norm self-attention + MLP block over a sequence of ``N x L x C`` tokens."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TokensDecoder(_ScheduledDecoder):
    """Transformer decoder: the embedding becomes a grid of tokens (at twice the base resolution) with learned
    positions, ``depth`` self-attention blocks mix them, then bilinear-upsample + 3x3 conv stages reach full size."""

    arch = "tokens"
    _CR = 640

    def __init__(
        self, dim: int, image_size: int, *, width: float = 1.0, hidden: int = 1024, depth: int = 3, heads: int = 4
    ) -> None:
        super().__init__(dim, image_size, width=width, hidden=hidden, depth=depth, heads=heads)
        for key, value, lo, hi in (("depth", depth, 1, 12), ("heads", heads, 1, 16)):
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ConfigError(f"tokens: {key} must be an int in [{lo}, {hi}], got {value!r}")
        ch = self._setup(width, hidden, "group")
        self.grid = self.base * 2
        c = ch[1] - ch[1] % heads
        self.stem = _Stem(self.dim, hidden, c, self.grid, "none")
        self.pos = nn.Parameter(torch.zeros(1, self.grid * self.grid, c))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[_TransformerBlock(c, heads) for _ in range(depth)])
        stages: list[nn.Module] = []
        c_in = c
        for i in range(1, self.k - 1):
            stages.append(
                nn.Sequential(
                    nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
                    nn.Conv2d(c_in, ch[i + 1], 3, 1, 1),
                    _make_norm("group", ch[i + 1]),
                    _act(),
                )
            )
            c_in = ch[i + 1]
        self.stages = nn.Sequential(*stages)
        self.to_rgb = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False), nn.Conv2d(c_in, 3, 3, 1, 1)
        )

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.stem(z)  # N x C x G x G
        n, c, g, _ = x.shape
        tokens = self.blocks(x.flatten(2).transpose(1, 2) + self.pos)
        x = tokens.transpose(1, 2).reshape(n, c, g, g)
        return self.to_rgb(self.stages(x))


class _ModConv(nn.Module):
    """3x3 convolution whose input channels are scaled per sample by a style (then demodulated), StyleGAN2-like."""

    def __init__(self, c_in: int, c_out: int, style_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, 3, 3) / math.sqrt(c_in * 9))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.style = nn.Linear(style_dim, c_in)
        with torch.no_grad():  # styles start near 1 (plain convolution) but already depend on the embedding
            self.style.weight.mul_(0.1)
        nn.init.ones_(self.style.bias)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # Modulating the input channels by s and demodulating the output by 1/sqrt(sum w^2 s^2) equals a
        # convolution with per-sample modulated, demodulated weights, without grouped convolutions.
        scale = self.style(w)  # N x c_in
        demod = torch.rsqrt((scale.pow(2) @ self.weight.pow(2).sum(dim=(2, 3)).t()) + 1e-8)  # N x c_out
        out = F.conv2d(x * scale[:, :, None, None], self.weight, padding=1)
        return out * demod[:, :, None, None] + self.bias[None, :, None, None]


class ModConvDecoder(_ScheduledDecoder):
    """Style-modulated decoder: an MLP maps the embedding to a style vector that modulates every 3x3 convolution
    of a synthesis network growing from a learned constant map; RGB is summed over scales (skip outputs)."""

    arch = "modconv"
    _CR = 768

    def __init__(self, dim: int, image_size: int, *, width: float = 1.0, hidden: int = 512) -> None:
        super().__init__(dim, image_size, width=width, hidden=hidden)
        ch = self._setup(width, hidden, "none")
        del self.stem
        style_dim = max(hidden, 64)
        self.mapping = nn.Sequential(nn.Linear(self.dim, style_dim), _act(), nn.Linear(style_dim, style_dim), _act())
        self.const = nn.Parameter(torch.randn(1, ch[0], self.base, self.base))
        self.first = _ModConv(ch[0], ch[0], style_dim)
        self.convs = nn.ModuleList()
        self.rgbs = nn.ModuleList([nn.Conv2d(ch[0], 3, 1)])
        for i in range(self.k):
            c_in, c_out = ch[i], ch[i + 1]
            self.convs.append(_ModConv(c_in, c_out, style_dim))
            self.rgbs.append(nn.Conv2d(c_out, 3, 1))
        self.act = _act()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        w = self.mapping(z)
        x = self.act(self.first(self.const.expand(len(z), -1, -1, -1), w))
        rgb = self.rgbs[0](x)
        for conv, to_rgb in zip(self.convs, self.rgbs[1:]):
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = self.act(conv(x, w))
            rgb = F.interpolate(rgb, scale_factor=2.0, mode="bilinear", align_corners=False) + to_rgb(x)
        return rgb


#: Decoder classes by architecture name.
DECODERS: dict[str, Callable[..., InversionDecoder]] = {
    DeconvDecoder.arch: DeconvDecoder,
    ResUpDecoder.arch: ResUpDecoder,
    PixelShuffleDecoder.arch: PixelShuffleDecoder,
    TokensDecoder.arch: TokensDecoder,
    ModConvDecoder.arch: ModConvDecoder,
}


def available_decoders() -> list[str]:
    """Architecture names :func:`build_decoder` accepts."""
    return sorted(DECODERS)


def build_decoder(arch: str, dim: int, image_size: int = 64, **kwargs: Any) -> InversionDecoder:
    """Build decoder ``arch`` for ``dim``-dimensional embeddings and ``image_size`` square RGB outputs.

    Raises :class:`~advface.errors.ConfigError` for an unknown architecture or bad arguments.
    """
    cls = DECODERS.get(arch)
    if cls is None:
        raise ConfigError(f"unknown inversion decoder {arch!r}; available: {', '.join(available_decoders())}")
    try:
        return cls(dim, image_size, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for inversion decoder {arch!r}: {exc}") from exc
