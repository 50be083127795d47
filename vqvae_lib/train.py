"""Train and evaluate a VQ-VAE on HipMRI slices: recipes (presets), the training loop, resuming, evaluation.

A run folder holds ``last.pt`` (everything needed to resume), ``best.pt`` (the model of the epoch with the best
validation SSIM) and ``metrics.json`` (the history), all rewritten atomically after every epoch, so an
interrupted run loses at most the epoch in progress. On CPU, a run is exactly reproducible from its seed, and a
resumed run gives the same weights and history as one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, config_diff, load_checkpoint, load_model, save_checkpoint
from .fileio import save_json
from .data import load_split
from .metrics import CodeUsage, ssim_psnr
from .model import VQVAE, ModelConfig
from .quantizer import VectorQuantizer

log = logging.getLogger(__name__)

# The recipes, in one place. "model" holds ModelConfig fields; everything else is a TrainConfig field.
PRESETS: dict[str, dict[str, Any]] = {
    # The common published recipe: 8x grid, 512 x 128 codebook learned by the VQ loss, Adam 1e-3, fp32.
    "seed": {
        "model": dict(hidden=128, res_hidden=32, n_res=2, downsample=8, codebook_size=512, embed_dim=128,
                      beta=0.25, ema=False, init="uniform", restart=False),
        "epochs": 20, "batch_size": 32, "lr": 1e-3, "schedule": "constant", "warmup": 0.0, "final_lr": 1.0,
        "amp": False, "channels_last": False,
    },
    # Our recipe: 4x grid, EMA codebook with k-means init and restarts, warm-up + cosine, bf16, channels_last.
    "default": {
        "model": dict(hidden=64, res_hidden=32, n_res=2, downsample=4, codebook_size=512, embed_dim=64,
                      beta=0.25, ema=True, decay=0.99, usage_decay=0.9, init="kmeans", restart=True),
        "epochs": 30, "batch_size": 32, "lr": 1e-3, "schedule": "cosine", "warmup": 0.03, "final_lr": 0.1,
        "amp": True, "channels_last": True,
    },
}
SCHEDULES = ("constant", "cosine")
RUN_FILES = ("last.pt", "best.pt", "metrics.json")
RESUME_MAY_CHANGE = ("epochs", "device")  # what a resumed run may ask for differently


@dataclass
class TrainConfig:
    """Everything that defines a training run. Build one with `make_config`.

    schedule: "constant", or "cosine": linear warm-up over the first `warmup` fraction of all steps, then
    cosine decay to `final_lr` x lr at the last step. amp: bf16 autocast (CUDA and CPU; the quantizer stays
    fp32). limit: train on the first `limit` training slices only (smoke runs, tests). model: the full
    ModelConfig as a dict. device: "auto", "cpu", "cuda", "cuda:N" or "mps".
    """

    preset: str
    epochs: int
    batch_size: int
    lr: float
    schedule: str
    warmup: float
    final_lr: float
    amp: bool
    channels_last: bool
    model: dict[str, Any]
    seed: int = 0
    device: str = "auto"
    limit: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.preset in PRESETS, f"preset must be one of {sorted(PRESETS)}, not {self.preset!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, not {self.schedule!r}"),
            (0 <= self.warmup < 1, f"warmup must be a fraction of the steps in [0, 1), got {self.warmup}"),
            (0 <= self.final_lr <= 1, f"final_lr must be a fraction of lr in [0, 1], got {self.final_lr}"),
            (self.limit is None or self.limit >= 1, f"limit must be None or >= 1, got {self.limit}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.model = ModelConfig.from_dict(self.model).to_dict()  # validates and fills in defaults

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; ValueError on unknown or missing keys and bad values."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"incomplete TrainConfig: {e}") from e


def make_config(preset: str = "default", **overrides: Any) -> TrainConfig:
    """The `preset` recipe with `overrides`: TrainConfig fields (e.g. epochs=2, limit=64), ModelConfig fields
    (e.g. downsample=8, hidden=16) or model={...} (ModelConfig fields). `make_config(**c.to_dict())` rebuilds c.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"preset"}
    unknown = sorted(set(overrides) - model_fields - train_fields)
    if unknown:
        raise ValueError(f"unknown settings {', '.join(unknown)}; train settings: {', '.join(sorted(train_fields))}; "
                         f"model settings: {', '.join(sorted(model_fields))}")
    recipe = {key: value for key, value in PRESETS[preset].items() if key != "model"}
    model = {**PRESETS[preset]["model"], **overrides.pop("model", {})}
    for key in model_fields & set(overrides):
        model[key] = overrides.pop(key)
    return TrainConfig(preset=preset, **{**recipe, **overrides}, model=model)


