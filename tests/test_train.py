"""Tests of vqvae_lib.train and the train/evaluate commands, with tiny models on the tiny phantom."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from vqvae_lib import runs, train as T
from vqvae_lib.checkpoint import CheckpointError, load_checkpoint, load_model
from vqvae_lib.cli import main
from vqvae_lib.data import load_split
from vqvae_lib.metrics import CodeUsage, ssim_gaussian, ssim_psnr
from vqvae_lib.model import VQVAE

TINY = dict(hidden=16, res_hidden=8, codebook_size=32, embed_dim=8)
RECORD_KEYS = {"epoch", "lr", "train_loss", "train_recon", "train_ssim", "train_commitment", "train_codebook", "val_recon",
               "val_ssim", "val_psnr", "val_perplexity", "val_active", "restarts", "seconds", "images_per_s",
               "precision"}
TIMING = ("seconds", "images_per_s")


def tiny(preset: str = "default", **overrides) -> T.TrainConfig:
    return T.make_config(preset, **{**TINY, "limit": 16, "batch_size": 8, "device": "cpu", "seed": 0, **overrides})


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_run(run_a, run_b) -> None:
    """Same history (but timing), weights, optimizer state and RNG state in the two runs' last.pt."""
    a, b = load_checkpoint(run_a / "last.pt"), load_checkpoint(run_b / "last.pt")
    assert untimed(a["history"]) == untimed(b["history"])
    assert_same_state(a["model_state"], b["model_state"])
    for sa, sb in zip(a["optimizer_state"]["state"].values(), b["optimizer_state"]["state"].values()):
        assert_same_state(sa, sb)
    assert a["scheduler_state"] == b["scheduler_state"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


@pytest.fixture(scope="module")
def run3(tiny_phantom, tmp_path_factory):
    """A finished 3-epoch run of the default recipe (bf16, channels_last, k-means init, EMA, restarts)."""
    out = tmp_path_factory.mktemp("run3")
    rng_before = torch.get_rng_state()
    history = T.train(tiny_phantom, out, tiny(epochs=3), progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the run's RNG use does not leak to the caller
    return out, history


@pytest.fixture(scope="module")
def interrupted(tiny_phantom, tmp_path_factory):
    """The same run again, stopped by Ctrl-C in the middle of epoch 3.

    Returns (folder, bytes of last.pt after epoch 2, the records of epochs 1 and 2).
    """
    out = tmp_path_factory.mktemp("interrupted")
    saved, records = {}, []
    forward, calls = VQVAE.forward, []

    def interrupt_second_batch(self, x):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(self, x)

    def after_epoch(record):
        records.append(record)
        if record["epoch"] == 2:
            saved["last"] = (out / "last.pt").read_bytes()
            VQVAE.forward = interrupt_second_batch

    try:
        with pytest.raises(KeyboardInterrupt):
            T.train(tiny_phantom, out, tiny(epochs=3), progress=False, callback=after_epoch)
    finally:
        VQVAE.forward = forward
    assert len(calls) == 2                                                 # it stopped inside epoch 3
    return out, saved["last"], records


# ---------------------------------------------------------------------------------------------- configs


def test_presets_hold_the_two_recipes():
    seed, default = T.make_config("seed"), T.make_config("default")
    assert seed.model == {"in_channels": 1, "hidden": 128, "res_hidden": 32, "n_res": 2, "downsample": 8,
                          "codebook_size": 512, "embed_dim": 128, "beta": 0.25, "ema": False, "decay": 0.99,
                          "usage_decay": 0.9, "init": "uniform", "restart": False, "quantizer": "vq", "lookup_dim": 8,
                          "fsq_levels": [8, 5, 5, 5]}
    assert (seed.lr, seed.schedule, seed.batch_size, seed.amp, seed.channels_last, seed.ssim_weight,
            seed.normalize_mse) == (1e-3, "constant", 32, False, False, 0.0, False)
    assert default.model == {"in_channels": 1, "hidden": 64, "res_hidden": 32, "n_res": 2, "downsample": 4,
                             "codebook_size": 512, "embed_dim": 64, "beta": 0.25, "ema": True, "decay": 0.99,
                             "usage_decay": 0.9, "init": "kmeans", "restart": True, "quantizer": "vq",
                             "lookup_dim": 8, "fsq_levels": [8, 5, 5, 5]}
    assert (default.lr, default.schedule, default.final_lr, default.batch_size, default.amp, default.channels_last,
            default.ssim_weight) == (1e-3, "cosine", 0.1, 32, True, True, 0.5)


def test_make_config_routes_overrides_and_round_trips():
    config = T.make_config("seed", downsample=4, epochs=3, limit=10, model={"hidden": 64})
    assert config.model["downsample"] == 4 and config.model["hidden"] == 64 and config.model["embed_dim"] == 128
    assert (config.epochs, config.limit, config.preset) == (3, 10, "seed")
    assert T.make_config(**config.to_dict()) == config
    assert T.TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.model_config().downsample == 4
    with pytest.raises(ValueError, match="unknown settings colour"):
        T.make_config("default", colour="red")
    with pytest.raises(ValueError, match="unknown preset 'best'"):
        T.make_config("best")
    with pytest.raises(ValueError, match="unknown TrainConfig fields: colour"):
        T.TrainConfig.from_dict({**config.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="incomplete TrainConfig"):
        T.TrainConfig.from_dict({"preset": "seed"})
    for bad, message in [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"schedule": "step"}, "schedule"),
                         ({"limit": 0}, "limit"), ({"downsample": 3}, "downsample")]:
        with pytest.raises(ValueError, match=message):
            T.make_config("default", **bad)


def test_learning_rate_schedules():
    cosine = T.make_config("default", warmup=0.1, final_lr=0.1)
    factors = [T.lr_factor(step, 100, cosine) for step in range(100)]
    np.testing.assert_allclose(factors[:10], np.arange(1, 11) / 10)       # linear warm-up over 10 steps
    assert factors[10] == pytest.approx(1.0) and factors[99] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))       # then decays monotonically
    assert T.lr_factor(100, 100, cosine) == pytest.approx(0.1)
    assert {T.lr_factor(step, 100, T.make_config("seed")) for step in range(100)} == {1.0}


