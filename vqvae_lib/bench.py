"""Benchmarks: our data path and training pipeline against the common recipe of published HipMRI VQ-VAEs.

Everything is measured in one run on the same data and machine, so the ratios are fair (absolute speeds on a
shared machine move from run to run; ratios measured side by side much less):

- data: the first decode of every NIfTI file into a fresh cache (files/s), reloading the cached splits into
  memory, and the peak memory of both;
- training: images/s of the common recipe (a Dataset that opens, decodes and resizes each file when it is
  asked for, a DataLoader with one worker, fp32, batch 32, the `seed` preset's model), of our pipeline with
  that same model (the split resident in device memory, mixed precision as `train.resolve_precision` picks
  it, channels-last: `train.train_epoch`), and of our pipeline with the default preset;
- evaluation: slices/s to reconstruct a split and score every slice (SSIM and PSNR).
"""

from __future__ import annotations

import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from skimage.transform import resize
from torch.utils.data import DataLoader, Dataset

from . import data
from .checkpoint import load_model
from .metrics import ssim_psnr
from .model import VQVAE
from .train import (TrainConfig, checkpoint_precision, compile_model, for_device, grad_scaler, make_config,
                    prepare_model, reconstruct, resident_images, resolve_precision, select_device, train_epoch)

BATCH = 32


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model and cores, torch and its threads, the GPU if any."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return {"cpu": names[0] if names else platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS reports bytes, Linux kilobytes


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so the clock reads the time it took."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def bench_data(data_dir: str | Path, workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """First decode of all three splits into a fresh cache, then their cached reload into memory (as training
    loads its split), with the peak memory (RSS) of this process after each."""
    before = _peak_rss_mb()
    with tempfile.TemporaryDirectory(prefix="hipmri-bench-cache-") as cache:
        started = time.perf_counter()
        files = sum(len(data.load_split(data_dir, s, cache_dir=cache, workers=workers, progress=progress))
                    for s in data.SPLITS)
        decode_s, decode_peak = time.perf_counter() - started, _peak_rss_mb()
        reload_s = []
        for _ in range(2):  # right after writing the cache, then again (the file pages now in the OS's cache)
            started = time.perf_counter()
            splits = [data.load_split(data_dir, s, cache_dir=cache, progress=False, memory_map=False)
                      for s in data.SPLITS]
            reload_s.append(time.perf_counter() - started)
            loaded_mb = sum(split.images.nbytes for split in splits) / 2**20
            del splits
    return {"files": files, "decode_s": decode_s, "decode_files_per_s": files / decode_s,
            "decode_workers": data.decode_workers() if workers is None else workers, "reload_s": reload_s[0],
            "reload_again_s": reload_s[1], "reload_mb": loaded_mb, "rss_before_mb": before,
            "decode_peak_rss_mb": decode_peak, "peak_rss_mb": _peak_rss_mb()}


class PerFileSlices(Dataset):
    """The common recipe's dataset: each item opens its NIfTI file, resizes it to 256 x 128 and scales it to
    [0, 1] by its minimum and maximum."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = np.squeeze(nib.load(self.files[i]).get_fdata())
        image = resize(image, data.WORK_SHAPE, preserve_range=True)
        image = (image - image.min()) / max(image.max() - image.min(), 1e-8)
        return torch.from_numpy(image.astype(np.float32))[None]


def _timed(run: Callable[[Any], int], warmup: int, steps: int | None, device: torch.device) -> float:
    """Images per second of run(steps) after run(warmup) (none with warmup=0); run(n) trains n steps and returns
    the images seen."""
    if warmup:
        run(warmup)
    _sync(device)
    started = time.perf_counter()
    images = run(steps)
    _sync(device)
    return images / (time.perf_counter() - started)


def bench_common_recipe(files: list[Path], device: torch.device, warmup: int, steps: int) -> float:
    """Images/s of the common recipe: per-item file loading in a DataLoader (one worker), fp32, batch 32."""
    torch.manual_seed(0)
    config = make_config("seed")
    model = VQVAE(config.model_config()).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loader = DataLoader(PerFileSlices(files), batch_size=BATCH, shuffle=True, num_workers=1, drop_last=True,
                        generator=torch.Generator().manual_seed(0), pin_memory=device.type == "cuda")
    batches = iter(loader)

    def run(n: int) -> int:
        for _ in range(n):
            x = next(batches).to(device, non_blocking=True)
            out = model(x)
            loss = F.mse_loss(out.recon, x) + out.vq.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return n * BATCH

    if (warmup + steps) * BATCH > len(files):
        raise ValueError(f"{warmup + steps} steps of {BATCH} need {(warmup + steps) * BATCH} slices; "
                         f"the data has {len(files)}")
    return _timed(run, warmup, steps, device)


