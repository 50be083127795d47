"""A Gaussian VAE with the VQ-VAE's encoder, decoder and latent grid, to compare the two (notebook 07).

The encoder outputs a mean and a log-variance per latent channel and position; z = mu + sigma * eps is decoded
by the same decoder. The loss is the negative ELBO per pixel, in nats, with a Gaussian decoder whose noise level
is set to its optimum for each batch (sigma^2 = MSE, the "optimal sigma-VAE" of Rybkin et al. 2021, arXiv
2006.13202), so no reconstruction / KL weight has to be tuned:

    loss = 0.5 log(2 pi e MSE)  +  KL(q(z | x) || N(0, I)) / (H W)

Samples decode z ~ N(0, I). KL per latent channel shows how many channels the model actually uses.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import runs
from .checkpoint import load_module
from .data import load_split
from .metrics import ssim_psnr
from .model import Decoder, Encoder, ModelConfig
from .train import (TrainConfig, autocast, batch_to, cudnn_autotune, for_device, grad_scaler, optimizer_step,
                    prepare_model, resident_images, select_device)

ACTIVE_KL = 0.01  # nats per position: a latent channel with less mean KL carries (almost) no information


@dataclass
class VAEOutput:
    recon: torch.Tensor  # (B, 1, H, W) decoded z, linear
    mu: torch.Tensor  # (B, D, h, w) posterior mean
    logvar: torch.Tensor  # (B, D, h, w) posterior log-variance
    kl: torch.Tensor  # (B, D) KL(q || N(0, I)) per image and channel, summed over positions, in nats


class GaussianVAE(nn.Module):
    """x (B, 1, H, W) -> VAEOutput; the encoder and decoder of `model.VQVAE` with the same config, the encoder's
    last layer giving 2 x embed_dim channels (mean and log-variance)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(dataclasses.replace(config, embed_dim=2 * config.embed_dim))
        self.decoder = Decoder(config)

    def latent_shape(self, image_shape: tuple[int, int]) -> tuple[int, int]:
        return image_shape[0] // self.config.downsample, image_shape[1] // self.config.downsample

    def forward(self, x: torch.Tensor, sample: bool = True) -> VAEOutput:
        """sample=False decodes the posterior mean (what `reconstruct` shows)."""
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)
        logvar = logvar.clamp(-20, 10)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(dim=(2, 3))
        return VAEOutput(recon=self.decoder(z.to(x.dtype)), mu=mu, logvar=logvar, kl=kl)

    @torch.no_grad()
    def sample(self, n: int, image_shape: tuple[int, int], *, seed: int = 0) -> torch.Tensor:
        """n images (n, 1, H, W) decoded from z ~ N(0, I) drawn with a seeded generator on the model's device."""
        weight = next(self.parameters())
        shape = (n, self.config.embed_dim, *self.latent_shape(image_shape))
        z = torch.randn(shape, generator=torch.Generator(weight.device).manual_seed(seed), device=weight.device)
        return self.decoder(z.to(weight.dtype))


def neg_elbo(x: torch.Tensor, out: VAEOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mse, kl per pixel) for a batch: loss = 0.5 log(2 pi e MSE) + KL / (H W), nats per pixel."""
    mse = F.mse_loss(out.recon.float(), x)
    kl = out.kl.sum(1).mean() / x[0, 0].numel()
    return 0.5 * torch.log(2 * math.pi * math.e * mse) + kl, mse, kl


def load_vae(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GaussianVAE, dict[str, Any]]:
    """The VAE a checkpoint holds (eval mode) and its payload."""
    return load_module(path, "vae", lambda c: GaussianVAE(ModelConfig.from_dict(c)), map_location)


@torch.no_grad()
def reconstruct(model: GaussianVAE, images: np.ndarray, batch_size: int = 64, *, amp: bool | str = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """Decode the posterior means of images (N, H, W): (recon (N, H, W) clipped to [0, 1], KL (N, D) nats).
    amp: the autocast precision, "bf16", "fp16" or "fp32" (True: bf16, False: fp32)."""
    device = next(model.parameters()).device
    model.eval()
    recon = np.empty(images.shape, dtype=np.float32)
    kl = np.empty((len(images), model.config.embed_dim), dtype=np.float64)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start:start + batch_size], dtype=np.float32))[:, None].to(device)
        with autocast(device, amp):
            out = model(x, sample=False)
        recon[start:start + len(x)] = out.recon.float().clamp(0, 1)[:, 0].cpu().numpy()
        kl[start:start + len(x)] = out.kl.float().cpu().numpy()
    return recon, kl


def train_vae(data_dir: str | Path, out_dir: str | Path, config: TrainConfig, *, resume: bool = False,
              overwrite: bool = False, progress: bool = True, data_options: dict[str, Any] | None = None,
              allow_other_data: bool = False,
              callback: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train a GaussianVAE with config's model, schedule and budget (its VQ settings and ssim_weight are not
    used). The run folder works as in `train.train` (best.pt: best validation SSIM). Records: epoch, lr,
    train_loss (negative ELBO, nats per pixel), train_recon (MSE), train_kl (nats per pixel), images_per_s,
    precision (`train.resolve_precision`), val_ssim, val_psnr (posterior-mean reconstructions), val_kl,
    val_active (channels with mean KL per position above ACTIVE_KL), seconds.
    """
    options = runs.data_options(data_options)
    runs.check_data_dir(data_dir)
    with runs.claim(out_dir, "vae", config.to_dict(), config.model, resume=resume, overwrite=overwrite,
                    inputs=(data_dir,)) as payload:
        return _fit_vae(data_dir, out_dir, config, payload, options, allow_other_data, progress, callback)


