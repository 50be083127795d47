"""Rate: how many bits it takes to store one slice, for a VQ-VAE, a Gaussian VAE and classical image codecs.

A VQ-VAE stores a slice as its code map, h x w indices into a codebook of K entries. We count that in three ways:

- raw (`raw_bits`): every index written with log2 K bits, h w log2 K bits per slice;
- under the code frequencies (`code_frequencies`, `bits_per_map`): an entropy coder with a context-free model,
  -log2 p(k) bits per position with p the (add-one smoothed) frequencies of the training maps, the same
  baseline as `prior.unigram_nll`;
- under the learned prior (`nats_to_bits_per_slice`): the PixelCNN's NLL per latent, which an arithmetic coder
  driven by the prior reaches to within a few bits per slice.

A VQ-VAE is a VAE whose posterior q(z | x) is one-hot on the nearest code. Its entropy is zero, so
KL(q || p) = -log p(k): with a uniform prior that is exactly log K nats per position (`one_hot_kl`), the raw
rate, a constant the paper leaves out of the loss; with a learned prior it is the prior's NLL. A Gaussian VAE's
rate is its KL to N(0, I) (`vae_kl_bits`), the cost of sending a posterior sample with bits-back coding.
`neg_elbo_per_pixel` puts either model's rate next to its distortion on one scale.

Codecs (`CODECS`, `codec_roundtrip`, `codec_curve`) encode 8-bit slices with Pillow and count the whole file,
headers included.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.distributions import Categorical, kl_divergence
from tqdm.auto import tqdm

from .metrics import ssim_gaussian, ssim_psnr
from .vae import GaussianVAE

CODECS = ("jpeg", "webp", "jpeg2000")
# Per codec, from a few hundred bytes per 256 x 128 slice to near transparent (about 2,000 to 90,000 bits per
# slice on the phantom); what "quality" means for each is in `codec_roundtrip`.
DEFAULT_QUALITIES: dict[str, tuple[float, ...]] = {
    "jpeg": (1, 5, 10, 20, 40, 70, 90, 95),
    "webp": (0, 10, 25, 50, 75, 90, 95, 100),
    "jpeg2000": (20, 25, 30, 35, 40, 45, 50),
}


def raw_bits(latent_shape: tuple[int, int], num_codes: int) -> float:
    """Bits per slice with every index of an (h, w) map stored in log2 K bits: h w log2 K."""
    h, w = latent_shape
    return h * w * math.log2(num_codes)


def code_frequencies(maps: np.ndarray, num_codes: int) -> np.ndarray:
    """Add-one smoothed code frequencies of maps (N, h, w) int (as in `prior.unigram_nll`): (K,) float64, sum 1."""
    flat = np.asarray(maps).ravel()
    if flat.size and (flat.min() < 0 or flat.max() >= num_codes):
        raise ValueError(f"code indices must lie in [0, {num_codes}), got values in [{flat.min()}, {flat.max()}]")
    counts = np.bincount(flat, minlength=num_codes) + 1.0
    return counts / counts.sum()


def bits_per_map(maps: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Bits of each map (N, h, w) under a context-free model p (K,): sum over positions of -log2 p[code], (N,)."""
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, h, w), got shape {maps.shape}")
    return -np.log2(np.asarray(probabilities, dtype=np.float64))[maps].sum(axis=(1, 2))


def nats_to_bits_per_slice(nats_per_latent: float, latent_shape: tuple[int, int]) -> float:
    """A prior's NLL in nats per latent position as bits per slice of an (h, w) map."""
    h, w = latent_shape
    return nats_per_latent * h * w / math.log(2)


@torch.no_grad()
def vae_kl_bits(model: GaussianVAE, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """KL(q(z | x) || N(0, I)) of each slice of images (N, H, W), summed over channels and positions, in bits:
    (N,) float64. Runs the model in eval mode without autocast; the KL is exact, no sample is drawn."""
    weight = next(model.parameters())
    model.eval()
    bits = np.empty(len(images), dtype=np.float64)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start:start + batch_size], dtype=np.float32))[:, None]
        kl = model(x.to(weight.device, weight.dtype), sample=False).kl
        bits[start:start + len(x)] = kl.sum(1).double().cpu().numpy() / math.log(2)
    return bits


