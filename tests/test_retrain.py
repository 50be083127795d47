"""`make checkpoints` (vqvae_lib.retrain), with one-epoch recipes on the tiny phantom."""

import json
import shutil

import pytest

from vqvae_lib import phantom, readme, retrain, runner
from vqvae_lib.checkpoint import load_checkpoint
from vqvae_lib.prior import file_sha256

TINY = ("--epochs", "1", "--limit", "16")
RECIPES = (
    retrain.Recipe("default_8x", ("train", "--preset", "default", "--downsample", "8", *TINY), 0.1),
    retrain.Recipe("prior_8x", ("prior", "--checkpoint", "{default_8x}/best.pt", "--layers", "2", "--channels", "16",
                                *TINY), 0.1),
    retrain.Recipe("vae_8x", ("vae", "--downsample", "8", *TINY), 0.1),
)


@pytest.fixture(scope="module")
def built(tiny_phantom, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrain")
    (root / "checkpoints").mkdir()
    manifest = retrain.build(tiny_phantom, root / "runs", root / "checkpoints", device="cpu", recipes=RECIPES)
    return root, manifest


def test_every_checkpoint_is_written_with_its_manifest_entry(built, tiny_phantom):
    root, manifest = built
    out = root / "checkpoints"
    assert json.loads((out / retrain.MANIFEST).read_text()) == manifest
    assert sorted(manifest["checkpoints"]) == ["default_8x.pt", "prior_8x.pt", "vae_8x.pt"]
    for name, entry in manifest["checkpoints"].items():
        assert entry["sha256"] == file_sha256(out / name)
        assert (out / name).read_bytes() == (root / "runs" / name[:-3] / "best.pt").read_bytes()
        assert entry["data_sha256"] == retrain.data_fingerprint(tiny_phantom) == manifest["data_sha256"]
        recipe = next(r for r in RECIPES if f"{r.name}.pt" == name)
        assert entry["command"].startswith(f"hipmri-vqvae {recipe.command[0]} ")
        assert f"--out {root / 'runs' / name[:-3]} --resume auto" in entry["command"]
        assert entry["history"] == load_checkpoint(root / "runs" / name[:-3] / "last.pt")["history"]
    assert manifest["checkpoints"]["default_8x.pt"]["metrics"]["test"]["n_slices"] == 60
    assert "val_nll" in manifest["checkpoints"]["prior_8x.pt"]["metrics"]["best_validation_epoch"]
    # the prior was trained on the VQ-VAE of this build, not on a committed one
    prior = load_checkpoint(out / "prior_8x.pt")
    assert prior["vqvae"]["sha256"] == manifest["checkpoints"]["default_8x.pt"]["sha256"]


def test_a_rerun_resumes_every_run_and_trains_nothing(built, tiny_phantom, capsys):
    root, manifest = built
    again = retrain.build(tiny_phantom, root / "runs", root / "checkpoints", device="cpu", recipes=RECIPES)
    assert "had already finished 1 epoch: nothing to do" in capsys.readouterr().out
    assert {k: v["sha256"] for k, v in again["checkpoints"].items()} == \
        {k: v["sha256"] for k, v in manifest["checkpoints"].items()}


def test_the_data_fingerprint_follows_the_slices(tiny_phantom, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_phantom, copy, ignore=shutil.ignore_patterns(".cache"))
    assert retrain.data_fingerprint(copy) == retrain.data_fingerprint(tiny_phantom)
    first = sorted(copy.glob("*/*.nii*"))[0]
    first.write_bytes(first.read_bytes() + b"\0")
    assert retrain.data_fingerprint(copy) != retrain.data_fingerprint(tiny_phantom)


def test_nothing_is_written_when_a_run_fails(tiny_phantom, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    broken = (retrain.Recipe("seed_8x", ("train", "--preset", "seed", "--epochs", "0"), 0.1),)
    with pytest.raises(RuntimeError, match="seed_8x: .* failed with exit code 2"):
        retrain.build(tiny_phantom, tmp_path / "runs", tmp_path / "checkpoints", device="cpu", recipes=broken)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_the_readme_block_is_made_from_the_manifest(built):
    _, manifest = built
    text = readme.checkpoints_markdown(manifest)
    row = next(line for line in text.splitlines() if line.startswith("| `default_8x.pt` | 8x | 1 (1) |"))
    test = manifest["checkpoints"]["default_8x.pt"]["metrics"]["test"]
    assert f"{test['ssim_mean']:.3f} ({test['ssim_min']:.3f}..{test['ssim_max']:.3f})" in row
    assert f"| {test['active_codes']} / 512 ({test['perplexity']:.1f}) |" in row
    assert f"`prior_8x.pt` (PixelCNN prior): validation NLL" in text and "`vae_8x.pt` (Gaussian VAE): test SSIM" in text
    assert text.startswith("Test split: 60 slices, 1 scans of 1 patient.")


def test_the_committed_checkpoints_are_the_manifests_on_the_phantom_the_code_writes(tmp_path):
    """Drift: a checkpoint changed by hand, or a phantom.py that writes other data than the checkpoints were
    trained on, fails here (the default phantom is written anew: about half a minute on 2 cores)."""
    committed = runner.REPO / "checkpoints"
    manifest = json.loads((committed / retrain.MANIFEST).read_text())
    assert sorted(manifest["checkpoints"]) == sorted(p.name for p in committed.glob("*.pt")) == \
        sorted(f"{r.name}.pt" for r in retrain.RECIPES)
    for name, entry in manifest["checkpoints"].items():
        assert entry["sha256"] == file_sha256(committed / name), f"{name} is not the file its manifest describes"
    phantom.generate(tmp_path / "phantom", seed=0, size="small", workers=2, progress=False)
    fingerprint = retrain.data_fingerprint(tmp_path / "phantom")
    stale = [name for name, entry in manifest["checkpoints"].items() if entry["data_sha256"] != fingerprint]
    assert not stale, f"{stale} were trained on other data than the current phantom.py writes: run make checkpoints"
