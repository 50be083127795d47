"""The VQ-VAE model: convolutional encoder, vector quantiser and decoder (van den Oord et al. 2017, section 4.1).

The architecture follows the paper's image model (and DeepMind's sonnet example): strided 4x4 convolutions
downsample the image by `downsample` (each halves H and W), residual blocks refine the features, a 1x1
convolution projects them to `embed_dim`-long vectors for the quantiser, and the decoder mirrors all of it with
transposed convolutions. The decoder output is linear (no sigmoid): the reconstruction loss sees raw values.
`quantizer` picks the paper's quantiser ("vq") or one of the later ones (`make_quantizer`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from vqvae_lib.quantizer import INITS, QuantizerOutput, VectorQuantizer
from vqvae_lib.quantizers import CosineQuantizer, FiniteScalarQuantizer

DOWNSAMPLES = (4, 8, 16)
QUANTIZERS = ("vq", "rotation", "cosine", "fsq")


@dataclass
class ModelConfig:
    """Every hyperparameter of `VQVAE`; plain values, so it round-trips through JSON with a checkpoint."""

    in_channels: int = 1
    hidden: int = 128  # channels of the encoder/decoder trunk
    res_hidden: int = 32  # channels inside each residual block
    n_res: int = 2  # residual blocks per stack
    downsample: int = 4  # 4, 8 or 16: the latent grid is (H / downsample, W / downsample)
    codebook_size: int = 512
    embed_dim: int = 64
    beta: float = 0.25
    ema: bool = True
    decay: float = 0.99
    usage_decay: float = 0.9
    init: str = "kmeans"
    restart: bool = True
    quantizer: str = "vq"  # one of QUANTIZERS, see `make_quantizer`; "fsq" ignores beta, ema ... restart
    lookup_dim: int = 8  # "cosine" only: the dimension codes are compared in
    fsq_levels: list[int] = dataclasses.field(default_factory=lambda: [8, 5, 5, 5])  # "fsq" only: values per channel

    def __post_init__(self) -> None:
        if self.downsample not in DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLES}, got {self.downsample}")
        for name in ("in_channels", "hidden", "res_hidden", "codebook_size", "embed_dim", "lookup_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden < 2:
            raise ValueError(f"hidden must be at least 2 (the first convolutions use hidden // 2), got {self.hidden}")
        if self.n_res < 0:
            raise ValueError(f"n_res must not be negative, got {self.n_res}")
        if self.beta < 0:
            raise ValueError(f"beta must not be negative, got {self.beta}")
        for name in ("decay", "usage_decay"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        self.fsq_levels = list(self.fsq_levels)  # a tuple would not equal itself after a JSON round trip
        if not self.fsq_levels or not all(isinstance(n, int) and n >= 2 for n in self.fsq_levels):
            raise ValueError(f"fsq_levels must be a non-empty list of integers >= 2, got {self.fsq_levels}")
        codes = math.prod(self.fsq_levels)
        if self.quantizer == "fsq" and self.codebook_size != codes:
            raise ValueError(f"codebook_size {self.codebook_size} does not match fsq_levels "
                             f"{'x'.join(map(str, self.fsq_levels))} = {codes} codes: set codebook_size to {codes}")

    def to_dict(self) -> dict:
        """A plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """The config from `to_dict`'s output; unknown keys raise ValueError (missing keys take the defaults)."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {', '.join(unknown)}")
        return cls(**d)


class ResidualStack(nn.Module):
    """`n_res` residual blocks x + conv1x1(ReLU(conv3x3(ReLU(x)))), then a ReLU: (B, hidden, h, w) -> same."""

    def __init__(self, hidden: int, res_hidden: int, n_res: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(hidden, res_hidden, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(res_hidden, hidden, 1),
            )
            for _ in range(n_res)
        )
        self.out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, hidden, h, w) -> (B, hidden, h, w)."""
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


def make_quantizer(config: ModelConfig) -> VectorQuantizer | CosineQuantizer | FiniteScalarQuantizer:
    """The quantiser `config.quantizer` names, for encoder outputs of config.embed_dim channels.

    "vq": the paper's `VectorQuantizer` (straight-through gradient); "rotation": the same with the rotation
    trick for the gradient; "cosine": `CosineQuantizer`, nearest code by angle in lookup_dim dimensions;
    "fsq": `FiniteScalarQuantizer` on the grid fsq_levels (no codebook). The first three take the config's
    codebook options (beta, ema, decay, usage_decay, init, restart).
    """
    if config.quantizer == "fsq":
        return FiniteScalarQuantizer(config.fsq_levels, config.embed_dim)
    options = dict(beta=config.beta, ema=config.ema, decay=config.decay, usage_decay=config.usage_decay,
                   init=config.init, restart=config.restart)
    if config.quantizer == "cosine":
        return CosineQuantizer(config.codebook_size, config.embed_dim, config.lookup_dim, **options)
    return VectorQuantizer(config.codebook_size, config.embed_dim,
                           estimator="rotation" if config.quantizer == "rotation" else "ste", **options)


