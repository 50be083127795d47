"""Tests of vqvae_lib.metrics: SSIM/PSNR against known values, code usage counted by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from vqvae_lib.metrics import (CodeUsage, high_frequency_share, in_real_range, nearest_by_ssim, slice_stats,
                               ssim_foreground, ssim_psnr, ssim_torch)


@pytest.fixture
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(0, 1, (3, 32, 24)).astype(np.float32)


def test_identical_images_have_ssim_one_and_infinite_psnr(images):
    ssim, psnr = ssim_psnr(images, images)
    assert ssim.shape == psnr.shape == (3,)
    np.testing.assert_allclose(ssim, 1.0, atol=1e-12)
    assert np.isposinf(psnr).all()


def test_psnr_of_a_known_error_matches_the_formula():
    target = np.full((2, 16, 16), 0.5)
    recon = target.copy()
    recon[0] += 0.1                     # MSE 0.01 -> 20 dB
    recon[1, :, :8] += 0.2              # MSE 0.02 on half the pixels, i.e. 0.04 / 2
    ssim, psnr = ssim_psnr(recon, target)
    np.testing.assert_allclose(psnr, [20.0, 10 * np.log10(1 / 0.02)], rtol=1e-9)
    assert (ssim < 1).all()


def test_torch_ssim_matches_skimage_and_has_a_gradient(images):
    rng = np.random.default_rng(1)
    recon = np.clip(images + rng.normal(0, 0.1, images.shape), 0, 1)
    reference = np.array([structural_similarity(t, r, data_range=1.0) for r, t in zip(recon, images.astype(float))])
    x = torch.tensor(recon[:, None], dtype=torch.float64, requires_grad=True)
    ssim = ssim_torch(x, torch.tensor(images[:, None], dtype=torch.float64))
    np.testing.assert_allclose(ssim.detach().numpy(), reference, rtol=1e-10)
    assert (reference < 0.95).all()  # far from the trivial value 1
    ssim.sum().backward()
    assert x.grad.abs().sum() > 0


def test_torch_ssim_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        ssim_torch(torch.zeros(2, 1, 16, 16), torch.zeros(2, 16, 16))


def test_recon_is_clipped_to_the_data_range(images):
    overshoot = images.copy()
    overshoot[images > 0.5] = 7.0           # clipped to 1
    clipped = np.where(images > 0.5, 1.0, images)
    np.testing.assert_array_equal(ssim_psnr(overshoot, images)[1], ssim_psnr(clipped, images)[1])
    noise = np.random.default_rng(1).normal(0, 0.05, images.shape)
    mse = ((np.clip(images + noise, 0, 1) - images) ** 2).mean(axis=(1, 2))
    np.testing.assert_allclose(ssim_psnr(images + noise, images)[1], 10 * np.log10(1 / mse), rtol=1e-6)


def test_ssim_falls_with_noise(images):
    noisy = images + np.random.default_rng(2).normal(0, 0.2, images.shape)
    ssim, _ = ssim_psnr(noisy, images)
    assert (ssim < 0.9).all() and (ssim > -1).all()


def test_shape_mismatch_is_refused(images):
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        ssim_psnr(images[:2], images)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        ssim_psnr(images[0], images[0])


def test_foreground_ssim_ignores_the_background():
    rng = np.random.default_rng(3)
    target = np.zeros((2, 32, 32))
    target[:, 8:24, 8:24] = rng.uniform(0.2, 1, (2, 16, 16))
    recon = target.copy()
    recon[0, 8:24, 8:24] += rng.normal(0, 0.1, (16, 16))  # image 0: errors only inside the body
    masks = np.zeros((2, 32, 32), dtype=np.uint8)
    masks[0, 8:24, 8:24] = 1
    fg = ssim_foreground(recon, target, masks)
    assert np.isnan(fg[1])                                # empty mask
    whole, _ = ssim_psnr(recon, target)
    assert fg[0] < whole[0] < 1                           # the black background inflates whole-image SSIM
    _, ssim_map = structural_similarity(target[0], np.clip(recon[0], 0, 1), data_range=1.0, full=True)
    assert fg[0] == pytest.approx(ssim_map[8:24, 8:24].mean())


def test_code_usage_counts_active_and_perplexity_by_hand():
    usage = CodeUsage(8)
    assert usage.active == 0 and usage.perplexity == 0.0
    usage.update(torch.tensor([[[0, 0], [1, 1]]]))        # a (B, h, w) tensor
    usage.update(np.array([3, 3, 3, 3]))                  # or an array
    np.testing.assert_array_equal(usage.counts, [2, 2, 0, 4, 0, 0, 0, 0])
    assert usage.active == 3
    p = np.array([0.25, 0.25, 0.5])
    assert usage.perplexity == pytest.approx(np.exp(-(p * np.log(p)).sum()))  # 2^1.5 = 2.83
    assert usage.perplexity == pytest.approx(2 ** 1.5)


def test_uniform_usage_has_perplexity_k_and_one_code_has_one():
    uniform = CodeUsage(16)
    uniform.update(np.tile(np.arange(16), 5))
    assert uniform.perplexity == pytest.approx(16) and uniform.active == 16
    single = CodeUsage(16)
    single.update(np.full(100, 7))
    assert single.perplexity == pytest.approx(1) and single.active == 1


def test_code_usage_refuses_out_of_range_and_non_integer_indices():
    usage = CodeUsage(4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        usage.update(np.array([0, 4]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        usage.update(np.array([-1]))
    with pytest.raises(TypeError):
        usage.update(np.array([0.5]))
    assert usage.counts.sum() == 0
    counts = usage.counts
    counts[0] = 99                                        # a copy: the accumulator is untouched
    assert usage.counts[0] == 0


def test_high_frequency_share_of_known_patterns():
    y, x = np.mgrid[0:32, 0:32]
    slow = np.cos(2 * np.pi * x / 16.0)        # 1/16 cycles per pixel: below the 0.25 cutoff
    fast = np.cos(2 * np.pi * x * 3 / 8.0)     # 3/8 cycles per pixel: above it
    np.testing.assert_allclose(high_frequency_share(np.stack([slow, fast, slow + fast, np.zeros_like(slow)])),
                               [0.0, 1.0, 0.5, 0.0], atol=1e-12)


def test_slice_stats_and_real_range():
    images = np.zeros((2, 8, 8))
    images[0, 2:6, 2:6] = 0.5                  # 16 of 64 pixels
    stats = slice_stats(images)
    assert stats.shape == (2, 4)
    np.testing.assert_allclose(stats[0, :2], [16 * 0.5 / 64, 16 / 64])
    np.testing.assert_array_equal(stats[1], 0.0)
    real = np.stack([np.linspace(0, 1, 101)] * 4, 1)
    inside = in_real_range(np.array([[0.5, 0.5, 0.5, 0.5], [0.5, 0.999, 0.0, 0.5]]), real)
    np.testing.assert_array_equal(inside, [[True] * 4, [True, False, False, True]])


def test_nearest_by_ssim_finds_the_copy(images):
    reference = np.random.default_rng(2).uniform(0, 1, (5, 32, 24)).astype(np.float32)
    reference[3] = images[1]
    ssim, index = nearest_by_ssim(images[1:2], reference, batch_size=2)
    assert index.tolist() == [3] and ssim[0] == pytest.approx(1.0)
    expected = [structural_similarity(r.astype(float), images[0].astype(float), data_range=1.0) for r in reference]
    ssim, index = nearest_by_ssim(images[:1], reference)
    assert index[0] == int(np.argmax(expected)) and ssim[0] == pytest.approx(max(expected), abs=1e-5)