def test_select_device():
    assert T.select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert T.select_device("auto").type in ("cpu", "mps")
        with pytest.raises(RuntimeError, match="device 'cuda' requested but CUDA is not available"):
            T.select_device("cuda")


# ---------------------------------------------------------------------------------------------- training


def test_a_run_writes_checkpoints_and_metrics_with_every_field(run3):
    out, history = run3
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.csv",
                                                     "metrics.json"]  # no temp files
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert json.loads((out / "metrics.json").read_text()) == history
    for record in history:
        assert set(record) == RECORD_KEYS and record["precision"] == "bf16"  # the default recipe on a CPU
        assert all(math.isfinite(v) for k, v in record.items() if k != "precision"), record
        assert record["train_loss"] > record["train_recon"] > 0 and record["train_commitment"] > 0
        assert 0 < record["train_ssim"] < 1
        assert record["train_loss"] == pytest.approx(record["train_recon"] + 0.5 * (1 - record["train_ssim"])
                                                     + 0.25 * record["train_commitment"] + record["train_codebook"])
        assert record["train_codebook"] == 0.0                            # EMA codebook: no codebook loss
        assert 0 < record["val_recon"] < 1 and -1 < record["val_ssim"] < 1 and record["val_psnr"] > 0
        assert 1 <= record["val_perplexity"] <= record["val_active"] <= 32
        assert isinstance(record["val_active"], int) and isinstance(record["restarts"], int)
        assert record["restarts"] >= 0 and record["images_per_s"] > 0 and record["seconds"] > 0
    assert history[2]["lr"] < history[1]["lr"] < history[0]["lr"] == pytest.approx(T.PRESETS["default"]["lr"])

    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 3 and last["history"] == history
    assert last["train_config"] == tiny(epochs=3).to_dict() and last["model_config"] == tiny().model
    assert {"optimizer_state", "scheduler_state", "rng"} <= set(last) and "scaler_state" not in last  # no fp16
    assert last["precision"] == "bf16"
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == 1 + int(np.argmax([h["val_ssim"] for h in history]))
    assert best["train_config"] == last["train_config"] and "optimizer_state" not in best
    model, _ = load_model(out / "last.pt", expect_config=tiny().model_config())
    assert_same_state(model.state_dict(), last["model_state"])


