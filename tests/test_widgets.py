"""The panels of notebooks 01-04 (`vqvae_lib.widgets`), driven from Python: views, pictures, controls, `show`."""

import json

import ipywidgets
import matplotlib.colors
import numpy as np
import pytest
import torch
from IPython.display import Image, Markdown
from matplotlib.figure import Figure

from vqvae_lib import REPO, data, viz, widgets
from vqvae_lib.explorer import CodebookExplorer
from vqvae_lib.model import VQVAE, ModelConfig
from vqvae_lib.train import PRESETS

PNG = b"\x89PNG\r\n\x1a\n"
MANIFEST = REPO / "checkpoints" / "MANIFEST.json"


def _png(panel) -> bytes:
    return bytes(panel.image.value)  # the Image widget hands back a memoryview


def _renders(panel) -> list:
    """The picture's value changes from now on."""
    changes = []
    panel.image.observe(changes.append, names="value")
    return changes


@pytest.fixture(scope="module")
def split(tiny_phantom):
    return data.load_split(tiny_phantom, "train", masks=True, progress=False)


# ------------------------------------------------------------------------------------------------ ScanBrowser


@pytest.fixture(scope="module")
def browser(split):
    return widgets.ScanBrowser(split)


def test_the_browser_holds_every_scan_in_slice_order(browser, split):
    assert browser.scans == sorted(set(zip(split.cases.tolist(), split.weeks.tolist())))
    assert sorted(np.concatenate(browser.rows).tolist()) == list(range(len(split)))
    for (case, week), rows in zip(browser.scans, browser.rows):
        assert (split.cases[rows] == case).all() and (split.weeks[rows] == week).all()
        assert (np.diff(split.indices[rows]) > 0).all()
    state = browser.view(1, 7)
    row = browser.rows[1][7]
    assert (state["case"], state["week"]) == browser.scans[1] and state["row"] == row
    assert state["slice"] == split.files[row].index and state["name"] == split.files[row].name
    np.testing.assert_array_equal(state["image"], split.images[row])
    np.testing.assert_array_equal(state["mask"], split.masks[row])
    assert browser.view()["position"] == len(browser.rows[0]) // 2


def test_the_overlay_has_the_label_colours_of_notebook_01(browser):
    state = browser.view(0)
    mask, overlay = state["mask"], state["overlay"]
    colours = matplotlib.colors.to_rgba_array(viz.LABEL_COLOURS)
    for k in range(1, len(data.LABELS)):
        if (mask == k).any():
            np.testing.assert_array_equal(overlay[mask == k], np.tile([*colours[k, :3], 0.45], ((mask == k).sum(), 1)))
    assert (overlay[mask == 0, 3] == 0).all()
    assert state["present"] == [data.LABELS[k] for k in np.unique(mask) if k > 0] and len(state["present"]) >= 3
    off = browser.view(0, labels=False)
    assert not off["labels"] and (off["overlay"][..., 3] == 0).all()


def test_the_picture_is_the_slice_with_its_overlay_when_on(browser):
    state = browser.view(2, 12)
    fig = browser.draw(Figure(), state)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), viz.oriented(state["image"]))
    np.testing.assert_array_equal(ax.images[1].get_array(), viz.oriented(state["overlay"]))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == state["present"]
    assert ax.get_title() == f"case {state['case']:03d}, week {state['week']}: slice {state['slice']} (13 of 60)"
    off = browser.draw(Figure(), browser.view(2, 12, labels=False)).axes[0]
    assert len(off.images) == 1 and off.get_legend() is None
    on_png, off_png = browser.render_png(state), browser.render_png(browser.view(2, 12, labels=False))
    assert on_png.startswith(PNG) and off_png.startswith(PNG) and on_png != off_png
    assert browser.static_png() == browser.render_png(browser.view())


