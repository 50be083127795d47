import errno
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vqvae_lib
from vqvae_lib import data, phantom, prior, runs, train as T
from vqvae_lib.checkpoint import CheckpointError, load_checkpoint
from vqvae_lib.cli import build_parser, commands, main, parse_args
from vqvae_lib.data import DataError
from vqvae_lib.model import VQVAE, ModelConfig

from test_runs import assert_tables_match


def test_inspect_prints_and_writes_the_census(tiny_phantom, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["inspect", str(tiny_phantom), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    plan = phantom.schedule(0, "tiny")
    assert {s: r["files"] for s, r in report["splits"].items()} == {s: 60 * len(v) for s, v in plan.items()}
    assert report["splits"]["train"]["shapes"] == {"256x128": 120, "256x144": 60}
    assert report["splits"]["train"]["weeks_per_case"] == {"019": [w for _, w in plan["train"]]}
    shares = report["splits"]["test"]["label_shares"]
    assert abs(sum(shares.values()) - 1) < 1e-9 and shares["prostate"] > 0
    assert report["problems"] == [] and all(not r["problems"] for r in report["splits"].values())
    text = capsys.readouterr().out
    assert "train: 180 slices, 1 case (019..019), 3 scans" in text and "no problems found" in text


def test_inspect_of_a_missing_folder_fails_with_a_clear_message(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert f"error: data folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_phantom_refuses_to_overwrite_without_force(tiny_phantom, capsys):
    assert main(["phantom", "--out", str(tiny_phantom), "--size", "tiny"]) == 2
    assert "already exists" in capsys.readouterr().err


def run_cli(argv: list[str]) -> int:
    """main(argv), with argparse's exit turned into its return code."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    """A folder, random bytes, and a checkpoint whose epoch is not a number."""
    from vqvae_lib.checkpoint import FORMAT
    from vqvae_lib.model import VQVAE, ModelConfig
    root = tmp_path_factory.mktemp("odd")
    (root / "folder").mkdir()
    (root / "random.pt").write_bytes(np.random.default_rng(1).bytes(2048))
    config = ModelConfig(hidden=16, res_hidden=8, codebook_size=16, embed_dim=8)
    torch.save({"format": FORMAT, "kind": "vqvae", "model_config": config.to_dict(), "train_config": {},
                "model_state": VQVAE(config).state_dict(), "epoch": "three", "history": []}, root / "epoch.pt")
    return root


@pytest.mark.parametrize("argv, message", [
    (["train", "--ssim-weight", "-1"], "argument --ssim-weight: must be a finite number >= 0, got -1"),
    (["train", "--ssim-weight", "nan"], "argument --ssim-weight: must be a finite number >= 0, got nan"),
    (["train", "--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (["train", "--seed", "-1"], "argument --seed: must be a whole number in [0, 2^63), got -1"),
    (["train", "--epochs", "1.5"], "argument --epochs: must be a whole number > 0, got '1.5'"),
    (["prior", "--checkpoint", "C", "--kernel", "4"], "argument --kernel: must be an odd whole number >= 3, got 4"),
    (["prior", "--checkpoint", "C", "--positions", "-1"], "argument --positions: must be a whole number >= 0, got -1"),
    (["phantom", "--workers", "-1"], "argument --workers: must be a whole number > 0, got -1"),
    (["inspect", "{data}", "--json", "{odd}/folder"], "argument --json: {odd}/folder is a folder; give the name of a file"),
    (["evaluate", "--checkpoint", "{odd}/epoch.pt", "--json", "{odd}/nowhere/e.json"],
     "argument --json: the folder {odd}/nowhere does not exist"),
    (["evaluate", "--checkpoint", "{odd}/random.pt"], "error: {odd}/random.pt is not a checkpoint: it is not a file "
                                                      "written by torch.save"),
    (["evaluate", "--checkpoint", "{odd}/epoch.pt"], "error: checkpoint {odd}/epoch.pt: epoch is 'three', not a whole "
                                                     "number >= 0"),
    (["sample", "--checkpoint", "C", "--prior", "P", "--out", "{odd}/samples.jpg"],
     "argument --out: {odd}/samples.jpg is neither a .png file name nor an existing folder"),
])
def test_user_errors_are_one_line_naming_the_value(argv, message, tiny_phantom, odd_files, tmp_path, capsys):
    needs = {"train": ["--out", str(tmp_path / "run")], "prior": ["--out", str(tmp_path / "run")],
             "phantom": ["--out", str(tmp_path / "ph")]}.get(argv[0], [])
    if argv[0] in ("train", "prior", "evaluate"):
        needs += ["--data-dir", str(tiny_phantom)]
    argv = [a.format(data=tiny_phantom, odd=odd_files) for a in argv] + needs
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert message.format(odd=odd_files) in err and "Traceback" not in err and "learning rate" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "ph").exists()


def test_evaluate_reports_both_ssims_and_per_scan_means_with_an_interval(tiny_phantom, tmp_path, capsys):
    """A test split of 3 scans of 2 patients (the tiny phantom's scans, one renamed), scored by an untrained model:
    the per-scan means and their bootstrap intervals over scans, on the terminal and in --json."""
    from vqvae_lib.checkpoint import FORMAT
    from vqvae_lib.metrics import bootstrap_interval
    test_dir = tmp_path / "hipmri" / "keras_slices_test"
    test_dir.mkdir(parents=True)
    for split, prefix, name_as in (("test", "case_040_week_5_", "case_040_week_5_"),
                                   ("validate", "case_036_week_4_", "case_036_week_4_"),
                                   ("train", "case_019_week_0_", "case_040_week_9_")):
        files = sorted((tiny_phantom / f"keras_slices_{split}").glob(f"{prefix}*"))
        assert len(files) == 60, (split, prefix)
        for path in files:
            (test_dir / path.name.replace(prefix, name_as)).write_bytes(path.read_bytes())
    config = ModelConfig(hidden=16, res_hidden=8, codebook_size=16, embed_dim=8)
    torch.manual_seed(0)
    torch.save({"format": FORMAT, "kind": "vqvae", "model_config": config.to_dict(), "train_config": {},
                "model_state": VQVAE(config).state_dict(), "epoch": 0, "history": []}, tmp_path / "untrained.pt")
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "untrained.pt"), "--data-dir", str(tmp_path / "hipmri"),
                 "--device", "cpu", "--json", str(report)]) == 0
    text = capsys.readouterr().out
    written = json.loads(report.read_text())
    summary, scans, slices = written["summary"], written["scans"], written["slices"]

    keys = sorted({(s["case"], s["week"]) for s in slices})
    assert keys == [(36, 4), (40, 5), (40, 9)] and summary["n_scans"] == len(keys) == len(scans) == 3
    assert summary["n_patients"] == 2 and summary["n_slices"] == len(slices) == 180
    assert [(s["case"], s["week"], s["n_slices"]) for s in scans] == [key + (60,) for key in keys]
    for name in ("ssim", "ssim_gaussian", "psnr"):
        per_slice = np.array([s[name] for s in slices])
        recomputed = [per_slice[[(s["case"], s["week"]) == key for s in slices]].mean() for key in keys]
        np.testing.assert_allclose([s[name] for s in scans], recomputed, rtol=1e-12)
        assert summary[f"scan_{name}_mean"] == pytest.approx(np.mean(recomputed), rel=1e-12)
        low, high = summary[f"scan_{name}_ci95"]
        assert (low, high) == bootstrap_interval(np.array([s[name] for s in scans]))
        assert min(recomputed) <= low < np.mean(recomputed) < high <= max(recomputed)
    gaussian = np.array([s["ssim_gaussian"] for s in slices])
    assert summary["ssim_gaussian_mean"] == pytest.approx(gaussian.mean(), rel=1e-12)
    assert (summary["ssim_gaussian_min"], summary["ssim_gaussian_max"]) == (gaussian.min(), gaussian.max())
    assert not np.allclose(gaussian, [s["ssim"] for s in slices], atol=1e-3)  # two conventions, two numbers

    s = summary
    assert (f"  SSIM  mean {s['ssim_mean']:.4f}  min {s['ssim_min']:.4f}  max {s['ssim_max']:.4f}   "
            f"(scikit-image default: 7x7 uniform window)\n") in text
    assert (f"  SSIM  mean {s['ssim_gaussian_mean']:.4f}  min {s['ssim_gaussian_min']:.4f}  max "
            f"{s['ssim_gaussian_max']:.4f}   (Wang et al. 2004: 11x11 Gaussian, sigma 1.5; MONAI, most papers)\n"
            ) in text
    (ssim_low, ssim_high), (g_low, g_high), (psnr_low, psnr_high) = (
        s["scan_ssim_ci95"], s["scan_ssim_gaussian_ci95"], s["scan_psnr_ci95"])
    assert (f"  per scan: 3 scans of 2 patients; SSIM {s['scan_ssim_mean']:.4f} (95 % bootstrap interval over scans "
            f"{ssim_low:.4f}..{ssim_high:.4f}), Gaussian SSIM {s['scan_ssim_gaussian_mean']:.4f} "
            f"({g_low:.4f}..{g_high:.4f}), PSNR {s['scan_psnr_mean']:.2f} dB ({psnr_low:.2f}..{psnr_high:.2f})\n"
            ) in text


def test_train_with_a_missing_data_folder_leaves_no_run_folder(tmp_path, capsys):
    assert main(["train", "--data-dir", str(tmp_path / "TYPO"), "--out", str(tmp_path / "runs" / "a")]) == 2
    assert capsys.readouterr().err == f"error: data folder {tmp_path / 'TYPO'} does not exist\n"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- config files

def write_toml(path, text: str):
    path.write_text(text)
    return path


def test_a_config_file_gives_the_options_and_the_command_line_wins(tmp_path):
    toml = write_toml(tmp_path / "run.toml", 'data_dir = "DATA"\nout = "RUN"\nepochs = 5\nbatch-size = 8\n'
                                             'lr = 0.01\nno_cache = true\nresume = "auto"\nprecision = "fp16"\n'
                                             'shape_policy = "pad"\ndownsample = 8\n')
    args = parse_args(build_parser(), ["train", "--config", str(toml), "--epochs", "7", "--shape-policy", "crop"])
    assert (args.data_dir, args.out, args.batch_size, args.lr, args.no_cache) == ("DATA", "RUN", 8, 0.01, True)
    assert (args.resume, args.precision, args.downsample) == ("auto", "fp16", 8)
    assert (args.epochs, args.shape_policy) == (7, "crop")                    # the command line wins
    plain = parse_args(build_parser(), ["train", "--data-dir", "D", "--out", "O", "--resume", "--epochs", "2"])
    assert (plain.resume, plain.epochs, plain.config, plain.precision) == (True, 2, None, None)
    prior_args = parse_args(build_parser(), ["prior", "--config", str(write_toml(
        tmp_path / "prior.toml", 'checkpoint = "C"\ndata-dir = "D"\nout = "O"\nkernel = 7\nresume = false\n'))])
    assert (prior_args.checkpoint, prior_args.kernel, prior_args.resume) == ("C", 7, False)


@pytest.mark.parametrize("text, message", [
    ("epochs = 0", "{toml}: epochs: must be a whole number > 0, got 0"),
    ('epochs = "3"', "{toml}: epochs: must be a number, got '3'"),
    ("lr = -1.0", "{toml}: lr: must be a finite number > 0, got -1.0"),
    ("downsample = 5", "{toml}: downsample: must be one of 4, 8, 16, got 5"),
    ('precision = "fp8"', "{toml}: precision: must be one of auto, bf16, fp16, fp32, got 'fp8'"),
    ("no-cache = 1", "{toml}: no-cache: must be true or false, got 1"),
    ("device = 0", "{toml}: device: must be a string, got 0"),
    ('resume = "yes"', "{toml}: resume: takes no value or 'auto', got 'yes'"),
    ("epoch = 3", "{toml}: unknown key 'epoch'; known: allow_other_data, batch_size"),
    ('config = "other.toml"', "{toml}: unknown key 'config'"),
    ("epochs = ", "config file {toml} is not valid TOML: Invalid value (at line 1, column 10)"),
    (None, "cannot read the config file {toml}: No such file or directory"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_key(text, message, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    if text is not None:
        write_toml(toml, text + "\n")
    assert run_cli(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m vqvae_lib train: error: ") and message.format(toml=toml) in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_options_a_config_file_does_not_give_are_still_required(tmp_path, capsys):
    toml = write_toml(tmp_path / "run.toml", "epochs = 2\n")
    assert run_cli(["train", "--config", str(toml)]) == 2
    assert "the following arguments are required: --data-dir, --out" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- run folder logs

def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event in log_dir, duplicates and all (no purging of orphaned steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_config_json_metrics_csv_tensorboard_and_resume_auto(tiny_phantom, tmp_path, capsys):
    """A run started from a config file with --resume auto (new), resumed twice with --resume auto, the first time
    without --log-dir: config.json, metrics.csv and TensorBoard's scalars hold every epoch once."""
    run, tb = tmp_path / "run", tmp_path / "tb"
    toml = write_toml(tmp_path / "run.toml", f'data_dir = "{tiny_phantom}"\nout = "{run}"\nepochs = 1\nlimit = 8\n'
                                             'batch_size = 8\ndownsample = 16\ndevice = "cpu"\nresume = "auto"\n'
                                             'precision = "fp32"\n')
    assert main(["train", "--config", str(toml)]) == 0
    first = json.loads((run / "metrics.json").read_text())
    assert main(["train", "--config", str(toml), "--epochs", "2", "--log-dir", str(tb)]) == 0
    assert main(["train", "--config", str(toml), "--epochs", "3", "--log-dir", str(tb)]) == 0
    assert capsys.readouterr().out.count("epoch 3/3: loss") == 1

    history = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3] and history[:1] == first     # resumed, not restarted
    assert all(r["precision"] == "fp32" for r in history)
    assert_tables_match(run)
    config = json.loads((run / "config.json").read_text())
    last = load_checkpoint(run / "last.pt")
    assert config["command"] == ["python", "-m", "vqvae_lib", "train", "--config", str(toml), "--epochs", "3",
                                 "--log-dir", str(tb)]
    assert config["kind"] == "vqvae" and config["version"] == vqvae_lib.__version__
    assert config["resumed_from_epoch"] == 2 and config["train_config"] == last["train_config"]
    assert config["train_config"]["precision"] == "fp32" and config["train_config"]["epochs"] == 3
    assert config["data"]["options"] == {"shape_policy": "crop", "normalization": "percentile"}
    assert config["data"]["fingerprint"] == last["data"]["fingerprint"]
    assert config["options"]["epochs"] == 3 and config["options"]["config"] == str(toml)
    assert config["options"]["resume"] == "auto" and config["options"]["log_dir"] == str(tb)

    scalars = tensorboard_scalars(tb)
    numeric = {k for k, v in history[0].items() if isinstance(v, (int, float)) and k != "epoch"}
    assert set(scalars) == numeric and "val_ssim" in numeric
    for tag, events in scalars.items():
        assert [step for step, _ in events] == [1, 2, 3], tag                 # epoch 1 filled in; no duplicates
        assert [value for _, value in events] == pytest.approx([r[tag] for r in history], rel=1e-6, abs=1e-12)


def test_resume_auto_starts_fresh_only_where_no_run_of_its_kind_is(odd_files, tiny_phantom, tmp_path, capsys):
    """--resume auto never resumes (or replaces) a run of another kind; plain --resume refuses it."""
    from vqvae_lib.checkpoint import FORMAT
    run = tmp_path / "vae"
    run.mkdir()
    payload = torch.load(odd_files / "epoch.pt", weights_only=True)
    torch.save({**payload, "format": FORMAT, "kind": "vae", "epoch": 1, "history": [{"epoch": 1}]}, run / "last.pt")
    before = (run / "last.pt").read_bytes()
    args = ["train", "--data-dir", str(tiny_phantom), "--out", str(run), "--device", "cpu"]
    assert main([*args, "--resume", "auto"]) == 2
    assert f"error: {run} already holds a run (last.pt)" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 2
    assert f"error: checkpoint {run / 'last.pt'} holds a vae model, not a vqvae model" in capsys.readouterr().err
    assert (run / "last.pt").read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["last.pt"]


def test_log_dir_without_tensorboard_fails_before_any_work(tiny_phantom, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)        # what a missing package gives
    argv = ["train", "--data-dir", str(tiny_phantom), "--out", str(tmp_path / "run"), "--log-dir", str(tmp_path / "tb")]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert err == ("python -m vqvae_lib train: error: --log-dir needs TensorBoard, which is not installed: "
                   "pip install 'hipmri-vqvae[tensorboard]' (see python -m vqvae_lib train --help)\n")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- progress, help

class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_only_on_a_terminal(terminal, tiny_phantom, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", _Terminal() if terminal else io.StringIO())
    assert main(["inspect", str(tiny_phantom)]) == 0
    assert ("\r" in sys.stderr.getvalue()) == terminal
    assert "no problems found" in capsys.readouterr().out


def test_the_console_script_names_itself_and_logs_no_progress_bars_to_a_file(tiny_phantom, tmp_path):
    script = Path(sys.executable).with_name("hipmri-vqvae")
    assert script.exists(), f"{script} is missing: pip install -e . in the venv"
    version = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert (version.returncode, version.stdout) == (0, f"hipmri-vqvae {vqvae_lib.__version__}\n")
    run, log = tmp_path / "run", tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        done = subprocess.run([script, "train", "--data-dir", str(tiny_phantom), "--out", str(run), "--epochs", "1",
                               "--limit", "8", "--batch-size", "8", "--downsample", "16", "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300)
    assert done.returncode == 0, log.read_text()
    assert "epoch 1/1: loss" in done.stdout and "\r" not in log.read_text()
    assert json.loads((run / "config.json").read_text())["command"][:2] == ["hipmri-vqvae", "train"]


@pytest.mark.parametrize("argv0, prog", [("/venv/bin/hipmri-vqvae", "hipmri-vqvae"),
                                         ("/src/vqvae_lib/__main__.py", "python -m vqvae_lib")])
def test_messages_name_the_command_as_typed(argv0, prog, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [argv0])
    assert run_cli(["train", "--epochs", "0"]) == 2
    assert capsys.readouterr().err.startswith(f"{prog} train: error: argument --epochs: must be a whole number")
    assert run_cli(["--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} [-h] [--version]")


def option_helps(command: str) -> dict[str, str]:
    """Option -> its help text (whitespace joined) in `COMMAND --help`."""
    text = commands(build_parser())[command].format_help()
    chunks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    return {chunk.split()[0].rstrip(","): " ".join(chunk.split()) for chunk in chunks if chunk.strip()}


def test_train_help_shows_the_presets_defaults():
    helps, default, seed = option_helps("train"), T.PRESETS["default"], T.PRESETS["seed"]
    assert f"(default: {default['epochs']}; seed preset: {seed['epochs']})" in helps["--epochs"]
    assert f"(default: {default['batch_size']})" in helps["--batch-size"]
    assert default["batch_size"] == seed["batch_size"]                  # so no "seed preset: ..." follows
    assert f"(default: {default['lr']})" in helps["--lr"] and default["lr"] == seed["lr"]
    assert (f"(default: {default['model']['downsample']}; seed preset: {seed['model']['downsample']})"
            in helps["--downsample"])
    assert "(default: 0.5; seed preset: 0.0)" in helps["--ssim-weight"] and default["ssim_weight"] == 0.5
    assert "(default: 8)" in option_helps("prior")["--layers"] and prior.PriorConfig().layers == 8


def test_every_option_that_takes_a_value_shows_its_default():
    for name, command in commands(build_parser()).items():
        if name in ("notebooks", "ipynb"):  # the notebook runner's options are tested with it
            continue
        for action in command._actions:
            if action.option_strings and action.nargs != 0 and not action.required:
                assert "default" in (action.help or ""), f"{name} {action.option_strings[0]}"


# ---------------------------------------------------------------------------------------------- exit codes

@pytest.mark.parametrize("error, code", [
    (ValueError("a bad\n value"), 2),
    (DataError("a bad data folder"), 2),
    (CheckpointError("a bad checkpoint"), 2),
    (runs.RunError("a locked run folder"), 2),
    (FileNotFoundError("no such file"), 2),
    (NotADirectoryError("not a folder"), 2),
    (FileExistsError("already exists"), 2),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1),
    (RuntimeError("training diverged\n in epoch 3"), 1),
    (OSError(errno.ENOSPC, "No space left on device"), 1),
    (KeyboardInterrupt(), 130),
])
def test_exit_codes(error, code, tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(data, "inspect", fail)
    assert main(["inspect", str(tmp_path)]) == code
    expected = "interrupted" if code == 130 else f"error: {' '.join(str(error).split())}"
    assert capsys.readouterr().err == expected + "\n"


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    assert run_cli(["vae", "--data-dir", "D", "--out", str(tmp_path / "run"), "--resume", "auto", "--overwrite"]) == 2
    assert "vae: error: --resume and --overwrite exclude each other" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["vae", "prior"])
def test_vae_and_prior_pass_precision_and_config_files_on(command, odd_files, tmp_path, monkeypatch, capsys):
    """The options reach the trainer's config (the trainer itself is replaced: nothing trains)."""
    from vqvae_lib import checkpoint, vae
    seen = {}

    def trainer(*args, **kwargs):
        seen.update(config=args[-1], resume=kwargs["resume"])
        return [{"epoch": 1, "val_ssim": 0.5, "val_nll": 1.0}]

    monkeypatch.setattr(vae, "train_vae", trainer)
    monkeypatch.setattr(prior, "train_prior", trainer)
    monkeypatch.setattr(checkpoint, "load_model", lambda path: (VQVAE(ModelConfig(codebook_size=64)), {}))
    toml = write_toml(tmp_path / "run.toml", f'out = "{tmp_path / "run"}"\ndata_dir = "D"\nepochs = 2\n'
                                             'resume = "auto"\n' + 'checkpoint = "C"\n' * (command == "prior"))
    assert main([command, "--config", str(toml), "--precision", "bf16"]) == 0
    assert (seen["config"].precision, seen["config"].epochs, seen["resume"]) == ("bf16", 2, False)


def test_train_takes_the_quantizer_and_codebook_from_the_command_line(tiny_phantom, tmp_path, capsys):
    base = ["train", "--data-dir", str(tiny_phantom), "--limit", "4", "--epochs", "1", "--downsample", "16",
            "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "fsq"), "--quantizer", "fsq", "--fsq-levels", "4,4"]) == 0
    model = load_checkpoint(tmp_path / "fsq" / "last.pt")["model_config"]
    assert (model["quantizer"], model["fsq_levels"], model["codebook_size"]) == ("fsq", [4, 4], 16)
    assert main([*base, "--out", str(tmp_path / "plain"), "--no-ema", "--init", "uniform", "--no-restart",
                 "--beta", "1", "--codebook-size", "32", "--embed-dim", "8", "--normalize-mse"]) == 0
    saved = load_checkpoint(tmp_path / "plain" / "last.pt")["train_config"]
    assert saved["normalize_mse"] is True
    assert {k: saved["model"][k] for k in ("ema", "init", "restart", "beta", "codebook_size", "embed_dim")} == \
        {"ema": False, "init": "uniform", "restart": False, "beta": 1.0, "codebook_size": 32, "embed_dim": 8}
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "bad"), "--quantizer", "fsq", "--codebook-size", "100"]) == 2
    err = capsys.readouterr().err
    assert "codebook_size 100 does not match fsq_levels 8x5x5x5 = 1000 codes: set codebook_size to 1000" in err
    assert "Traceback" not in err and not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--out", str(tmp_path / "bad"), "--fsq-levels", "8,x"])
    assert exit_info.value.code == 2 and "must be whole numbers >= 2 separated by commas, got '8,x'" in \
        capsys.readouterr().err