def test_same_seed_twice_gives_identical_history(run3, interrupted):
    """The interrupted run is the same config and seed: its first two epochs match to the last bit."""
    first_two = interrupted[2]
    assert [h["epoch"] for h in first_two] == [1, 2]
    assert untimed(first_two) == untimed(run3[1][:2])


def test_an_interrupted_run_resumes_exactly(run3, interrupted, tiny_phantom):
    """Ctrl-C in the middle of epoch 3 keeps last.pt of epoch 2; resuming gives the uninterrupted run."""
    out, last_of_epoch_2, _ = interrupted
    assert (out / "last.pt").read_bytes() == last_of_epoch_2               # intact
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.csv",
                                                     "metrics.json"]
    assert len(json.loads((out / "metrics.json").read_text())) == 2

    history = T.train(tiny_phantom, out, tiny(epochs=3), resume=True, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert_same_run(run3[0], out)


def test_resuming_with_more_epochs_equals_a_longer_run(tiny_phantom, tmp_path):
    """The seed recipe (constant learning rate): 2 epochs, then resumed to 3 = 3 epochs straight."""
    T.train(tiny_phantom, tmp_path / "a", tiny("seed", epochs=2), progress=False)
    history = T.train(tiny_phantom, tmp_path / "a", tiny("seed", epochs=3), resume=True, progress=False)
    straight = T.train(tiny_phantom, tmp_path / "b", tiny("seed", epochs=3), progress=False)
    assert untimed(history) == untimed(straight) and len(history) == 3
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert history[0]["train_codebook"] > 0 and history[0]["lr"] == history[2]["lr"] == 1e-3
    first = history[0]  # ssim_weight 0: the loss is MSE + VQ loss, with SSIM only recorded
    assert first["train_loss"] == pytest.approx(first["train_recon"] + 0.25 * first["train_commitment"]
                                                 + first["train_codebook"]) and -1 < first["train_ssim"] < 1


def test_resuming_a_finished_run_changes_nothing(run3, tiny_phantom):
    out, history = run3
    before = {name: (out / name).read_bytes() for name in runs.RUN_FILES}
    for epochs in (3, 2):
        assert T.train(tiny_phantom, out, tiny(epochs=epochs), resume=True, progress=False) == history
    assert {name: (out / name).read_bytes() for name in runs.RUN_FILES} == before


def test_resuming_with_another_config_is_refused(run3, tiny_phantom, tmp_path):
    out, _ = run3
    before = (out / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match="cannot resume from .*last.pt") as info:
        T.train(tiny_phantom, out, tiny(epochs=4, lr=5e-4, downsample=8), resume=True, progress=False)
    text = str(info.value)
    assert "lr: checkpoint 0.001, requested 0.0005" in text and "downsample: checkpoint 4, requested 8" in text
    assert "epochs: checkpoint" not in text                               # epochs may change
    assert (out / "last.pt").read_bytes() == before


def test_an_existing_run_is_not_overwritten_unless_asked(run3, tiny_phantom, tmp_path):
    out, _ = run3
    before = {name: (out / name).read_bytes() for name in runs.RUN_FILES}
    with pytest.raises(FileExistsError, match="already holds a run"):
        T.train(tiny_phantom, out, tiny(epochs=3), progress=False)
    assert {name: (out / name).read_bytes() for name in runs.RUN_FILES} == before
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    history = T.train(tiny_phantom, copy, tiny(epochs=1, limit=8), overwrite=True, progress=False)
    assert len(history) == 1
    assert load_checkpoint(copy / "last.pt")["epoch"] == load_checkpoint(copy / "best.pt")["epoch"] == 1


# ---------------------------------------------------------------------------------------------- evaluation


def test_reconstruct_gives_clipped_images_and_code_indices(run3, tiny_phantom):
    model, _ = load_model(run3[0] / "best.pt")
    model.train()
    images = np.array(load_split(tiny_phantom, "test", progress=False).images[:5])
    recon, indices = T.reconstruct(model, images, batch_size=2, device="cpu")
    assert model.training                                                  # mode restored
    assert recon.shape == images.shape and recon.dtype == np.float32 and 0 <= recon.min() <= recon.max() <= 1
    assert indices.shape == (5, 64, 32) and indices.dtype == np.int64 and 0 <= indices.min() <= indices.max() < 32
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(images[:, None])).recon.clamp(0, 1)[:, 0].numpy()
    np.testing.assert_allclose(recon, expected, atol=1e-6)


