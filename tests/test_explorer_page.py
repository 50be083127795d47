"""The explorer page's inputs and error text, without a browser (tests/test_browser.py drives the page)."""

import json

import ipywidgets
import pytest

from vqvae_lib import explorer_page, runner

CHECKPOINT = runner.REPO / "checkpoints" / "default.pt"


def test_paths_come_from_the_environment_relative_to_the_repository(tmp_path):
    assert explorer_page.inputs({}) == (runner.REPO / "data" / "phantom", CHECKPOINT)
    data_dir, ckpt = explorer_page.inputs({explorer_page.DATA_ENV: "elsewhere",
                                           explorer_page.CHECKPOINT_ENV: str(tmp_path / "m.pt")})
    assert data_dir == runner.REPO / "elsewhere" and ckpt == tmp_path / "m.pt"


@pytest.mark.parametrize("missing", ["data", "checkpoint"])
def test_a_missing_input_is_named_on_the_page(missing, tiny_phantom, tmp_path, monkeypatch):
    absent = tmp_path / "absent"
    monkeypatch.setenv(explorer_page.DATA_ENV, str(absent if missing == "data" else tiny_phantom))
    monkeypatch.setenv(explorer_page.CHECKPOINT_ENV, str(absent if missing == "checkpoint" else CHECKPOINT))
    page = explorer_page.app()
    assert isinstance(page, ipywidgets.HTML)
    assert 'class="explorer-error"' in page.value and f"{absent} does not exist" in page.value


def test_the_page_notebook_is_not_part_of_the_series(tmp_path):
    assert explorer_page.APP not in runner.notebook_paths()  # `make figures` must not execute it
    nb = json.loads(explorer_page.notebook(tmp_path).read_text())
    assert nb["metadata"]["kernelspec"]["name"] == runner.KERNEL
    assert any("explorer_page.app()" in "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
