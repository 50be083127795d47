"""Run folders under careless use, real kills and concurrent runs: nothing a user does may lose work.

Kills are real SIGKILLs of `python -m vqvae_lib train` subprocesses, at chosen moments (inside a file write,
between two files, during a training step, while the data cache is built) or at seeded random times.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vqvae_lib import runs, train as T
from vqvae_lib.checkpoint import load_checkpoint
from vqvae_lib.cli import main
from vqvae_lib.fileio import HOST
from vqvae_lib.model import VQVAE
from vqvae_lib.vae import train_vae

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden=16, res_hidden=8, codebook_size=32, embed_dim=8)
TIMING = ("seconds", "images_per_s")
# The CLI run the subprocess tests train: the default recipe on 16 slices, 8x grid, 3 epochs of 2 steps.
TRAIN = ["train", "--epochs", "3", "--limit", "16", "--batch-size", "8", "--downsample", "8", "--device", "cpu"]

# `python -m vqvae_lib` with a SIGKILL of itself at the n-th event of a kind (KILL_AT="kind:n"): "write" inside
# an atomic file write (temp file complete, not yet moved into place), "after" just after one, "step" at a
# training step's forward pass, "decode" while the data cache is built (at the n-th slice normalised).
HOOKED = """
import os, signal, sys
from vqvae_lib import checkpoint, cli, data, fileio, model, runs

kind, _, n = os.environ.get("KILL_AT", "none:0").partition(":")
count = [0]

def tick():
    count[0] += 1
    if count[0] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)

if kind in ("write", "after"):
    real_write = fileio.atomic_write

    def atomic_write(path, write):
        if kind == "write":
            real_write(path, lambda f: (write(f), f.flush(), tick()))
        else:
            real_write(path, write)
            tick()

    fileio.atomic_write = checkpoint.atomic_write = runs.atomic_write = atomic_write
elif kind == "step":
    forward = model.VQVAE.forward
    model.VQVAE.forward = lambda self, x: (tick(), forward(self, x))[1]
elif kind == "decode":
    normalize = data.normalize
    data.normalize = lambda *a, **k: (tick(), normalize(*a, **k))[1]