def select_device(pref: str = "auto") -> torch.device:
    """The torch device for `pref`: "auto" picks CUDA, else Apple MPS, else CPU; a named device ("cpu", "cuda",
    "cuda:1", "mps") that is not available raises RuntimeError."""
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(pref)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise RuntimeError(f"device {pref!r} requested but CUDA is not available: {why}; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {pref!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {pref!r} requested but MPS is not available")
    return device


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning-rate multiplier for optimiser step `step` (0-based) of `total_steps`."""
    if config.schedule == "constant":
        return 1.0
    warmup = round(config.warmup * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return config.final_lr + (1 - config.final_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def _quantizer(model: VQVAE) -> VectorQuantizer:
    return next(m for m in model.modules() if isinstance(m, VectorQuantizer))


def _resident(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W) array -> (N, 1, H, W) float32 tensor, on `device` when it fits (else in pinned CPU memory)."""
    x = torch.from_numpy(np.array(images, dtype=np.float32))[:, None]  # a copy: the memmap is read-only
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return x.to(device) if x.nbytes < free // 2 else x.pin_memory()
    return x.to(device)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded by (seed, epoch): an epoch's order does not depend on the epochs before it."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


@torch.no_grad()
def reconstruct(model: VQVAE, images: np.ndarray, batch_size: int = 64, device: str | torch.device | None = None,
                *, amp: bool = False, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Reconstruct images (N, H, W) in [0, 1] in eval mode, batch by batch.

    The model is moved to `device` (default: where it is) and left in the mode it was in. amp: bf16 autocast.
    Returns (recon (N, H, W) float32 clipped to [0, 1], indices (N, h, w) int64 code indices).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    recon = np.empty((len(images), *images.shape[1:]), dtype=np.float32)
    indices = np.empty((len(images), *model.latent_shape(images.shape[1:])), dtype=np.int64)
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="reconstructing", unit="batch",
                          disable=not progress, leave=False):
            x = torch.from_numpy(np.array(images[start:start + batch_size], dtype=np.float32))[:, None].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(x)
            recon[start:start + len(x)] = out.recon.float().clamp(0, 1)[:, 0].cpu().numpy()
            indices[start:start + len(x)] = out.vq.indices.cpu().numpy()
    finally:
        model.train(was_training)
    return recon, indices


def validate(model: VQVAE, images: np.ndarray, batch_size: int, device: torch.device, *,
             amp: bool = False) -> dict[str, float | int]:
    """Scores of the whole split images (N, H, W): recon MSE (of the clipped reconstruction), mean SSIM and PSNR,
    perplexity and number of active codes over the split."""
    recon, indices = reconstruct(model, images, batch_size, device, amp=amp)
    target = np.asarray(images, dtype=np.float32)
    ssim, psnr = ssim_psnr(recon, target)
    usage = CodeUsage(model.config.codebook_size)
    usage.update(indices)
    return {"val_recon": float(np.mean((recon - target) ** 2, dtype=np.float64)), "val_ssim": float(ssim.mean()),
            "val_psnr": float(psnr.mean()), "val_perplexity": usage.perplexity, "val_active": usage.active}