def bench_pipeline(config: TrainConfig, images: torch.Tensor, device: torch.device, warmup: int,
                   steps: int | None, compile: bool = False, progress: bool = False) -> float:
    """Images/s of our training loop (`train.train_epoch`) with `config` on the resident images (N, 1, H, W):
    `steps` batches, or with steps=None one whole epoch over all of them."""
    torch.manual_seed(0)
    config = for_device(config, device)
    total = warmup + (steps if steps is not None else math.ceil(len(images) / BATCH))  # the schedule's length
    model, optimizer, scheduler = prepare_model(VQVAE(config.model_config()), config, device, total)
    scaler = grad_scaler(config.precision, device)
    if compile:
        compile_model(model)

    def run(n: int | None) -> int:
        subset = images if n is None else images[:n * BATCH]
        if n == warmup and steps is None:  # warm up on the epoch's last, partial batch size too (a compiled
            subset = images[:n * BATCH + len(images) % BATCH]  # model compiles once more for a new shape)
        train_epoch(model, subset, optimizer, scheduler, config, device, epoch=1, progress=progress and n is None,
                    scaler=scaler)
        return len(subset)

    return _timed(run, warmup, steps, device)


def bench_eval(model: VQVAE, images: np.ndarray, device: torch.device, amp: bool | str) -> float:
    """Slices/s to reconstruct images (N, H, W) and score each (SSIM and PSNR); amp as in `train.reconstruct`."""
    started = time.perf_counter()
    recon, _ = reconstruct(model, images, 64, device, amp=amp)
    ssim_psnr(recon, images)
    return len(images) / (time.perf_counter() - started)


def run(data_dir: str | Path, *, device: str = "auto", warmup: int = 2, steps: int = 20,
        checkpoint: str | Path | None = None, compile: bool = False, workers: int | None = None,
        full_epoch: bool | None = None, progress: bool = True,
        report: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Every benchmark, in order; report(line) is called with a readable line as each result arrives.

    checkpoint: the VQ-VAE for the evaluation benchmark (default: a fresh model of the default preset).
    full_epoch: also time one whole epoch of the default preset over the training split (default: on CUDA only;
    on a CPU it takes minutes). Returns {"machine", "device", "data", "train", "eval"}.
    """
    dev = select_device(device)
    result: dict[str, Any] = {"machine": machine(), "device": str(dev)}
    m = result["machine"]
    report(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)"
           + (f", GPU {m['gpu']}" if m["gpu"] else "") + f"; benchmarking on {dev}")

    d = result["data"] = bench_data(data_dir, workers, progress)
    report(f"data: first decode of {d['files']:,} files {d['decode_s']:.1f} s ({d['decode_files_per_s']:.0f} "
           f"files/s, {d['decode_workers']} threads); cached reload into memory {d['reload_s']:.2f} s, again "
           f"{d['reload_again_s']:.2f} s ({d['reload_mb']:,.0f} MB); peak memory of this process "
           f"{d['rss_before_mb']:,.0f} MB before, {d['decode_peak_rss_mb']:,.0f} MB decoding, "
           f"{d['peak_rss_mb']:,.0f} MB reloading")

    split = data.load_split(data_dir, "train", progress=progress, memory_map=False)
    images = resident_images(split.images, dev)
    common = bench_common_recipe([f.path for f in split.files], dev, warmup, steps)
    ours_same = bench_pipeline(make_config("seed", amp=True, channels_last=True), images, dev, warmup, steps,
                               compile)
    default = bench_pipeline(make_config("default"), images, dev, warmup, steps, compile)
    precision = resolve_precision(make_config("default"), dev)
    t = result["train"] = {"steps": steps, "batch_size": BATCH, "common_recipe_images_per_s": common,
                           "ours_seed_model_images_per_s": ours_same, "ours_default_images_per_s": default,
                           "ratio_same_model": ours_same / common, "ratio_default": default / common,
                           "compile": compile, "precision": precision}
    report(f"train ({steps} steps of {BATCH} after {warmup} warm-up): common recipe {common:.1f} img/s; ours "
           f"({precision}), same model {ours_same:.1f} img/s = {t['ratio_same_model']:.2f}x; ours, default preset "
           f"{default:.1f} img/s = {t['ratio_default']:.2f}x the common recipe")

    if dev.type == "cuda" if full_epoch is None else full_epoch:
        rate = bench_pipeline(make_config("default"), images, dev, warmup, None, compile, progress)
        t["default_epoch_s"] = len(images) / rate
        report(f"one epoch of the default preset over {len(images):,} slices: {t['default_epoch_s']:.1f} s")
    del images

    test = data.load_split(data_dir, "test", progress=progress).images
    if checkpoint is not None:
        model, payload = load_model(checkpoint, map_location=dev)
        precision = checkpoint_precision(payload, dev)
    else:
        torch.manual_seed(0)
        model = VQVAE(make_config("default").model_config()).to(dev)  # in the default preset's precision
    rate = bench_eval(model, test, dev, precision)
    result["eval"] = {"slices": len(test), "slices_per_s": rate, "precision": precision,
                      "checkpoint": str(checkpoint) if checkpoint is not None else None}
    report(f"eval: reconstruct + SSIM/PSNR of {len(test)} test slices ({precision}) {rate:.0f} slices/s")
    return result
