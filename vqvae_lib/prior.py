"""A learned prior over code index maps: the gated PixelCNN (van den Oord et al. 2016, arXiv 1606.05328) or a
small causal transformer (as in MONAI's VQ-VAE + transformer tutorial).

A trained VQ-VAE turns every slice into an index map (h, w) of codebook entries. The prior models those maps
autoregressively in raster order, p(k) = prod_i p(k_i | k_<i), and new slices are made by sampling a map one
position at a time and decoding it with the VQ-VAE's decoder (the paper's section 4.1). Both priors take the
same inputs, give the same logits (B, K, h, w), train with the same loop and sample with the same options
(temperature, top-k, top-p, a kept prefix for completion).

Two stacks keep every position blind to the future without a blind spot: the vertical stack sees all rows
above (and the current row, which is why its output reaches the horizontal stack shifted down by one row); the
horizontal stack sees the current row left of the position (the first layer excludes the position itself).
Each layer is gated, tanh(a) * sigmoid(b), and may add an embedding of the slice position within its scan.

PixelCNN sampling is exact and cheaper than running the whole network at every step: the vertical stack only
depends on finished rows, so it runs once per row on the rows it can see, and only the horizontal stack runs per
position.

The transformer reads the map as a sequence: a start token, then the first n - 1 codes; output i is the
distribution of code i. Each input token gets learned embeddings of the row and column it predicts (so one model
serves any grid up to max_rows x max_cols) and of the slice-position bin. Its sampling caches every layer's keys
and values (incremental decoding), so each new code costs one token's attention over the cached ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import runs
from .checkpoint import CheckpointError, load_model, load_module
from .data import SplitData, load_split
from .fileio import atomic_write
from .model import VQVAE
from .train import (autocast, check_run_settings, checkpoint_precision, cudnn_autotune, for_device, grad_scaler,
                    optimizer_for, optimizer_step, run_config, select_device)


ARCHS = ("pixelcnn", "transformer")


@dataclass
class PriorConfig:
    """Every hyperparameter of `PixelCNNPrior`; plain values, so it round-trips through JSON with a checkpoint."""

    codebook_size: int = 512  # the VQ-VAE's K: the prior predicts one of K codes per position
    channels: int = 64  # PixelCNN: channels of the gated layers; transformer: model width
    layers: int = 8  # gated layers or transformer blocks
    kernel: int = 5  # PixelCNN only; odd; vertical kernel (kernel // 2 + 1) x kernel, horizontal 1 x (kernel // 2 + 1)
    positions: int = 8  # slice-position bins to condition on (0: unconditional)
    arch: str = "pixelcnn"  # or "transformer"
    dropout: float = 0.0  # on each layer's residual branch (not on attention weights: CPU fused attention has none)
    heads: int = 4  # transformer only: attention heads (channels must be divisible by them)
    max_rows: int = 64  # transformer only: the largest grid it has position embeddings for
    max_cols: int = 32

    def __post_init__(self) -> None:
        for name in ("codebook_size", "channels", "layers", "heads", "max_rows", "max_cols"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, not {self.arch!r}")
        if self.kernel < 3 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd and >= 3, got {self.kernel}")
        if self.positions < 0:
            raise ValueError(f"positions must not be negative, got {self.positions}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.arch == "transformer" and self.channels % self.heads:
            raise ValueError(f"channels ({self.channels}) must be divisible by heads ({self.heads})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PriorConfig:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown PriorConfig keys: {', '.join(unknown)}")
        return cls(**d)


def _check_inputs(config: PriorConfig, indices: torch.Tensor, position: torch.Tensor | None) -> None:
    if indices.dim() != 3 or indices.dtype != torch.int64:
        raise ValueError(f"indices must be (B, h, w) int64, got {tuple(indices.shape)} {indices.dtype}")
    if config.positions and position is None:
        raise ValueError(f"this prior is conditioned on {config.positions} slice-position bins: pass position (B,)")
    if position is not None and not config.positions:
        raise ValueError("this prior is unconditional: pass position=None")


def _gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated PixelCNN layer: (v, h) (B, C, H, W) each -> (v, h); see the module docstring."""

    def __init__(self, channels: int, kernel: int, first: bool, positions: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.reach, self.first, self.dropout = kernel // 2, first, dropout
        self.v_conv = nn.Conv2d(channels, 2 * channels, (self.reach + 1, kernel))
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, self.reach + 1))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.condition = nn.Embedding(positions, 4 * channels) if positions else None

    def _bias(self, position: torch.Tensor | None) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        if self.condition is None or position is None:
            return 0.0, 0.0
        v, h = self.condition(position)[:, :, None, None].chunk(2, dim=1)
        return v, h

    def vertical(self, v: torch.Tensor, position: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """v (B, C, H, W) -> (next v, feed): output row i sees input rows i - reach .. i; feed (B, 2C, H, W) is
        what row i of the horizontal stack receives, computed from rows < i only."""
        pre = self.v_conv(F.pad(v, (self.reach, self.reach, self.reach, 0)))
        return _gate(pre + self._bias(position)[0]), self.v_to_h(F.pad(pre, (0, 0, 1, -1)))

    def horizontal(self, h: torch.Tensor, feed: torch.Tensor, position: torch.Tensor | None) -> torch.Tensor:
        """h (B, C, H, W), feed (B, 2C, H, W) -> next h: column j sees columns j - reach .. j (.. j - 1 in the
        first layer, which sees the codes themselves and has no residual)."""
        shift = 1 if self.first else 0
        pre = self.h_conv(F.pad(h, (self.reach + shift, -shift, 0, 0))) + feed
        out = self.h_out(_gate(pre + self._bias(position)[1]))
        if self.dropout:
            out = F.dropout(out, self.dropout, self.training)
        return out if self.first else h + out


class PixelCNNPrior(nn.Module):
    """p(index map): indices (B, h, w) int64 [+ position bins (B,)] -> logits (B, K, h, w) of each position's code
    given the codes before it in raster order."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.codebook_size, config.channels)
        self.layers = nn.ModuleList(GatedLayer(config.channels, config.kernel, i == 0, config.positions,
                                               config.dropout) for i in range(config.layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(config.channels, config.channels, 1), nn.ReLU(),
                                  nn.Conv2d(config.channels, config.codebook_size, 1))

    @property
    def rows_seen(self) -> int:
        """How many rows above a position can influence its logits."""
        return 1 + self.config.layers * (self.config.kernel // 2)

    def _check(self, indices: torch.Tensor, position: torch.Tensor | None) -> None:
        _check_inputs(self.config, indices, position)

    def forward(self, indices: torch.Tensor, position: torch.Tensor | None = None) -> torch.Tensor:
        """indices (B, h, w) int64, position (B,) int64 bins or None -> logits (B, K, h, w)."""
        self._check(indices, position)
        v = h = self.embed(indices).permute(0, 3, 1, 2)
        for layer in self.layers:
            v, feed = layer.vertical(v, position)
            h = layer.horizontal(h, feed, position)
        return self.head(h)

    def _feeds(self, above: torch.Tensor, width: int, position: torch.Tensor | None) -> list[torch.Tensor]:
        """Each layer's feed (B, 2C, 1, W) into the next row, from the rows above it (B, r, W) (r may be 0)."""
        if above.shape[1] == 0:
            weight = self.embed.weight
            zeros = weight.new_zeros(len(above), 2 * self.config.channels, 1, width)
            return [layer.v_to_h(zeros) for layer in self.layers]
        v = self.embed(above).permute(0, 3, 1, 2)
        feeds = []
        for layer in self.layers:  # the feed into the next row is the shifted-down vertical output of this last row
            v, feed = layer.vertical(F.pad(v, (0, 0, 0, 1)), position)
            feeds.append(feed[:, :, -1:])
            v = v[:, :, :-1]
        return feeds

    def _row_logits(self, row: torch.Tensor, feeds: list[torch.Tensor], position: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, K, W) of one row (B, W) given its feeds: column j is valid when columns < j are final."""
        h = self.embed(row[:, None]).permute(0, 3, 1, 2)
        for layer, feed in zip(self.layers, feeds):
            h = layer.horizontal(h, feed, position)
        return self.head(h)[:, :, 0]

    def row_logits(self, indices: torch.Tensor, row: int, position: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K, w) of row `row` computed the way `sample` does; equals forward(indices)[:, :, row]."""
        self._check(indices, position)
        above = indices[:, max(0, row - self.rows_seen):row]
        return self._row_logits(indices[:, row], self._feeds(above, indices.shape[2], position), position)

    @torch.no_grad()
    def sample(self, n: int, shape: tuple[int, int], position: torch.Tensor | None = None, *, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0, progress: bool = False,
               prefix: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """n index maps (n, h, w) int64 drawn position by position on the model's device; see `Sampling`."""
        draw = Sampling(n, shape, temperature, top_k, top_p, seed, prefix, start, device=self.embed.weight.device)
        self._check(draw.indices, position)
        indices, (height, width) = draw.indices, shape
        with evaluating(self):
            for i in tqdm(range(draw.start // width, height), desc="sampling rows", unit="row",
                          disable=not progress or None, leave=False):
                feeds = self._feeds(indices[:, max(0, i - self.rows_seen):i], width, position)
                for j in range(draw.start - i * width if i == draw.start // width else 0, width):
                    indices[:, i, j] = draw(self._row_logits(indices[:, i], feeds, position)[:, :, j])
        return indices


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block, the model's own mode again after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class Sampling:
    """How a prior draws maps: n maps of `shape`, each code from softmax(logits / temperature), optionally
    restricted to the top_k likeliest codes or to the smallest set whose probability reaches top_p (nucleus
    sampling); a seed gives the same maps. prefix (n, h, w): a map whose first `start` positions in raster order
    are kept (completion); the rest is drawn. Calling it on logits (n, K) draws one code per map."""

    def __init__(self, n: int, shape: tuple[int, int], temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, prefix: torch.Tensor | None = None, start: int = 0, *,
                 device: torch.device) -> None:
        length = shape[0] * shape[1]
        if n < 1 or temperature <= 0:
            raise ValueError(f"need n >= 1 and temperature > 0, got n={n}, temperature={temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if not 0 <= start <= length:
            raise ValueError(f"start must be a raster position in [0, {length}], got {start}")
        if prefix is None and start:
            raise ValueError("start > 0 keeps part of a map: pass that map as prefix")
        if prefix is not None and tuple(prefix.shape) != (n, *shape):
            raise ValueError(f"prefix must be {(n, *shape)}, got {tuple(prefix.shape)}")
        self.temperature, self.top_k, self.top_p, self.start = temperature, top_k, top_p, start
        self.indices = (prefix.to(device=device, dtype=torch.int64).clone() if prefix is not None
                        else torch.zeros(n, *shape, dtype=torch.int64, device=device))
        self.generator = torch.Generator(device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if self.top_p is not None and self.top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # probability of the likelier codes
            logits = logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter(
                -1, order, before >= self.top_p), -math.inf)
        return torch.multinomial(logits.softmax(-1), 1, generator=self.generator)[:, 0]


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention and an MLP, each added back to its input."""

    def __init__(self, channels: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def forward(self, x: torch.Tensor, cache: dict[str, torch.Tensor] | None = None, at: int = 0) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). With a cache ({"k", "v"}: (B, heads, n, C / heads)) x holds the tokens at
        sequence positions at .. at + T - 1: their keys and values are stored there and they attend to all
        positions up to their own."""
        b, t, c = x.shape
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for y in self.qkv(self.norm1(x)).split(c, dim=-1))
        if cache is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            end = at + t
            cache["k"][:, :, at:end], cache["v"][:, :, at:end] = k, v
            mask = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(at)
            attended = F.scaled_dot_product_attention(q, cache["k"][:, :, :end], cache["v"][:, :, :end],
                                                      attn_mask=mask)
        x = x + self._drop(self.proj(attended.transpose(1, 2).reshape(b, t, c)))
        return x + self._drop(self.mlp(self.norm2(x)))


class TransformerPrior(nn.Module):
    """p(index map) as a causal transformer, the interface of `PixelCNNPrior`: indices (B, h, w) int64
    [+ position bins (B,)] -> logits (B, K, h, w); see the module docstring."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        self.embed = nn.Embedding(config.codebook_size + 1, c)  # the last token is the start token
        self.rows, self.cols = nn.Embedding(config.max_rows, c), nn.Embedding(config.max_cols, c)
        self.condition = nn.Embedding(config.positions, c) if config.positions else None
        self.blocks = nn.ModuleList(Block(c, config.heads, config.dropout) for _ in range(config.layers))
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, config.codebook_size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def _check(self, indices: torch.Tensor, position: torch.Tensor | None) -> None:
        _check_inputs(self.config, indices, position)
        if indices.shape[1] > self.config.max_rows or indices.shape[2] > self.config.max_cols:
            raise ValueError(f"a {indices.shape[1]} x {indices.shape[2]} map exceeds this prior's grid of at most "
                             f"{self.config.max_rows} x {self.config.max_cols}")

    def _inputs(self, tokens: torch.Tensor, at: int, width: int, position: torch.Tensor | None) -> torch.Tensor:
        """Embeddings (B, T, C) of input tokens (B, T) at sequence positions at .. at + T - 1."""
        steps = torch.arange(at, at + tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.rows(steps // width) + self.cols(steps % width)
        return x + self.condition(position)[:, None] if self.condition is not None else x

    def _with_start(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.cat([codes.new_full((len(codes), 1), self.config.codebook_size), codes], 1)

    def forward(self, indices: torch.Tensor, position: torch.Tensor | None = None) -> torch.Tensor:
        """indices (B, h, w) int64, position (B,) int64 bins or None -> logits (B, K, h, w)."""
        self._check(indices, position)
        b, h, w = indices.shape
        x = self._inputs(self._with_start(indices.flatten(1)[:, :-1]), 0, w, position)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).transpose(1, 2).reshape(b, -1, h, w)

    @torch.no_grad()
    def sample(self, n: int, shape: tuple[int, int], position: torch.Tensor | None = None, *, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0, progress: bool = False,
               prefix: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """n index maps (n, h, w) int64 drawn code by code with a key/value cache; see `Sampling`."""
        draw = Sampling(n, shape, temperature, top_k, top_p, seed, prefix, start, device=self.head.weight.device)
        self._check(draw.indices, position)
        codes, width, length = draw.indices.view(n, -1), shape[1], shape[0] * shape[1]
        heads, c = self.config.heads, self.config.channels
        cache = [{"k": codes.new_zeros((n, heads, length, c // heads), dtype=self.head.weight.dtype),
                  "v": codes.new_zeros((n, heads, length, c // heads), dtype=self.head.weight.dtype)}
                 for _ in self.blocks]

        def step(tokens: torch.Tensor, at: int) -> torch.Tensor:  # the logits (n, K) after the last token
            x = self._inputs(tokens, at, width, position)
            for block, layer_cache in zip(self.blocks, cache):
                x = block(x, layer_cache, at)
            return self.head(self.norm(x[:, -1]))

        with evaluating(self):
            logits = step(self._with_start(codes[:, :draw.start]), 0) if draw.start < length else None
            for i in tqdm(range(draw.start, length), desc="sampling codes", unit="code",
                          disable=not progress or None, leave=False):
                codes[:, i] = draw(logits)
                if i + 1 < length:
                    logits = step(codes[:, i:i + 1], i + 1)
        return draw.indices


def make_prior(config: PriorConfig) -> PixelCNNPrior | TransformerPrior:
    """The prior network `config.arch` names."""
    return (TransformerPrior if config.arch == "transformer" else PixelCNNPrior)(config)


def position_nll(model: nn.Module, maps: np.ndarray, bins: np.ndarray | None = None, batch_size: int = 64, *,
                 amp: bool | str = False) -> np.ndarray:
    """Each position's negative log-likelihood under the prior, in nats: maps (N, h, w) int64, bins (N,) position
    bins (used if the prior is conditioned on them) -> (N, h, w) float64: where the prior is surprised. Eval
    mode, on the model's device."""
    device = next(model.parameters()).device
    model.eval()
    out = np.empty(np.shape(maps))
    with torch.no_grad():
        for start in range(0, len(maps), batch_size):
            x = torch.from_numpy(np.asarray(maps[start:start + batch_size], dtype=np.int64)).to(device)
            position = (torch.from_numpy(np.asarray(bins[start:start + batch_size])).to(device)
                        if model.config.positions and bins is not None else None)
            with autocast(device, amp):
                logits = model(x, position)
            out[start:start + len(x)] = F.cross_entropy(logits.float(), x, reduction="none").double().cpu().numpy()
    return out


def nll_per_latent(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood in nats per latent position: logits (B, K, h, w), indices (B, h, w) -> ()."""
    return F.cross_entropy(logits.float(), indices)


def map_nll(model: nn.Module, maps: np.ndarray, bins: np.ndarray | None = None, batch_size: int = 64, *,
            amp: bool | str = False) -> np.ndarray:
    """Each map's mean negative log-likelihood under the prior, in nats per latent (`position_nll` averaged over
    the map): (N,) float64."""
    return position_nll(model, maps, bins, batch_size, amp=amp).mean((1, 2))


def unigram_nll(train: np.ndarray, test: np.ndarray, codebook_size: int) -> float:
    """The baseline a prior must beat: nats per latent of `test` maps under the code frequencies of `train` maps
    (add-one smoothed), i.e. a model that ignores all context. A uniform guess scores log(K)."""
    counts = np.bincount(np.asarray(train).ravel(), minlength=codebook_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(test).ravel()].mean())


def position_bins(data: SplitData, bins: int) -> np.ndarray:
    """(N,) int64: each slice's position within its scan, slice index / largest index of that scan, in `bins`
    equal bins (all zeros when bins is 0)."""
    if bins == 0:
        return np.zeros(len(data), dtype=np.int64)
    scans = [f.scan for f in data.files]
    last: dict[tuple[int, int], int] = {}
    for scan, index in zip(scans, data.indices):
        last[scan] = max(last.get(scan, 0), int(index))
    relative = np.array([index / max(1, last[scan]) for scan, index in zip(scans, data.indices)])
    return np.minimum((relative * bins).astype(np.int64), bins - 1)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def encode_maps(model: VQVAE, images: np.ndarray, batch_size: int = 64, *, amp: bool | str = False,
                progress: bool = False) -> np.ndarray:
    """Code index maps (N, h, w) int64 of images (N, H, W), on the model's device. amp: the autocast precision,
    "bf16", "fp16" or "fp32" (True: bf16, False: fp32)."""
    device = next(model.parameters()).device
    model.eval()
    out = np.empty((len(images), *model.latent_shape(images.shape[1:])), dtype=np.int64)
    for start in tqdm(range(0, len(images), batch_size), desc="encoding", unit="batch", disable=not progress or None,
                      leave=False):
        x = torch.from_numpy(np.array(images[start:start + batch_size], dtype=np.float32))[:, None].to(device)
        with autocast(device, amp):
            out[start:start + len(x)] = model.encode(x).cpu().numpy()
    return out


def cached_maps(vq: VQVAE, vq_sha256: str, images: np.ndarray, path: str | Path, *, amp: bool | str = False,
                progress: bool = False) -> np.ndarray:
    """`encode_maps` of images, cached in the .npy file `path`: reused when it was made from the same VQ-VAE
    checkpoint (its sha256) and the same image bytes, re-encoded (and rewritten atomically) otherwise."""
    path = Path(path)
    digest = hashlib.sha256(vq_sha256.encode())
    for start in range(0, len(images), 256):
        digest.update(np.ascontiguousarray(images[start:start + 256]).tobytes())
    key_path = path.with_suffix(".key")
    if path.exists() and key_path.exists() and key_path.read_text() == digest.hexdigest():
        maps = np.load(path)
        if maps.shape[0] == len(images):
            return maps.astype(np.int64)
    maps = encode_maps(vq, images, amp=amp, progress=progress)
    atomic_write(path, lambda f: np.save(f, maps.astype(np.int16 if vq.config.codebook_size <= 32767 else np.int64)))
    atomic_write(key_path, lambda f: f.write(digest.hexdigest().encode()))
    return maps


@dataclass
class PriorTrainConfig:
    """A prior's training run. model: PriorConfig fields (codebook_size is set from the VQ-VAE). The schedule
    fields, amp and precision mean what they mean in `train.TrainConfig`."""

    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup: float = 0.03
    final_lr: float = 0.1
    amp: bool = True
    precision: str = "auto"  # configs saved before it existed load as "auto"
    seed: int = 0
    device: str = "auto"
    limit: int | None = None
    model: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_run_settings(self)
        self.model = PriorConfig.from_dict(self.model).to_dict()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_prior_config(**settings: Any) -> PriorTrainConfig:
    """A PriorTrainConfig from PriorTrainConfig and PriorConfig fields (e.g. epochs=2, channels=32)."""
    return run_config(PriorTrainConfig, PriorConfig, "prior", settings)


def load_prior(path: str | Path, map_location: str | torch.device = "cpu"
               ) -> tuple[PixelCNNPrior | TransformerPrior, dict[str, Any]]:
    """The prior a checkpoint holds (eval mode) and its payload (payload["vqvae"] names the VQ-VAE it models)."""
    return load_module(path, "prior", lambda c: make_prior(PriorConfig.from_dict(c)), map_location)


def check_pair(vq_checkpoint: str | Path, prior_payload: dict[str, Any], prior_path: str | Path) -> str:
    """Refuse (CheckpointError) a prior trained on the codes of another VQ-VAE; returns the VQ-VAE's sha256."""
    sha = file_sha256(vq_checkpoint)
    expected = prior_payload.get("vqvae", {}).get("sha256")
    if sha != expected:
        raise CheckpointError(f"prior {prior_path} was trained on the codes of another VQ-VAE checkpoint "
                              f"({prior_payload.get('vqvae', {}).get('path', '?')}, sha256 {str(expected)[:12]}...), "
                              f"not {vq_checkpoint} (sha256 {sha[:12]}...)")
    return sha


def _batches(n: int, batch_size: int, order: torch.Tensor | None = None):
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size] if order is not None else slice(start, start + batch_size)


def train_prior(vq_checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path, config: PriorTrainConfig, *,
                resume: bool = False, overwrite: bool = False, progress: bool = True,
                data_options: dict[str, Any] | None = None, allow_other_data: bool = False,
                callback: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Fit a PixelCNNPrior to the index maps the VQ-VAE `vq_checkpoint` gives the train split of data_dir.

    The maps of the train and validate splits are encoded once and cached in out_dir (maps_*.npy). The run
    folder works as in `train.train` (best.pt: lowest validation NLL); overwrite refuses a VQ-VAE checkpoint
    inside out_dir. Returns the history, one record per epoch: epoch, lr, train_nll (nats per latent, training
    mode), maps_per_s, precision (`train.resolve_precision`), val_nll, val_bits (bits per latent, whole
    validation split), seconds. The maps are encoded in the VQ-VAE's own precision (`train.checkpoint_precision`).
    """
    options = runs.data_options(data_options)
    runs.check_data_dir(data_dir)
    device = select_device(config.device)
    vq, vq_payload = load_model(vq_checkpoint, map_location=device)
    if config.model["codebook_size"] != vq.config.codebook_size:
        raise ValueError(f"the prior's codebook_size {config.model['codebook_size']} differs from the VQ-VAE's "
                         f"{vq.config.codebook_size} ({vq_checkpoint})")
    with runs.claim(out_dir, "prior", config.to_dict(), config.model, resume=resume, overwrite=overwrite,
                    inputs=(vq_checkpoint, data_dir)) as payload:
        return _fit_prior(vq, vq_payload, vq_checkpoint, data_dir, Path(out_dir), config, payload, options,
                          allow_other_data, progress, callback)


def _fit_prior(vq: VQVAE, vq_payload: dict[str, Any], vq_checkpoint: str | Path, data_dir: str | Path,
               out_dir: Path, config: PriorTrainConfig, payload: dict[str, Any] | None, options: dict[str, Any],
               allow_other_data: bool, progress: bool, callback: Callable[[dict[str, Any]], None] | None
               ) -> list[dict[str, Any]]:
    """The body of `train_prior`, in its claimed run folder."""
    device = next(vq.parameters()).device
    saved, config = config, for_device(config, device)
    sha = check_pair(vq_checkpoint, payload, out_dir / "last.pt") if payload is not None else file_sha256(vq_checkpoint)
    vq_precision = checkpoint_precision(vq_payload, device)
    splits, loaded = {}, []
    for split in ("train", "validate"):
        data = load_split(data_dir, split, progress=progress, **options)
        loaded.append(data)
        limit = config.limit if split == "train" else None
        maps = cached_maps(vq, sha, data.images[:limit], out_dir / f"maps_{split}.npy", amp=vq_precision,
                           progress=progress)
        bins = position_bins(data, config.model["positions"])[:limit]
        splits[split] = (torch.from_numpy(maps).to(device), torch.from_numpy(bins).to(device))
    record = runs.data_record(data_dir, loaded, options)
    del loaded
    (train_maps, train_bins), (val_maps, val_bins) = splits["train"], splits["validate"]
    conditioned = config.model["positions"] > 0
    steps = config.epochs * math.ceil(len(train_maps) / config.batch_size)

    with torch.random.fork_rng(devices=runs.cuda_devices(device)), cudnn_autotune(device):
        torch.manual_seed(config.seed)
        model = make_prior(PriorConfig.from_dict(config.model)).to(device)
        optimizer, scheduler = optimizer_for(model, config, steps)
        scaler = grad_scaler(config.precision, device)

        def nll(maps: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
            with autocast(device, config.precision):
                logits = model(maps, bins if conditioned else None)
            return nll_per_latent(logits, maps)

        def one_epoch(epoch: int) -> dict[str, Any]:
            model.train()
            started, total = time.perf_counter(), torch.zeros((), device=device)  # float32: MPS has no float64
            order = torch.randperm(len(train_maps), generator=runs.epoch_generator(config.seed, epoch)).to(device)
            with tqdm(total=len(train_maps), desc=f"prior epoch {epoch}/{config.epochs}", unit="map",
                      disable=not progress or None, leave=False) as bar:
                for batch in _batches(len(train_maps), config.batch_size, order):
                    loss = nll(train_maps[batch], train_bins[batch])
                    optimizer_step(loss, optimizer, scheduler, scaler)
                    total += loss.detach() * len(batch)
                    bar.update(len(batch))
            mean = total.item() / len(train_maps)
            if not math.isfinite(mean):
                raise RuntimeError(f"prior training diverged in epoch {epoch}: the NLL is {mean}; lower the lr")
            return {"train_nll": mean, "maps_per_s": len(train_maps) / (time.perf_counter() - started),
                    "precision": config.precision}

        @torch.no_grad()
        def score() -> dict[str, Any]:
            model.eval()
            total = sum(nll(val_maps[b], val_bins[b]).item() * len(val_maps[b])
                        for b in _batches(len(val_maps), 64))
            return {"val_nll": total / len(val_maps), "val_bits": total / len(val_maps) / math.log(2)}

        extra = {"vqvae": {"sha256": sha, "path": str(vq_checkpoint), "latent_shape": list(train_maps.shape[1:])},
                 "precision": config.precision}
        return runs.fit(out_dir, kind="prior", model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                        payload=payload, train_config=saved.to_dict(), model_config=model.config.to_dict(),
                        epochs=config.epochs, device=device, one_epoch=one_epoch, score=score, best="val_nll",
                        minimize=True, extra=extra, data=record, allow_other_data=allow_other_data,
                        callback=callback)


class SliceGenerator:
    """A VQ-VAE and the prior trained on its codes, as one tool: draw new slices, complete the kept part of a
    real slice's code map, and show where a map surprises the prior. Sampling options (temperature, top_k,
    top_p) are those of `Sampling`; position bins are those of `position_bins`."""

    def __init__(self, vq: VQVAE, model: nn.Module, latent_shape: tuple[int, int]) -> None:
        self.vq, self.prior, self.latent_shape = vq, model, tuple(latent_shape)
        self.device = next(model.parameters()).device

    @property
    def positions(self) -> int:
        return self.prior.config.positions

    def bins(self, n: int, position: int | None, seed: int = 0) -> np.ndarray:
        """(n,) bins: `position` for all, or (None) drawn uniformly with the seed for a conditioned prior."""
        if position is not None and not 0 <= position < max(1, self.positions):
            raise ValueError(f"position must be a bin in [0, {max(1, self.positions)}), got {position}")
        if position is None and self.positions:
            return np.random.default_rng(seed).integers(0, self.positions, n)
        return np.full(n, position or 0, dtype=np.int64)

    def _condition(self, bins: np.ndarray) -> torch.Tensor | None:
        return torch.from_numpy(np.asarray(bins, dtype=np.int64)).to(self.device) if self.positions else None

    @torch.no_grad()
    def decode(self, maps: np.ndarray | torch.Tensor) -> np.ndarray:
        """Slices (n, H, W) float32 in [0, 1] decoded from index maps (n, h, w)."""
        maps = torch.as_tensor(np.asarray(maps), dtype=torch.int64, device=self.device)
        return torch.cat([self.vq.decode_indices(maps[b]) for b in _batches(len(maps), 32)]
                         ).clamp(0, 1)[:, 0].cpu().numpy()

    def encode(self, images: np.ndarray) -> np.ndarray:
        return encode_maps(self.vq, np.asarray(images))

    def sample(self, n: int, *, position: int | None = None, seed: int = 0, progress: bool = False,
               **options: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n new slices: (images (n, H, W), maps (n, h, w) int64, bins (n,))."""
        bins = self.bins(n, position, seed)
        maps = self.prior.sample(n, self.latent_shape, self._condition(bins), seed=seed, progress=progress,
                                 **options)
        return self.decode(maps), maps.cpu().numpy(), bins

    def complete(self, index_map: np.ndarray, rows: int, n: int, *, position: int = 0, seed: int = 0,
                 **options: Any) -> tuple[np.ndarray, np.ndarray]:
        """n completions of one map (h, w): its first `rows` rows kept, the rest drawn by the prior at slice
        position bin `position`. Returns (images (n, H, W), maps (n, h, w))."""
        height, width = self.latent_shape
        if np.shape(index_map) != self.latent_shape:
            raise ValueError(f"the map must be {self.latent_shape}, got {np.shape(index_map)}")
        if not 0 <= rows <= height:
            raise ValueError(f"rows must be in [0, {height}], got {rows}")
        prefix = torch.as_tensor(np.asarray(index_map), dtype=torch.int64).expand(n, height, width)
        maps = self.prior.sample(n, self.latent_shape, self._condition(self.bins(n, position)), seed=seed,
                                 prefix=prefix, start=rows * width, **options)
        return self.decode(maps), maps.cpu().numpy()

    def surprise(self, maps: np.ndarray, bins: np.ndarray | None = None) -> np.ndarray:
        """`position_nll` of maps (N, h, w) in bits: (N, h, w)."""
        return position_nll(self.prior, maps, bins) / math.log(2)


def load_generator(vq_checkpoint: str | Path, prior_checkpoint: str | Path, device: str = "auto") -> SliceGenerator:
    """The `SliceGenerator` of a VQ-VAE checkpoint and a prior checkpoint trained on its codes (`check_pair`)."""
    dev = select_device(device)
    model, payload = load_prior(prior_checkpoint, map_location=dev)
    check_pair(vq_checkpoint, payload, prior_checkpoint)
    vq, _ = load_model(vq_checkpoint, map_location=dev)
    return SliceGenerator(vq, model, tuple(payload["vqvae"]["latent_shape"]))


def sample_slices(vq_checkpoint: str | Path, prior_checkpoint: str | Path, n: int, *, seed: int = 0,
                  position: int | None = None, device: str = "auto", progress: bool = False, **options: Any
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n new slices: index maps drawn from the prior, decoded by the VQ-VAE.

    position: the slice-position bin for every sample, or None to draw the bins uniformly (seeded) for a
    conditioned prior; options: temperature, top_k, top_p (`Sampling`). Returns (images (n, H, W) float32
    clipped to [0, 1], maps (n, h, w) int64, bins (n,)).
    """
    return load_generator(vq_checkpoint, prior_checkpoint, device).sample(n, position=position, seed=seed,
                                                                          progress=progress, **options)