def _train_epoch(model: VQVAE, images: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                 config: TrainConfig, device: torch.device, epoch: int, progress: bool) -> dict[str, float]:
    """One pass over images (N, 1, H, W) in a seeded random order; returns the mean losses per image."""
    model.train()
    n = len(images)
    order = torch.randperm(n, generator=_epoch_generator(config.seed, epoch)).to(images.device)
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # total, recon, commitment, codebook (x batch size)
    with tqdm(total=n, desc=f"epoch {epoch}/{config.epochs}", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, n, config.batch_size):
            x = images[order[start:start + config.batch_size]].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
                out = model(x)
            recon_loss = F.mse_loss(out.recon.float(), x)
            loss = recon_loss + out.vq.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            parts = torch.stack([loss, recon_loss, out.vq.commitment, out.vq.codebook_loss]).detach()
            sums += parts.double() * len(x)  # no .item() per step: it would wait for the GPU every batch
            bar.update(len(x))
    total, recon, commitment, codebook = (sums / n).tolist()
    if not math.isfinite(total):
        raise RuntimeError(f"training diverged in epoch {epoch}: the loss is {total}; try a lower learning rate")
    return {"train_loss": total, "train_recon": recon, "train_commitment": commitment, "train_codebook": codebook}


def _check_resumable(path: Path, config: TrainConfig) -> dict[str, Any]:
    payload = load_checkpoint(path)
    missing = [key for key in ("optimizer_state", "scheduler_state", "rng") if key not in payload]
    if missing:
        raise CheckpointError(f"cannot resume from {path}: it lacks {', '.join(missing)}")
    diff = config_diff(payload["train_config"], config.to_dict(), ignore=RESUME_MAY_CHANGE + ("model",))
    diff += config_diff(payload["model_config"], config.model)
    if diff:
        raise CheckpointError(f"cannot resume from {path}: the requested config differs from the run's "
                              f"(only epochs and device may change): {'; '.join(diff)}")
    return payload


