import json

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
