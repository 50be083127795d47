"""Precision by hardware: the resolver on simulated devices (no GPU needed), and real fp16 + GradScaler runs on
the CPU (its fp16 autocast), resumed exactly; checkpoints older than the precision setting."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vqvae_lib import prior as P, runs, train as T, vae as V
from vqvae_lib.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vqvae_lib.model import VQVAE

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")
TINY = dict(hidden=16, res_hidden=8, codebook_size=32, embed_dim=8, limit=16, batch_size=8, device="cpu", seed=0)
FP16 = {**TINY, "hidden": 8, "res_hidden": 4, "n_res": 1, "limit": 8, "batch_size": 4}  # CPU fp16 is slow
TIMING = ("seconds", "images_per_s", "maps_per_s")


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def simulate_gpu(monkeypatch, capability: tuple[int, int], name: str) -> None:
    """torch.cuda as a GPU of `capability` reports it; is_bf16_supported counts emulated bf16 as torch does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: capability >= (8, 0) or including_emulation)


def resolved(preset: str = "default", device: torch.device = CPU, **overrides) -> str:
    return T.resolve_precision(T.make_config(preset, **overrides), device)


# ---------------------------------------------------------------------------------------------- resolving


def test_on_the_cpu_auto_is_bf16_with_amp_and_fp32_without():
    assert T.PRECISIONS == ("auto", "bf16", "fp16", "fp32") and T.make_config().precision == "auto"
    assert resolved() == "bf16" and resolved("seed") == "fp32"  # the seed recipe has amp=False
    assert [resolved(precision=p) for p in ("bf16", "fp16", "fp32")] == ["bf16", "fp16", "fp32"]
    assert resolved("seed", precision="fp16") == "fp16"  # an explicit precision overrides amp
    with pytest.raises(ValueError, match="precision must be one of .*, not 'fp8'"):
        T.make_config(precision="fp8")
    with pytest.raises(ValueError, match="precision must be one of"):
        P.make_prior_config(precision="half")


@pytest.mark.parametrize("capability, name, auto", [((8, 0), "NVIDIA A100-SXM4-40GB", "bf16"),
                                                    ((9, 0), "NVIDIA H100", "bf16"),
                                                    ((7, 5), "Tesla T4", "fp16"),
                                                    ((7, 0), "Tesla V100-SXM2-16GB", "fp16")])
def test_on_a_gpu_auto_is_bf16_where_native_else_fp16(monkeypatch, capability, name, auto):
    simulate_gpu(monkeypatch, capability, name)
    assert resolved(device=CUDA) == auto and resolved("seed", device=CUDA) == "fp32"
    assert T.resolve_precision(P.make_prior_config(), CUDA) == auto
    assert T.grad_scaler(auto, CPU).is_enabled() == (auto == "fp16")
    assert resolved(device=CUDA, precision="fp16") == "fp16" and resolved(device=CUDA, precision="fp32") == "fp32"
    if auto == "bf16":
        assert resolved(device=CUDA, precision="bf16") == "bf16"


def test_explicit_bf16_on_a_gpu_without_it_names_the_gpu_and_the_way_out(monkeypatch):
    simulate_gpu(monkeypatch, (7, 5), "Tesla T4")
    with pytest.raises(ValueError, match=r"cuda:0 \(Tesla T4\) has compute capability 7\.5; "
                                         r"use --precision fp16 or fp32"):
        resolved(device=CUDA, precision="bf16")
    with pytest.raises(ValueError, match="compute capability 7.5"):
        T.for_device(P.make_prior_config(precision="bf16"), CUDA)


def test_on_mps_auto_is_fp32_and_mixed_precision_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    device = T.select_device("auto")
    assert device.type == "mps" and resolved(device=device) == resolved(device=device, precision="fp32") == "fp32"
    for precision in ("bf16", "fp16"):
        with pytest.raises(ValueError, match=f"precision {precision} is not supported on mps.*fp32 or auto"):
            resolved(device=device, precision=precision)


def test_for_device_resolves_and_the_saved_config_keeps_the_request(monkeypatch):
    simulate_gpu(monkeypatch, (7, 5), "Tesla T4")
    config = T.make_config()
    on_t4 = T.for_device(config, CUDA)
    assert (on_t4.precision, on_t4.channels_last, config.precision) == ("fp16", True, "auto")
    assert T.resolve_precision(on_t4, CUDA) == "fp16"  # resolving a resolved config changes nothing


