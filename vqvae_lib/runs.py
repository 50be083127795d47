"""Run folders shared by every model we train (VQ-VAE, VAE, prior): claim, lock, resume, replace, then the epochs.

A run folder holds ``config.json`` (how the run was started: its configs, data, command line and versions;
written when it starts and on every resume), ``last.pt`` (everything needed to resume), ``best.pt`` (the model
of the best validation epoch) and ``metrics.json`` and ``metrics.csv`` (the history), the last four rewritten
atomically after every epoch in that order, so an interrupted run loses at most the epoch in progress and can
always be resumed: a resumed run first rewrites a ``best.pt`` or metrics file that a kill left behind its
``last.pt``. A resumed run restores the weights,
optimizer, scheduler and RNG, so on CPU it gives the same weights and history as one that was never interrupted.

While a run trains, its folder is locked (``.lock``, holding the process id, host and command): a second run on
the same folder is refused at once, and the lock of a process that died is detected and taken over. Replacing a
run (overwrite) moves the old one into ``.replaced/`` and deletes it only once the new run has finished its first
epoch; if the new run fails or is killed before that, the old run is put back (at once, or by the next run of
the folder). Each run records the data it was trained on (`data_record`); resuming on other data is refused
unless asked for.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import hashlib
import io
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import psutil
import torch
from torch.optim.lr_scheduler import LambdaLR

from . import __version__
from .checkpoint import CheckpointError, config_diff, load_checkpoint, save_checkpoint
from .data import DataError, SplitData, file_stats, find_split_dirs
from .fileio import HOST, atomic_write, process_alive, remove_stale_temps, save_json, temp_name
from .model import ModelConfig

log = logging.getLogger(__name__)

RUN_FILES = ("last.pt", "best.pt", "metrics.json")  # a folder holding one of these holds a run
# What replacing a run replaces (the prior also caches its code maps).
RUN_OUTPUTS = (*RUN_FILES, "metrics.csv", "config.json", "maps_*")
RESUME_MAY_CHANGE = ("epochs", "device")  # what a resumed run may ask for differently
RESUME_STATE = ("optimizer_state", "scheduler_state", "rng")
SCALER_STATE = "scaler_state"  # last.pt of an fp16 run also holds its GradScaler's state (`fit`)
CONFIG_DEFAULTS = {"precision": "auto", "normalize_mse": False}  # what a run config saved without them meant
# ... and a model config (VQ-VAE and VAE) saved before the quantizer could be chosen
MODEL_DEFAULTS = {k: v for k, v in ModelConfig().to_dict().items() if k in ("quantizer", "lookup_dim", "fsq_levels")}
# ... and a prior's model config saved before the transformer prior (`prior.PriorConfig`'s defaults)
MODEL_DEFAULTS |= {"arch": "pixelcnn", "dropout": 0.0, "heads": 4, "max_rows": 64, "max_cols": 32}
DATA_OPTIONS = {"shape_policy": "crop", "normalization": "percentile", "cache": True}  # load_split's defaults
LOCK = ".lock"
REPLACED = ".replaced"


class RunError(RuntimeError):
    """A run folder that cannot be used as asked; the message says why and what to do."""


# What `invoked_as` adds to the config.json of the runs started in its block.
_INVOCATION: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("invocation", default={})


@contextlib.contextmanager
def invoked_as(command: list[str], options: dict[str, Any]) -> Iterator[None]:
    """Record in the config.json of the runs started in the block the command line as typed (instead of the
    process's) and its resolved options (plain values), as the CLI knows them."""
    token = _INVOCATION.set({"command": command, "options": options})
    try:
        yield
    finally:
        _INVOCATION.reset(token)


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
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"].cpu())


# ---------------------------------------------------------------------------------------------- inputs


def check_data_dir(data_dir: str | Path, splits: tuple[str, ...] = ("train", "validate")) -> None:
    """DataError unless data_dir is a HipMRI-layout folder with these splits (checked before a run claims its
    folder, so a mistyped path leaves nothing behind)."""
    dirs = find_split_dirs(data_dir)
    missing = [split for split in splits if split not in dirs]
    if missing:
        raise DataError(f"{data_dir} has no keras_slices_{missing[0]} folder; a run needs the "
                        f"{' and '.join(splits)} splits (present: {', '.join(dirs)})")


def data_options(given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `load_split` options of a run's data: DATA_OPTIONS updated by `given` (ValueError for unknown keys)."""
    unknown = sorted(set(given or {}) - set(DATA_OPTIONS))
    if unknown:
        raise ValueError(f"unknown data options {', '.join(unknown)}; known: {', '.join(DATA_OPTIONS)}")
    return {**DATA_OPTIONS, **(given or {})}


def data_record(data_dir: str | Path, splits: list[SplitData], options: dict[str, Any]) -> dict[str, Any]:
    """What a run records of its data: the folder, the decoding options that change the data (`data_options`
    but the cache) and a fingerprint of the slices (names, file sizes, shape and per-slice intensity scales of
    each split), which survives copying the data elsewhere."""
    options = {key: value for key, value in options.items() if key != "cache"}
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for split in splits:
        sizes = [sum(size for _, size, _ in file_stats(f.path, f.name)) for f in split.files]
        digest.update(json.dumps([split.split, list(split.images.shape), [f.name for f in split.files],
                                  sizes]).encode())
        digest.update(np.ascontiguousarray(split.scales, dtype=np.float32).tobytes())
    return {"dir": str(Path(data_dir).resolve()), "options": options, "fingerprint": digest.hexdigest()}


def check_same_data(payload: dict[str, Any], record: dict[str, Any], path: Path, allow_other_data: bool
                    ) -> dict[str, Any]:
    """The data record to store on resuming the run of `payload` with `record`'s data: RunError when the data
    differ from the run's own, unless allow_other_data (then the record keeps the earlier data under "earlier")."""
    saved = payload.get("data")
    if not isinstance(saved, dict) or "fingerprint" not in saved:
        log.warning("%s records no data fingerprint (an older run): cannot check that it resumes on its own data",
                    path)
        return record
    if saved["fingerprint"] == record["fingerprint"]:
        return {**record, "earlier": saved.get("earlier", [])}
    what = (f"options {saved.get('options')} then, {record['options']} now" if saved.get("options") != record["options"]
            else f"fingerprint {saved['fingerprint'][:12]} then, {record['fingerprint'][:12]} now")
    if not allow_other_data:
        raise RunError(f"cannot resume from {path}: it was trained on other data ({saved.get('dir')} then, "
                       f"{record['dir']} now; {what}); resume on its own data, or pass allow_other_data=True "
                       "(--allow-other-data) to continue on these data")
    log.warning("resuming %s on other data than its earlier epochs (%s)", path, what)
    earlier = [*saved.get("earlier", []), {k: v for k, v in saved.items() if k != "earlier"}]
    return {**record, "earlier": earlier}


# ---------------------------------------------------------------------------------------------- the lock


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    command = " ".join(map(str, holder.get("command", []))) or "?"
    return (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (started {holder.get('started', '?')}: "
            f"{command[:200]})")


def _command(process: psutil.Process) -> list[str]:
    try:
        line = process.cmdline()
    except psutil.Error:
        line = sys.argv
    return [Path(line[0]).name, *line[1:]] if line else []


@contextlib.contextmanager
def locked(folder: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of a run folder for the block: a lock file written whole and then linked into
    place (atomic, also on network file systems). RunError at once when a live process holds it; the lock of
    a process of this host that is gone is reported and taken over."""
    folder = Path(folder)
    path = folder / LOCK
    me = psutil.Process()
    holder = {"pid": os.getpid(), "host": HOST, "created": me.create_time(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": _command(me)}
    tmp = temp_name(path)
    atomic_write(tmp, lambda f: f.write((json.dumps(holder) + "\n").encode()))
    try:
        while True:
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                other = _read_lock(path)
                alive = other.get("host") != HOST or process_alive(int(other.get("pid", -1)), other.get("created"))
                if other and alive:
                    raise RunError(f"{folder} is in use by {_describe(other)}; wait for it to finish, or if that "
                                   f"process is gone, delete {path}") from None
                if not other and time.time() - path.stat().st_mtime < 10:
                    raise RunError(f"{folder} is being claimed by another process ({path} is new and unreadable); "
                                   "try again in a moment") from None
                log.warning("taking over the stale lock %s of %s, which is no longer running", path, _describe(other))
                path.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield
    finally:
        holder = _read_lock(path)
        if (holder.get("pid"), holder.get("host")) == (os.getpid(), HOST):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- claiming


def _outputs(folder: Path) -> list[Path]:
    return sorted({p for pattern in RUN_OUTPUTS for p in folder.glob(pattern) if p.is_file()})


def _restore_replaced(folder: Path) -> None:
    """Put back the run that an unfinished replacement moved aside; the new run's outputs go."""
    aside = folder / REPLACED
    for path in _outputs(folder):
        if not (aside / path.name).exists():
            path.unlink()
    for entry in sorted(aside.iterdir()):
        os.replace(entry, folder / entry.name)
    aside.rmdir()


def _recover(folder: Path) -> None:
    """Tidy what a killed run left: temp files, and a replacement that did (or did not) finish its first epoch."""
    remove_stale_temps(folder)
    remove_stale_temps(folder / REPLACED)
    if (folder / REPLACED).is_dir():
        if (folder / "last.pt").exists():
            shutil.rmtree(folder / REPLACED)
        else:
            log.warning("%s: restoring the run that an interrupted overwrite was replacing", folder)
            _restore_replaced(folder)


def _run_kind(folder: Path) -> str:
    """The kind of model the run in folder trained; RunError when its checkpoints cannot tell."""
    for name in ("last.pt", "best.pt"):
        if (folder / name).exists():
            try:
                return load_checkpoint(folder / name)["kind"]
            except CheckpointError as e:
                raise RunError(f"refusing to replace the run in {folder}: {e}; delete it yourself if it may go") \
                    from None
    raise RunError(f"refusing to replace {folder}: it holds {', '.join(p.name for p in _outputs(folder))} but no "
                   "checkpoint that says what they are; delete them yourself if they may go")


def holds_run(out_dir: str | Path, kind: str) -> bool:
    """Whether out_dir holds a run of `kind` with a finished epoch (its last.pt; CheckpointError if unreadable)."""
    path = Path(out_dir) / "last.pt"
    return path.exists() and load_checkpoint(path)["kind"] == kind


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


@contextlib.contextmanager
def claim(out_dir: str | Path, kind: str, train_config: dict[str, Any], model_config: dict[str, Any], *,
          resume: bool, overwrite: bool, inputs: tuple[str | Path, ...] = ()) -> Iterator[dict[str, Any] | None]:
    """Lock out_dir for a run of `kind` for the block and yield the payload of its last.pt to resume (or None).

    A new run is refused (FileExistsError) where out_dir holds a run, unless overwrite: then the old run must be
    of the same kind, no input file (checkpoints, data) may lie inside out_dir, and the old run is moved aside
    and deleted only when the new one has written its first epoch (`fit`); on an error before that it is put
    back. resume continues last.pt, refused (CheckpointError) when it is of another kind, lacks the resume
    state or differs from the configs in more than RESUME_MAY_CHANGE; a folder with no finished epoch starts
    from scratch. A folder this call made is removed again if nothing was written into it.
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"run folder {out_dir} is a file, not a folder")
    if overwrite:
        for path in map(Path, inputs):
            if _inside(path, out_dir):
                raise RunError(f"{path} is inside {out_dir}, which overwrite would replace; copy it elsewhere "
                               "first or choose another run folder")
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with locked(out_dir):
            _recover(out_dir)
            payload = _resume_payload(out_dir, kind, train_config, model_config) if resume else None
            if not resume:
                _make_room(out_dir, kind, overwrite)
            try:
                yield payload
            except BaseException:
                if (out_dir / REPLACED).is_dir() and not (out_dir / "last.pt").exists():
                    log.warning("%s: the new run failed before its first epoch; the old run is back", out_dir)
                    _restore_replaced(out_dir)
                raise
    finally:
        if made:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if empty


def _with_defaults(saved: dict[str, Any], defaults: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """A config saved before some fields existed, with their defaults where the requested config has them."""
    return {**{k: v for k, v in defaults.items() if k in wanted}, **saved}


def _resume_payload(out_dir: Path, kind: str, train_config: dict[str, Any], model_config: dict[str, Any]
                    ) -> dict[str, Any] | None:
    if not (out_dir / "last.pt").exists():
        log.warning("%s has no finished epoch to resume: starting from scratch", out_dir)
        return None
    payload = load_resume(out_dir, kind)
    diff = config_diff(_with_defaults(payload["train_config"], CONFIG_DEFAULTS, train_config), train_config,
                       ignore=RESUME_MAY_CHANGE + ("model",))
    diff += config_diff(_with_defaults(payload["model_config"], MODEL_DEFAULTS, model_config), model_config)
    if diff:
        raise CheckpointError(f"cannot resume from {out_dir / 'last.pt'}: the requested config differs from the "
                              f"run's (only epochs and device may change): {'; '.join(diff)}")
    return payload


def _make_room(out_dir: Path, kind: str, overwrite: bool) -> None:
    """Refuse a new run where a run is, or (overwrite) move a run of the same kind aside."""
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not existing:
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} already holds a run ({', '.join(existing)}); resume it, choose another "
                              "folder or pass overwrite=True (--overwrite) to replace it")
    old = _run_kind(out_dir)
    if old != kind:
        raise RunError(f"refusing to replace the {old} run in {out_dir} by a {kind} run; choose another folder "
                       "(or delete that run yourself)")
    aside = out_dir / REPLACED
    aside.mkdir()
    for path in _outputs(out_dir):
        os.replace(path, aside / path.name)


def load_resume(out_dir: str | Path, kind: str) -> dict[str, Any]:
    """The payload of out_dir/last.pt, checked to be of `kind` and to hold the resume state (CheckpointError)."""
    path = Path(out_dir) / "last.pt"
    payload = load_checkpoint(path, kind=kind)
    missing = [key for key in RESUME_STATE if key not in payload]
    if missing:
        raise CheckpointError(f"cannot resume from {path}: it lacks {', '.join(missing)}")
    for key in [*RESUME_STATE, *([SCALER_STATE] if SCALER_STATE in payload else [])]:
        if not isinstance(payload[key], dict):
            raise CheckpointError(f"cannot resume from {path}: its {key} is a {type(payload[key]).__name__}")
    if not isinstance(payload["rng"].get("torch"), torch.Tensor) or payload["rng"]["torch"].dtype != torch.uint8:
        raise CheckpointError(f"cannot resume from {path}: its rng state holds no torch generator state")
    if payload["epoch"] != len(payload["history"]):
        raise CheckpointError(f"cannot resume from {path}: it says epoch {payload['epoch']} but its history holds "
                              f"{len(payload['history'])} epochs")
    return payload


# ---------------------------------------------------------------------------------------------- training


def _best_epoch(history: list[dict[str, Any]], best: str, sign: float) -> int | None:
    scored = [(sign * h[best], -h["epoch"]) for h in history]
    return -max(scored)[1] if scored else None


def _repair(out_dir: Path, payload: dict[str, Any], best: str, sign: float) -> None:
    """Rewrite best.pt, metrics.json and metrics.csv where a kill after last.pt left them an epoch behind."""
    history = payload["history"]
    wanted = _best_epoch(history, best, sign)
    try:
        have = load_checkpoint(out_dir / "best.pt")["epoch"] if (out_dir / "best.pt").exists() else None
    except CheckpointError:
        have = None
    if have != wanted:
        if wanted != payload["epoch"]:
            raise RunError(f"{out_dir / 'best.pt'} holds epoch {have}, but the best epoch in {out_dir / 'last.pt'} "
                           f"is {wanted}, which is no longer stored; the best model of this run is lost")
        log.warning("%s: rewriting best.pt of epoch %s from last.pt (the run was stopped between the two)",
                    out_dir, wanted)
        save_checkpoint(out_dir / "best.pt", {k: v for k, v in payload.items()
                                              if k not in RESUME_STATE + (SCALER_STATE, "format")})
    metrics = out_dir / "metrics.json"
    try:
        current = json.loads(metrics.read_text())
    except (OSError, ValueError):
        current = None
    if current != history:
        save_json(metrics, history)
    table = out_dir / "metrics.csv"
    if not table.exists() or table.read_text() != _csv(history):
        _save_csv(table, history)


def _csv(history: list[dict[str, Any]]) -> str:
    """The history as CSV text: one row per epoch, a column per key (in order of first appearance)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, list(dict.fromkeys(key for record in history for key in record)),
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return text.getvalue()


def _save_csv(path: Path, history: list[dict[str, Any]]) -> None:
    text = _csv(history)
    atomic_write(path, lambda f: f.write(text.encode()))


def _save_config(out_dir: Path, kind: str, train_config: dict[str, Any], model_config: dict[str, Any],
                 extra: dict[str, Any], done: int) -> None:
    """Write out_dir/config.json: what a reader needs to rerun the run (or to know how it was started)."""
    me = psutil.Process()
    save_json(out_dir / "config.json", {
        "kind": kind, "version": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "host": HOST, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cwd": os.getcwd(), "command": _command(me),
        "options": None, **_INVOCATION.get(), "resumed_from_epoch": done, "train_config": train_config,
        "model_config": model_config, **extra})


def fit(out_dir: str | Path, *, kind: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        scheduler: LambdaLR, payload: dict[str, Any] | None, train_config: dict[str, Any],
        model_config: dict[str, Any], epochs: int, device: torch.device,
        one_epoch: Callable[[int], dict[str, Any]], score: Callable[[], dict[str, Any]], best: str,
        minimize: bool = False, extra: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
        allow_other_data: bool = False, callback: Callable[[dict[str, Any]], None] | None = None,
        main: bool = True, scaler: torch.amp.GradScaler | None = None) -> list[dict[str, Any]]:
    """Train epochs len(history) + 1 .. epochs, writing the run folder after each; returns the history.

    payload: what `claim` yielded (None for a new run): it is checked to be on the same data (`check_same_data`),
    its best.pt and metrics files are brought up to date, and its weights, optimizer, scheduler and RNG states
    are restored first. config.json is written before the first epoch (`invoked_as` adds the CLI's view).
    one_epoch(epoch) trains one epoch and returns its record fields; score() validates. The record of an epoch
    is {"epoch", "lr" (at its start), **one_epoch, **score, "seconds"}; best.pt holds the epoch with the highest
    (or, with minimize, lowest) record[best]. extra: more plain values for both
    checkpoints; data: the run's `data_record`, stored in both. callback(record) runs after the files are
    written. main=False (the other processes of a data-parallel run): train only; no scoring, files or
    callback, and the history holds the one_epoch fields. scaler: the run's GradScaler; an enabled one (fp16)
    is saved in last.pt and restored from it (a run resumed in fp16 after epochs in another precision starts
    a fresh one).
    """
    out_dir = Path(out_dir)
    sign = -1.0 if minimize else 1.0
    history: list[dict[str, Any]] = []
    if payload is not None:
        if data is not None:
            data = check_same_data(payload, data, out_dir / "last.pt", allow_other_data)
        if main:
            _repair(out_dir, payload, best, sign)
        model.load_state_dict(payload["model_state"])
        optimizer.load_state_dict(payload["optimizer_state"])
        scheduler.load_state_dict(payload["scheduler_state"])
        if scaler is not None and scaler.is_enabled() and payload.get(SCALER_STATE):
            scaler.load_state_dict(payload[SCALER_STATE])
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):  # epochs may have changed
            group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
        _set_rng_state(payload["rng"], device)
        history = payload["history"]
    best_value = max((sign * h[best] for h in history), default=-math.inf)
    extra = {**(extra or {}), **({"data": data} if data is not None else {})}
    if main:
        _save_config(out_dir, kind, train_config, model_config, extra, len(history))
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

        state = {**extra, "kind": kind, "model_config": model_config, "train_config": train_config,
                 "model_state": model.state_dict(), "epoch": epoch, "history": history}
        # last.pt first: a run stopped after it resumes from this epoch and rewrites the other two (`_repair`).
        resume_state = {"optimizer_state": optimizer.state_dict(), "scheduler_state": scheduler.state_dict(),
                        "rng": _rng_state(device)}
        if scaler is not None and scaler.is_enabled():
            resume_state[SCALER_STATE] = scaler.state_dict()
        save_checkpoint(out_dir / "last.pt", {**state, **resume_state})
        if sign * record[best] > best_value:
            best_value = sign * record[best]
            save_checkpoint(out_dir / "best.pt", state)
        save_json(out_dir / "metrics.json", history)
        _save_csv(out_dir / "metrics.csv", history)
        if (out_dir / REPLACED).exists():  # the new run has its first epoch: the run it replaces may go
            shutil.rmtree(out_dir / REPLACED)
        if callback is not None:
            callback(record)
    return history