def test_evaluate_equals_a_direct_computation(run3, tiny_phantom):
    out, history = run3
    result = T.evaluate(out / "best.pt", tiny_phantom, "validate", device="cpu", progress=False)
    model, payload = load_model(out / "best.pt")
    split = load_split(tiny_phantom, "validate", progress=False)
    recon, indices = T.reconstruct(model, split.images, 64, "cpu", amp=True)  # the run trained with bf16
    ssim, psnr = ssim_psnr(recon, np.asarray(split.images))
    gaussian = ssim_gaussian(recon, np.asarray(split.images))
    usage = CodeUsage(32)
    usage.update(indices)
    np.testing.assert_array_equal(result["ssim"], ssim)
    np.testing.assert_array_equal(result["ssim_gaussian"], gaussian)
    np.testing.assert_array_equal(result["psnr"], psnr)
    np.testing.assert_array_equal(result["code_counts"], usage.counts)
    (case, week), = {(f.case, f.week) for f in split.files}                # the tiny phantom: one validation scan
    assert result["scans"] == [{"case": case, "week": week, "n_slices": 60, "ssim": ssim.mean(),
                                "ssim_gaussian": gaussian.mean(), "psnr": psnr.mean()}]
    s = result["summary"]
    assert s == {"n_slices": 60, "ssim_mean": ssim.mean(), "ssim_min": ssim.min(), "ssim_max": ssim.max(),
                 "psnr_mean": psnr.mean(), "psnr_min": psnr.min(), "psnr_max": psnr.max(),
                 "active_codes": usage.active, "perplexity": usage.perplexity, "codebook_size": 32,
                 "epoch": payload["epoch"], "ssim_gaussian_mean": gaussian.mean(),
                 "ssim_gaussian_min": gaussian.min(), "ssim_gaussian_max": gaussian.max(), "n_scans": 1,
                 "n_patients": 1, "scan_ssim_mean": ssim.mean(), "scan_ssim_ci95": [ssim.mean()] * 2,
                 "scan_ssim_gaussian_mean": gaussian.mean(), "scan_ssim_gaussian_ci95": [gaussian.mean()] * 2,
                 "scan_psnr_mean": psnr.mean(), "scan_psnr_ci95": [psnr.mean()] * 2}
    assert all(type(v) in (int, float) or type(v) is list and {type(x) for x in v} == {float} for v in s.values())
    assert result["names"] == [f.name for f in split.files] and len(result["cases"]) == len(result["weeks"]) == 60
    # The validation scores logged during training, from the (channels_last) training model.
    best = history[payload["epoch"] - 1]
    assert s["ssim_mean"] == pytest.approx(best["val_ssim"], abs=5e-3)
    assert s["active_codes"] == pytest.approx(best["val_active"], abs=2)