def test_the_browser_controls_change_state_and_picture(browser):
    browser.widget()
    assert browser.state["row"] == browser.view()["row"]
    renders = _renders(browser)
    before = _png(browser)
    browser.scan.value = 2
    assert len(renders) == 1 and browser.state["scan"] == 2 and browser.slider.max == len(browser.rows[2]) - 1
    assert _png(browser) != before
    browser.slider.value = 5
    assert browser.state["position"] == 5 and browser.state["row"] == browser.rows[2][5]
    with_labels = _png(browser)
    browser.labels.value = False
    assert not browser.state["labels"] and _png(browser) != with_labels and len(renders) == 3


def test_without_masks_there_is_nothing_to_overlay(tiny_phantom):
    plain = widgets.ScanBrowser(data.load_split(tiny_phantom, "train", progress=False))
    state = plain.view()
    assert state["mask"] is None and not state["labels"] and state["present"] == []
    plain.widget()
    assert plain.labels.disabled


def test_bad_browser_states_are_refused(browser):
    with pytest.raises(IndexError, match="scan 3 outside"):
        browser.view(3)
    with pytest.raises(IndexError, match="position 60 outside the scan's 60 slices"):
        browser.view(0, 60)


# ----------------------------------------------------------------------------------------- ReceptiveFieldPanel


@pytest.fixture(scope="module")
def config():
    return ModelConfig.from_dict(PRESETS["default"]["model"])


@pytest.fixture(scope="module")
def fields(split, config):
    return widgets.ReceptiveFieldPanel(split.images[30], config, (4, 8, 16))


def _computed_field(encoder) -> int:
    """Receptive field side from the convolutions, as notebook 02 computes it."""
    size, jump = 1, 1
    for layer in encoder.modules():
        if isinstance(layer, torch.nn.Conv2d):
            size += (layer.kernel_size[0] - 1) * jump
            jump *= layer.stride[0]
    return size


def test_the_field_is_where_the_cells_gradient_is_non_zero(fields, split):
    for factor in (4, 8):
        state = fields.view(factor=factor)  # the central cell, as in notebook 02
        x = torch.tensor(np.asarray(split.images[30]))[None, None].requires_grad_(True)
        z = fields.encoders[factor](x)
        z[0, :, state["row"], state["col"]].sum().backward()
        np.testing.assert_array_equal(state["field"], x.grad[0, 0].numpy() != 0)
        np.testing.assert_allclose(state["gradient"], x.grad[0, 0].abs().numpy())
        assert state["cell"].sum() == factor**2 and state["field"][state["cell"]].all()
        assert state["size"] == (_computed_field(fields.encoders[factor]),) * 2  # an interior cell: nothing clipped


def test_the_field_moves_with_the_chosen_cell(fields):
    d = 4
    here, right, down = fields.view(30, 14, d), fields.view(30, 15, d), fields.view(31, 14, d)
    np.testing.assert_array_equal(right["field"][:, d:], here["field"][:, :-d])
    np.testing.assert_array_equal(down["field"][d:], here["field"][:-d])
    assert right["cols"] == (here["cols"][0] + d, here["cols"][1] + d) and right["rows"] == here["rows"]
    corner = fields.view(0, 0, d)
    assert corner["rows"][0] == 0 and corner["cols"][0] == 0 and corner["size"][0] < here["size"][0]


def test_the_picture_draws_the_field_and_the_cell(fields):
    state = fields.view(20, 10, 8)
    ax = fields.draw(Figure(), state).axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), viz.oriented(fields.slice))
    overlay = np.asarray(ax.images[1].get_array())
    np.testing.assert_array_equal(overlay[..., 3] > 0, viz.oriented(state["field"] | state["cell"]))
    np.testing.assert_allclose(overlay[viz.oriented(state["cell"])],
                               np.tile(matplotlib.colors.to_rgba(widgets.CELL_COLOUR, 0.9), (64, 1)))
    only_field = viz.oriented(state["field"] & ~state["cell"])
    np.testing.assert_allclose(overlay[only_field], np.tile(matplotlib.colors.to_rgba(widgets.FIELD_COLOUR, 0.45),
                                                            (only_field.sum(), 1)))
    height, width = state["size"]
    assert ax.get_title() == f"8x: cell (20, 10) of 32 x 16 sees {height} x {width} px"
    assert fields.render_png(state) != fields.render_png(fields.view(21, 10, 8))


