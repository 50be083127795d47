import json

import numpy as np
import pytest
import torch

from vqvae_lib import phantom
from vqvae_lib.cli import main


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


def test_train_with_a_missing_data_folder_leaves_no_run_folder(tmp_path, capsys):
    assert main(["train", "--data-dir", str(tmp_path / "TYPO"), "--out", str(tmp_path / "runs" / "a")]) == 2
    assert capsys.readouterr().err == f"error: data folder {tmp_path / 'TYPO'} does not exist\n"
    assert list(tmp_path.iterdir()) == []