def test_cli_train_and_evaluate(tiny_phantom, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data-dir", str(tiny_phantom), "--out", str(run), "--preset", "default", "--epochs", "1",
            "--device", "cpu", "--seed", "3", "--batch-size", "8", "--limit", "8", "--lr", "5e-4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "epoch 1/1: loss " in text and f"{run / 'best.pt'}" in text and f"{run / 'metrics.json'}" in text
    config = load_checkpoint(run / "last.pt")["train_config"]
    assert (config["seed"], config["lr"], config["limit"], config["model"]["hidden"]) == (3, 5e-4, 8, 64)

    assert main(args) == 2                                                 # the run exists
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--data-dir", str(tiny_phantom), "--out", str(run), "--resume"]) == 0  # nothing to do
    assert "already finished 1 epoch: nothing to do" in capsys.readouterr().out
    assert main(["train", "--data-dir", str(tiny_phantom), "--out", str(run), "--resume", "--lr", "0.1"]) == 2
    assert "lr: checkpoint 0.0005, requested 0.1" in capsys.readouterr().err

    report = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data-dir", str(tiny_phantom),
                 "--json", str(report)]) == 0
    text = capsys.readouterr().out
    written = json.loads(report.read_text())
    summary, slices = written["summary"], written["slices"]
    assert written["split"] == "test" and summary["n_slices"] == len(slices) == 60 and summary["epoch"] == 1
    ssim, psnr = np.array([s["ssim"] for s in slices]), np.array([s["psnr"] for s in slices])
    assert (summary["ssim_mean"], summary["ssim_min"], summary["ssim_max"]) == (ssim.mean(), ssim.min(), ssim.max())
    assert (summary["psnr_mean"], summary["psnr_min"], summary["psnr_max"]) == (psnr.mean(), psnr.min(), psnr.max())
    assert 1 <= summary["perplexity"] <= summary["active_codes"] <= summary["codebook_size"] == 512
    assert slices[0]["name"] == f"case_{slices[0]['case']:03d}_week_{slices[0]['week']}_slice_{slices[0]['slice']}"
    assert f"SSIM  mean {ssim.mean():.4f}" in text and f"{summary['active_codes']}/512 active" in text
    gaussian = np.array([s["ssim_gaussian"] for s in slices])
    assert summary["ssim_gaussian_mean"] == gaussian.mean() and summary["n_scans"] == summary["n_patients"] == 1
    assert written["scans"] == [{"case": 40, "week": slices[0]["week"], "n_slices": 60, "ssim": ssim.mean(),
                                 "ssim_gaussian": gaussian.mean(), "psnr": psnr.mean()}]
    assert f"  SSIM  mean {ssim.mean():.4f}  min {ssim.min():.4f}  max {ssim.max():.4f}   (scikit-image default" in text
    assert (f"  SSIM  mean {gaussian.mean():.4f}  min {gaussian.min():.4f}  max {gaussian.max():.4f}   "
            f"(Wang et al.") in text
    assert (f"  per scan: 1 scan of 1 patient; SSIM {ssim.mean():.4f}, Gaussian SSIM {gaussian.mean():.4f}, PSNR "
            f"{psnr.mean():.2f} dB (a single scan: no interval over scans can be given)\n") in text

    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data-dir", str(tiny_phantom)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_compiled_training_matches_eager(tiny_phantom, tmp_path):
    """--compile compiles the encoder and decoder in place: same checkpoint keys, the same losses up to rounding."""
    eager = T.train(tiny_phantom, tmp_path / "eager", tiny(epochs=1), progress=False)
    compiled = T.train(tiny_phantom, tmp_path / "compiled", tiny(epochs=1), compile=True, progress=False)
    assert compiled[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=1e-2)
    assert compiled[0]["val_ssim"] == pytest.approx(eager[0]["val_ssim"], abs=1e-2)
    eager_state, compiled_state = (load_checkpoint(tmp_path / name / "best.pt", kind="vqvae")["model_state"]
                                   for name in ("eager", "compiled"))
    assert eager_state.keys() == compiled_state.keys()


def test_on_mps_runs_use_fp32_and_no_channels_last():
    config = T.make_config("default")
    on_mps = T.for_device(config, torch.device("mps"))
    assert (on_mps.precision, on_mps.channels_last) == ("fp32", False)
    assert (config.precision, config.channels_last) == ("auto", True)  # the saved config keeps what was asked for
    on_cpu = T.for_device(config, torch.device("cpu"))
    assert (on_cpu.precision, on_cpu.channels_last) == ("bf16", True)
    from vqvae_lib.prior import make_prior_config
    assert T.for_device(make_prior_config(), torch.device("mps")).precision == "fp32"


def test_no_float64_op_runs_in_the_training_loops(tiny_phantom, tmp_path):
    """Apple's MPS has no float64: the VQ-VAE, VAE and prior loops must not make a float64 tensor on the model's
    device (here the CPU, where every tensor lives), e.g. for their loss accumulators."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vqvae_lib.prior import make_prior_config, train_prior
    from vqvae_lib.vae import train_vae

    class Float64Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in torch.utils._pytree.tree_leaves(out)):
                self.ops.add(str(func))
            return out

    load_split(tiny_phantom, "train", progress=False)  # the data cache is built outside the recording
    load_split(tiny_phantom, "validate", progress=False)
    with Float64Ops() as mode:
        T.train(tiny_phantom, tmp_path / "vq", tiny(epochs=1), progress=False)
        train_vae(tiny_phantom, tmp_path / "vae", tiny(epochs=1), progress=False)
        train_prior(tmp_path / "vq" / "best.pt", tiny_phantom, tmp_path / "prior",
                    make_prior_config(codebook_size=32, channels=8, layers=2, epochs=1, limit=8, device="cpu"),
                    progress=False)
    assert mode.ops == set()


def test_a_steady_training_step_waits_for_the_device_at_most_once():
    """Host synchronisations (a tensor read on the host, or an op whose output shape depends on the data) counted
    with a dispatch mode over four steady steps of the default preset: at most one per step."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = ("aten._local_scalar_dense", "aten.nonzero", "aten.bincount", "aten.unique", "aten.masked_select")

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith(syncing):
                self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    config = T.make_config("default", limit=64, batch_size=16, device="cpu", epochs=2)
    device = torch.device("cpu")
    torch.manual_seed(0)
    model, optimizer, scheduler = T.prepare_model(VQVAE(config.model_config()), config, device, 8)
    images = torch.rand(64, 1, 256, 128)
    T.train_epoch(model, images, optimizer, scheduler, config, device, 1, False)  # k-means initialisation
    restarts = model.quantizer.restarts_total
    with Syncs() as syncs:
        T.train_epoch(model, images, optimizer, scheduler, config, device, 2, False)
    assert sum(syncs.ops.values()) <= 4, syncs.ops
    assert model.quantizer.restarts_total >= restarts  # restarts are still counted (on the device)


