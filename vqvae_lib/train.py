"""Train and evaluate a VQ-VAE on HipMRI slices: recipes (presets), the training loop, resuming, evaluation.

Run folders (config.json, last.pt, best.pt, metrics.json/.csv, resuming) are handled by `runs`. On CPU, a run
is exactly reproducible from its seed, and a resumed run gives the same weights and history as one that was
never interrupted. Under ``torchrun --nproc_per_node=N`` the same run trains data-parallel (`distributed`):
each process takes its share of every global batch of `batch_size` slices. Mixed precision follows the
hardware (`resolve_precision`): bf16 autocast on the CPU and on GPUs with native bf16, fp16 autocast with a
GradScaler on older GPUs (T4, V100), fp32 on Apple MPS; the quantizer stays fp32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from . import distributed, runs
from .checkpoint import load_model
from .data import load_split
from .metrics import CodeUsage, bootstrap_interval, scan_means, score_summary, ssim_gaussian, ssim_psnr, ssim_torch
from .model import VQVAE, ModelConfig


# The recipes, in one place. "model" holds ModelConfig fields; everything else is a TrainConfig field.
PRESETS: dict[str, dict[str, Any]] = {
    # The common published recipe: 8x grid, 512 x 128 codebook learned by the VQ loss, Adam 1e-3, fp32.
    "seed": {
        "model": dict(hidden=128, res_hidden=32, n_res=2, downsample=8, codebook_size=512, embed_dim=128,
                      beta=0.25, ema=False, init="uniform", restart=False),
        "epochs": 20, "batch_size": 32, "lr": 1e-3, "schedule": "constant", "warmup": 0.0, "final_lr": 1.0,
        "amp": False, "channels_last": False,
    },
    # Our recipe: 4x grid, EMA codebook with k-means init and restarts, MSE + 0.5 (1 - SSIM), warm-up + cosine,
    # mixed precision (bf16 where the hardware has it), channels_last.
    "default": {
        "model": dict(hidden=64, res_hidden=32, n_res=2, downsample=4, codebook_size=512, embed_dim=64,
                      beta=0.25, ema=True, decay=0.99, usage_decay=0.9, init="kmeans", restart=True),
        "epochs": 30, "batch_size": 32, "lr": 1e-3, "schedule": "cosine", "warmup": 0.03, "final_lr": 0.1,
        "amp": True, "channels_last": True, "ssim_weight": 0.5,
    },
}
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_run_settings(config: Any) -> None:
    """ValueError for a bad epochs, batch_size, lr, schedule, warmup, final_lr, limit or precision (of any run
    config)."""
    checks = [
        (config.epochs >= 1, f"epochs must be >= 1, got {config.epochs}"),
        (config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}"),
        (config.lr > 0, f"lr must be > 0, got {config.lr}"),
        (config.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, not {config.schedule!r}"),
        (0 <= config.warmup < 1, f"warmup must be a fraction of the steps in [0, 1), got {config.warmup}"),
        (0 <= config.final_lr <= 1, f"final_lr must be a fraction of lr in [0, 1], got {config.final_lr}"),
        (config.limit is None or config.limit >= 1, f"limit must be None or >= 1, got {config.limit}"),
        (config.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, not {config.precision!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def run_config(train_cls: type, model_cls: type, what: str, settings: dict[str, Any]) -> Any:
    """A run config `train_cls` (a prior's or a feature network's) from settings that mix its own fields and
    those of its model config `model_cls` (e.g. epochs=2, channels=32); ValueError naming unknown `what` settings."""
    model_fields = {f.name for f in dataclasses.fields(model_cls)}
    train_fields = {f.name for f in dataclasses.fields(train_cls)}
    unknown = sorted(set(settings) - model_fields - train_fields)
    if unknown:
        raise ValueError(f"unknown {what} settings {', '.join(unknown)}; "
                         f"train settings: {', '.join(sorted(train_fields))}; "
                         f"model settings: {', '.join(sorted(model_fields))}")
    settings = dict(settings)
    model = {**settings.pop("model", {}), **{k: settings.pop(k) for k in model_fields & set(settings)}}
    return train_cls(**settings, model=model)


def optimizer_for(model: torch.nn.Module, config: Any, steps: int) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """Adam at config.lr and the scheduler of config's schedule over `steps` optimiser steps.

    The fused Adam (one kernel for all parameters, its step counts on the device) where the parameters' device
    has one: the for-each Adam reads every parameter's step count on the host, dozens of reads a step.
    """
    device = next(model.parameters()).device
    fused = device.type in ("cpu", "cuda", "mps")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=fused)
    return optimizer, LambdaLR(optimizer, partial(lr_factor, total_steps=steps, config=config))


def prepare_model(model: torch.nn.Module, config: TrainConfig, device: torch.device, steps: int
                  ) -> tuple[torch.nn.Module, torch.optim.Optimizer, LambdaLR]:
    """The model on `device` (channels-last if the config says so), with its optimizer and scheduler."""
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return (model, *optimizer_for(model, config, steps))


@dataclass
class TrainConfig:
    """Everything that defines a training run. Build one with `make_config`.

    schedule: "constant", or "cosine": linear warm-up over the first `warmup` fraction of all steps, then
    cosine decay to `final_lr` x lr at the last step. ssim_weight: the reconstruction loss is
    MSE + ssim_weight x (1 - SSIM) (0: MSE alone, as in the paper). normalize_mse: divide that MSE by the
    variance of the training slices, as DeepMind's sonnet example does (it changes what beta weighs the
    commitment loss against). amp: the recipe wants mixed precision.
    precision: "auto" (fp32 without amp; with amp what the device does best: bf16 on the CPU and GPUs with
    native bf16, fp16 with a GradScaler on older GPUs, fp32 on MPS), or "bf16", "fp16" or "fp32" whatever amp
    says (`resolve_precision`; the quantizer always computes in fp32). limit: train on the first `limit`
    training slices only (smoke runs, tests). model: the full ModelConfig as a dict. device: "auto", "cpu",
    "cuda", "cuda:N" or "mps".
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
    ssim_weight: float = 0.0
    normalize_mse: bool = False
    seed: int = 0
    device: str = "auto"
    limit: int | None = None
    precision: str = "auto"  # configs saved before it existed load as "auto"

    def __post_init__(self) -> None:
        check_run_settings(self)
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, not {self.preset!r}")
        if self.ssim_weight < 0:
            raise ValueError(f"ssim_weight must be >= 0, got {self.ssim_weight}")
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