def test_evaluation_runs_a_checkpoint_in_its_own_precision_as_far_as_the_device_has_it(monkeypatch):
    new = {"precision": "bf16", "train_config": {"amp": True, "precision": "auto"}}
    old_amp, old_fp32 = {"train_config": {"amp": True}}, {"train_config": {"amp": False}}  # before `precision`
    fp16 = {"precision": "fp16", "train_config": {"amp": True, "precision": "auto"}}
    assert [T.checkpoint_precision(p, CPU) for p in (new, old_amp, old_fp32, fp16)] == ["bf16", "bf16", "fp32", "fp16"]
    assert T.checkpoint_precision(new, MPS) == T.checkpoint_precision(fp16, MPS) == "fp32"
    simulate_gpu(monkeypatch, (8, 6), "NVIDIA A10")
    assert [T.checkpoint_precision(p, CUDA) for p in (new, old_amp, fp16)] == ["bf16", "bf16", "fp16"]
    simulate_gpu(monkeypatch, (7, 5), "Tesla T4")
    assert [T.checkpoint_precision(p, CUDA) for p in (new, old_amp, old_fp32)] == ["fp16", "fp16", "fp32"]


def test_autocast_takes_a_precision_or_the_old_bool():
    a, b = torch.rand(4, 4), torch.rand(4, 4)
    for amp, dtype in [("bf16", torch.bfloat16), (True, torch.bfloat16), ("fp16", torch.float16),
                       ("fp32", torch.float32), (False, torch.float32)]:
        with T.autocast(CPU, amp):
            assert torch.mm(a, b).dtype == dtype, amp
    with pytest.raises(ValueError, match="autocast precision must be .*, not 'auto'"):
        T.autocast(CPU, "auto")


# ---------------------------------------------------------------------------------------------- fp16 runs


@pytest.fixture(scope="module")
def few_slices(tiny_phantom, tmp_path_factory):
    """The tiny phantom's first 8 train and 12 validate slices: CPU fp16 is slow, and validation sees every slice."""
    root = tmp_path_factory.mktemp("few") / "hipmri"
    for split, n in (("train", 8), ("validate", 12)):
        (root / f"keras_slices_{split}").mkdir(parents=True)
        for path in sorted((tiny_phantom / f"keras_slices_{split}").iterdir())[:n]:
            shutil.copy(path, root / f"keras_slices_{split}" / path.name)
    return root