def test_validation_on_the_device_matches_scikit_image(run3, tiny_phantom):
    """`validate` scores with ssim_torch on the device; the scikit-image numbers of the same model agree."""
    model, _ = load_model(run3[0] / "best.pt")
    images = load_split(tiny_phantom, "validate", progress=False).images
    scores = T.validate(model, images, 16, torch.device("cpu"))
    recon, indices = T.reconstruct(model, images, 16)
    ssim, psnr = ssim_psnr(recon, np.asarray(images))
    usage = CodeUsage(model.config.codebook_size)
    usage.update(indices)
    assert scores["val_ssim"] == pytest.approx(ssim.mean(), abs=1e-5)
    assert scores["val_psnr"] == pytest.approx(psnr.mean(), abs=1e-3)
    assert scores["val_recon"] == pytest.approx(float(np.mean((recon - np.asarray(images)) ** 2)), rel=1e-5)
    assert (scores["val_active"], scores["val_perplexity"]) == (usage.active, pytest.approx(usage.perplexity))


def test_cudnn_autotuning_is_on_for_cuda_runs_only_and_restored():
    before = torch.backends.cudnn.benchmark
    with T.cudnn_autotune(torch.device("cuda")):
        assert torch.backends.cudnn.benchmark is True
    assert torch.backends.cudnn.benchmark == before
    with T.cudnn_autotune(torch.device("cpu")):
        assert torch.backends.cudnn.benchmark == before


def test_batches_for_a_gpu_go_through_pinned_memory(monkeypatch):
    moves = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: moves.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False: moves.append(
        (str(device), non_blocking)) or self)
    x = torch.zeros(2, 1, 4, 4)
    T.batch_to(x, torch.device("cuda", 0))
    assert moves == ["pin", ("cuda:0", True)]
    assert T.batch_to(x, torch.device("cpu")) is x and len(moves) == 2  # already there: no copy


def test_kmeans_codes_come_from_rank_0(monkeypatch):
    """Under data-parallel training every replica takes rank 0's initial codes (its broadcast)."""
    from vqvae_lib import distributed
    from vqvae_lib.quantizer import VectorQuantizer

    rank0 = torch.full((16, 4), 7.0)
    monkeypatch.setattr(distributed, "broadcast_tensor", lambda codes: codes.copy_(rank0))
    q = VectorQuantizer(16, 4, init="kmeans")
    q._init_from_data(torch.randn(128, 4))
    assert torch.equal(q.codebook, rank0) and torch.equal(q.embed_sum, rank0)


def test_a_compiled_model_compiles_once_whatever_the_batch_size():
    """An epoch of 20 slices in batches of 8 ends with a batch of 4: the compiled encoder and decoder are not
    compiled again for it (two graphs in all, one each)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    config = T.make_config("default", **TINY, limit=20, batch_size=8, device="cpu", epochs=2)
    torch.manual_seed(0)
    model, optimizer, scheduler = T.prepare_model(VQVAE(config.model_config()), config, torch.device("cpu"), 6)
    T.compile_model(model)
    for epoch in (1, 2):
        T.train_epoch(model, torch.rand(20, 1, 64, 32), optimizer, scheduler, config, torch.device("cpu"), epoch,
                      False)
    assert counters["stats"]["unique_graphs"] == 2
