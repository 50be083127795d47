"""The experiments behind notebooks 03, 05 and 08 (`make sweeps`, `hipmri-vqvae sweeps`): many short runs.

Every run is one `hipmri-vqvae train` command: the default recipe on the first `LIMIT` training slices for
`EPOCHS` epochs (notebook 04's demo budget, so all runs take the same optimiser steps), changed by a few options.
Each trains in its own run folder with `--resume auto`, and its result is written to OUT/NAME.json: the command,
the code revision, the data's fingerprint, the machine, the training history and the test scores of its last
epoch (`measure`). A rerun skips every run whose result file holds the same command, so an interrupted sweep
continues where it stopped and a finished one costs nothing (a result of the same command on another device
counts as done).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import data, prior, retrain, train
from .checkpoint import load_checkpoint, load_model
from .fileio import save_json

LIMIT, EPOCHS = 480, 6
RESULTS = "results/sweeps"  # in the repository: committed
BASE = ("train", "--preset", "default", "--limit", str(LIMIT), "--epochs", str(EPOCHS))
PLAIN = ("--no-ema", "--init", "uniform", "--no-restart")  # the paper's quantizer: no fix against collapse


@dataclass(frozen=True)
class Run:
    """One sweep run: `BASE` + options. name: its result file's name."""

    name: str
    options: tuple[str, ...] = ()


def _switches(kmeans: bool, ema: bool, restart: bool) -> tuple[str, ...]:
    return ("--ema" if ema else "--no-ema", "--init", "kmeans" if kmeans else "uniform",
            "--restart" if restart else "--no-restart")


_FIXES = ((False, False, False), (True, False, False), (False, True, False), (False, False, True),
          (True, True, False), (True, False, True), (False, True, True), (True, True, True))


def _fix_name(kmeans: bool, ema: bool, restart: bool) -> str:
    used = [name for name, on in (("kmeans", kmeans), ("ema", ema), ("restart", restart)) if on]
    return "default" if len(used) == 3 else "plain" if not used else "+".join(used)


# The groups of runs, in the order they run. A run in several groups (the default recipe) trains once.
GROUPS: dict[str, tuple[Run, ...]] = {
    # Notebook 03: each fix against codebook collapse, alone and combined.
    "collapse": tuple(Run(_fix_name(*fix), _switches(*fix)) for fix in _FIXES),
    # Notebook 03: the commitment weight, against the MSE as it is and divided by the data's variance.
    "beta": tuple(Run(f"beta{beta:g}{'_normalized' if normalized else ''}",
                      ("--beta", f"{beta:g}", *(("--normalize-mse",) if normalized else ())))
                  for normalized in (False, True) for beta in (0.05, 0.25, 1.0)),
    # Notebook 03: the codebook size K and the code dimension D.
    "size": tuple(Run(f"K{k}", ("--codebook-size", str(k))) for k in (64, 256, 512, 1024, 2048))
    + tuple(Run(f"D{d}", ("--embed-dim", str(d))) for d in (8, 32, 64)),
    # Notebook 05: rate and distortion at each grid (4x comes from "size").
    "rd": tuple(Run(f"{d}x_K{k}", ("--downsample", str(d), "--codebook-size", str(k)))
                for d in (8, 16) for k in (64, 256, 512, 1024)),
    # Notebook 08: quantizers beyond the paper, on the default model (FSQ at 8 x 8 x 8 = 512 codes, as K).
    "quantizers": (Run("rotation", ("--quantizer", "rotation")), Run("cosine", ("--quantizer", "cosine")),
                   Run("fsq", ("--quantizer", "fsq", "--fsq-levels", "8,8,8"))),
}
_SAME = {"K512": "default", "beta0.25": "default", "D64": "default", "4x_K512": "default"}  # one run, two names


