"""Retrain every committed checkpoint from the current code (`make checkpoints`, `hipmri-vqvae checkpoints`).

The models train in dependency order (the prior after the VQ-VAE it encodes with), each in its own run folder
under `runs` with `--resume auto`, so a killed or requeued job continues where it stopped. Only when all of
them have finished are they copied into the checkpoint folder, together with MANIFEST.json: for each file its
sha256, the exact command, the data's fingerprint, the code revision, the training time, the machine, the
run's whole history (one record per epoch) and its headline metrics (test scores from `evaluate`, the prior's
validation NLL).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import REPO, __version__, data, metrics, train, vae
from .checkpoint import load_checkpoint
from .fileio import atomic_write, save_json
from .prior import file_sha256

MANIFEST = "MANIFEST.json"


@dataclass(frozen=True)
class Recipe:
    """One committed checkpoint: NAME.pt is the best.pt of `command` (CLI words; {NAME} is the run folder of an
    earlier recipe). cpu_minutes: its training time on the project's 2-core CPU, as a guide."""

    name: str
    command: tuple[str, ...]
    cpu_minutes: float


RECIPES = (
    Recipe("default", ("train", "--preset", "default"), 24),
    Recipe("default_8x", ("train", "--preset", "default", "--downsample", "8", "--epochs", "15"), 12),
    Recipe("seed_8x", ("train", "--preset", "seed", "--epochs", "15"), 18),
    Recipe("prior_8x", ("prior", "--checkpoint", "{default_8x}/best.pt"), 3),
    Recipe("vae_8x", ("vae", "--downsample", "8", "--epochs", "15"), 2.5),
    # generation (notebook 06): a sharper 8x model, two priors over its codes and the PixelCNN as before
    Recipe("gen_8x", ("train", "--preset", "default", "--downsample", "8", "--epochs", "40"), 35),
    Recipe("pixelcnn_gen_plain", ("prior", "--checkpoint", "{gen_8x}/best.pt"), 5.5),
    Recipe("pixelcnn_gen", ("prior", "--checkpoint", "{gen_8x}/best.pt", "--dropout", "0.1", "--epochs", "20"), 14),
    Recipe("transformer_gen", ("prior", "--checkpoint", "{gen_8x}/best.pt", "--arch", "transformer", "--channels",
                               "64", "--layers", "4", "--heads", "4", "--dropout", "0.1", "--epochs", "15",
                               "--precision", "fp32"), 15),
    # the feature space that judges samples (`sample_metrics`)
    Recipe("features", ("features",), 1.5),
)