def test_the_field_controls_move_the_cell_and_keep_it_in_place_across_factors(fields):
    fields.widget()
    assert (fields.state["factor"], fields.state["row"], fields.state["col"]) == (4, 32, 16)
    renders = _renders(fields)
    before = _png(fields)
    fields.col.value = 20
    assert fields.state["col"] == 20 and _png(fields) != before and len(renders) == 1
    fields.factor.value = 16
    assert len(renders) == 2 and (fields.state["row"], fields.state["col"]) == (8, 5)
    assert (fields.row.max, fields.col.max) == (15, 7) and fields.state["grid"] == (16, 8)
    fields.factor.value = 4
    assert (fields.state["row"], fields.state["col"]) == (32, 20) and (fields.row.max, fields.col.max) == (63, 31)


def test_bad_field_states_are_refused(fields, config):
    with pytest.raises(ValueError, match="factor 2 is not one of"):
        fields.view(factor=2)
    with pytest.raises(IndexError, match=r"cell \(16, 0\) outside the 16 x 8 grid of 16x"):
        fields.view(16, 0, 16)
    with pytest.raises(ValueError, match="must be \\(H, W\\)"):
        widgets.ReceptiveFieldPanel(np.zeros((2, 256, 128)), config)


# ------------------------------------------------------------------------------------------- ToyQuantizerPanel


def _toy(seed: int = 0) -> np.ndarray:
    """Notebook 03's toy: eight clusters around a circle away from the origin."""
    rng = np.random.default_rng(seed)
    angles = np.repeat(np.arange(8) * np.pi / 4, 250)
    return 3.5 + np.stack([2.5 * np.cos(angles), 2.5 * np.sin(angles)], 1) + rng.normal(0, 0.35, (len(angles), 2))


@pytest.fixture(scope="module")
def toy():
    return widgets.ToyQuantizerPanel(_toy())


@pytest.fixture(scope="module")
def plain(toy):
    return toy.view()


def test_plain_codes_collapse_and_restarts_revive_them(toy, plain):
    assert plain["dead"] >= 24 and plain["restarts_done"] == 0
    revived = toy.view(restarts=True)
    assert revived["dead"] == 0 and revived["n_used"] == 32 and revived["restarts_done"] > 0
    assert revived["error"] < 0.1 * plain["error"]
    np.testing.assert_array_equal(revived["used"], np.bincount(revived["assignment"], minlength=32) > 0)


def test_kmeans_starts_every_code_on_the_data(toy, plain):
    started = toy.view(kmeans=True)
    assert started["active"][0] == 32 and plain["active"][0] <= 4 and started["restarts_done"] == 0


def test_k_sets_the_codebook_size(toy):
    for k in (8, 64):
        state = toy.view(kmeans=True, ema=True, restarts=True, codes=k)
        assert state["codebook"].shape == (k, 2) and state["used"].shape == (k,) and state["n_used"] == k
        assert state["active"].max() <= k


def test_beta_pulls_the_encoder_outputs_to_their_codes(toy):
    states = [toy.view(kmeans=True, ema=True, restarts=True, beta=b) for b in (0.0, 0.5, 2.0)]
    np.testing.assert_array_equal(states[0]["encoded"], toy.points)  # beta 0: the notebook's fixed points
    moved = [float(np.abs(s["encoded"] - toy.points).mean()) for s in states]
    errors = [s["error"] for s in states]
    assert moved[0] == 0 < moved[1] < moved[2] and errors[0] > errors[1] > errors[2]