sys.exit(cli.main(sys.argv[1:]))
"""


def tiny(**overrides) -> T.TrainConfig:
    return T.make_config("default", **{**TINY, "limit": 16, "batch_size": 8, "device": "cpu", **overrides})


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(args: list[str], kill_at: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess (with the kill hook when kill_at is given)."""
    env = {**os.environ, "KILL_AT": kill_at or "none:0"}
    return subprocess.run([sys.executable, "-c", HOOKED, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def requeue_args(data_dir: Path, out: Path) -> list[str]:
    """The README's requeue line: --resume auto."""
    return [*TRAIN, "--data-dir", str(data_dir), "--out", str(out), "--resume", "auto"]


def assert_same_run(a: Path, b: Path) -> None:
    """The same history (but timing), weights, optimizer state and best model in two run folders."""
    last_a, last_b = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert untimed(last_a["history"]) == untimed(last_b["history"])
    for key in last_a["model_state"]:
        assert torch.equal(last_a["model_state"][key], last_b["model_state"][key]), key
    for sa, sb in zip(last_a["optimizer_state"]["state"].values(), last_b["optimizer_state"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(last_a["rng"]["torch"], last_b["rng"]["torch"])
    best_a, best_b = load_checkpoint(a / "best.pt"), load_checkpoint(b / "best.pt")
    assert best_a["epoch"] == best_b["epoch"]
    assert all(torch.equal(best_a["model_state"][k], best_b["model_state"][k]) for k in best_a["model_state"])
    assert untimed(json.loads((a / "metrics.json").read_text())) == untimed(last_b["history"])
    assert_tables_match(b)
    assert json.loads((b / "config.json").read_text())["train_config"] == last_b["train_config"]


def assert_tables_match(folder: Path) -> None:
    """metrics.csv holds the values of metrics.json, one row per epoch."""
    history = json.loads((folder / "metrics.json").read_text())
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == [record["epoch"] for record in history]
    for row, record in zip(rows, history):
        assert set(row) == set(record)
        assert all(row[k] == v if isinstance(v, str) else float(row[k]) == v for k, v in record.items()), row


def assert_clean(*folders: Path) -> None:
    """No lock, temp file or replaced run left behind."""
    for folder in folders:
        left = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name in (runs.LOCK, runs.REPLACED)]
        assert not left, f"{folder}: {left}"


@pytest.fixture(scope="module")
def data_copy(tiny_phantom, tmp_path_factory) -> Path:
    """A copy of the tiny phantom with its cache, that the subprocess runs share."""
    root = tmp_path_factory.mktemp("data") / "hipmri"
    shutil.copytree(tiny_phantom, root, ignore=shutil.ignore_patterns(".cache"))
    return root


@pytest.fixture(scope="module")
def reference(data_copy, tmp_path_factory) -> Path:
    """The CLI run of TRAIN, never interrupted (it also builds the shared copy's data cache)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = cli(requeue_args(data_copy, out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def vq_run(tiny_phantom, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vq") / "run"
    T.train(tiny_phantom, out, tiny(epochs=2), progress=False)
    return out


# ---------------------------------------------------------------------------------------------- overwrite


def test_overwrite_with_a_mistyped_data_folder_keeps_the_run(vq_run, tmp_path, capsys):
    before = snapshot(vq_run)
    assert main(["train", "--data-dir", str(tmp_path / "TYPO"), "--out", str(vq_run), "--overwrite"]) == 2
    assert f"error: data folder {tmp_path / 'TYPO'} does not exist" in capsys.readouterr().err
    assert snapshot(vq_run) == before


def test_overwrite_refuses_an_input_inside_the_folder_it_would_replace(vq_run, tiny_phantom, capsys):
    before = snapshot(vq_run)
    assert main(["prior", "--checkpoint", str(vq_run / "best.pt"), "--data-dir", str(tiny_phantom),
                 "--out", str(vq_run), "--overwrite", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"error: {vq_run / 'best.pt'} is inside {vq_run}, which overwrite would replace" in err
    assert snapshot(vq_run) == before


def test_overwrite_refuses_a_run_of_another_kind(vq_run, tiny_phantom, tmp_path, capsys):
    vae_run = tmp_path / "vae"
    train_vae(tiny_phantom, vae_run, tiny(epochs=1, limit=8), progress=False)
    before = snapshot(vae_run)
    assert main(["train", "--data-dir", str(tiny_phantom), "--out", str(vae_run), "--overwrite", "--epochs", "1",
                 "--limit", "8", "--device", "cpu"]) == 2
    assert f"refusing to replace the vae run in {vae_run} by a vqvae run" in capsys.readouterr().err
    assert snapshot(vae_run) == before


def test_a_failed_overwrite_puts_the_old_run_back_and_a_finished_epoch_replaces_it(vq_run, tiny_phantom, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(vq_run, run)
    for name in ("config.json", "metrics.csv"):  # a run written before these existed: the new run's go again
        (run / name).unlink()
    before = snapshot(run)
    forward = VQVAE.forward

    def fail(self, x):
        raise KeyboardInterrupt

    VQVAE.forward = fail
    try:
        with pytest.raises(KeyboardInterrupt):
            T.train(tiny_phantom, run, tiny(epochs=1, limit=8), overwrite=True, progress=False)
    finally:
        VQVAE.forward = forward
    assert snapshot(run) == before                                         # back, byte for byte, no lock left

    seen = []
    history = T.train(tiny_phantom, run, tiny(epochs=2, limit=8, seed=5), overwrite=True, progress=False,
                      callback=lambda record: seen.append(sorted(p.name for p in run.iterdir())))
    assert seen[0] == [runs.LOCK, "best.pt", "config.json", "last.pt", "metrics.csv", "metrics.json"]  # old one gone
    assert len(history) == 2 and load_checkpoint(run / "last.pt")["train_config"]["seed"] == 5
    assert json.loads((run / "config.json").read_text())["train_config"]["seed"] == 5
    assert_tables_match(run)
    assert_clean(run)


def test_a_killed_overwrite_is_put_back_by_the_next_run(vq_run, data_copy, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(vq_run, run)
    before = snapshot(run)
    killed = cli([*TRAIN, "--data-dir", str(data_copy), "--out", str(run), "--overwrite"], kill_at="step:1")
    assert killed.returncode == -signal.SIGKILL
    assert (run / runs.REPLACED / "last.pt").exists() and not (run / "last.pt").exists()
    assert {"config.json", "metrics.csv"} <= {p.name for p in (run / runs.REPLACED).iterdir()}
    assert json.loads((run / "config.json").read_text())["resumed_from_epoch"] == 0  # written as the run started
    again = cli([*TRAIN, "--data-dir", str(data_copy), "--out", str(run)])  # no --overwrite: refused, after...
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert "restoring the run that an interrupted overwrite was replacing" in again.stderr
    assert "taking over the stale lock" in again.stderr
    assert snapshot(run) == before                                         # ...the old run is back


# ---------------------------------------------------------------------------------------------- the lock


def test_a_second_run_on_a_locked_folder_is_refused_at_once(tiny_phantom, tmp_path):
    run, refused = tmp_path / "run", []

    def second_run(record):
        with pytest.raises(runs.RunError, match=f"{run} is in use by process {os.getpid()} on {HOST}") as info:
            T.train(tiny_phantom, run, tiny(epochs=1), overwrite=True, progress=False)
        refused.append(str(info.value))

    T.train(tiny_phantom, run, tiny(epochs=1), progress=False, callback=second_run)
    assert len(refused) == 1 and "started 20" in refused[0]               # when, and the command
    assert not (run / runs.LOCK).exists()                                  # released


def test_two_train_processes_on_one_folder_and_the_lock_of_a_killed_one(data_copy, reference, tmp_path):
    run = tmp_path / "run"
    args = [*TRAIN, "--epochs", "50", "--data-dir", str(data_copy), "--out", str(run)]
    first = subprocess.Popen([sys.executable, "-m", "vqvae_lib", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / runs.LOCK).exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        started = time.monotonic()
        second = cli(args)
        assert second.returncode == 2 and time.monotonic() - started < 30
        assert f"error: {run} is in use by process {first.pid} on {HOST}" in second.stderr
        assert "vqvae_lib train" in second.stderr                          # the holder's command
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run / runs.LOCK).exists()                                      # the dead process's lock
    short = [*TRAIN, "--epochs", "1", "--data-dir", str(data_copy), "--out", str(run)]  # the last --epochs counts
    third = cli(short + ["--resume"] * (run / "last.pt").exists())
    assert third.returncode == 0, third.stderr
    assert f"taking over the stale lock {run / runs.LOCK} of process {first.pid} on {HOST}" in third.stderr
    assert load_checkpoint(run / "last.pt")["epoch"] >= 1
    assert_clean(run)


# ---------------------------------------------------------------------------------------------- kills


def test_a_kill_between_last_pt_and_best_pt_resumes(data_copy, reference, tmp_path):
    """Writes: the lock, config.json, then last.pt of epoch 1 (the 3rd): killed before best.pt exists."""
    run = tmp_path / "run"
    assert cli(requeue_args(data_copy, run), kill_at="after:3").returncode == -signal.SIGKILL
    assert sorted(p.name for p in run.iterdir()) == [runs.LOCK, "config.json", "last.pt"]
    done = cli(requeue_args(data_copy, run))                               # resumed, as --resume auto says
    assert done.returncode == 0, done.stderr
    assert "rewriting best.pt of epoch 1 from last.pt" in done.stderr
    assert_same_run(reference, run)


def test_a_kill_inside_a_write_leaves_a_temp_file_that_the_next_run_removes(data_copy, reference, tmp_path):
    run = tmp_path / "run"
    assert cli(requeue_args(data_copy, run), kill_at="write:3").returncode == -signal.SIGKILL
    temps = [p.name for p in run.iterdir() if p.name.startswith(".last.pt.") and p.name.endswith(".tmp")]
    assert len(temps) == 1 and not (run / "last.pt").exists()
    done = cli(requeue_args(data_copy, run))                               # no last.pt: a new run
    assert done.returncode == 0, done.stderr
    assert_same_run(reference, run)
    assert_clean(run)


def test_resume_of_a_folder_with_no_finished_epoch_starts_from_scratch(tiny_phantom, tmp_path, caplog):
    fresh = T.train(tiny_phantom, tmp_path / "a", tiny(epochs=1), progress=False)
    resumed = T.train(tiny_phantom, tmp_path / "b", tiny(epochs=1), resume=True, progress=False)
    assert untimed(resumed) == untimed(fresh)
    assert f"{tmp_path / 'b'} has no finished epoch to resume: starting from scratch" in caplog.text


def test_killed_at_random_moments_a_run_finishes_as_if_never_interrupted(tiny_phantom, data_copy, reference,
                                                                         tmp_path, capsys):
    """24 attempts in 4 folders, each killed (SIGKILL) at a seeded moment: inside a file write, between two
    files, at a training step, during the data cache build (the first folders decode a fresh copy of the data),
    or after a random delay; then each folder is run to its end with the README's requeue line (--resume auto)."""
    rng = random.Random(20261201)
    kills, killed_at = 0, []
    for scenario in range(4):
        data_dir = data_copy
        if scenario < 2:  # a copy without a cache: the first attempts are killed while it is built
            data_dir = tmp_path / f"data{scenario}"
            shutil.copytree(tiny_phantom, data_dir, ignore=shutil.ignore_patterns(".cache"))
        run = tmp_path / f"run{scenario}"
        plans = [f"decode:{rng.randint(1, 239)}"] * (scenario < 2) + [
            rng.choice([f"write:{rng.randint(1, 4)}", f"after:{rng.randint(1, 4)}", f"step:{rng.randint(1, 4)}",
                        f"time:{rng.uniform(2.0, 8.0):.1f}"]) for _ in range(6 - (scenario < 2))]
        for plan in plans:
            kind, _, value = plan.partition(":")
            if kind == "time":
                process = subprocess.Popen([sys.executable, "-m", "vqvae_lib", *requeue_args(data_dir, run)],
                                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    process.wait(float(value))
                except subprocess.TimeoutExpired:
                    process.send_signal(signal.SIGKILL)
                returncode = process.wait()
            else:
                returncode = cli(requeue_args(data_dir, run), kill_at=plan).returncode
            assert returncode in (0, -signal.SIGKILL), plan
            kills += returncode == -signal.SIGKILL
            killed_at += [plan] * (returncode == -signal.SIGKILL)
        done = cli(requeue_args(data_dir, run))
        assert done.returncode == 0, done.stderr
        assert_same_run(reference, run)
        assert_clean(run, data_dir / ".cache")
    assert kills >= 20
    with capsys.disabled():
        print(f"\nkill test: {kills} SIGKILLs of `train` ({', '.join(killed_at)}); 4 run folders finished "
              "identical to the uninterrupted run")


# ---------------------------------------------------------------------------------------------- data


def test_resuming_on_other_data_is_refused_unless_asked(tiny_phantom, tmp_path, caplog):
    run, moved, other = tmp_path / "run", tmp_path / "moved", tmp_path / "other"
    T.train(tiny_phantom, run, tiny(epochs=1), progress=False)
    recorded = load_checkpoint(run / "last.pt")["data"]
    assert recorded["dir"] == str(tiny_phantom.resolve()) and len(recorded["fingerprint"]) == 64
    assert recorded["options"] == {"shape_policy": "crop", "normalization": "percentile"}
    assert load_checkpoint(run / "best.pt")["data"] == recorded

    shutil.copytree(tiny_phantom, moved, ignore=shutil.ignore_patterns(".cache"))  # the same data elsewhere
    shutil.copytree(tiny_phantom, other, ignore=shutil.ignore_patterns(".cache"))
    for path in sorted((other / "keras_slices_train").glob("case_*_slice_5*.nii.gz")):
        path.unlink()                                                      # other data: fewer slices
    before = snapshot(run)
    with pytest.raises(runs.RunError, match=f"cannot resume from {run / 'last.pt'}: it was trained on other data "
                                            f"\\({tiny_phantom.resolve()} then, {other.resolve()} now"):
        T.train(other, run, tiny(epochs=2), resume=True, progress=False)
    with pytest.raises(runs.RunError, match="options {'shape_policy': 'crop', 'normalization': 'percentile'} then, "
                                            "{'shape_policy': 'resize', 'normalization': 'percentile'} now"):
        T.train(tiny_phantom, run, tiny(epochs=2), resume=True, progress=False,
                data_options={"shape_policy": "resize"})
    assert snapshot(run) == before

    T.train(moved, run, tiny(epochs=2), resume=True, progress=False)       # moved data are the same data
    history = T.train(other, run, tiny(epochs=3), resume=True, allow_other_data=True, progress=False)
    assert len(history) == 3 and "resuming" in caplog.text and "on other data" in caplog.text
    data = load_checkpoint(run / "last.pt")["data"]
    assert data["dir"] == str(other.resolve()) and data["fingerprint"] != recorded["fingerprint"]
    assert [d["dir"] for d in data["earlier"]] == [str(moved.resolve())]


def test_cli_resume_on_other_data(tiny_phantom, tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    args = ["train", "--out", str(run), "--epochs", "1", "--limit", "8", "--batch-size", "8", "--downsample", "16",
            "--device", "cpu"]
    assert main([*args, "--data-dir", str(tiny_phantom)]) == 0
    shutil.copytree(tiny_phantom, other, ignore=shutil.ignore_patterns(".cache"))
    next((other / "keras_slices_validate").glob("case_*.nii.gz")).unlink()
    capsys.readouterr()
    assert main([*args, "--data-dir", str(other), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]                     # after the progress bars
    assert err.startswith("error: cannot resume from") and "trained on other data" in err
    assert "--allow-other-data" in err
    assert main([*args, "--data-dir", str(other), "--resume", "--epochs", "2", "--allow-other-data"]) == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
