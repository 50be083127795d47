"""Tests of vqvae_lib.metrics: SSIM/PSNR against known values, code usage counted by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d
from skimage.metrics import structural_similarity

from vqvae_lib.metrics import (CodeUsage, bootstrap_interval, high_frequency_share, in_real_range, nearest_by_ssim,
                               scan_means, slice_stats, ssim_foreground, ssim_gaussian, ssim_psnr, ssim_torch)


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


def wang_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Wang et al. 2004's SSIM of two (H, W) images written out: an explicit normalised 11x11 Gaussian window
    (sigma 1.5), population covariances, the mean over the (H - 10, W - 10) positions where the window fits."""
    t = np.arange(-5, 6)
    window = np.outer(*2 * [np.exp(-t ** 2 / (2 * 1.5 ** 2))])
    window /= window.sum()

    def local_mean(a: np.ndarray) -> np.ndarray:
        return correlate2d(a, window, mode="valid")

    mx, my = local_mean(x), local_mean(y)
    vx, vy, cxy = local_mean(x * x) - mx ** 2, local_mean(y * y) - my ** 2, local_mean(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())


def noisy_pair(seed: int, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(recon, target) (3, 40, 30): smooth image-like targets in [0, 1] and noisy copies that overshoot them."""
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(np.cumsum(rng.normal(0, 1, (3, 40, 30)), 1), 2)
    target = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return target + rng.normal(0, noise, target.shape), target


def test_gaussian_ssim_matches_a_direct_implementation():
    recon, target = noisy_pair(4)
    recon[0] = np.random.default_rng(4).uniform(0, 1, (40, 30))      # an unrelated pair
    ssim = ssim_gaussian(recon, target)
    expected = [wang_ssim(np.clip(r, 0, 1), t) for r, t in zip(recon, target)]  # recon clipped, as documented
    assert ssim.shape == (3,) and ssim.dtype == np.float64
    np.testing.assert_allclose(ssim, expected, rtol=0, atol=1e-10)
    assert ssim[0] < 0.1 < 0.3 < ssim[1:].min() < ssim[1:].max() < 0.99
    np.testing.assert_allclose(ssim_gaussian(target, target), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        ssim_gaussian(recon[:2], target)


def test_the_two_ssim_conventions_are_different_numbers():
    recon, target = noisy_pair(5, noise=0.05)
    uniform, _ = ssim_psnr(recon, target)
    gaussian = ssim_gaussian(recon, target)
    assert (np.abs(gaussian - uniform) > 0.02).all(), (gaussian, uniform)


def test_scan_means_groups_slices_by_case_and_week():
    values = np.array([1.0, 2.0, 10.0, 3.0, 20.0, 7.0])
    cases = np.array([41, 40, 40, 40, 40, 41])
    weeks = np.array([2, 7, 5, 7, 5, 2])
    scans, means = scan_means(values, cases, weeks)
    assert scans == [(40, 5), (40, 7), (41, 2)] and all(isinstance(v, int) for scan in scans for v in scan)
    np.testing.assert_allclose(means, [15.0, 2.5, 4.0])
    with pytest.raises(ValueError, match=r"\(N,\)"):
        scan_means(values, cases[:5], weeks)


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
    values = np.random.default_rng(6).normal(0.9, 0.02, 20)
    low, high = bootstrap_interval(values)
    assert (low, high) == bootstrap_interval(values) == bootstrap_interval(values, seed=0)
    assert bootstrap_interval(values, seed=1) != (low, high)
    assert values.min() <= low < values.mean() < high <= values.max()
    assert isinstance(low, float) and isinstance(high, float)
    narrower = bootstrap_interval(values, level=0.5)
    assert low < narrower[0] < narrower[1] < high
    three = np.array([0.13682181687047085, 0.1015161589336859, 0.11395630317323756])  # 3 * v / 3 < v here
    assert bootstrap_interval(three) == (three.min(), three.max())


def test_bootstrap_interval_widens_with_the_spread():
    values = np.random.default_rng(7).normal(0, 1, 8)
    low, high = bootstrap_interval(values)
    wide_low, wide_high = bootstrap_interval(3 * values)       # same resamples, three times the spread
    assert wide_high - wide_low == pytest.approx(3 * (high - low), rel=1e-9) and high - low > 0


def test_bootstrap_interval_of_one_and_of_two_values():
    assert bootstrap_interval(np.array([0.93])) == (0.93, 0.93)
    # Resample means of two values a < b are a, (a + b) / 2 or b with chances 1/4, 1/2, 1/4: the 2.5 % and 97.5 %
    # quantiles are a and b.
    assert bootstrap_interval(np.array([0.95, 0.91])) == (0.91, 0.95)


@pytest.mark.parametrize("values, level, message", [
    ([], 0.95, "non-empty"), ([[0.9, 0.8]], 0.95, "non-empty"), ([0.9], 0.0, r"level must lie in \(0, 1\)"),
    ([0.9], 1.0, "level must lie"), ([0.9, 0.8], 95, "got 95"), ([0.9], float("nan"), "level must lie"),
])
def test_bootstrap_interval_refuses_bad_input(values, level, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_interval(np.array(values), level=level)


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