def runs_of(groups: list[str] | None = None) -> list[Run]:
    """The distinct runs of `groups` (default: all), in order; ValueError for an unknown group."""
    unknown = sorted(set(groups or ()) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown sweep group {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    chosen, seen = [], set()
    for group in groups or GROUPS:
        for run in GROUPS[group]:
            name = _SAME.get(run.name, run.name)
            if name not in seen:
                seen.add(name)
                chosen.append(run if name == run.name else Run(name, _switches(True, True, True)))
    return chosen


def command(run: Run, data_dir: Path, folder: Path, device: str) -> list[str]:
    """The CLI words of `run` (without the program name)."""
    return [*BASE, *run.options, "--data-dir", str(data_dir), "--out", str(folder), "--resume", "auto",
            "--device", device]


def measure(checkpoint: Path, data_dir: Path, device: str = "auto") -> dict[str, Any]:
    """Test scores of a run's checkpoint: `evaluate`'s summary, the restarts over training, and the bits a test
    slice costs: raw (h w log2 K) and under the code frequencies of the training split (add-one smoothed, as
    `prior.unigram_nll`)."""
    summary = train.evaluate(checkpoint, data_dir, "test", device=device, progress=False)["summary"]
    dev = train.select_device(device)
    model, payload = load_model(checkpoint, map_location=dev)
    amp = train.checkpoint_precision(payload, dev)
    maps = {split: prior.encode_maps(model, data.load_split(data_dir, split, progress=False).images, amp=amp)
            for split in ("train", "test")}
    k, positions = model.config.codebook_size, math.prod(maps["test"].shape[1:])
    history = payload["history"]
    return {**summary, "restarts": int(sum(r["restarts"] for r in history)),
            "train_commitment": history[-1]["train_commitment"], "train_recon": history[-1]["train_recon"],
            "latent_shape": list(maps["test"].shape[1:]),
            "bits_raw": positions * math.log2(k),
            "bits_frequencies": positions * prior.unigram_nll(maps["train"], maps["test"], k) / math.log(2),
            "train_seconds": round(sum(r["seconds"] for r in history), 1),
            "images_per_s_median": float(np.median([r["images_per_s"] for r in history]))}


def _without_device(command: str) -> str:
    return re.sub(r" --device \S+", "", command)


def _done(path: Path, command: str) -> bool:
    """Whether the result file `path` holds a run of `command` (on whatever device: the run is the same)."""
    try:
        stored = json.loads(path.read_text())["command"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(stored, str) and _without_device(stored) == _without_device(command)


def run_sweeps(data_dir: str | Path, runs: str | Path, out: str | Path, *, groups: list[str] | None = None,
               device: str = "auto") -> list[Path]:
    """Train and measure every run of `groups` not yet in `out` (one folder per run under `runs`, resumed);
    returns the result files written now."""
    data_dir, runs, out = Path(data_dir), Path(runs), Path(out)
    runs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    chosen = runs_of(groups)
    fingerprint, revision, host = retrain.data_fingerprint(data_dir), retrain.code_revision(), retrain.machine(device)
    written = []
    for i, run in enumerate(chosen, 1):
        words = command(run, data_dir, runs / run.name, device)
        shown = retrain.shown_command(words)
        target = out / f"{run.name}.json"
        if _done(target, shown):
            continue
        print(f"[{i}/{len(chosen)}] {run.name}: {shown}", flush=True)
        started = time.perf_counter()
        retrain.run_command(words, f"sweep run {run.name}")
        last = runs / run.name / "last.pt"
        payload = load_checkpoint(last)
        result = {"name": run.name, "command": shown, "code_revision": revision, "data_sha256": fingerprint,
                  "machine": host, "this_call_seconds": round(time.perf_counter() - started, 1),
                  "train_config": payload["train_config"], "history": payload["history"],
                  "test": measure(last, data_dir, device)}
        save_json(target, result)
        written.append(target)
    return written


def load_results(folder: str | Path, group: str) -> dict[str, dict[str, Any]]:
    """The stored results of `group`'s runs found in `folder`: run name (as the group names it) -> result."""
    found = {}
    for run in GROUPS[group]:
        path = Path(folder) / f"{_SAME.get(run.name, run.name)}.json"
        if path.is_file():
            found[run.name] = json.loads(path.read_text())
    return found


def rerun(name: str, data_dir: str | Path, runs: str | Path, *, device: str = "auto",
          limit: int | None = None, epochs: int | None = None) -> dict[str, Any]:
    """Train the sweep run `name` again in runs/NAME (resumed if there) and return its `measure`; limit and
    epochs shorten it (smoke runs). The notebooks compare a full rerun with the committed result."""
    run = next((r for r in runs_of() if r.name == name), None)
    if run is None:
        raise ValueError(f"no sweep run is called {name!r}")
    folder = Path(runs) / name
    words = command(run, Path(data_dir), folder, device)
    words += [*(["--limit", str(limit)] if limit else []), *(["--epochs", str(epochs)] if epochs else [])]
    retrain.run_command(words, f"rerun of {name}")
    return measure(folder / "last.pt", Path(data_dir), device)


def reproduce(name: str, data_dir: str | Path, committed: dict[str, Any], *, smoke: bool = False,
              device: str = "cpu") -> tuple[bool, str]:
    """Train the sweep run `name` again in a temporary folder (smoke: 16 slices, 1 epoch) and compare its test
    scores with its committed result: (whether SSIM agrees to 0.01 and the codes used to a tenth, a sentence
    saying both)."""
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        again = rerun(name, data_dir, folder, device=device, **({"limit": 16, "epochs": 1} if smoke else {}))
    before = committed["test"]
    same = (abs(again["ssim_mean"] - before["ssim_mean"]) < 0.01
            and abs(again["active_codes"] - before["active_codes"]) <= max(2, before["active_codes"] // 10))
    return same, (f"{name}, trained again here: {again['active_codes']} codes, test SSIM {again['ssim_mean']:.4f} "
                  f"(committed: {before['active_codes']} codes, {before['ssim_mean']:.4f})")