def one_hot_kl(num_codes: int) -> float:
    """KL(one-hot || uniform over K codes) in nats, with torch.distributions: log K."""
    one_hot = torch.zeros(num_codes, dtype=torch.float64)
    one_hot[0] = 1.0
    uniform = torch.full((num_codes,), 1.0 / num_codes, dtype=torch.float64)
    return float(kl_divergence(Categorical(probs=one_hot), Categorical(probs=uniform)))


def gaussian_nll_per_pixel(mse: float) -> float:
    """Nats per pixel of a Gaussian decoder whose noise variance is at its optimum sigma^2 = MSE:
    0.5 log(2 pi e MSE), as in `vae.neg_elbo`."""
    if mse <= 0:
        raise ValueError(f"mse must be positive, got {mse}")
    return 0.5 * math.log(2 * math.pi * math.e * mse)


def neg_elbo_per_pixel(mse: float, rate_nats_per_slice: float, pixels: int) -> dict[str, float]:
    """The negative ELBO in nats per pixel: {"distortion", "rate", "total"}, total = distortion + rate.

    distortion: `gaussian_nll_per_pixel(mse)`; rate: rate_nats_per_slice / pixels, where the rate is -log p(z)
    under the prior for a VQ-VAE (its one-hot posterior has zero entropy) or the KL for a Gaussian VAE. Both
    models land on one scale, a continuous density of intensities in [0, 1], so values can be negative; lower
    is the better density model.
    """
    distortion, rate = gaussian_nll_per_pixel(mse), rate_nats_per_slice / pixels
    return {"distortion": distortion, "rate": rate, "total": distortion + rate}


def _save_options(codec: str, quality: float) -> tuple[str, dict[str, Any]]:
    """Pillow's format name and save options for codec at quality."""
    if codec == "jpeg":
        return "JPEG", {"quality": int(quality), "optimize": True}
    if codec == "webp":
        return "WEBP", {"quality": float(quality), "method": 6, "lossless": False}
    if codec == "jpeg2000":
        # The 9/7 wavelet (the lossy one) and a bare codestream (.j2k), without the JP2 boxes around it.
        return "JPEG2000", {"quality_mode": "dB", "quality_layers": [float(quality)], "irreversible": True,
                            "no_jp2": True}
    raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")


def codec_roundtrip(image: np.ndarray, codec: str, quality: float) -> tuple[np.ndarray, int]:
    """Encode image (H, W) in [0, 1] as an 8-bit grey file in memory and decode it: (decoded (H, W) float32 in
    [0, 1], file size in bytes, headers included).

    quality: for "jpeg" the libjpeg quality, 1..95 (optimised Huffman tables); for "webp" the lossy quality,
    0..100 (method 6, the slowest and best); for "jpeg2000" the target PSNR in dB of the single quality layer.
    Higher means a larger file and a better image for all three.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be (H, W), got shape {image.shape}")
    fmt, options = _save_options(codec, quality)
    buffer = io.BytesIO()
    Image.fromarray(np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), "L").save(buffer, fmt, **options)
    nbytes = buffer.tell()
    buffer.seek(0)
    with Image.open(buffer) as decoded:  # WebP decodes to RGB, with three equal channels
        return np.asarray(decoded.convert("L"), dtype=np.float32) / 255.0, nbytes


def codec_curve(images: np.ndarray, codec: str, qualities: Sequence[float], *,
                progress: bool = False) -> list[dict[str, Any]]:
    """A codec's rate-distortion curve on images (N, H, W) in [0, 1], one dict per quality: {"codec", "quality",
    "bits_per_slice" (mean of 8 x file bytes), "ssim", "ssim_gaussian", "psnr" (means over slices, against the
    float originals, so the 8-bit rounding counts as distortion)}."""
    images = np.asarray(images)
    points = []
    for quality in tqdm(qualities, desc=codec, disable=not progress or None, leave=False):
        decoded, nbytes = zip(*(codec_roundtrip(image, codec, quality) for image in images))
        recon = np.stack(decoded)
        ssim, psnr = ssim_psnr(recon, images)
        points.append({"codec": codec, "quality": quality, "bits_per_slice": 8 * float(np.mean(nbytes)),
                       "ssim": float(ssim.mean()), "ssim_gaussian": float(ssim_gaussian(recon, images).mean()),
                       "psnr": float(psnr.mean())})
    return points
