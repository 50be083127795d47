"""Tests of vqvae_lib.rate (bits per slice of code maps, VAEs and codecs) and viz.rate_distortion."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch.distributions import Normal

from vqvae_lib import rate as R
from vqvae_lib import viz
from vqvae_lib.model import ModelConfig
from vqvae_lib.prior import unigram_nll
from vqvae_lib.vae import GaussianVAE


def smooth_image(shape: tuple[int, int] = (128, 64)) -> np.ndarray:
    """A bright blob on a gradient, (H, W) float32 in [0, 1]."""
    r, c = np.mgrid[:shape[0], :shape[1]] / np.array(shape)[:, None, None]
    blob = np.exp(-((r - 0.5) ** 2 + (c - 0.4) ** 2) / 0.02)
    return (0.2 * r + 0.7 * blob).astype(np.float32)


def test_raw_bits_of_a_64x32_grid_with_512_codes():
    assert R.raw_bits((64, 32), 512) == 64 * 32 * 9


def test_bits_under_uniform_frequencies_equal_raw_bits():
    maps = np.random.default_rng(0).integers(0, 512, (3, 64, 32))
    np.testing.assert_allclose(R.bits_per_map(maps, np.full(512, 1 / 512)), R.raw_bits((64, 32), 512))


def test_code_frequencies_sum_to_one_and_agree_with_unigram_nll():
    rng = np.random.default_rng(1)
    train = rng.choice(16, (20, 8, 4), p=np.arange(1, 17) / 136)
    test = rng.integers(0, 16, (5, 8, 4))
    p = R.code_frequencies(train, 16)
    assert p.shape == (16,) and math.isclose(p.sum(), 1.0)
    assert math.isclose(p[3], (np.count_nonzero(train == 3) + 1) / (train.size + 16))
    nats_per_latent = R.bits_per_map(test, p).sum() * math.log(2) / test.size
    assert math.isclose(nats_per_latent, unigram_nll(train, test, 16), rel_tol=1e-12)
    with pytest.raises(ValueError, match="16"):
        R.code_frequencies(np.array([[[16]]]), 16)


def test_prior_nats_per_latent_to_bits_per_slice():
    assert math.isclose(R.nats_to_bits_per_slice(math.log(512), (64, 32)), R.raw_bits((64, 32), 512))
    assert math.isclose(R.nats_to_bits_per_slice(2.0, (8, 4)), 64 / math.log(2))


@pytest.mark.parametrize("k", [1, 2, 512])
def test_one_hot_kl_to_uniform_is_log_k(k):
    assert math.isclose(R.one_hot_kl(k), math.log(k), abs_tol=1e-12)


def test_gaussian_nll_formula_matches_torch_normal():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.random((4, 32, 16)))
    x_hat = x + torch.from_numpy(rng.normal(0, 0.05, x.shape))
    mse = float(((x - x_hat) ** 2).mean())
    expected = -Normal(x_hat, math.sqrt(mse)).log_prob(x).mean().item()
    assert math.isclose(R.gaussian_nll_per_pixel(mse), expected, rel_tol=1e-10)
    with pytest.raises(ValueError):
        R.gaussian_nll_per_pixel(0.0)


def test_neg_elbo_per_pixel_adds_distortion_and_rate_per_pixel():
    out = R.neg_elbo_per_pixel(0.01, 1000.0, 256 * 128)
    assert math.isclose(out["distortion"], 0.5 * (math.log(2 * math.pi) + 1 + math.log(0.01)))
    assert math.isclose(out["distortion"], -0.8836, abs_tol=1e-4)  # negative: a density on [0, 1]
    assert math.isclose(out["rate"], 1000 / 32768)
    assert math.isclose(out["total"], out["distortion"] + out["rate"])


def test_vae_kl_bits_are_the_models_kl_in_bits():
    torch.manual_seed(0)
    model = GaussianVAE(ModelConfig(hidden=16, res_hidden=8, n_res=1, embed_dim=4))
    images = np.random.default_rng(3).random((5, 32, 16), dtype=np.float32)
    bits = R.vae_kl_bits(model, images, batch_size=2)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)[:, None], sample=False).kl.sum(1).double().numpy() / math.log(2)
    assert bits.shape == (5,) and not model.training
    np.testing.assert_allclose(bits, expected, rtol=1e-5)
    assert (bits > 0).all()


@pytest.mark.parametrize("codec", R.CODECS)
def test_codec_roundtrip_higher_quality_costs_more_and_looks_better(codec):
    image = smooth_image()
    low, high = R.DEFAULT_QUALITIES[codec][1], R.DEFAULT_QUALITIES[codec][-2]
    (rec_low, bytes_low), (rec_high, bytes_high) = (R.codec_roundtrip(image, codec, q) for q in (low, high))
    assert rec_low.shape == image.shape and rec_low.dtype == np.float32
    assert 0 <= rec_high.min() and rec_high.max() <= 1
    psnr = [10 * np.log10(1 / np.mean((r - image) ** 2)) for r in (rec_low, rec_high)]
    assert bytes_high > bytes_low and psnr[1] > psnr[0] > 20


def test_unknown_codec_raises_naming_it():
    with pytest.raises(ValueError, match="png"):
        R.codec_roundtrip(smooth_image(), "png", 50)


def test_codec_curve_averages_file_bits_and_metrics_over_slices():
    images = np.stack([smooth_image(), smooth_image()[::-1].copy()])
    points = R.codec_curve(images, "jpeg", [10, 90])
    assert [p["quality"] for p in points] == [10, 90]
    assert set(points[0]) == {"codec", "quality", "bits_per_slice", "ssim", "ssim_gaussian", "psnr"}
    sizes = [R.codec_roundtrip(image, "jpeg", 10)[1] for image in images]
    assert points[0]["bits_per_slice"] == 8 * np.mean(sizes)
    assert points[1]["psnr"] > points[0]["psnr"] and 0 < points[0]["ssim"] < points[1]["ssim"] <= 1


def test_rate_distortion_figure_has_labelled_axes_and_legend(tmp_path):
    curves = {"jpeg": [{"bits_per_slice": 4e3, "ssim": 0.6, "psnr": 24.0},
                       {"bits_per_slice": 9e4, "ssim": 0.98, "psnr": 44.0}]}
    points = {"VQ-VAE 4x": [{"bits_per_slice": 18432.0, "ssim": 0.95, "psnr": 36.0, "label": "K=512"}],
              "VQ-VAE 8x": [{"bits_per_slice": 4608.0, "ssim": 0.9, "psnr": 32.0, "label": "K=512"}]}
    fig = viz.rate_distortion(curves, points, tmp_path / "rd.png")
    assert (tmp_path / "rd.png").read_bytes().startswith(b"\x89PNG")
    axes = fig.axes
    assert len(axes) == 2 and all(ax.get_xscale() == "log" for ax in axes)
    assert all("bits per slice" in ax.get_xlabel() for ax in axes)
    assert "SSIM" in axes[0].get_ylabel() and "PSNR" in axes[1].get_ylabel()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["jpeg", "VQ-VAE 4x", "VQ-VAE 8x"]
    assert "K=512" in [t.get_text() for t in axes[0].texts]
    plt.close(fig)
    single = viz.rate_distortion(curves, {}, None, metrics=("psnr",))
    assert len(single.axes) == 1 and single.axes[0].get_ylabel() == "PSNR (dB)"
    plt.close(single)
