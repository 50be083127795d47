"""Reconstruction quality (SSIM, PSNR) and codebook usage.

Images are (N, H, W) arrays in [0, 1], so both metrics use data_range 1. SSIM comes in two conventions:
skimage's default (`ssim_psnr`, 7x7 uniform window) and Wang et al. 2004's (`ssim_gaussian`, 11x11 Gaussian).
Slices of one scan are strongly correlated, so intervals are taken over per-scan means (`scan_means`,
`bootstrap_interval`), never over slices. Codebook usage is always measured over a whole split (`CodeUsage`),
never per batch: a batch of 32 slices can use few codes even when the split uses many, and a per-batch perplexity
would understate it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
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


def ssim_gaussian(recon: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-image SSIM in the convention of Wang et al. 2004, used by MONAI and most papers.

    recon, target: (N, H, W), images in [0, 1]; recon is clipped to [0, 1] first, as in `ssim_psnr`. An 11x11
    Gaussian window with sigma 1.5 (skimage truncates it at 3.5 sigma: radius int(3.5 * 1.5 + 0.5) = 5),
    population covariances, K1 = 0.01, K2 = 0.03, and the mean of the SSIM map over the positions where the
    whole window fits (skimage crops 5 pixels from each border). Not the same number as `ssim_psnr`'s 7x7
    uniform-window SSIM: compare a score only with one of the same convention. Returns (N,) float64.
    """
    recon, target = _check_pair(recon, target)
    return np.array([structural_similarity(t, r, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, K1=0.01, K2=0.03)
                     for r, t in zip(recon, target)])


def score_summary(ssim: np.ndarray, ssim_gaussian: np.ndarray, psnr: np.ndarray) -> dict[str, float]:
    """Mean, min and max of per-image scores (N,) each: {"ssim_mean", "ssim_min", ..., "psnr_max"} as floats."""
    return {f"{name}_{stat}": float(getattr(values, stat)())
            for name, values in (("ssim", ssim), ("ssim_gaussian", ssim_gaussian), ("psnr", psnr))
            for stat in ("mean", "min", "max")}


