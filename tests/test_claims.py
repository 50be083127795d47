"""Checked claims (vqvae_lib.claims): asserted in full mode on the default phantom, counted in SMOKE mode."""

import json
import re

import pytest

from vqvae_lib import runner, tasks
from vqvae_lib.claims import ClaimFailed, Claims, is_default_phantom
from vqvae_lib.phantom import MANIFEST


@pytest.fixture
def default_like(tmp_path):
    """A folder whose PHANTOM.json says it is the default phantom (seed 0, size small)."""
    folder = tmp_path / "phantom"
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps({"seed": 0, "size": "small"}))
    return folder


def test_only_the_default_phantom_is_what_the_text_describes(default_like, tiny_phantom, tmp_path):
    assert is_default_phantom(default_like)
    assert not is_default_phantom(tiny_phantom)  # seed 0, size tiny
    assert not is_default_phantom(tmp_path / "missing")
    (tmp_path / MANIFEST).write_text("not json")
    assert not is_default_phantom(tmp_path)


def test_full_mode_on_the_default_phantom_raises_on_a_false_claim(default_like):
    claims = Claims(False, default_like)
    claims(True, "the codebook is used", "500 of 512")
    with pytest.raises(ClaimFailed, match=r"the text says 'SSIM is high', but this run measured: 0.31"):
        claims(False, "SSIM is high", "0.31")
    assert str(claims).splitlines() == ["1 claims of the text checked on this run:",
                                        "  - the codebook is used (500 of 512)"]


def test_on_other_data_a_false_claim_is_listed_with_a_warning(tiny_phantom):
    claims = Claims(False, tiny_phantom)
    with pytest.warns(UserWarning, match="says 'SSIM is high'; on this data: 0.31"):
        claims(False, "SSIM is high", "0.31")
    assert "1 claims of the text, written for the default phantom, do not hold on this data:" in str(claims)


def test_smoke_mode_counts_claims_without_checking_them(default_like):
    claims = Claims(True, default_like)
    claims(False, "SSIM is high")
    assert claims.skipped == ["SSIM is high"] and not claims.checked
    assert str(claims) == "SMOKE mode: 1 claims of the text not checked (they are checked in full mode)"


def test_a_false_claim_stops_a_notebook_run_in_full_mode(default_like, tmp_path):
    script = tmp_path / "notebooks" / "01_claim.py"
    script.parent.mkdir()
    script.write_text('# %% tags=["parameters"]\nSMOKE = True\nDATA_DIR = "."\n\n'
                      '# %%\nfrom vqvae_lib.claims import Claims\n\nclaims = Claims(SMOKE, DATA_DIR)\n'
                      'claims(1 + 1 == 3, "one and one make three", "2")\nprint(claims)\n')
    build = tmp_path / "build"
    out = runner.execute(script, build, {"SMOKE": True, "DATA_DIR": str(default_like)}, progress=False)
    assert "SMOKE mode: 1 claims" in out.read_text()
    with pytest.raises(runner.NotebookFailed, match="ClaimFailed: the text says 'one and one make three'"):
        runner.execute(script, build, {"SMOKE": False, "DATA_DIR": str(default_like)}, progress=False)


def test_make_figures_runs_the_notebooks_in_full_mode(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(tasks, "ensure_phantom", lambda data_dir: None)
    monkeypatch.setattr(runner, "run_all", lambda params, build, source: seen.update(params) or [])
    tasks.figures(tmp_path, tmp_path / "figs", tmp_path / "build", screenshot=False)
    assert seen["SMOKE"] is False


@pytest.mark.parametrize("script", runner.notebook_paths(), ids=lambda p: p.stem)
def test_every_notebook_checks_its_claims_and_shows_them(script):
    source = script.read_text()
    assert "claims = Claims(SMOKE, DATA)" in source
    assert len(re.findall(r"^\s*claims\(", source, flags=re.M)) >= 1
    assert "# ## Checked claims" in source and "\nprint(claims)\n" in source
