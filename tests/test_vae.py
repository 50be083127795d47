"""Tests of vqvae_lib.vae: the Gaussian VAE's shapes, KL and loss values, sampling, and a training run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vqvae_lib import train as T
from vqvae_lib import vae as V
from vqvae_lib.checkpoint import CheckpointError, load_checkpoint
from vqvae_lib.model import ModelConfig

CONFIG = ModelConfig(hidden=16, res_hidden=8, n_res=1, downsample=8, embed_dim=4)


def small_vae() -> V.GaussianVAE:
    torch.manual_seed(0)
    return V.GaussianVAE(CONFIG).double()


def test_shapes_and_kl_match_torch_distributions():
    model = small_vae()
    x = torch.rand(2, 1, 64, 32, dtype=torch.float64)
    out = model(x)
    assert out.recon.shape == x.shape and out.mu.shape == out.logvar.shape == (2, 4, 8, 4)
    expected = kl_divergence(Normal(out.mu, (0.5 * out.logvar).exp()), Normal(0.0, 1.0)).sum(dim=(2, 3))
    torch.testing.assert_close(out.kl, expected)


def test_posterior_mean_decoding_is_deterministic_and_sampling_is_not():
    model = small_vae()
    x = torch.rand(1, 1, 64, 32, dtype=torch.float64)
    assert torch.equal(model(x, sample=False).recon, model(x, sample=False).recon)
    assert not torch.equal(model(x).recon, model(x).recon)


def test_negative_elbo_value():
    """loss = 0.5 log(2 pi e MSE) + KL / pixels: the Gaussian NLL per pixel at the optimal sigma^2 = MSE."""
    x = torch.zeros(2, 1, 4, 4)
    out = V.VAEOutput(recon=torch.full((2, 1, 4, 4), 0.1), mu=torch.zeros(2, 1, 1, 1),
                      logvar=torch.zeros(2, 1, 1, 1), kl=torch.tensor([[1.6], [3.2]]))
    loss, mse, kl = V.neg_elbo(x, out)
    assert mse.item() == pytest.approx(0.01) and kl.item() == pytest.approx(2.4 / 16)
    gaussian_nll = -Normal(0.1, math.sqrt(0.01)).log_prob(torch.tensor(0.0)).item()  # per pixel, sigma^2 = MSE
    assert loss.item() == pytest.approx(gaussian_nll + 2.4 / 16, rel=1e-6)


def test_samples_are_seeded():
    model = small_vae()
    a = model.sample(3, (64, 32), seed=1)
    assert a.shape == (3, 1, 64, 32)
    assert torch.equal(a, model.sample(3, (64, 32), seed=1)) and not torch.equal(a, model.sample(3, (64, 32), seed=2))


def test_a_vae_run_trains_and_loads(tiny_phantom, tmp_path):
    config = T.make_config("default", hidden=16, res_hidden=8, embed_dim=4, downsample=8, epochs=2, limit=16,
                           batch_size=8, device="cpu", ssim_weight=0.0)
    history = V.train_vae(tiny_phantom, tmp_path / "vae", config, progress=False)
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        assert h["train_loss"] == pytest.approx(0.5 * math.log(2 * math.pi * math.e * h["train_recon"])
                                                + h["train_kl"], abs=0.05)  # equal per batch; means differ a little
        assert h["train_kl"] > 0 and -1 < h["val_ssim"] < 1 and 0 <= h["val_active"] <= 4
    model, payload = V.load_vae(tmp_path / "vae" / "best.pt")
    assert payload["kind"] == "vae" and payload["epoch"] == 1 + int(np.argmax([h["val_ssim"] for h in history]))
    recon, kl = V.reconstruct(model, np.zeros((2, 256, 128), dtype=np.float32))
    assert recon.shape == (2, 256, 128) and kl.shape == (2, 4) and (kl >= 0).all()
    with pytest.raises(CheckpointError, match="holds a vae model, not a vqvae model"):
        T.evaluate(tmp_path / "vae" / "best.pt", tiny_phantom, device="cpu", progress=False)
    relabelled = load_checkpoint(tmp_path / "vae" / "best.pt")
    relabelled["kind"] = "vqvae"
    torch.save(relabelled, tmp_path / "relabelled.pt")
    with pytest.raises(CheckpointError, match="holds a vqvae model, not a vae model"):
        V.load_vae(tmp_path / "relabelled.pt")
