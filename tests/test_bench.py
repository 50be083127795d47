"""The benchmark command on the tiny phantom: every figure present and consistent (no timing assertions)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from vqvae_lib import bench, data
from vqvae_lib.cli import main

CHECKPOINT = str(Path(__file__).resolve().parents[1] / "checkpoints" / "default.pt")


def test_bench_reports_every_figure(tiny_phantom, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--data-dir", str(tiny_phantom), "--device", "cpu", "--steps", "1", "--warmup", "1",
            "--checkpoint", CHECKPOINT, "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"] == torch.__version__
    d, t, e = result["data"], result["train"], result["eval"]
    assert d["files"] == 300 and d["reload_mb"] == pytest.approx(300 * 256 * 128 * 4 / 2**20)
    assert d["reload_s"] > 0 and d["reload_again_s"] > 0 and d["decode_files_per_s"] == pytest.approx(300 / d["decode_s"])
    assert d["peak_rss_mb"] >= d["decode_peak_rss_mb"] >= d["rss_before_mb"] > 0
    rates = [t["common_recipe_images_per_s"], t["ours_seed_model_images_per_s"], t["ours_default_images_per_s"]]
    assert all(rate > 0 for rate in rates) and "default_epoch_s" not in t  # no whole epoch on a CPU by default
    assert t["ratio_same_model"] == pytest.approx(rates[1] / rates[0])
    assert t["ratio_default"] == pytest.approx(rates[2] / rates[0])
    assert e["slices"] == 60 and e["slices_per_s"] > 0 and e["checkpoint"] == CHECKPOINT
    text = capsys.readouterr().out
    for start in ("machine: ", "data: first decode of 300 files", "train (1 steps of 32", "eval: reconstruct"):
        assert start in text


def test_common_recipe_dataset_resizes_and_scales_each_file(tiny_phantom):
    files = data.list_slices(tiny_phantom / "keras_slices_train")
    odd = next(f for f in files if f.case == 19 and f.week == 1)  # a 256 x 144 slice
    assert nib.load(odd.path).shape[:2] == (256, 144)
    x = bench.PerFileSlices([odd.path])[0]
    assert x.shape == (1, 256, 128) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == pytest.approx(1.0)
    assert np.isfinite(x.numpy()).all()


def test_bench_names_a_missing_data_folder(tmp_path, capsys):
    assert main(["bench", "--data-dir", str(tmp_path / "nowhere"), "--steps", "1"]) == 2
    assert f"{tmp_path / 'nowhere'} does not exist; write the full-size phantom there with" in capsys.readouterr().err


def test_no_warm_up_and_the_peak_memory_of_macos(tiny_phantom, monkeypatch):
    images = torch.from_numpy(np.array(data.load_split(tiny_phantom, "validate", progress=False).images))[:, None]
    config = bench.make_config("default", hidden=16, res_hidden=8, codebook_size=16, embed_dim=8, device="cpu")
    assert np.isfinite(bench.bench_pipeline(config, images[:32], torch.device("cpu"), 0, 1))  # --warmup 0
    seen = []
    real = bench.train_epoch
    monkeypatch.setattr(bench, "train_epoch", lambda model, subset, *a, **k: (seen.append(len(subset)),
                                                                              real(model, subset, *a, **k)))
    bench.bench_pipeline(config, images[:40], torch.device("cpu"), 1, None)  # a whole epoch of 40: 32 + 8
    assert seen == [32 + 8, 40]  # the warm-up has seen the partial batch too

    class Usage:
        ru_maxrss = 3 * 2**30  # bytes on macOS, kilobytes on Linux
    monkeypatch.setattr(bench.resource, "getrusage", lambda who: Usage)
    monkeypatch.setattr(bench.sys, "platform", "darwin")
    assert bench._peak_rss_mb() == 3 * 1024
    monkeypatch.setattr(bench.sys, "platform", "linux")
    assert bench._peak_rss_mb() == 3 * 2**20


def test_the_clock_waits_for_mps(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    bench._sync(torch.device("mps"))
    bench._sync(torch.device("cpu"))
    assert calls == ["mps"]