def test_a_toy_run_is_fixed_by_its_seed(toy, plain):
    again = toy.view()
    for key in ("codebook", "encoded", "assignment", "active"):
        np.testing.assert_array_equal(again[key], plain[key])
    state = torch.random.get_rng_state()
    other = widgets.ToyQuantizerPanel(_toy(), seed=1).view(kmeans=True)
    assert not np.allclose(other["codebook"], toy.view(kmeans=True)["codebook"])
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone


def test_the_toy_picture_shows_used_and_dead_codes(toy, plain):
    fig = toy.draw(Figure(), plain)
    plane, curve = fig.axes
    offsets = {c.get_label(): c.get_offsets() for c in plane.collections}
    np.testing.assert_allclose(offsets["used"], plain["codebook"][plain["used"]])
    np.testing.assert_allclose(offsets["dead"], plain["codebook"][~plain["used"]])
    np.testing.assert_allclose(offsets["encoded"], plain["encoded"])
    assert plane.get_title() == f"{plain['n_used']} of 32 codes used, {plain['dead']} dead"
    np.testing.assert_array_equal(curve.lines[0].get_ydata(), plain["active"])
    assert fig.get_suptitle().startswith("plain, beta 0.25")


def test_the_toy_controls_retrain(toy):
    toy.widget()
    renders = _renders(toy)
    collapsed = _png(toy)
    toy.restarts.value = True
    assert toy.state["restarts"] and toy.state["dead"] == 0 and _png(toy) != collapsed
    toy.codes.value = 16
    assert toy.state["codebook"].shape == (16, 2)
    toy.beta.value = 1.0
    toy.kmeans.value = True
    toy.ema.value = True
    assert (toy.state["beta"], toy.state["kmeans"], toy.state["ema"]) == (1.0, True, True) and len(renders) == 5
    assert _png(toy) == toy.render_png(toy.view(True, True, True, 1.0, 16))


# ------------------------------------------------------------------------------------------------- CurvesPanel


@pytest.fixture(scope="module")
def manifest():
    return json.loads(MANIFEST.read_text())["checkpoints"]


@pytest.fixture(scope="module")
def curves():
    return widgets.CurvesPanel(MANIFEST)


def test_the_panel_offers_every_recorded_metric_and_run(curves, manifest):
    keys = set()
    for entry in manifest.values():
        for record in entry["history"]:
            keys |= {k for k, v in record.items() if type(v) in (int, float)} - {"epoch"}
    assert curves.metrics == sorted(keys) and "precision" not in curves.metrics
    assert list(curves.histories) == [name.removesuffix(".pt") for name in manifest]
    assert curves.default_metric == "val_ssim"
    assert curves.default_runs == [n.removesuffix(".pt") for n, e in manifest.items() if "val_ssim" in e["history"][0]]


def test_the_curves_and_best_epochs_are_the_manifests(curves, manifest):
    state = curves.view("val_ssim", ["seed_8x", "default"])
    assert state["runs"] == ["seed_8x", "default"] and state["missing"] == []
    for run in state["runs"]:
        history, best = manifest[f"{run}.pt"]["history"], manifest[f"{run}.pt"]["metrics"]["best_validation_epoch"]
        epochs, values = state["series"][run]
        assert epochs.tolist() == [r["epoch"] for r in history] and values.tolist() == [r["val_ssim"] for r in history]
        assert state["best"][run] == (best["epoch"], best["val_ssim"])
        assert best["val_ssim"] == max(values)  # a VQ-VAE's best epoch is its best validation SSIM
    assert state["best"]["seed_8x"][0] == 13 < len(manifest["seed_8x.pt"]["history"])
    prior = curves.view("val_nll", ["default", "prior_8x"])
    assert prior["runs"] == ["prior_8x"] and prior["missing"] == ["default"]
    assert prior["best"]["prior_8x"][1] == min(r["val_nll"] for r in manifest["prior_8x.pt"]["history"])


