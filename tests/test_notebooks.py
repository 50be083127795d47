"""Every notebook executed headlessly with papermill in smoke mode, on the tiny phantom."""

import json

import matplotlib.image as mpimg
import pytest

from vqvae_lib import runner

FIGURES = {
    "01": ["01_split_counts.png", "01_patient_splits.png", "01_shape_policy.png", "01_intensity_histograms.png",
           "01_scan_montage.png", "01_slices_and_labels.png", "01_label_shares.png"],
}


def _text(notebook):
    nb = json.loads(notebook.read_text())
    out = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            out.append("".join(o.get("text", "")))
            out.append("".join(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


@pytest.fixture(scope="module")
def executed(tiny_phantom, tmp_path_factory):
    build = tmp_path_factory.mktemp("build")
    figs = build / "figures"
    params = {"SMOKE": True, "DATA_DIR": str(tiny_phantom), "FIG_DIR": str(figs), "SEED": 0}
    paths = runner.run_all(params, build, progress=False)
    return {p.stem[:2]: p for p in paths}, figs


def test_every_numbered_notebook_has_a_figure_list():
    assert sorted(p.stem[:2] for p in runner.notebook_paths()) == sorted(FIGURES)


@pytest.mark.parametrize("number", sorted(FIGURES))
def test_notebook_writes_its_figures(executed, number):
    _, figs = executed
    for name in FIGURES[number]:
        image = mpimg.imread(figs / name)
        assert image.shape[0] > 100 and image.shape[1] > 100, name
        assert image[..., :3].std() > 0.02, f"{name} is blank"


def test_01_reports_what_the_data_holds(executed):
    notebooks, _ = executed
    text = _text(notebooks["01"])
    assert "patient-level split check passed; patients per split: {'train': 1, 'validate': 1, 'test': 1}" in text
    # the tiny phantom holds case 019 week 1: its 60 slices of 256 x 144 are cropped, and the notebook says so
    assert "60 slices reshaped ['case_019_week_1_slice_0'" in text
    assert "crop 256x144 -> 256x128" in text
    assert "batch (8, 1, 256, 128) torch.float32" in text


def test_sources_are_left_untouched(executed):
    notebooks, _ = executed
    for path in notebooks.values():
        assert runner.NOTEBOOK_DIR not in path.parents and path.suffix == ".ipynb"