def scan_means(values: np.ndarray, cases: np.ndarray, weeks: np.ndarray) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Mean of per-slice values per scan: values, cases, weeks (N,) -> (the sorted (case, week) scans (S),
    the mean of `values` over each scan's slices (S,) float64)."""
    values, cases, weeks = np.asarray(values, dtype=np.float64), np.asarray(cases), np.asarray(weeks)
    if values.ndim != 1 or cases.shape != values.shape or weeks.shape != values.shape:
        raise ValueError(f"values, cases and weeks must all be (N,); got {values.shape}, {cases.shape} and "
                         f"{weeks.shape}")
    scans = sorted({(int(c), int(w)) for c, w in zip(cases, weeks)})
    return scans, np.array([values[(cases == c) & (weeks == w)].mean() for c, w in scans], dtype=np.float64)


def bootstrap_interval(values: np.ndarray, level: float = 0.95, n_boot: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of values (S,), e.g. per-scan means (slices of one scan are
    correlated, so resample scans, not slices).

    Draws n_boot resamples of the S values with replacement (a numpy Generator seeded with `seed`, so the
    result is deterministic) and returns the (1 - level) / 2 and (1 + level) / 2 quantiles of their means.
    With one value it returns (value, value). With few values it is no more than their spread: for two values
    a < b it is (a, b).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_interval needs a non-empty (S,) array of values, got shape {values.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if values.size == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (n_boot, values.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    # The mean of k copies of v can round to one ulp outside [min, max]; the interval cannot.
    return float(max(low, values.min())), float(min(high, values.max()))


def ssim_torch(recon: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, win_size: int = 7) -> torch.Tensor:
    """Per-image SSIM in torch, differentiable, so 1 - SSIM can be a training loss.

    recon, target: (N, 1, H, W). The same definition as skimage's default (and so as `ssim_psnr`): a
    win_size x win_size uniform window, sample covariances (n / (n - 1)), K1 = 0.01, K2 = 0.03, and the mean of
    the SSIM map over the positions where the whole window fits. Returns (N,) in the input's dtype.
    """
    if recon.shape != target.shape or recon.ndim != 4 or recon.shape[1] != 1:
        raise ValueError(f"recon and target must both be (N, 1, H, W); got {tuple(recon.shape)} and "
                         f"{tuple(target.shape)}")
    mu_x, var_x = _local_moments(recon, win_size)
    mu_y, var_y = _local_moments(target, win_size)
    mean_xy = F.avg_pool2d(recon * target, win_size, stride=1)
    return _ssim_mean(mu_x, mu_y, var_x, var_y, mean_xy, win_size, data_range)


def _local_moments(x: torch.Tensor, win_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mean and sample variance of x (N, 1, H, W) over win_size x win_size windows (valid positions)."""
    n = win_size * win_size
    mu = F.avg_pool2d(x, win_size, stride=1)
    return mu, n / (n - 1) * (F.avg_pool2d(x * x, win_size, stride=1) - mu * mu)


def _ssim_mean(mu_x: torch.Tensor, mu_y: torch.Tensor, var_x: torch.Tensor, var_y: torch.Tensor,
               mean_xy: torch.Tensor, win_size: int, data_range: float) -> torch.Tensor:
    """Mean SSIM per image from local moments (mean_xy: the local mean of x * y)."""
    n = win_size * win_size
    cov_xy = n / (n - 1) * (mean_xy - mu_x * mu_y)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


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

    def add(self, counts: np.ndarray) -> None:
        """Add a histogram (K,) of code counts made elsewhere (e.g. on the GPU)."""
        counts = np.asarray(counts)
        if counts.shape != (self.num_codes,):
            raise ValueError(f"counts must have shape ({self.num_codes},), got {counts.shape}")
        self._counts += np.rint(counts).astype(np.int64)

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


def high_frequency_share(images: np.ndarray, cutoff: float = 0.25) -> np.ndarray:
    """Per-image share of spectral power above `cutoff` cycles per pixel (radial frequency, mean removed).

    images: (N, H, W). A sharpness measure: blurring removes high frequencies and lowers it, noise raises it,
    so compare it with the same measure on real slices. Returns (N,) float64 in [0, 1].
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3:
        raise ValueError(f"images must be (N, H, W), got {images.shape}")
    power = np.abs(np.fft.fft2(images - images.mean(axis=(1, 2), keepdims=True))) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(images.shape[1]), np.fft.fftfreq(images.shape[2]), indexing="ij")
    high = np.hypot(fy, fx) > cutoff
    total = power.sum(axis=(1, 2))
    return np.divide(power[:, high].sum(axis=1), total, out=np.zeros(len(images)), where=total > 0)


SLICE_STATS = ("mean intensity", "body fraction", "high-frequency share", "edge strength")


def slice_stats(images: np.ndarray) -> np.ndarray:
    """Simple per-slice statistics that real slices keep in a narrow range (N, H, W) in [0, 1] -> (N, 4):
    mean intensity; body fraction (pixels above 0.1); high-frequency share (`high_frequency_share`); edge
    strength (mean gradient magnitude inside the body)."""
    images = np.asarray(images, dtype=np.float64)
    body = images > 0.1
    gy, gx = np.gradient(images, axis=(1, 2))
    edges = np.hypot(gy, gx)
    inside = np.divide((edges * body).sum(axis=(1, 2)), body.sum(axis=(1, 2)), out=np.zeros(len(images)),
                       where=body.any(axis=(1, 2)))
    return np.stack([images.mean(axis=(1, 2)), body.mean(axis=(1, 2)), high_frequency_share(images), inside], 1)


def in_real_range(stats: np.ndarray, real: np.ndarray, quantiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """(N, S) bool: whether each statistic of each image lies within the [1st, 99th] percentile (by default) of
    the same statistic over real slices `real` (M, S)."""
    low, high = np.percentile(real, quantiles, axis=0)
    return (stats >= low) & (stats <= high)


@torch.no_grad()
def nearest_by_ssim(images: np.ndarray, reference: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """For each image (N, H, W), the reference slice (M, H, W) with the highest SSIM (`ssim_torch`, the same
    values as `ssim_psnr`). Returns (ssim (N,), index into reference (N,))."""
    best, where = np.full(len(images), -np.inf), np.zeros(len(images), dtype=np.int64)
    x = torch.from_numpy(np.array(images, dtype=np.float32))[:, None]
    mu_x, var_x = _local_moments(x, 7)
    for start in range(0, len(reference), batch_size):  # the reference's moments are computed once per batch
        ref = torch.from_numpy(np.array(reference[start:start + batch_size], dtype=np.float32))[:, None]
        mu_r, var_r = _local_moments(ref, 7)
        for i in range(len(x)):
            mean_xr = F.avg_pool2d(x[i:i + 1] * ref, 7, stride=1)
            scores = _ssim_mean(mu_x[i:i + 1], mu_r, var_x[i:i + 1], var_r, mean_xr, 7, 1.0).double()
            top = int(scores.argmax())
            if scores[top] > best[i]:
                best[i], where[i] = float(scores[top]), start + top
    return best, where
