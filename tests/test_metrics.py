"""Tests of vqvae_lib.metrics: SSIM/PSNR against known values, code usage counted by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from vqvae_lib.metrics import CodeUsage, ssim_foreground, ssim_psnr


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
