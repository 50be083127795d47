"""Run folders shared by every model we train (VQ-VAE, VAE, prior): claim or resume, then the epoch loop.

A run folder holds ``last.pt`` (everything needed to resume), ``best.pt`` (the model of the best validation
epoch) and ``metrics.json`` (the history), all rewritten atomically after every epoch, so an interrupted run
loses at most the epoch in progress. A resumed run restores the weights, optimizer, scheduler and RNG, so on CPU
it gives the same weights and history as one that was never interrupted.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from .checkpoint import CheckpointError, config_diff, load_checkpoint, save_checkpoint
from .fileio import save_json

RUN_FILES = ("last.pt", "best.pt", "metrics.json")
RESUME_MAY_CHANGE = ("epochs", "device")  # what a resumed run may ask for differently


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded by (seed, epoch): an epoch's order does not depend on the epochs before it."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def cuda_devices(device: torch.device) -> list[int]:
    """The CUDA device indices whose RNG a run on `device` uses (for torch.random.fork_rng)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def start(out_dir: str | Path, kind: str, train_config: dict[str, Any], model_config: dict[str, Any], *,
          resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Claim out_dir for a new run (None), or check that its last.pt can be resumed with these configs (its payload).

    A new run is refused where out_dir already holds one, unless overwrite. Resuming is refused (CheckpointError)
    when last.pt is of another kind, lacks the resume state, or differs from the configs in more than
    RESUME_MAY_CHANGE.
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if resume:
        path = out_dir / "last.pt"
        payload = load_resume(out_dir, kind)
        diff = config_diff(payload["train_config"], train_config, ignore=RESUME_MAY_CHANGE + ("model",))
        diff += config_diff(payload["model_config"], model_config)
        if diff:
            raise CheckpointError(f"cannot resume from {path}: the requested config differs from the run's "
                                  f"(only epochs and device may change): {'; '.join(diff)}")
        return payload
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a run ({', '.join(existing)}); resume it, choose another "
                              "folder or pass overwrite=True (--overwrite) to replace it")
    for name in existing:
        (out_dir / name).unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    return None


def load_resume(out_dir: str | Path, kind: str) -> dict[str, Any]:
    """The payload of out_dir/last.pt, checked to be of `kind` and to hold the resume state (CheckpointError)."""
    path = Path(out_dir) / "last.pt"
    payload = load_checkpoint(path, kind=kind)
    missing = [key for key in ("optimizer_state", "scheduler_state", "rng") if key not in payload]
    if missing:
        raise CheckpointError(f"cannot resume from {path}: it lacks {', '.join(missing)}")
    return payload


def fit(out_dir: str | Path, *, kind: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        scheduler: LambdaLR, payload: dict[str, Any] | None, train_config: dict[str, Any],
        model_config: dict[str, Any], epochs: int, device: torch.device,
        one_epoch: Callable[[int], dict[str, Any]], score: Callable[[], dict[str, Any]], best: str,
        minimize: bool = False, extra: dict[str, Any] | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None, main: bool = True) -> list[dict[str, Any]]:
    """Train epochs len(history) + 1 .. epochs, writing the run folder after each; returns the history.

    payload: what `start` returned (None for a new run): its weights, optimizer, scheduler and RNG states are
    restored first. one_epoch(epoch) trains one epoch and returns its record fields; score() validates. The
    record of an epoch is {"epoch", "lr" (at its start), **one_epoch, **score, "seconds"}; best.pt holds the
    epoch with the highest (or, with minimize, lowest) record[best]. extra: more plain values for both checkpoints.
    callback(record) runs after the files are written. main=False (the other processes of a data-parallel run):
    train only; no scoring, files or callback, and the history holds the one_epoch fields.
    """
    out_dir = Path(out_dir)
    history: list[dict[str, Any]] = []
    if payload is not None:
        model.load_state_dict(payload["model_state"])
        optimizer.load_state_dict(payload["optimizer_state"])
        scheduler.load_state_dict(payload["scheduler_state"])
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):  # epochs may have changed
            group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
        _set_rng_state(payload["rng"], device)
        history = payload["history"]
    sign = -1.0 if minimize else 1.0
    best_value = max((sign * h[best] for h in history), default=-math.inf)
    for epoch in range(len(history) + 1, epochs + 1):
        started = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        record.update(one_epoch(epoch))
        if not main:
            history.append(record)
            continue
        record.update(score())
        record["seconds"] = time.perf_counter() - started
        history.append(record)

        state = {**(extra or {}), "kind": kind, "model_config": model_config, "train_config": train_config,
                 "model_state": model.state_dict(), "epoch": epoch, "history": history}
        # best.pt first: if interrupted before last.pt, the resumed run redoes this epoch and rewrites both.
        if sign * record[best] > best_value:
            best_value = sign * record[best]
            save_checkpoint(out_dir / "best.pt", state)
        save_checkpoint(out_dir / "last.pt", {**state, "optimizer_state": optimizer.state_dict(),
                                              "scheduler_state": scheduler.state_dict(), "rng": _rng_state(device)})
        save_json(out_dir / "metrics.json", history)
        if callback is not None:
            callback(record)
    return history