def _fit_vae(data_dir: str | Path, out_dir: str | Path, config: TrainConfig, payload: dict[str, Any] | None,
             options: dict[str, Any], allow_other_data: bool, progress: bool,
             callback: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    """The body of `train_vae`, in its claimed run folder."""
    device = select_device(config.device)
    saved, config = config, for_device(config, device)
    train_split = load_split(data_dir, "train", progress=progress, memory_map=False, **options)
    val_split = load_split(data_dir, "validate", progress=progress, **options)
    record = runs.data_record(data_dir, [train_split, val_split], options)
    images, val_images = resident_images(train_split.images[:config.limit], device), val_split.images
    steps = config.epochs * math.ceil(len(images) / config.batch_size)

    with torch.random.fork_rng(devices=runs.cuda_devices(device)), cudnn_autotune(device):
        torch.manual_seed(config.seed)
        model, optimizer, scheduler = prepare_model(GaussianVAE(config.model_config()), config, device, steps)
        scaler = grad_scaler(config.precision, device)

        def one_epoch(epoch: int) -> dict[str, Any]:
            model.train()
            started, sums = time.perf_counter(), torch.zeros(3, device=device)  # float32: MPS has no float64
            order = torch.randperm(len(images), generator=runs.epoch_generator(config.seed, epoch)).to(images.device)
            with tqdm(total=len(images), desc=f"VAE epoch {epoch}/{config.epochs}", unit="img",
                      disable=not progress or None, leave=False) as bar:
                for start in range(0, len(images), config.batch_size):
                    x = batch_to(images[order[start:start + config.batch_size]], device)
                    with autocast(device, config.precision):
                        out = model(x)
                    loss, mse, kl = neg_elbo(x, out)
                    optimizer_step(loss, optimizer, scheduler, scaler)
                    sums += torch.stack([loss, mse, kl]).detach() * len(x)
                    bar.update(len(x))
            loss, mse, kl = (sums / len(images)).tolist()
            if not math.isfinite(loss):
                raise RuntimeError(f"VAE training diverged in epoch {epoch}: the loss is {loss}; lower the lr")
            return {"train_loss": loss, "train_recon": mse, "train_kl": kl,
                    "images_per_s": len(images) / (time.perf_counter() - started), "precision": config.precision}

        def score() -> dict[str, Any]:
            recon, kl = reconstruct(model, val_images, config.batch_size, amp=config.precision)
            ssim, psnr = ssim_psnr(recon, np.asarray(val_images))
            per_position = kl.mean(0) / np.prod(model.latent_shape(val_images.shape[1:]))
            return {"val_ssim": float(ssim.mean()), "val_psnr": float(psnr.mean()),
                    "val_kl": float(kl.sum(1).mean() / np.prod(val_images.shape[1:])),
                    "val_active": int((per_position > ACTIVE_KL).sum())}

        return runs.fit(out_dir, kind="vae", model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                        payload=payload, train_config=saved.to_dict(), model_config=model.config.to_dict(),
                        epochs=config.epochs, device=device, one_epoch=one_epoch, score=score, best="val_ssim",
                        extra={"precision": config.precision}, data=record, allow_other_data=allow_other_data,
                        callback=callback)