def _claim_run_folder(out_dir: Path, overwrite: bool) -> None:
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a run ({', '.join(existing)}); resume it, choose another "
                              "folder or pass overwrite=True (--overwrite) to replace it")
    for name in existing:
        (out_dir / name).unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def train(data_dir: str | Path, out_dir: str | Path, config: TrainConfig, *, resume: bool = False,
          overwrite: bool = False, progress: bool = True,
          callback: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train a VQVAE on the train split of data_dir, validating on the whole validate split after every epoch.

    Writes out_dir/last.pt, best.pt (best validation SSIM) and metrics.json after every epoch. resume: continue
    from last.pt (only `epochs` and `device` may differ from its config; a finished run is returned as is).
    overwrite: replace a run already in out_dir (refused otherwise). callback(record) runs after each epoch's
    files are written.

    Returns the history, one record per epoch: epoch; lr (at the epoch's start); train_loss, train_recon,
    train_commitment, train_codebook (means per image); val_recon (MSE of the clipped reconstruction), val_ssim,
    val_psnr (means over the whole validation split), val_perplexity, val_active (code usage over the whole
    split); restarts (dead codes re-set in the epoch); seconds (training and validation); images_per_s (training).
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    payload = None
    if resume:
        payload = _check_resumable(out_dir / "last.pt", config)
        if payload["epoch"] >= config.epochs:
            log.info("%s already finished %d epochs: nothing to do", out_dir, payload["epoch"])
            return payload["history"]
    else:
        _claim_run_folder(out_dir, overwrite)
    device = select_device(config.device)
    train_split = load_split(data_dir, "train", progress=progress)
    val_images = load_split(data_dir, "validate", progress=progress).images
    images = _resident(train_split.images[:config.limit], device)
    steps = config.epochs * math.ceil(len(images) / config.batch_size)

    # The run's RNG use stays inside: the caller's global RNG state is the same afterwards.
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed)
        model = VQVAE(config.model_config()).to(device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        factor = partial(lr_factor, total_steps=steps, config=config)
        scheduler = LambdaLR(optimizer, factor)
        history: list[dict[str, Any]] = []
        if payload is not None:
            model.load_state_dict(payload["model_state"])
            optimizer.load_state_dict(payload["optimizer_state"])
            scheduler.load_state_dict(payload["scheduler_state"])
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):  # epochs may have changed
                group["lr"] = base * factor(scheduler.last_epoch)
            _set_rng_state(payload["rng"], device)
            history = payload["history"]
        first_epoch = len(history) + 1  # == the checkpoint's epoch + 1
        best_ssim = max((h["val_ssim"] for h in history), default=-math.inf)
        quantizer = _quantizer(model)

        for epoch in range(first_epoch, config.epochs + 1):
            started, restarts_before = time.perf_counter(), quantizer.restarts_total
            record: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
            record.update(_train_epoch(model, images, optimizer, scheduler, config, device, epoch, progress))
            train_seconds = time.perf_counter() - started
            record.update(validate(model, val_images, config.batch_size, device, amp=config.amp))
            record.update(restarts=quantizer.restarts_total - restarts_before,
                          seconds=time.perf_counter() - started, images_per_s=len(images) / train_seconds)
            history.append(record)

            state = {"model_config": model.config.to_dict(), "train_config": config.to_dict(),
                     "model_state": model.state_dict(), "epoch": epoch, "history": history}
            # best.pt first: if interrupted before last.pt, the resumed run redoes this epoch and rewrites both.
            if record["val_ssim"] > best_ssim:
                best_ssim = record["val_ssim"]
                save_checkpoint(out_dir / "best.pt", state)
            save_checkpoint(out_dir / "last.pt", {**state, "optimizer_state": optimizer.state_dict(),
                                                  "scheduler_state": scheduler.state_dict(),
                                                  "rng": _rng_state(device)})
            save_json(out_dir / "metrics.json", history)
            log.debug("epoch %d/%d: loss %.4g, val SSIM %.4f, PSNR %.2f dB, %d active codes", epoch, config.epochs,
                      record["train_loss"], record["val_ssim"], record["val_psnr"], record["val_active"])
            if callback is not None:
                callback(record)
    return history


def evaluate(checkpoint: str | Path, data_dir: str | Path, split: str = "test", *, batch_size: int = 64,
             device: str = "auto", amp: bool | None = None, progress: bool = True) -> dict[str, Any]:
    """Score a checkpoint on every slice of a split.

    amp: bf16 autocast; None uses the checkpoint's training setting (so "validate" reproduces its val_ssim).
    Returns {"checkpoint", "split", "epoch", "names" (N,), "cases" (N,), "weeks" (N,), "slices" (N,),
    "ssim" (N,), "psnr" (N,), "code_counts" (K,), "summary": {"n_slices", "ssim_mean", "ssim_min", "ssim_max",
    "psnr_mean", "psnr_min", "psnr_max", "active_codes", "perplexity", "codebook_size", "epoch"}}.
    """
    dev = select_device(device)
    model, payload = load_model(checkpoint, map_location=dev)
    if amp is None:
        amp = bool(payload["train_config"].get("amp", False))
    data = load_split(data_dir, split, progress=progress)
    recon, indices = reconstruct(model, data.images, batch_size, dev, amp=amp, progress=progress)
    ssim, psnr = ssim_psnr(recon, np.asarray(data.images))
    usage = CodeUsage(model.config.codebook_size)
    usage.update(indices)
    summary = {"n_slices": len(data), "ssim_mean": float(ssim.mean()), "ssim_min": float(ssim.min()),
               "ssim_max": float(ssim.max()), "psnr_mean": float(psnr.mean()), "psnr_min": float(psnr.min()),
               "psnr_max": float(psnr.max()), "active_codes": usage.active, "perplexity": usage.perplexity,
               "codebook_size": model.config.codebook_size, "epoch": int(payload["epoch"])}
    return {"checkpoint": str(checkpoint), "split": split, "epoch": int(payload["epoch"]),
            "names": [f.name for f in data.files], "cases": data.cases, "weeks": data.weeks, "slices": data.indices,
            "ssim": ssim, "psnr": psnr, "code_counts": usage.counts, "summary": summary}
