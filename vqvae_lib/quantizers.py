"""Quantisers beyond the paper's: cosine lookup in a low dimension (Improved VQGAN) and Finite Scalar Quantization.

Both share `quantizer.VectorQuantizer`'s interface, which the model and the training loop rely on:
``forward(z (B, D, h, w)) -> QuantizerOutput``, ``nearest(flat (N, D)) -> (N,) int64``,
``lookup(indices (B, h, w)) -> (B, D, h, w)``, ``num_codes`` and ``restarts_total``. D is the encoder's output
width (`ModelConfig.embed_dim`); each quantiser projects it down to the small space it quantises in and back.
The projections are linear maps of each latent vector (a 1x1 convolution), computed in full fp32 like the rest
of the quantiser (`quantizer.full_fp32`), on rows (N, D) in both `forward` and `nearest`, so that encoding an
image finds exactly the codes the forward pass finds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from . import distributed
from .quantizer import QuantizerOutput, VectorQuantizer, full_fp32


def _rows(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B*h*w, C): one row per latent position."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _grid(rows: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """The inverse of `_rows`: (B*h*w, C) -> (B, C, h, w)."""
    return rows.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def _check_grid(z: torch.Tensor, dim: int) -> None:
    if z.dim() != 4 or z.shape[1] != dim:
        raise ValueError(f"expected z of shape (B, {dim}, h, w), got {tuple(z.shape)}")


class CosineQuantizer(nn.Module):
    """Vector quantisation by cosine similarity in a low dimension: z (B, D, h, w) -> `QuantizerOutput`.

    Improved VQGAN (Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN") looks codes up in a
    much smaller space than the encoder's: a learned linear projection takes each vector from D to `lookup_dim`
    dimensions, where it and the codes are l2-normalised, so the nearest code is the one at the smallest angle
    and no code can win by its length; the chosen code (straight-through gradient) is projected back to D for
    the decoder. The paper reports that both changes raise codebook usage. The lookup itself is a
    ``VectorQuantizer(..., normalize=True)`` (`vq`), so EMA updates, data-dependent initialisation and restarts
    work as for the paper's quantiser, on the unit vectors; the losses are measured between those unit vectors.

    Args:
        num_codes: K, the number of codes.
        dim: D, the encoder's output width.
        lookup_dim: the dimension codes live and are compared in.
        **options: the remaining `VectorQuantizer` options (beta, ema, decay, usage_decay, init, restart ...).
    """

    def __init__(self, num_codes: int, dim: int, lookup_dim: int, **options: Any) -> None:
        super().__init__()
        if lookup_dim < 1:
            raise ValueError(f"lookup_dim must be positive, got {lookup_dim}")
        self.dim, self.lookup_dim = dim, lookup_dim
        self.project_in = nn.Linear(dim, lookup_dim)
        self.vq = VectorQuantizer(num_codes, lookup_dim, normalize=True, **options)
        self.project_out = nn.Linear(lookup_dim, dim)

    @property
    def num_codes(self) -> int:
        """K, the number of codes."""
        return self.vq.num_codes

    @property
    def restarts_total(self) -> int:
        """How many code restarts have happened so far (in the state_dict)."""
        return self.vq.restarts_total

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the code of highest cosine similarity to each projected vector: flat (N, D) -> (N,) int64."""
        with full_fp32(flat.device.type):
            return self.vq.nearest(self.project_in(flat.float()))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """The decoder's input for the given codes: (B, h, w) int64 -> (B, D, h, w), the unit codes projected."""
        b, h, w = indices.shape
        with full_fp32(indices.device.type):
            return _grid(self.project_out(_rows(self.vq.lookup(indices))), b, h, w)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Project, quantise, project back: z (B, D, h, w) -> `QuantizerOutput` (quantized (B, D, h, w)); fp32."""
        _check_grid(z, self.dim)
        b, _, h, w = z.shape
        with full_fp32(z.device.type):
            out = self.vq(_grid(self.project_in(_rows(z.float())), b, h, w))  # quantised in (B, lookup_dim, h, w)
            quantized = _grid(self.project_out(_rows(out.quantized)), b, h, w)
        return replace(out, quantized=quantized.to(z.dtype))


class FiniteScalarQuantizer(nn.Module):
    """Finite Scalar Quantization: round each of a few bounded channels: z (B, D, h, w) -> `QuantizerOutput`.

    Mentzer et al. 2023 ("Finite Scalar Quantization: VQ-VAE Made Simple", arXiv 2309.15505) replace the
    codebook by a fixed grid: a learned projection takes each vector to d = len(levels) channels, channel i is
    squashed by a tanh into an interval holding `levels[i]` integers (shifted by half a level when that number
    is even) and rounded with a straight-through gradient, and the integers are scaled into [-1, 1] by the
    half widths levels[i] // 2. The codes are the prod(levels) points of the grid, numbered as mixed-radix
    numbers of their level digits; nothing is learned in the grid, so there is no codebook, no auxiliary loss
    (loss, commitment and codebook_loss are 0) and no dead code to restart, and a projection back to D
    channels feeds the decoder.

    The bound follows vector-quantize-pytorch (1.32): tanh(z + s) (L - 1)(1 + eps) / 2 - o, with offset o = 1/2
    for even L and s = atanh(o / ((L - 1)(1 + eps) / 2)), so that z = 0 stays at 0; rounding it gives exactly L
    integers for every L up to 1 / eps. The paper's reference code (appendix A.1) writes (1 - eps), and tan for
    atanh: the same integers, reached at slightly different z.

    Args:
        levels: the number of values of each channel, each from 2 to 1 / eps.
        dim: D, the encoder's output width.
        eps: widening of the tanh interval, see above.
    """

    def __init__(self, levels: Sequence[int], dim: int, eps: float = 1e-3) -> None:
        super().__init__()
        levels = list(levels)
        if not levels or any(not 2 <= level <= 1 / eps for level in levels):
            raise ValueError(f"levels must be a non-empty list of integers from 2 to {1 / eps:g}, got {levels}")
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.levels, self.dim, self.num_codes = levels, dim, math.prod(levels)
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)
        # Constants of the grid, derived from `levels` (so not saved in the state_dict), each (d,).
        levels_t = torch.tensor(levels)
        half_l = (levels_t - 1) * (1 + eps) / 2
        offset = torch.where(levels_t % 2 == 0, 0.5, 0.0)
        self.register_buffer("_levels", levels_t, persistent=False)
        self.register_buffer("_half_l", half_l, persistent=False)
        self.register_buffer("_offset", offset, persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / half_l), persistent=False)
        self.register_buffer("_half_width", (levels_t // 2).float(), persistent=False)
        # Place values of the digits: the first channel is the least significant, as in the paper's code.
        self.register_buffer("_basis", torch.cumprod(torch.tensor([1] + levels[:-1]), 0), persistent=False)

    @property
    def restarts_total(self) -> int:
        """Always 0: a fixed grid has no dead codes to restart."""
        return 0

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash each channel into its interval: z (N, d) -> (N, d), channel i in about [-(L-1)/2, (L-1)/2]
        (shifted by -1/2 for even L), so that rounding gives exactly levels[i] integers."""
        return torch.tanh(z + self._shift) * self._half_l - self._offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Bound, round (straight-through) and scale: z (N, d) -> codes (N, d), channel i in [-1, 1] on its grid."""
        bounded = self.bound(z)
        rounded = bounded + (bounded.round() - bounded).detach()  # value: the integer; gradient: the identity
        return rounded / self._half_width

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Grid points to code numbers: codes (N, d) from `quantize` -> (N,) int64 in [0, prod(levels))."""
        digits = (codes * self._half_width + self._half_width).round().long()  # (N, d), digit i in [0, levels[i])
        return (digits * self._basis).sum(1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """The inverse of `codes_to_indices`: (N,) int64 -> codes (N, d)."""
        digits = indices.unsqueeze(1) // self._basis % self._levels  # (N, d)
        return (digits - self._half_width) / self._half_width

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Code number of each vector: flat (N, D) -> (N,) int64."""
        with full_fp32(flat.device.type):
            return self.codes_to_indices(self.quantize(self.project_in(flat.float())))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """The decoder's input for the given codes: (B, h, w) int64 -> (B, D, h, w), the grid points projected."""
        b, h, w = indices.shape
        with full_fp32(indices.device.type):
            return _grid(self.project_out(self.indices_to_codes(indices.reshape(-1))), b, h, w)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Project, quantise, project back: z (B, D, h, w) -> `QuantizerOutput` (quantized (B, D, h, w)); fp32."""
        _check_grid(z, self.dim)
        b, _, h, w = z.shape
        with full_fp32(z.device.type):
            codes = self.quantize(self.project_in(_rows(z.float())))  # (N, d)
            indices = self.codes_to_indices(codes.detach())  # (N,)
            quantized = _grid(self.project_out(codes), b, h, w)
            # Code usage in this batch (over all processes), as in `VectorQuantizer`.
            counts = codes.new_zeros(self.num_codes).index_add_(0, indices, codes.new_ones(len(indices)))
            if self.training:
                distributed.all_reduce_sum(counts)
            probs = counts / counts.sum()
            perplexity = torch.exp(-torch.special.xlogy(probs, probs).sum())
            zero = codes.new_zeros(())
        return QuantizerOutput(quantized=quantized.to(z.dtype), indices=indices.view(b, h, w), loss=zero,
                               commitment=zero, codebook_loss=zero, perplexity=perplexity)