def _num_halvings(downsample: int) -> int:
    return int(math.log2(downsample))


class Encoder(nn.Module):
    """Image to encoder output z_e: (B, in_channels, H, W) -> (B, embed_dim, H / d, W / d), d = downsample.

    log2(d) 4x4 stride-2 convolutions (hidden // 2 channels, the last one hidden; ReLU after each), a 3x3
    convolution, a residual stack and a 1x1 convolution to embed_dim.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n = _num_halvings(config.downsample)
        widths = [config.in_channels] + [config.hidden // 2] * (n - 1) + [config.hidden]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        layers += [
            nn.Conv2d(config.hidden, config.hidden, 3, padding=1),
            ResidualStack(config.hidden, config.res_hidden, config.n_res),
            nn.Conv2d(config.hidden, config.embed_dim, 1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) -> z_e: (B, embed_dim, H / d, W / d)."""
        return self.net(x)


class Decoder(nn.Module):
    """Quantised latents to image: (B, embed_dim, h, w) -> (B, in_channels, h * d, w * d), d = downsample.

    A 3x3 convolution to hidden, a residual stack, then log2(d) 4x4 stride-2 transposed convolutions
    (hidden // 2 channels, the last one in_channels; ReLU between them). The output is linear.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n = _num_halvings(config.downsample)
        widths = [config.hidden] + [config.hidden // 2] * (n - 1) + [config.in_channels]
        layers: list[nn.Module] = [
            nn.Conv2d(config.embed_dim, config.hidden, 3, padding=1),
            ResidualStack(config.hidden, config.res_hidden, config.n_res),
        ]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])  # no ReLU after the last layer: linear output

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q: (B, embed_dim, h, w) -> (B, in_channels, h * d, w * d)."""
        return self.net(z_q)


@dataclass
class VQVAEOutput:
    """What one forward pass of `VQVAE` returns."""

    recon: torch.Tensor  # (B, in_channels, H, W) reconstruction, linear (not clipped to [0, 1])
    vq: QuantizerOutput  # quantiser output: codes, indices, VQ losses, perplexity


class VQVAE(nn.Module):
    """Encoder -> quantiser -> decoder; x: (B, in_channels, H, W) with H and W divisible by downsample.

    The quantiser is `make_quantizer(config)`. Training loss: reconstruction error of `recon` plus `vq.loss`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = make_quantizer(config)
        self.decoder = Decoder(config)

    def latent_shape(self, image_shape: tuple[int, int]) -> tuple[int, int]:
        """The latent grid (h, w) of an (H, W) image; ValueError if H or W is not divisible by downsample."""
        height, width = image_shape
        d = self.config.downsample
        if height % d or width % d:
            raise ValueError(f"image shape {height}x{width} is not divisible by the downsampling factor {d}")
        return height // d, width // d

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        """x: (B, in_channels, H, W) -> VQVAEOutput (recon: (B, in_channels, H, W))."""
        self._check_input(x)
        # A compiled encoder and decoder (`train.compile_model`) take any batch size, so an epoch's last, smaller
        # batch does not compile them again; no effect without torch.compile.
        torch._dynamo.maybe_mark_dynamic(x, 0)
        vq = self.quantizer(self.encoder(x))
        torch._dynamo.maybe_mark_dynamic(vq.quantized, 0)
        return VQVAEOutput(recon=self.decoder(vq.quantized), vq=vq)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images to code indices: x (B, in_channels, H, W) -> (B, h, w) int64, the codes the eval-mode forward
        pass chooses. Never changes the codebook."""
        self._check_input(x)
        z_e = self.encoder(x)
        b, d, h, w = z_e.shape
        return self.quantizer.nearest(z_e.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices to images: (B, h, w) int64 -> (B, in_channels, h * d, w * d)."""
        return self.decoder(self.quantizer.lookup(indices))

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images of shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        self.latent_shape(tuple(x.shape[-2:]))
