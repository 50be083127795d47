"""`make sweeps`: the short runs behind notebooks 03, 05 and 08, and the committed results they left."""

import json
import math

import pytest

from vqvae_lib import cli, retrain, runner, sweeps

RESULTS = runner.REPO / sweeps.RESULTS


@pytest.fixture()
def tiny_sweep(monkeypatch):
    """Two one-epoch runs on 16 slices at the 16x grid, in one group."""
    monkeypatch.setattr(sweeps, "BASE", ("train", "--preset", "default", "--limit", "16", "--epochs", "1",
                                         "--downsample", "16"))
    monkeypatch.setattr(sweeps, "GROUPS", {"tiny": (sweeps.Run("plain", sweeps.PLAIN),
                                                    sweeps.Run("K64", ("--codebook-size", "64")))})
    monkeypatch.setattr(sweeps, "_SAME", {})


def test_every_run_trains_once_however_many_groups_name_it():
    names = [run.name for run in sweeps.runs_of()]
    assert len(names) == len(set(names))
    assert "default" in names and not {"K512", "beta0.25", "D64"} & set(names)
    collapse = [run.name for run in sweeps.runs_of(["collapse"])]
    assert collapse[0] == "plain" and collapse[-1] == "default" and len(collapse) == 8


def test_an_unknown_group_is_a_one_line_error(capsys, tiny_phantom, tmp_path):
    assert cli.main(["sweeps", "--only", "nope", "--data-dir", str(tiny_phantom), "--runs", str(tmp_path / "r"),
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown sweep group nope; choose from collapse, beta, size, rd, quantizers" in err
    assert "Traceback" not in err


def test_a_sweep_writes_one_result_per_run_and_a_rerun_trains_nothing(tiny_sweep, tiny_phantom, tmp_path,
                                                                      monkeypatch):
    written = sweeps.run_sweeps(tiny_phantom, tmp_path / "runs", tmp_path / "out", device="cpu")
    assert [p.name for p in written] == ["plain.json", "K64.json"]
    result = json.loads((tmp_path / "out" / "K64.json").read_text())
    assert result["command"].startswith("hipmri-vqvae train --preset default --limit 16 --epochs 1 --downsample 16 "
                                        "--codebook-size 64 --data-dir ")
    assert result["code_revision"] == retrain.code_revision()
    assert result["data_sha256"] == retrain.data_fingerprint(tiny_phantom)
    assert result["train_config"]["model"]["codebook_size"] == 64 and len(result["history"]) == 1
    test = result["test"]
    assert test["latent_shape"] == [16, 8] and test["bits_raw"] == 16 * 8 * math.log2(64)
    assert 0 < test["bits_frequencies"] < math.inf and test["n_slices"] > 0
    plain = json.loads((tmp_path / "out" / "plain.json").read_text())["train_config"]["model"]
    assert (plain["ema"], plain["init"], plain["restart"]) == (False, "uniform", False)

    def no_training(argv):
        raise AssertionError(f"trained again: {argv}")
    monkeypatch.setattr(cli, "main", no_training)
    assert sweeps.run_sweeps(tiny_phantom, tmp_path / "runs", tmp_path / "out", device="auto") == []


def test_a_lost_result_is_measured_again_from_its_finished_run(tiny_sweep, tiny_phantom, tmp_path):
    sweeps.run_sweeps(tiny_phantom, tmp_path / "runs", tmp_path / "out", device="cpu")
    before = json.loads((tmp_path / "out" / "plain.json").read_text())
    (tmp_path / "out" / "plain.json").unlink()
    assert [p.name for p in sweeps.run_sweeps(tiny_phantom, tmp_path / "runs", tmp_path / "out",
                                              device="cpu")] == ["plain.json"]
    after = json.loads((tmp_path / "out" / "plain.json").read_text())
    assert after["history"] == before["history"] and after["test"]["ssim_mean"] == before["test"]["ssim_mean"]


def test_every_run_has_its_committed_result_made_by_its_command():
    for run in sweeps.runs_of():
        path = RESULTS / f"{run.name}.json"
        assert path.is_file(), f"{path} is missing: run `make sweeps`"
        result = json.loads(path.read_text())
        wanted = retrain.shown_command(sweeps.command(run, runner.REPO / "data/phantom",
                                                     runner.REPO / "build/sweeps" / run.name, "auto"))
        assert sweeps._done(path, wanted), f"{path} holds `{result['command']}`, not `{wanted}`"
        assert result["code_revision"] != "unknown" and "+changes" not in result["code_revision"]
    assert sorted(p.stem for p in RESULTS.glob("*.json")) == sorted(run.name for run in sweeps.runs_of())


def test_the_committed_results_are_of_the_default_phantom():
    fingerprints = {json.loads(p.read_text())["data_sha256"] for p in RESULTS.glob("*.json")}
    assert fingerprints == {json.loads((runner.REPO / "checkpoints/MANIFEST.json").read_text())["data_sha256"]}


def test_a_rerun_reproduces_its_committed_result_and_notices_one_that_differs(tiny_sweep, tiny_phantom, tmp_path):
    sweeps.run_sweeps(tiny_phantom, tmp_path / "runs", tmp_path / "out", device="cpu")
    committed = json.loads((tmp_path / "out" / "K64.json").read_text())
    same, evidence = sweeps.reproduce("K64", tiny_phantom, committed)
    assert same and evidence.startswith("K64, trained again here: ") and "(committed: " in evidence
    committed["test"]["ssim_mean"] += 0.05
    assert not sweeps.reproduce("K64", tiny_phantom, committed)[0]