@pytest.fixture(scope="module")
def fp16_runs(few_slices, tmp_path_factory):
    """A 2-epoch fp16 run, and the same run stopped after epoch 1 and then resumed."""
    root = tmp_path_factory.mktemp("fp16")
    config = T.make_config("default", **FP16, epochs=2, precision="fp16")
    straight = T.train(few_slices, root / "straight", config, progress=False)

    def stop_after_epoch_1(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(few_slices, root / "resumed", config, progress=False, callback=stop_after_epoch_1)
    assert load_checkpoint(root / "resumed" / "last.pt")["epoch"] == 1
    resumed = T.train(few_slices, root / "resumed", config, resume=True, progress=False)
    return root, straight, resumed


def test_an_fp16_run_scales_its_losses_and_records_its_precision(fp16_runs):
    root, history, _ = fp16_runs
    for record in history:
        assert record["precision"] == "fp16"
        assert all(math.isfinite(v) for k, v in record.items() if k != "precision"), record
        assert 0 < record["train_recon"] < 1 and -1 < record["val_ssim"] < 1
    last, best = load_checkpoint(root / "straight" / "last.pt"), load_checkpoint(root / "straight" / "best.pt")
    assert last["precision"] == best["precision"] == "fp16" and last["train_config"]["precision"] == "fp16"
    scaler = last["scaler_state"]
    assert (scaler["scale"], scaler["_growth_tracker"]) != (2.0 ** 16, 0)  # it has moved from its initial state
    assert "scaler_state" not in best
    assert all(torch.isfinite(t).all() for t in last["model_state"].values() if t.is_floating_point())


def test_an_fp16_run_resumed_after_one_epoch_equals_the_uninterrupted_run(fp16_runs):
    root, straight, resumed = fp16_runs
    assert untimed(resumed) == untimed(straight) and len(resumed) == 2
    a, b = load_checkpoint(root / "straight" / "last.pt"), load_checkpoint(root / "resumed" / "last.pt")
    assert a["scaler_state"] == b["scaler_state"]
    for name, weight in a["model_state"].items():
        assert torch.equal(weight, b["model_state"][name]), name
    for sa, sb in zip(a["optimizer_state"]["state"].values(), b["optimizer_state"]["state"].values()):
        assert all(torch.equal(sa[key], sb[key]) for key in sa)


def test_an_fp16_checkpoint_is_evaluated_in_fp16(fp16_runs, few_slices, monkeypatch):
    used, reconstruct = [], T.reconstruct
    monkeypatch.setattr(T, "reconstruct", lambda *a, amp, **k: used.append(amp) or reconstruct(*a, amp=amp, **k))
    result = T.evaluate(fp16_runs[0] / "straight" / "best.pt", few_slices, "validate", device="cpu",
                        progress=False)
    assert used == ["fp16"] and np.isfinite(result["ssim"]).all()


def test_a_broken_scaler_state_is_refused(fp16_runs, tmp_path):
    payload = load_checkpoint(fp16_runs[0] / "straight" / "last.pt")
    save_checkpoint(tmp_path / "last.pt", {**payload, "scaler_state": [65536.0]})
    with pytest.raises(CheckpointError, match="its scaler_state is a list"):
        runs.load_resume(tmp_path, "vqvae")


def test_fp16_training_without_the_runs_scaler_is_refused():
    config = T.make_config("default", **TINY, precision="fp16")
    model, optimizer, scheduler = T.prepare_model(VQVAE(config.model_config()), config, CPU, 1)
    with pytest.raises(ValueError, match="fp16 training needs the run's GradScaler"):
        T.train_epoch(model, torch.rand(8, 1, 64, 32), optimizer, scheduler, config, CPU, 1, False)
    T.train_epoch(model, torch.rand(8, 1, 64, 32), optimizer, scheduler, config, CPU, 1, False,
                  T.grad_scaler("fp16", CPU))


def test_the_vae_and_the_prior_train_in_fp16_too(fp16_runs, few_slices, tmp_path):
    config = T.make_config("default", **FP16, downsample=8, epochs=1, ssim_weight=0.0, precision="fp16")
    history = V.train_vae(few_slices, tmp_path / "vae", config, progress=False)
    assert history[0]["precision"] == "fp16" and math.isfinite(history[0]["train_loss"])
    assert load_checkpoint(tmp_path / "vae" / "last.pt")["scaler_state"]["scale"] > 0
    prior_config = P.make_prior_config(codebook_size=32, channels=8, layers=2, epochs=1, limit=8, device="cpu",
                                       precision="fp16")
    history = P.train_prior(fp16_runs[0] / "straight" / "best.pt", few_slices, tmp_path / "prior", prior_config,
                            progress=False)
    assert history[0]["precision"] == "fp16" and math.isfinite(history[0]["train_nll"])
    last = load_checkpoint(tmp_path / "prior" / "last.pt")
    assert last["precision"] == "fp16" and last["scaler_state"]["scale"] > 0


# ---------------------------------------------------------------------------------------------- older runs


def test_a_checkpoint_from_before_the_precision_setting_loads_as_auto(tmp_path):
    """The committed default.pt with every precision field removed, as checkpoints were written before it."""
    payload = load_checkpoint(Path(__file__).resolve().parents[1] / "checkpoints" / "default.pt")
    payload.pop("precision", None)
    del payload["train_config"]["precision"]
    for record in payload["history"]:
        del record["precision"]
    save_checkpoint(tmp_path / "old.pt", payload)
    payload = load_checkpoint(tmp_path / "old.pt")
    config = T.TrainConfig.from_dict(payload["train_config"])
    assert config.precision == "auto" and T.resolve_precision(config, CPU) == "bf16"
    assert T.checkpoint_precision(payload, CPU) == "bf16"  # as it was trained and validated


def test_an_older_run_resumes_as_auto(few_slices, tmp_path):
    """A run whose last.pt predates `precision` (no field in its config, records or payload), `normalize_mse`
    and the quantizer fields resumes as "auto", the paper's quantizer, and continues exactly as the run would
    have."""
    config = T.make_config("seed", **TINY, epochs=2)
    straight = T.train(few_slices, tmp_path / "straight", config, progress=False)
    T.train(few_slices, tmp_path / "old", T.make_config(**{**config.to_dict(), "epochs": 1}), progress=False)
    last = load_checkpoint(tmp_path / "old" / "last.pt")
    del last["precision"], last["train_config"]["precision"], last["history"][0]["precision"]
    del last["train_config"]["normalize_mse"]
    for key in ("quantizer", "lookup_dim", "fsq_levels"):
        del last["model_config"][key], last["train_config"]["model"][key]
    save_checkpoint(tmp_path / "old" / "last.pt", last)
    resumed = T.train(few_slices, tmp_path / "old", config, resume=True, progress=False)
    assert untimed(resumed[1:]) == untimed(straight[1:]) and resumed[1]["precision"] == "fp32"
    assert load_checkpoint(tmp_path / "old" / "last.pt")["train_config"] == config.to_dict()