def data_fingerprint(data_dir: str | Path) -> str:
    """sha256 over every slice file of a HipMRI-layout folder: relative names and contents, in sorted order."""
    data_dir = Path(data_dir)
    digest = hashlib.sha256()
    for path in sorted(data_dir.glob("*/*.nii*")):
        digest.update(f"{path.relative_to(data_dir).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def code_revision() -> str:
    """The repository's commit, with "+changes" when tracked files differ from it ("unknown" outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def machine(device: str) -> dict[str, Any]:
    dev = train.select_device(device)
    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
            "python": platform.python_version(), "torch": torch.__version__, "vqvae_lib": __version__}


def _copy(source: Path, f: Any) -> None:
    with open(source, "rb") as src:
        shutil.copyfileobj(src, f)


def _test_scores(recon: np.ndarray, images: np.ndarray) -> dict[str, float]:
    ssim, psnr = metrics.ssim_psnr(recon, images)
    return metrics.score_summary(ssim, metrics.ssim_gaussian(recon, images), psnr)


def _validation_score(record: dict[str, Any]) -> float:
    """Higher is better: a VQ-VAE's or VAE's validation SSIM, a prior's NLL or a feature network's loss negated."""
    for loss in ("val_nll", "val_loss"):
        if loss in record:
            return -record[loss]
    return record["val_ssim"]


def _headline(best: Path, data_dir: Path, device: str) -> dict[str, Any]:
    """What the README and notebooks quote of a checkpoint (a run's best.pt): test scores of a VQ-VAE or VAE
    (`evaluate` for a VQ-VAE), its best validation epoch's record, its training speed, and a VQ-VAE's grid."""
    payload = load_checkpoint(best)
    record = max(payload["history"], key=_validation_score)
    out: dict[str, Any] = {"best_validation_epoch": record}
    speeds = [r["images_per_s"] for r in payload["history"] if "images_per_s" in r]
    if speeds:
        out["images_per_s_median"] = float(np.median(speeds))
    if payload["kind"] == "vqvae":
        out["test"] = train.evaluate(best, data_dir, "test", device=device, progress=False)["summary"]
        out["downsample"] = payload["model_config"]["downsample"]
    elif payload["kind"] == "prior":
        out["arch"] = payload["model_config"].get("arch", "pixelcnn")
    elif payload["kind"] == "vae":
        dev = train.select_device(device)
        model, _ = vae.load_vae(best, map_location=dev)
        images = np.asarray(data.load_split(data_dir, "test", progress=False).images)
        recon, _ = vae.reconstruct(model, images, amp=train.checkpoint_precision(payload, dev))
        out["test"] = _test_scores(recon, images)
    return out


def _baseline(data_dir: Path) -> dict[str, float]:
    """Test scores of predicting the mean training slice for every test slice."""
    images = np.asarray(data.load_split(data_dir, "test", progress=False).images)
    mean_image = np.asarray(data.load_split(data_dir, "train", progress=False).images).mean(0)
    return _test_scores(np.broadcast_to(mean_image, images.shape), images)


def shown_path(path: Path) -> str:
    """A path as a result file shows it: relative to the repository when inside it (the commands run from there)."""
    return Path(os.path.relpath(path, REPO)).as_posix() if REPO in path.parents else str(path)


def shown_command(words: list[str]) -> str:
    """The CLI words as a result file shows them: `hipmri-vqvae ...`, with `shown_path` paths."""
    return "hipmri-vqvae " + " ".join(shown_path(Path(w)) if Path(w).is_absolute() else w for w in words)


def run_command(words: list[str], name: str) -> None:
    """Run `hipmri-vqvae WORDS` in this process; RuntimeError naming `name` and the command when it fails."""
    from . import cli
    try:
        code = cli.main(words)
    except SystemExit as e:  # a bad option: argparse has said why
        code = e.code
    if code:
        raise RuntimeError(f"{name}: `{shown_command(words)}` failed with exit code {code}")


def build(data_dir: str | Path, runs: str | Path, out: str | Path, *, device: str = "auto",
          recipes: tuple[Recipe, ...] = RECIPES) -> dict[str, Any]:
    """Train every recipe (resuming its run folder), then write each best.pt to OUT/NAME.pt and OUT/MANIFEST.json;
    returns the manifest. Nothing in `out` changes unless every run has finished."""
    data_dir, runs, out = Path(data_dir), Path(runs), Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"checkpoint folder {out} does not exist")
    folders = {r.name: runs / r.name for r in recipes}
    revision = code_revision()  # of the code this process runs, whatever the tree holds by its end
    entries = {}
    for i, recipe in enumerate(recipes, 1):
        words = [w.format(**{k: str(v) for k, v in folders.items()}) for w in recipe.command]
        command = [*words, "--data-dir", str(data_dir), "--out", str(folders[recipe.name]), "--resume", "auto",
                   "--device", device]
        print(f"[{i}/{len(recipes)}] {recipe.name}: hipmri-vqvae {' '.join(command)} "
              f"(about {recipe.cpu_minutes:g} min on a 2-core CPU)", flush=True)
        started = time.perf_counter()
        run_command(command, recipe.name)
        history = load_checkpoint(folders[recipe.name] / "last.pt")["history"]
        entries[recipe.name] = {"command": shown_command(command), "epochs": len(history),
                                "train_seconds": round(sum(r["seconds"] for r in history), 1),
                                "this_call_seconds": round(time.perf_counter() - started, 1),
                                "history": history}  # the whole run: a best.pt's own stops at its epoch
    fingerprint, host = data_fingerprint(data_dir), machine(device)
    manifest = {"command": "make checkpoints", "data_dir": shown_path(data_dir), "data_sha256": fingerprint,
                "code_revision": revision, "machine": host, "baselines": {"mean_image": _baseline(data_dir)},
                "checkpoints": {}}
    for recipe in recipes:
        best = folders[recipe.name] / "best.pt"
        target = out / f"{recipe.name}.pt"
        atomic_write(target, lambda f, source=best: _copy(source, f))
        manifest["checkpoints"][target.name] = {
            "sha256": file_sha256(target), **entries[recipe.name], "data_sha256": fingerprint,
            "code_revision": revision, "metrics": _headline(target, data_dir, device)}
    save_json(out / MANIFEST, manifest)
    print(f"wrote {len(recipes)} checkpoints and {out / MANIFEST}")
    return manifest