def _native_bf16(device: torch.device) -> bool:
    """Whether CUDA `device` computes bf16 natively (compute capability 8.0 or later: Ampere on). torch's check
    without emulation, and this device's capability (that check looks at the current device only)."""
    return (torch.cuda.is_bf16_supported(including_emulation=False)
            and torch.cuda.get_device_capability(device) >= (8, 0))


def resolve_precision(config: Any, device: torch.device) -> str:
    """The precision ("bf16", "fp16" or "fp32") a run of `config` (TrainConfig or PriorTrainConfig) trains in on
    `device`.

    "auto": fp32 without amp; with amp bf16 on the CPU and on GPUs with native bf16 (compute capability 8.0 or
    later), fp16 (with a GradScaler) on older GPUs (T4, V100), fp32 on Apple MPS. An explicit precision is kept;
    ValueError for bf16 on a GPU without native bf16 and for bf16 or fp16 on MPS.
    """
    precision = config.precision  # one of PRECISIONS: `check_run_settings` checked it
    if precision == "auto":
        if not config.amp or device.type == "mps":
            return "fp32"
        return "fp16" if device.type == "cuda" and not _native_bf16(device) else "bf16"
    if precision != "fp32" and device.type == "mps":
        raise ValueError(f"precision {precision} is not supported on {device}, which trains in fp32 here; "
                         "use --precision fp32 or auto")
    if precision == "bf16" and device.type == "cuda" and not _native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"precision bf16 needs a GPU with native bf16 (compute capability 8.0 or later), but "
                         f"{device} ({torch.cuda.get_device_name(device)}) has compute capability {major}.{minor}; "
                         "use --precision fp16 or fp32")
    return precision


def checkpoint_precision(payload: dict[str, Any], device: torch.device) -> str:
    """The precision to run a checkpoint's model in on `device`: the one it trained in (payload["precision"];
    older checkpoints: bf16 if their config asked for amp, else fp32), as far as `device` has it: fp16 for bf16
    on a GPU without native bf16, fp32 on MPS."""
    trained = payload.get("precision") or ("bf16" if payload["train_config"].get("amp", False) else "fp32")
    if device.type == "mps":
        return "fp32"
    if trained == "bf16" and device.type == "cuda" and not _native_bf16(device):
        return "fp16"
    return trained