def test_the_curves_picture_marks_each_best_epoch(curves):
    state = curves.view("val_psnr", ["default", "seed_8x", "prior_8x"], log=True)
    ax = curves.draw(Figure(), state).axes[0]
    lines, stars = ax.lines[0::2], ax.lines[1::2]
    for run, line, star in zip(state["runs"], lines, stars):
        epochs, values = state["series"][run]
        np.testing.assert_array_equal(line.get_xdata(), epochs)
        np.testing.assert_array_equal(line.get_ydata(), values)
        assert (star.get_xdata()[0], star.get_ydata()[0]) == state["best"][run] and star.get_marker() == "*"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        f"{run} (best epoch {state['best'][run][0]})" for run in state["runs"]]
    assert ax.get_yscale() == "log" and ax.get_title() == "val_psnr (not recorded by prior_8x)"


def test_the_curves_controls_change_metric_runs_and_scale(curves):
    curves.widget()
    assert list(curves.metric.options) == curves.metrics and list(curves.runs.value) == curves.default_runs
    renders = _renders(curves)
    before = _png(curves)
    curves.metric.value = "val_active"
    assert curves.state["metric"] == "val_active" and _png(curves) != before
    curves.runs.value = ("default_8x",)
    assert curves.state["runs"] == ["default_8x"]
    curves.log.value = True
    assert curves.state["log"] and len(renders) == 3
    assert _png(curves) == curves.render_png(curves.view("val_active", ["default_8x"], True))


def test_a_manifest_without_validation_ssim_or_best_epoch(tmp_path, curves):
    path = tmp_path / "MANIFEST.json"
    history = [{"epoch": 1, "val_nll": 2.0, "precision": "fp32"}, {"epoch": 2, "val_nll": 1.5, "precision": "fp32"}]
    path.write_text(json.dumps({"checkpoints": {"p.pt": {"history": history}}}))
    panel = widgets.CurvesPanel(path)
    assert panel.metrics == ["val_nll"] and panel.default_runs == ["p"]
    state = panel.view()
    assert state["best"] == {"p": None} and state["series"]["p"][1].tolist() == [2.0, 1.5]
    assert [t.get_text() for t in panel.draw(Figure(), state).axes[0].get_legend().get_texts()] == ["p"]
    with pytest.raises(ValueError, match="no run records 'val_ssim'"):
        panel.view("val_ssim")
    with pytest.raises(ValueError, match=r"unknown runs \['nope'\]"):
        curves.view(runs=["nope"])


# -------------------------------------------------------------------------------------------------------- show


@pytest.fixture
def shown(monkeypatch):
    """What `show` displays, in order."""
    out = []
    monkeypatch.setattr("IPython.display.display", lambda *objs: out.extend(objs))
    return out


def test_show_headless_displays_the_default_picture_and_how_to_run_it_live(shown, browser):
    widgets.show(browser, False)
    image, note = shown
    assert isinstance(image, Image) and image.data == browser.static_png()
    assert isinstance(note, Markdown) and "`make lab`" in note.data and "`INTERACTIVE = True`" in note.data
    assert "make explorer" not in note.data


def test_show_interactive_displays_the_live_widget(shown, curves):
    widgets.show(curves, True)
    (box,) = shown
    assert isinstance(box, ipywidgets.VBox) and curves.image in box.children


def test_show_names_make_explorer_for_the_codebook_explorer(shown):
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(hidden=16, res_hidden=8, codebook_size=8, embed_dim=4, downsample=4)).eval()
    explorer = CodebookExplorer(model, np.random.default_rng(0).random((2, 32, 16)))
    widgets.show(explorer, False)
    image, note = shown
    assert image.data == explorer.static_png() and "`make explorer`" in note.data and "`make lab`" in note.data
