"""Data-parallel training with torchrun: 2 CPU processes (gloo) against one process on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqvae_lib import distributed
from vqvae_lib.checkpoint import load_checkpoint
from vqvae_lib.cli import main
from vqvae_lib.train import global_batches

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
REPO = Path(__file__).resolve().parents[1]


def train_args(data: Path, out: Path, epochs: int = 2) -> list[str]:
    return ["-m", "vqvae_lib", "train", "--device", "cpu", "--limit", "64", "--epochs", str(epochs), "--batch-size",
            "16", "--downsample", "8", "--seed", "3", "--data-dir", str(data), "--out", str(out)]


def _run(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes share the two cores
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tiny_phantom, tmp_path_factory):
    """The same run twice: one process, and torchrun with 2 processes splitting each global batch of 16."""
    root = tmp_path_factory.mktemp("ddp")
    _run([sys.executable, *train_args(tiny_phantom, root / "single")])
    _run([*TORCHRUN, *train_args(tiny_phantom, root / "ddp")])
    return {"dir": root, **{name: (json.loads((root / name / "metrics.json").read_text()),
                                   load_checkpoint(root / name / "last.pt", kind="vqvae"))
                            for name in ("single", "ddp")}}


def test_every_process_keeps_the_same_weights_and_codebook(runs, capsys):
    history, _ = runs["ddp"]
    # replica_divergence is only recorded by a data-parallel run: max |weight or buffer - rank 0's| after each epoch.
    assert [record["replica_divergence"] for record in history] == [0.0, 0.0]
    with capsys.disabled():
        print("\ntorchrun test: executed with 2 processes (gloo backend); replicas identical after every epoch")


def test_data_parallel_run_matches_one_process(runs):
    (single, one), (ddp, two) = runs["single"], runs["ddp"]
    assert "replica_divergence" not in single[0]
    # Same data, order, global batches and codebook updates: only float summation order differs (bf16 autocast).
    for a, b in zip(single, ddp, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_ssim"] == pytest.approx(a["val_ssim"], abs=2e-3)
        assert b["val_active"] == a["val_active"] and b["restarts"] == a["restarts"]
    for name, weight in one["model_state"].items():
        if weight.is_floating_point() and weight.numel():
            diff = (weight - two["model_state"][name]).norm() / weight.norm().clamp(min=1e-8)
            assert diff < 0.02, f"{name} differs by {diff:.4f} of its norm"


def test_a_data_parallel_run_resumes(runs, tiny_phantom):
    ddp_dir = runs["dir"] / "ddp"
    _run([*TORCHRUN, *train_args(tiny_phantom, ddp_dir, epochs=3), "--resume"])
    history = json.loads((ddp_dir / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3] and history[:2] == runs["ddp"][0]
    assert history[2]["replica_divergence"] == 0.0


def test_other_commands_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["vae", "--data-dir", "x", "--out", "y"]) == 2
    assert "only `train` runs data-parallel; run `vae` without torchrun" in capsys.readouterr().err


def test_global_batches_leave_out_a_last_batch_too_small_to_split():
    assert global_batches(70, 32) == [(0, 32), (32, 64), (64, 70)]
    assert global_batches(65, 32, world=2) == [(0, 32), (32, 64)]
    assert global_batches(66, 32, world=2) == [(0, 32), (32, 64), (64, 66)]


def test_helpers_are_no_ops_in_one_process():
    x = torch.arange(6.0).reshape(3, 2)
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_reduce_sum(x.clone()).equal(x)
    assert distributed.gather_rows(x).equal(x)
    assert distributed.main_first(lambda: 1, lambda: 2) == 1


def test_more_processes_than_gpus_is_said_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.cuda_index() == 1
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(RuntimeError, match=r"process 2 of this node has no GPU of its own: the node has 2 visible "
                                           r"GPUs; start at most 2 processes per node \(torchrun --nproc_per_node=2\)"):
        distributed.cuda_index()


def test_buffer_sync_option_of_older_and_newer_torch():
    class Older:
        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            pass

    class Newer:
        def __init__(self, module, device_ids=None, broadcast_buffers=True, forward_sync_buffers=True):
            pass

    assert distributed.no_buffer_sync(Older) == {"broadcast_buffers": False}
    assert distributed.no_buffer_sync(Newer) == {"forward_sync_buffers": False}
    from torch.nn.parallel import DistributedDataParallel
    assert list(distributed.no_buffer_sync(DistributedDataParallel)) == ["forward_sync_buffers"]  # torch 2.13