def autocast(device: torch.device, amp: bool | str) -> torch.autocast:
    """The autocast block of `amp`: a precision ("bf16", "fp16" or "fp32") or a bool (True: bf16, False: fp32)."""
    precision = ("bf16" if amp else "fp32") if isinstance(amp, bool) else amp
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"autocast precision must be bf16, fp16, fp32 or a bool, not {amp!r}")
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES.get(precision, torch.bfloat16),
                          enabled=precision != "fp32")


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """The GradScaler of a run in `precision` on `device`: scaling fp16 losses, and for bf16 and fp32 a disabled
    one (its scale, step and update pass straight through to the loss and optimizer)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                   scaler: torch.amp.GradScaler) -> None:
    """Backpropagate `loss` and take one optimiser and scheduler step, through `scaler`: the loss is scaled and
    scaler.step unscales the gradients before the step (skipping it where they overflowed). Nothing clips
    gradients, so nothing else needs them unscaled."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def for_device(config: Any, device: torch.device) -> Any:
    """The run config (TrainConfig or PriorTrainConfig) as it trains on `device`: its precision resolved
    (`resolve_precision`), and on Apple MPS without channels-last, which MPS does not run well; the saved config
    keeps what was asked for."""
    mps = {"channels_last": False} if device.type == "mps" and hasattr(config, "channels_last") else {}
    return dataclasses.replace(config, precision=resolve_precision(config, device), **mps)


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning-rate multiplier for optimiser step `step` (0-based) of `total_steps`."""
    if config.schedule == "constant":
        return 1.0
    warmup = round(config.warmup * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return config.final_lr + (1 - config.final_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def compile_model(model: VQVAE) -> None:
    """torch.compile the encoder and decoder in place (state_dict keys stay the same); the quantizer, with its
    data-dependent steps (initialisation, restarts), stays eager."""
    model.encoder.compile()
    model.decoder.compile()


@contextlib.contextmanager
def cudnn_autotune(device: torch.device) -> Iterator[None]:
    """On CUDA, let cuDNN time its convolution algorithms for our fixed shapes (`cudnn.benchmark`) for the block;
    the caller's setting is restored afterwards."""
    if device.type != "cuda":
        yield
        return
    before, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def batch_to(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device`. From CPU memory to a GPU through pinned memory, so the copy runs asynchronously (a
    batch indexed out of the pinned split is itself pageable)."""
    if batch.device == device:
        return batch
    if device.type == "cuda" and batch.device.type == "cpu":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def resident_images(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W) array -> (N, 1, H, W) float32 tensor, on `device` when it fits (else in pinned CPU memory).

    On the CPU the tensor shares memory with a writable C-contiguous float32 array; others are copied.
    """
    x = torch.from_numpy(np.require(images, np.float32, ["C", "W"]))[:, None]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return x.to(device) if x.nbytes < free // 2 else x.pin_memory()
    return x.to(device)


@torch.no_grad()
def reconstruct(model: VQVAE, images: np.ndarray, batch_size: int = 64, device: str | torch.device | None = None,
                *, amp: bool | str = False, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Reconstruct images (N, H, W) in [0, 1] in eval mode, batch by batch.

    The model is moved to `device` (default: where it is) and left in the mode it was in. amp: the autocast
    precision, "bf16", "fp16" or "fp32" (True: bf16, False: fp32).
    Returns (recon (N, H, W) float32 clipped to [0, 1], indices (N, h, w) int64 code indices).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    recon = np.empty((len(images), *images.shape[1:]), dtype=np.float32)
    indices = np.empty((len(images), *model.latent_shape(images.shape[1:])), dtype=np.int64)
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="reconstructing", unit="batch",
                          disable=not progress or None, leave=False):
            x = torch.from_numpy(np.array(images[start:start + batch_size], dtype=np.float32))[:, None].to(device)
            with autocast(device, amp):
                out = model(x)
            recon[start:start + len(x)] = out.recon.float().clamp(0, 1)[:, 0].cpu().numpy()
            indices[start:start + len(x)] = out.vq.indices.cpu().numpy()
    finally:
        model.train(was_training)
    return recon, indices


@torch.no_grad()
def validate(model: VQVAE, images: np.ndarray, batch_size: int, device: torch.device, *,
             amp: bool | str = False) -> dict[str, float | int]:
    """Scores of the whole split images (N, H, W): recon MSE (of the clipped reconstruction), mean SSIM and PSNR,
    perplexity and number of active codes over the split. amp: as in `reconstruct`.

    Computed on `device` and read once (SSIM by `ssim_torch`, which matches scikit-image's to about 1e-5, so a
    GPU does not wait for the CPU every epoch); `evaluate` reports scikit-image's own numbers.
    """
    was_training = model.training
    model.to(device).eval()
    sums = torch.zeros(3, device=device)  # MSE, SSIM, PSNR, summed over the images
    counts = torch.zeros(model.config.codebook_size, device=device)
    try:
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[start:start + batch_size], dtype=np.float32))[:, None].to(device)
            with autocast(device, amp):
                out = model(x)
            recon = out.recon.float().clamp(0, 1)
            mse = (recon - x).pow(2).mean((1, 2, 3))
            sums += torch.stack([mse.sum(), ssim_torch(recon, x).sum(), (-10 * torch.log10(mse)).sum()])
            indices = out.vq.indices.flatten()
            counts.index_add_(0, indices, counts.new_ones(len(indices)))
    finally:
        model.train(was_training)
    mse, ssim, psnr = (sums / len(images)).tolist()
    usage = CodeUsage(model.config.codebook_size)
    usage.add(counts.cpu().numpy())
    return {"val_recon": mse, "val_ssim": ssim, "val_psnr": psnr, "val_perplexity": usage.perplexity,
            "val_active": usage.active}


def global_batches(n: int, batch_size: int, world: int = 1) -> list[tuple[int, int]]:
    """(start, stop) of each global batch of an epoch over n slices. With `world` processes each batch is split
    between them, so a last batch of fewer than `world` slices is left out (it could not feed every process)."""
    batches = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    return [(a, b) for a, b in batches if b - a >= world]


def train_epoch(net: torch.nn.Module, images: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                config: TrainConfig, device: torch.device, epoch: int, progress: bool,
                scaler: torch.amp.GradScaler | None = None, mse_scale: float = 1.0) -> dict[str, float]:
    """One pass over images (N, 1, H, W) in a seeded random order; returns the mean losses (and SSIM) per image.

    The loss is mse_scale x MSE + the VQ loss (+ the SSIM term); train_recon reports the unscaled MSE.

    Trains in config's precision on `device` (`resolve_precision`). scaler: the run's `grad_scaler`, which keeps
    its scale from epoch to epoch (needed for fp16; bf16 and fp32 need none). net: the model, or its
    DistributedDataParallel wrapper. Data-parallel: every process draws
    the same order and trains on its contiguous share of each global batch; its loss is weighted by its share, so
    the averaged gradient is that of the whole global batch.
    """
    precision = resolve_precision(config, device)
    if scaler is None:
        if precision == "fp16":
            raise ValueError("fp16 training needs the run's GradScaler: pass scaler=grad_scaler('fp16', device)")
        scaler = grad_scaler(precision, device)
    net.train()
    world, rank = distributed.world_size(), distributed.rank()
    batches = global_batches(len(images), config.batch_size, world)
    order = torch.randperm(len(images), generator=runs.epoch_generator(config.seed, epoch)).to(images.device)
    # total, MSE, SSIM, commitment, codebook (x batch size), summed on the device in float32 (MPS has no float64)
    sums = torch.zeros(5, device=device)
    seen = sum(b - a for a, b in batches)
    with tqdm(total=seen, desc=f"epoch {epoch}/{config.epochs}", unit="img", disable=not progress or None,
              leave=False) as bar:
        for start, stop in batches:
            mine = torch.tensor_split(order[start:stop], world)[rank]
            x = batch_to(images[mine], device)
            with autocast(device, precision):
                out = net(x)
            recon = out.recon.float()
            mse, ssim = F.mse_loss(recon, x), ssim_torch(recon, x).mean()
            loss = mse_scale * mse + out.vq.loss
            if config.ssim_weight:
                loss = loss + config.ssim_weight * (1 - ssim)
            # weighted by this process's share of the batch: DDP divides the summed gradients by world
            optimizer_step(loss * (len(x) * world / (stop - start)), optimizer, scheduler, scaler)
            parts = torch.stack([loss, mse, ssim, out.vq.commitment, out.vq.codebook_loss]).detach()
            sums += parts * len(x)  # no .item() per step: it would wait for the GPU every batch
            bar.update(stop - start)
    total, mse, ssim, commitment, codebook = (distributed.all_reduce_sum(sums) / seen).tolist()
    if not math.isfinite(total):
        raise RuntimeError(f"training diverged in epoch {epoch}: the loss is {total}; try a lower learning rate")
    return {"train_loss": total, "train_recon": mse, "train_ssim": ssim, "train_commitment": commitment,
            "train_codebook": codebook}


def train(data_dir: str | Path, out_dir: str | Path, config: TrainConfig, *, resume: bool = False,
          overwrite: bool = False, progress: bool = True, compile: bool = False,
          data_options: dict[str, Any] | None = None, allow_other_data: bool = False,
          callback: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train a VQVAE on the train split of data_dir, validating on the whole validate split after every epoch.

    Writes out_dir/config.json at the start, then last.pt, best.pt (best validation SSIM), metrics.json and
    metrics.csv after every epoch (`runs.fit`),
    holding the folder's lock meanwhile (`runs.claim`). resume: continue from last.pt (only `epochs` and
    `device` may differ from its config; a finished run is returned as is; a folder without a finished epoch
    starts from scratch); a resume on other data than the run's is refused unless allow_other_data.
    overwrite: replace a VQ-VAE run already in out_dir (refused otherwise), once the new run has finished its
    first epoch. data_options: `load_split` options (`runs.DATA_OPTIONS`: shape_policy, normalization, cache).
    compile: `compile_model` first (worth it on a GPU; checkpoints are the same). callback(record) runs after
    each epoch's files are written.

    Under torchrun (several processes) the run is data-parallel: rank 0 claims the folder, builds the data cache
    first, validates, writes the files and calls `callback`; every process returns the same history.

    Returns the history, one record per epoch: epoch; lr (at the epoch's start); train_loss, train_recon (MSE),
    train_ssim, train_commitment, train_codebook (means per image, in training mode); restarts (dead codes re-set
    in the epoch); images_per_s (training, all processes); precision (the one it trained in:
    `resolve_precision`; also stored in the checkpoints); val_recon (MSE of the clipped reconstruction),
    val_ssim, val_psnr (means over the whole validation split), val_perplexity, val_active (code usage over the
    whole split); seconds (training and validation); data-parallel runs also replica_divergence (the largest
    difference of any weight or codebook entry between processes after the epoch: 0.0 when they agree).
    """
    options = runs.data_options(data_options)
    runs.check_data_dir(data_dir)
    with distributed.process_group(config.device), contextlib.ExitStack() as stack:
        main = distributed.is_main()
        payload = distributed.main_first(
            lambda: stack.enter_context(runs.claim(out_dir, "vqvae", config.to_dict(), config.model, resume=resume,
                                                   overwrite=overwrite, inputs=(data_dir,))),
            lambda: runs.load_resume(out_dir, "vqvae") if resume and (Path(out_dir) / "last.pt").exists() else None)
        device = distributed.local_device(select_device(config.device))
        saved, config = config, for_device(config, device)
        compile = compile and device.type != "mps"  # torch.compile does not support MPS well yet
        train_split, val_split = distributed.main_first(lambda: (
            load_split(data_dir, "train", progress=progress and main, memory_map=False, **options),
            load_split(data_dir, "validate", progress=progress and main, **options)))
        record = runs.data_record(data_dir, [train_split, val_split], options)
        images = resident_images(train_split.images[:config.limit], device)
        del train_split
        batches = global_batches(len(images), config.batch_size, distributed.world_size())
        steps, per_epoch = config.epochs * len(batches), sum(stop - start for start, stop in batches)
        mse_scale = 1.0 / float(images.var()) if config.normalize_mse else 1.0

        # The run's RNG use stays inside: the caller's global RNG state is the same afterwards.
        with torch.random.fork_rng(devices=runs.cuda_devices(device)), cudnn_autotune(device):
            torch.manual_seed(config.seed)
            model, optimizer, scheduler = prepare_model(VQVAE(config.model_config()), config, device, steps)
            if compile:
                compile_model(model)
            net = distributed.wrap(model, device)
            quantizer = model.quantizer
            scaler = grad_scaler(config.precision, device)

            def one_epoch(epoch: int) -> dict[str, Any]:
                started, restarts_before = time.perf_counter(), quantizer.restarts_total
                record = train_epoch(net, images, optimizer, scheduler, config, device, epoch, progress and main,
                                     scaler, mse_scale)
                record.update(restarts=quantizer.restarts_total - restarts_before,
                              images_per_s=per_epoch / (time.perf_counter() - started), precision=config.precision)
                if distributed.active():
                    record["replica_divergence"] = distributed.replica_divergence(model)
                return record

            history = runs.fit(out_dir, kind="vqvae", model=model, optimizer=optimizer, scheduler=scheduler,
                               scaler=scaler, payload=payload, train_config=saved.to_dict(),
                               model_config=model.config.to_dict(), epochs=config.epochs, device=device,
                               one_epoch=one_epoch, best="val_ssim", extra={"precision": config.precision},
                               data=record, allow_other_data=allow_other_data, callback=callback, main=main,
                               score=lambda: validate(model, val_split.images, config.batch_size, device,
                                                      amp=config.precision))
        return distributed.broadcast_object(history)


def evaluate(checkpoint: str | Path, data_dir: str | Path, split: str = "test", *, batch_size: int = 64,
             device: str = "auto", amp: bool | str | None = None, progress: bool = True,
             data_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score a checkpoint on every slice of a split.

    amp: the autocast precision, as in `reconstruct`; None: the one it trained in, as far as the device has it
    (`checkpoint_precision`; so "validate" reproduces its val_ssim).
    data_options: `load_split` options (`runs.DATA_OPTIONS`).
    Returns {"checkpoint", "split", "epoch", "names" (N,), "cases" (N,), "weeks" (N,), "slices" (N,),
    "ssim" (N,) (skimage's default: 7x7 uniform window), "ssim_gaussian" (N,) (Wang et al. 2004: 11x11 Gaussian),
    "psnr" (N,), "code_counts" (K,), "scans": [{"case", "week", "n_slices", "ssim", "ssim_gaussian", "psnr"}]
    (S per-scan means, sorted by case and week), "summary": {"n_slices", "ssim_mean", "ssim_min", "ssim_max",
    "psnr_mean", "psnr_min", "psnr_max", "active_codes", "perplexity", "codebook_size", "epoch",
    "ssim_gaussian_mean", "ssim_gaussian_min", "ssim_gaussian_max", "n_scans", "n_patients", "scan_ssim_mean",
    "scan_ssim_ci95", "scan_psnr_mean", "scan_psnr_ci95", "scan_ssim_gaussian_mean", "scan_ssim_gaussian_ci95"}}.
    The slices of one scan are strongly correlated, so the scan_* means are means of the per-scan means and their
    ci95 [low, high] a 95 % percentile bootstrap over scans (`bootstrap_interval`; [mean, mean] for one scan).
    """
    dev = select_device(device)
    model, payload = load_model(checkpoint, map_location=dev)
    if amp is None:
        amp = checkpoint_precision(payload, dev)
    data = load_split(data_dir, split, progress=progress, **runs.data_options(data_options))
    recon, indices = reconstruct(model, data.images, batch_size, dev, amp=amp, progress=progress)
    images, cases, weeks = np.asarray(data.images), data.cases, data.weeks
    ssim, psnr = ssim_psnr(recon, images)
    ssim_g = ssim_gaussian(recon, images)
    usage = CodeUsage(model.config.codebook_size)
    usage.update(indices)
    summary = {"n_slices": len(data), **score_summary(ssim, ssim_g, psnr), "active_codes": usage.active,
               "perplexity": usage.perplexity, "codebook_size": model.config.codebook_size,
               "epoch": int(payload["epoch"])}
    per_scan = {name: scan_means(values, cases, weeks) for name, values in
                (("ssim", ssim), ("ssim_gaussian", ssim_g), ("psnr", psnr))}
    scans = [{"case": case, "week": week, "n_slices": int(((cases == case) & (weeks == week)).sum()),
              **{name: float(means[i]) for name, (_, means) in per_scan.items()}}
             for i, (case, week) in enumerate(per_scan["ssim"][0])]
    summary.update(n_scans=len(scans), n_patients=len({scan["case"] for scan in scans}))
    for name, (_, means) in per_scan.items():
        summary[f"scan_{name}_mean"] = float(means.mean())
        summary[f"scan_{name}_ci95"] = list(bootstrap_interval(means))
    return {"checkpoint": str(checkpoint), "split": split, "epoch": int(payload["epoch"]),
            "names": [f.name for f in data.files], "cases": cases, "weeks": weeks, "slices": data.indices,
            "ssim": ssim, "ssim_gaussian": ssim_g, "psnr": psnr, "code_counts": usage.counts, "scans": scans,
            "summary": summary}
