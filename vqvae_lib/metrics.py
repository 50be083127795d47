"""Reconstruction quality (SSIM, PSNR) and codebook usage.

Images are (N, H, W) arrays in [0, 1], so both metrics use data_range 1. Codebook usage is always measured over
a whole split (`CodeUsage`), never per batch: a batch of 32 slices can use few codes even when the split uses
many, and a per-batch perplexity would understate it.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _check_pair(recon: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    recon, target = np.asarray(recon), np.asarray(target)
    if recon.shape != target.shape or recon.ndim != 3:
        raise ValueError(f"recon and target must both be (N, H, W); got {recon.shape} and {target.shape}")
    return np.clip(recon, 0.0, 1.0).astype(np.float64), target.astype(np.float64)


def ssim_psnr(recon: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-image SSIM and PSNR of recon against target.

    recon, target: (N, H, W), images in [0, 1]; recon is clipped to [0, 1] first (a decoder may overshoot).
    SSIM is skimage's (7x7 uniform window) and PSNR is 10 log10(data_range^2 / MSE), both with `data_range`
    stated rather than guessed from the data. Returns (ssim (N,), psnr (N,)) float64; PSNR is inf for an exact
    reconstruction.
    """
    recon, target = _check_pair(recon, target)
    ssim = np.array([structural_similarity(t, r, data_range=data_range) for r, t in zip(recon, target)])
    with np.errstate(divide="ignore"):
        psnr = np.array([peak_signal_noise_ratio(t, r, data_range=data_range) for r, t in zip(recon, target)])
    return ssim, psnr


def ssim_foreground(recon: np.ndarray, target: np.ndarray, masks: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-image mean of the SSIM map inside the foreground (masks > 0, e.g. the body labels 1..5).

    recon, target: (N, H, W) in [0, 1] (recon clipped first); masks: (N, H, W). Unlike whole-image SSIM this is
    not inflated by the black background. Returns (N,) float64; NaN for an image with an empty mask.
    """
    recon, target = _check_pair(recon, target)
    masks = np.asarray(masks)
    if masks.shape != target.shape:
        raise ValueError(f"masks must have the images' shape {target.shape}, got {masks.shape}")
    out = np.full(len(target), np.nan)
    for i, (r, t, m) in enumerate(zip(recon, target, masks)):
        inside = m > 0
        if inside.any():
            _, ssim_map = structural_similarity(t, r, data_range=data_range, full=True)
            out[i] = ssim_map[inside].mean()
    return out


class CodeUsage:
    """Histogram of the code indices of a whole split, filled batch by batch.

    >>> usage = CodeUsage(512)
    >>> for batch in loader: usage.update(model.encode(batch))   # indices (B, h, w)
    >>> usage.active, usage.perplexity
    """

    def __init__(self, num_codes: int) -> None:
        if num_codes < 1:
            raise ValueError(f"num_codes must be >= 1, got {num_codes}")
        self.num_codes = num_codes
        self._counts = np.zeros(num_codes, dtype=np.int64)

    def update(self, indices: torch.Tensor | np.ndarray) -> None:
        """Count indices of any shape (e.g. (B, h, w)); values must lie in [0, num_codes)."""
        flat = (indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)).ravel()
        if flat.size == 0:
            return
        if not np.issubdtype(flat.dtype, np.integer):
            raise TypeError(f"code indices must be integers, got {flat.dtype}")
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= self.num_codes:
            raise ValueError(f"code indices must lie in [0, {self.num_codes}), got values in [{low}, {high}]")
        self._counts += np.bincount(flat, minlength=self.num_codes)

    @property
    def counts(self) -> np.ndarray:
        """(K,) int64: how often each code was used (a copy)."""
        return self._counts.copy()

    @property
    def active(self) -> int:
        """Number of codes used at least once."""
        return int(np.count_nonzero(self._counts))

    @property
    def perplexity(self) -> float:
        """exp(entropy) of the code histogram: the effective number of equally used codes (1..K; 0 when empty)."""
        total = self._counts.sum()
        if total == 0:
            return 0.0
        p = self._counts[self._counts > 0] / total
        return float(np.exp(-(p * np.log(p)).sum()))
