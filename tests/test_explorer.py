"""The codebook explorer, driven from Python (no browser), on a tiny untrained VQ-VAE; the sampler panel on a
tiny VQ-VAE and transformer prior trained for one epoch on the tiny phantom."""

import copy
from pathlib import Path

import ipywidgets
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from vqvae_lib import data, metrics, viz
from vqvae_lib import prior as P
from vqvae_lib import train as T
from vqvae_lib.explorer import (COMPLETIONS, HIGHLIGHT, NO_CODE, PATCH_CELLS, PATCH_MARGIN, RANDOM, SAMPLES, WASH,
                                CodebookExplorer, SamplerPanel, code_intensity, decoder_reach, explorer_grid,
                                intensity_map)
from vqvae_lib.model import VQVAE, ModelConfig

PNG = b"\x89PNG\r\n\x1a\n"
D = 4


def _ellipses(n: int = 6, shape: tuple[int, int] = (64, 32)) -> np.ndarray:
    """(n, H, W) float32: a bright ellipse on black, moved down the slice from one image to the next."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.stack([(((yy - 10 - 8 * k) / 9) ** 2 + ((xx - 16) / 6) ** 2 < 1) * (0.4 + 0.1 * k)
                     for k in range(n)]).astype(np.float32)


@pytest.fixture(scope="module")
def images():
    return _ellipses()


@pytest.fixture(scope="module")
def model(images):
    """Untrained, but one training-mode pass initialises its codebook from the encoder's outputs (k-means),
    so the slices use many codes, and not all the same ones."""
    torch.manual_seed(0)
    m = VQVAE(ModelConfig(hidden=16, res_hidden=8, codebook_size=16, embed_dim=8, downsample=D))
    m.train()
    m(torch.from_numpy(images[:, None]))
    return m.eval()


@pytest.fixture(scope="module")
def explorer(model, images):
    return CodebookExplorer(model, images, [f"s{i}" for i in range(len(images))], batch_size=4)


def _png(explorer) -> bytes:
    return bytes(explorer.image.value)  # the Image widget hands back a memoryview


def _rarest(explorer, k: int) -> int:
    return explorer.codes_by_use(k)[-1][0]


def test_index_maps_and_reconstructions_match_the_model(explorer, model, images):
    # batch_size=4 splits the 6 images in two batches: the result must equal one pass over all
    x = torch.from_numpy(images[:, None])
    expected = model.encode(x).numpy()
    assert explorer.indices.dtype == np.int64
    assert explorer.indices.shape == (6, *model.latent_shape(images.shape[1:])) == (6, 64 // D, 32 // D)
    np.testing.assert_array_equal(explorer.indices, expected)
    recon = model.decode_indices(torch.from_numpy(expected))[:, 0].clamp(0, 1).numpy()
    assert explorer.recon.shape == images.shape and explorer.recon.min() >= 0 and explorer.recon.max() <= 1
    np.testing.assert_allclose(explorer.recon, recon, atol=1e-5)
    assert not model.training


def test_the_ellipses_give_different_index_maps(explorer):
    assert not np.array_equal(explorer.indices[0], explorer.indices[5])


def test_view_without_a_code_highlights_nothing(explorer, images):
    state = explorer.view(2)
    np.testing.assert_array_equal(state["image"], images[2])
    np.testing.assert_array_equal(state["indices"], explorer.indices[2])
    np.testing.assert_array_equal(state["recon"], explorer.recon[2])
    assert state["highlight"].shape == (16, 8) and not state["highlight"].any()
    assert state["pixel_highlight"].shape == (64, 32) and not state["pixel_highlight"].any()
    assert state["code"] is None and state["code_patch"] is None and state["usage"] == 0
    np.testing.assert_array_equal(state["codes_in_slice"], np.unique(explorer.indices[2]))
    assert state["name"] == "s2"


def test_view_with_a_code_highlights_its_cells_and_their_pixel_blocks(explorer):
    k = 3
    code = _rarest(explorer, k)
    state = explorer.view(k, code)
    cells = explorer.indices[k] == code
    np.testing.assert_array_equal(state["highlight"], cells)
    assert state["usage"] == cells.sum() > 0
    blocks = np.kron(cells, np.ones((D, D), dtype=bool))
    np.testing.assert_array_equal(state["pixel_highlight"], blocks)
    assert state["pixel_highlight"].sum() == cells.sum() * D * D
    patch = state["code_patch"]
    assert patch.shape == (PATCH_CELLS * D, PATCH_CELLS * D)


def test_code_patch_is_the_centre_of_a_map_filled_with_that_code(explorer, model):
    code = int(explorer.indices[0, 0, 0])
    n, m, p = PATCH_CELLS + 2 * PATCH_MARGIN, PATCH_MARGIN * D, PATCH_CELLS * D
    full = model.decode_indices(torch.full((1, n, n), code))[0, 0].numpy()  # not clipped: it may exceed 1
    np.testing.assert_allclose(explorer.code_patch(code), full[m:m + p, m:m + p], atol=1e-5)


def test_body_code_is_the_most_used_code_of_the_bright_cells(explorer):
    d, (h, w) = explorer.downsample, explorer.indices.shape[1:]
    bright = explorer.images[0][:h * d, :w * d].reshape(h, d, w, d).mean(axis=(1, 3)) > 0.3
    assert bright.any() and not bright.all()
    counts = np.bincount(explorer.indices[0][bright], minlength=explorer.n_codes)
    assert explorer.body_code(0) == int(counts.argmax())
    assert explorer.body_code(0, threshold=2.0) == explorer.codes_by_use(0)[0][0]  # no cell that bright


def test_a_code_absent_from_the_slice_has_zero_usage(explorer):
    absent = sorted(set(range(16)) - set(explorer.indices[1].ravel().tolist()))[0]
    state = explorer.view(1, absent)
    assert state["usage"] == 0 and not state["pixel_highlight"].any() and state["code_patch"] is not None


def test_bad_inputs_are_refused(explorer, model, images):
    with pytest.raises(ValueError):
        CodebookExplorer(model, images[0])
    with pytest.raises(ValueError):
        CodebookExplorer(model, images, ["only one name"])
    with pytest.raises(ValueError):
        explorer.view(0, 16)
    with pytest.raises(IndexError):
        explorer.view(6)


def test_moving_the_slider_updates_state_picture_and_code_options(explorer, images):
    explorer.widget()
    before = _png(explorer)
    assert before.startswith(PNG)
    renders = []
    explorer.image.observe(renders.append, names="value")
    for k in (4, 1):
        explorer.slider.value = k
        assert len(renders) == {4: 1, 1: 2}[k]  # replacing the dropdown's options does not render again
        np.testing.assert_array_equal(explorer.state["image"], images[k])
        assert _png(explorer) != before and _png(explorer).startswith(PNG)
        before = _png(explorer)
        codes, counts = np.unique(explorer.indices[k], return_counts=True)
        values = [v for _, v in explorer.code.options]
        assert values[0] == NO_CODE and sorted(values[1:]) == codes.tolist()
        assert [counts[codes.tolist().index(c)] for c in values[1:]] == sorted(counts, reverse=True)
        label, value = explorer.code.options[1]
        assert label == f"code {value} ({counts[codes.tolist().index(value)]} cells)"


def test_choosing_a_code_highlights_it(explorer):
    explorer.widget()
    k = 5
    explorer.slider.value = k
    before = _png(explorer)
    code = _rarest(explorer, k)
    explorer.code.value = code
    state = explorer.state
    assert state["code"] == code and state["usage"] == (explorer.indices[k] == code).sum()
    np.testing.assert_array_equal(state["highlight"], explorer.indices[k] == code)
    assert state["pixel_highlight"].sum() == state["highlight"].sum() * D * D
    assert _png(explorer) != before and _png(explorer).startswith(PNG)
    explorer.code.value = NO_CODE
    assert explorer.state["code"] is None and not explorer.state["highlight"].any()


def test_the_chosen_code_survives_a_slice_change_only_if_present(explorer):
    explorer.widget()
    sets = [set(np.unique(m).tolist()) for m in explorer.indices]
    pairs = [(a, b, c) for a in range(6) for b in range(6) for c in sets[a] if a != b]
    shared = next((a, b, c) for a, b, c in pairs if c in sets[b])
    missing = next((a, b, c) for a, b, c in pairs if c not in sets[b])
    for a, b, c in (shared, missing):
        explorer.slider.value = a
        explorer.code.value = c
        explorer.slider.value = b
        kept = c in sets[b]
        assert explorer.code.value == (c if kept else NO_CODE)
        assert explorer.state["code"] == (c if kept else None)
        assert explorer.state["index"] == b
        assert explorer.state["usage"] == ((explorer.indices[b] == c).sum() if kept else 0)


def test_figure_shows_image_and_index_map_the_same_way_up(explorer, tmp_path):
    code = _rarest(explorer, 2)
    fig = explorer.figure(2, code, tmp_path / "explorer.png")
    assert (tmp_path / "explorer.png").read_bytes().startswith(PNG)
    axes = fig.axes
    assert len(axes) == 4
    state = explorer.view(2, code)
    assert f"code {code}: {state['usage']} of 128 cells" == axes[1].get_title()
    shown_map = axes[1].images[0].get_array()
    rgb = explorer.index_map(state["indices"], state["highlight"])
    np.testing.assert_array_equal(rgb[state["highlight"]], np.tile(HIGHLIGHT, (state["usage"], 1)))
    np.testing.assert_allclose(rgb[~state["highlight"]],
                               explorer.index_map(state["indices"])[~state["highlight"]] * WASH + 1 - WASH)
    np.testing.assert_array_equal(shown_map, viz.oriented(rgb))
    np.testing.assert_array_equal(axes[0].images[0].get_array(), viz.oriented(state["image"]))
    overlay = np.asarray(axes[0].images[1].get_array())
    np.testing.assert_array_equal(overlay[..., 3] > 0, viz.oriented(state["pixel_highlight"]))
    plt.close(fig)


def test_explorer_grid_has_a_row_per_slice_with_its_ssim(explorer, tmp_path):
    fig = explorer_grid(explorer, [0, 3, 5], tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes().startswith(PNG)
    assert len(fig.axes) == 10  # and the colour bar
    assert fig.axes[9].get_xlabel() == "code coloured by the mean intensity it decodes to"
    ssim, _ = metrics.ssim_psnr(explorer.recon[[0, 3, 5]], explorer.images[[0, 3, 5]])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "s0" and titles[3] == "s3"
    assert titles[5] == f"reconstruction (SSIM {ssim[1]:.3f})"
    np.testing.assert_array_equal(fig.axes[4].images[0].get_array(),
                                  viz.oriented(intensity_map(explorer.indices[3], explorer.intensity)))
    plt.close(fig)


def _canvas(fig) -> np.ndarray:
    """(height, width, 3) int pixels of a pyplot figure drawn at the saved DPI (`viz.DPI`)."""
    fig.set_dpi(viz.DPI)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)


def _panel(fig, pixels: np.ndarray, ax) -> np.ndarray:
    """The pixels inside one axes of a drawn figure."""
    box = ax.get_window_extent()
    height = pixels.shape[0]
    return pixels[int(height - box.y1) + 1:int(height - box.y0) - 1, int(box.x0) + 1:int(box.x1) - 1]


def test_code_intensity_is_the_mean_of_what_each_code_decodes_to(explorer, model):
    expected = np.array([explorer.code_patch(k).mean() for k in range(16)])
    np.testing.assert_allclose(code_intensity(model, batch_size=3), expected, atol=1e-6)  # in batches of 3 codes
    np.testing.assert_allclose(explorer.intensity, expected, atol=1e-6)
    assert np.ptp(expected) > 0


def test_a_brighter_decoding_code_gets_a_brighter_colour(explorer):
    luminance = np.array([0.2126, 0.7152, 0.0722])
    rgb = intensity_map(np.array([[0, 1, 2, 3]]), np.array([0.9, 0.1, 0.5, 1.7]))[0]
    bright = rgb @ luminance
    assert bright[1] < bright[2] < bright[0] < bright[3]
    np.testing.assert_array_equal(rgb[3], intensity_map(np.array([[0]]), np.array([1.0]))[0, 0])  # clipped at vmax
    # the explorer's codes, on a scale spanning their intensities: colour brightness follows the decoded intensity
    intensity = explorer.intensity
    order = np.argsort(intensity)
    ranked = intensity_map(order[None], intensity, vmin=intensity.min(), vmax=intensity.max())[0] @ luminance
    assert (np.diff(ranked) >= 0).all() and ranked[-1] > ranked[0] + 0.5
    cells = explorer.index_map(explorer.indices[2])
    np.testing.assert_array_equal(cells, intensity_map(explorer.indices[2], intensity))
    highlight = explorer.indices[2] == explorer.indices[2, 0, 0]
    marked = intensity_map(explorer.indices[2], intensity, highlight)
    np.testing.assert_array_equal(marked[highlight], np.tile(HIGHLIGHT, (highlight.sum(), 1)))
    assert not np.isclose(marked[~highlight], HIGHLIGHT, atol=0.1).all(axis=-1).any()


def test_decoder_reach_is_exactly_where_a_linear_copy_of_the_decoder_responds(model):
    # Without its ReLUs the decoder is affine: a change at one latent cell changes exactly the pixels its
    # convolutions connect to that cell (random weights leave no structural zero).
    linear = copy.deepcopy(model)
    for module in list(linear.decoder.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.ReLU):
                setattr(module, name, torch.nn.Identity())
    assert not any(isinstance(m, torch.nn.ReLU) for m in linear.decoder.modules())
    torch.manual_seed(1)
    z = torch.randn(1, 8, 16, 8)
    for row, col in [(0, 0), (7, 4), (15, 7), (2, 6)]:
        moved = z.clone()
        moved[0, :, row, col] += torch.randn(8)
        with torch.no_grad():
            changed = (linear.decoder(moved) != linear.decoder(z))[0, 0].numpy()
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        box = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
        assert decoder_reach(model, row, col, (64, 32)) == decoder_reach(linear, row, col, (64, 32)) == box


def test_an_edit_changes_one_cell_and_the_decoding_only_within_the_decoders_reach(explorer, model):
    k, row, col = 3, 7, 4
    old = int(explorer.indices[k, row, col])
    code = int(np.argmax(np.abs(explorer.intensity - explorer.intensity[old])))
    state = explorer.edit_view(k, row, col, code)
    assert (state["index"], state["row"], state["col"], state["code"], state["old_code"]) == (k, row, col, code, old)
    changed = state["edited"] != explorer.indices[k]
    assert changed.sum() == 1 and changed[row, col] and state["edited"][row, col] == code
    np.testing.assert_array_equal(state["indices"], explorer.indices[k])  # the explorer's own map is untouched
    np.testing.assert_allclose(state["original"], explorer.recon[k], atol=1e-5)
    decoded = model.decode_indices(torch.from_numpy(state["edited"][None]))[0, 0].clamp(0, 1).numpy()
    np.testing.assert_allclose(state["decoded"], decoded, atol=1e-5)
    np.testing.assert_array_equal(state["difference"], state["decoded"] - state["original"])
    top, bottom, left, right = state["reach"]
    assert state["reach"] == decoder_reach(model, row, col, (64, 32))
    assert state["cell"] == (row * D, (row + 1) * D, col * D, (col + 1) * D)
    assert top < row * D and bottom > (row + 1) * D and left < col * D and right > (col + 1) * D
    outside = np.ones((64, 32), dtype=bool)
    outside[top:bottom, left:right] = False
    assert outside.mean() > 0.4  # the reach is a part of the slice, not all of it
    assert not state["difference"][outside].any()
    assert np.abs(state["difference"][row * D:(row + 1) * D, col * D:(col + 1) * D]).max() > 0


def test_editing_a_cell_to_its_own_code_changes_nothing(explorer):
    state = explorer.edit_view(1, 5, 2, explorer.indices[1, 5, 2])
    np.testing.assert_array_equal(state["edited"], explorer.indices[1])
    assert not state["difference"].any()
    np.testing.assert_array_equal(state["decoded"], state["original"])


def test_bad_edits_are_refused(explorer):
    with pytest.raises(ValueError, match=r"row 16 outside the index map's 16 x 8 cells: row in \[0, 16\)"):
        explorer.edit_view(0, 16, 0, 1)
    with pytest.raises(ValueError, match=r"col -1 outside the index map's 16 x 8 cells: col in \[0, 8\)"):
        explorer.edit_view(0, 0, -1, 1)
    with pytest.raises(ValueError, match=r"code 16 outside the codebook \[0, 16\)"):
        explorer.edit_view(0, 0, 0, 16)
    with pytest.raises(IndexError, match=r"slice 6 outside \[0, 6\)"):
        explorer.edit_view(6, 0, 0, 1)


def test_the_edit_picture_outlines_the_cell_where_the_slice_shows_it(explorer):
    from matplotlib.figure import Figure

    state = explorer.edit_view(2, 9, 3, 5)
    fig = explorer._draw_edit(Figure(), state)
    assert [ax.get_title() for ax in fig.axes][:3] == [f"cell (9, 3): code {state['old_code']} -> 5",
                                                      "original decoding", "edited decoding"]
    cell = np.zeros((64, 32), dtype=bool)
    cell[9 * D:10 * D, 3 * D:4 * D] = True
    reach = np.zeros((64, 32), dtype=bool)
    reach[slice(*state["reach"][:2]), slice(*state["reach"][2:])] = True
    edited = state["edited"] != state["indices"]
    for ax, mask in [(fig.axes[0], edited), (fig.axes[1], cell), (fig.axes[2], cell), (fig.axes[3], cell)]:
        rows, cols = np.nonzero(viz.oriented(mask))  # where the panel shows those pixels
        box = ax.patches[0]
        assert (box.get_x(), box.get_y()) == (cols.min() - 0.5, rows.min() - 0.5)
        assert (box.get_width(), box.get_height()) == (cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
    rows, cols = np.nonzero(viz.oriented(reach))
    dashed = fig.axes[3].patches[1]
    assert (dashed.get_x(), dashed.get_y()) == (cols.min() - 0.5, rows.min() - 0.5)
    assert (dashed.get_width(), dashed.get_height()) == (np.ptp(cols) + 1, np.ptp(rows) + 1)
    np.testing.assert_array_equal(fig.axes[3].images[0].get_array(), viz.oriented(state["difference"]))
    assert explorer.render_edit(state).startswith(PNG)


def test_the_edit_controls_render_the_edit_of_the_current_slice(explorer):
    explorer.widget()
    assert (explorer.edit_row.value, explorer.edit_col.value) == (8, 4)  # the map's centre
    assert (explorer.edit_row.max, explorer.edit_col.max, explorer.edit_code.max) == (15, 7, 15)
    assert explorer.edit_state is None
    waiting = bytes(explorer.edit_image.value)
    explorer.slider.value = 2
    explorer.edit_row.value, explorer.edit_col.value, explorer.edit_code.value = 3, 5, 7
    explorer.edit_button.click()
    state = explorer.edit_state
    assert (state["index"], state["row"], state["col"], state["code"]) == (2, 3, 5, 7)
    assert bytes(explorer.edit_image.value) == explorer.render_edit(explorer.edit_view(2, 3, 5, 7)) != waiting
    explorer.slider.value = 4  # a new slice: the old edit goes
    assert explorer.edit_state is None and bytes(explorer.edit_image.value) == waiting


def test_static_png_is_the_widgets_first_picture(explorer):
    explorer.widget()
    assert explorer.static_png() == _png(explorer) == explorer.render_png(explorer.view(0))


def test_the_code_alone_panel_has_its_own_grey_scale(explorer):
    k = 4
    spread = {c: np.ptp(explorer.code_patch(c)) for c, _ in explorer.codes_by_use(k)}
    code = max(spread, key=spread.get)
    patch = explorer.code_patch(code)
    fig = explorer.figure(k, code)
    ax = fig.axes[3]
    assert ax.get_title() == f"code {code} alone\nown scale {patch.min():.2f}-{patch.max():.2f}"
    assert ax.images[0].norm.vmin == patch.min() and ax.images[0].norm.vmax == patch.max()
    shown = _panel(fig, _canvas(fig), ax)
    assert shown.min() <= 10 and shown.max() >= 245  # black to white: not clipped, not one grey
    plt.close(fig)


def test_a_code_that_decodes_to_one_grey_is_drawn_as_that_grey(explorer):
    code = explorer.codes_by_use(4)[0][0]
    saved = explorer._patches[code].copy()
    explorer._patches[code] = 1.3  # saturated: brighter than any slice, one value
    try:
        fig = explorer.figure(4, code)
    finally:
        explorer._patches[code] = saved
    ax = fig.axes[3]
    assert ax.get_title() == f"code {code} alone\none grey: 1.30"
    assert (ax.images[0].norm.vmin, ax.images[0].norm.vmax) == (0, 1)
    plt.close(fig)


def test_highlighted_cells_are_visible_at_the_saved_size(model):
    # Slices of the real size (256 x 128, 4 x 4 blocks), where one cell is a few pixels of the saved figure.
    big = CodebookExplorer(model, np.kron(_ellipses(2), np.ones((1, 4, 4), dtype=np.float32)))
    cells = big.indices[0]
    found = None
    for code, _ in reversed(big.codes_by_use(0)):  # a highlighted cell with no other within two cells
        mine = np.argwhere(cells == code)
        for r, c in mine:
            if (np.abs(mine - [r, c]).max(axis=1) <= 2).sum() == 1:
                found = code, r, c
                break
        if found:
            break
    code, r, c = found
    fig = big.figure(0, code)
    pixels = _canvas(fig)
    ax = fig.axes[0]
    x, y = ax.transData.transform([((r + 0.5) * D - 0.5, 128 - (c + 0.5) * D - 0.5)])[0]
    cell_px = (ax.transData.transform([(D, 0)]) - ax.transData.transform([(0, 0)]))[0, 0]
    assert cell_px < 6  # a cell is small at the saved size
    row, col = int(round(pixels.shape[0] - y)), int(round(x))
    window = pixels[row - 9:row + 10, col - 9:col + 10]
    marked = (np.abs(window - HIGHLIGHT * 255) <= 30).all(axis=2)
    rows, cols = np.nonzero(marked)
    assert np.ptp(rows) + 1 >= 10 and np.ptp(cols) + 1 >= 10, "the mark round the cell spans under 10 pixels"
    plt.close(fig)


def tiny_generator(data_dir: Path, root: Path) -> tuple[Path, Path]:
    """(VQ-VAE, prior) checkpoints trained for one epoch on 16 slices of data_dir (latent maps 16 x 8, 16 codes),
    made once under root (a session's base temp folder, so other test modules reuse them)."""
    vq, prior = root / "sampler_vq" / "best.pt", root / "sampler_prior" / "best.pt"
    if not prior.exists():
        T.train(data_dir, vq.parent, T.make_config("default", hidden=16, res_hidden=8, codebook_size=16, embed_dim=8,
                                                   downsample=16, epochs=1, limit=16, batch_size=8, device="cpu"),
                progress=False)
        P.train_prior(vq, data_dir, prior.parent, P.make_prior_config(
            arch="transformer", channels=16, layers=1, heads=2, epochs=1, limit=16, batch_size=8, codebook_size=16,
            device="cpu"), progress=False)
    return vq, prior


@pytest.fixture(scope="module")
def panel(tiny_phantom, tmp_path_factory):
    generator = P.load_generator(*tiny_generator(tiny_phantom, tmp_path_factory.getbasetemp()), device="cpu")
    split = data.load_split(tiny_phantom, "test", progress=False)
    return SamplerPanel(generator, np.asarray(split.images), [f.name for f in split.files],
                        P.position_bins(split, generator.positions))


def test_the_panel_holds_the_slices_index_maps(panel):
    assert panel.generator.latent_shape == (16, 8) and panel.generator.positions == 8
    assert panel.maps.shape == (len(panel), 16, 8) and panel.maps.dtype == np.int64
    np.testing.assert_array_equal(panel.maps[:5], panel.generator.encode(panel.images[:5]))


@pytest.mark.parametrize("rows", [0, 5, 16])
def test_a_completion_keeps_the_codes_above_the_cut(panel, rows):
    k = 30
    state = panel.complete_view(k, rows, seed=3)
    assert state["index"] == k and state["rows"] == rows and state["cut"] == rows * 256 // 16
    assert state["position"] == panel.bins[k]
    np.testing.assert_array_equal(state["map"], panel.maps[k])
    assert state["maps"].shape == (COMPLETIONS, 16, 8) and state["images"].shape == (COMPLETIONS, 256, 128)
    for completion in state["maps"]:
        np.testing.assert_array_equal(completion[:rows], panel.maps[k][:rows])
    if rows < 16:
        assert (state["maps"][:, rows:] != panel.maps[k][rows:]).any()
    recon = panel.generator.decode(panel.maps[k:k + 1])[0]
    assert np.isnan(state["kept"][state["cut"]:]).all()
    np.testing.assert_array_equal(state["kept"][:state["cut"]], recon[:state["cut"]])
    assert panel.render_completion(state).startswith(PNG)


def test_samples_follow_the_seed(panel):
    first, again, other = (panel.sample_view(1.0, None, seed) for seed in (0, 0, 1))
    assert first["maps"].shape == (SAMPLES, 16, 8) and first["images"].shape == (SAMPLES, 256, 128)
    np.testing.assert_array_equal(first["maps"], again["maps"])
    np.testing.assert_array_equal(first["bins"], again["bins"])
    assert not np.array_equal(first["maps"], other["maps"])
    assert first["captions"] == [f"bin {b} of 8" for b in first["bins"]]
    fixed = panel.sample_view(0.7, 3, 0, n=2)
    assert fixed["bins"].tolist() == [3, 3] and fixed["temperature"] == 0.7
    assert panel.render_sample(fixed).startswith(PNG) and panel.render_sample(first) != panel.render_sample(other)


def test_the_panels_static_png_is_its_first_samples(panel):
    panel.widget()
    panel.sample_button.click()
    assert panel.static_png() == bytes(panel.sample_image.value) == panel.render_sample(panel.sample_view(1.0, None, 0))


def test_bad_sampler_inputs_are_refused(panel):
    with pytest.raises(ValueError, match=r"rows must be in \[0, 16\] \(latent rows kept\), got 17"):
        panel.complete_view(0, 17)
    with pytest.raises(ValueError, match="rows must be in"):
        panel.complete_view(0, -1)
    with pytest.raises(IndexError):
        panel.complete_view(len(panel), 3)
    with pytest.raises(ValueError, match="position must be a bin"):
        panel.sample_view(1.0, 8)
    with pytest.raises(ValueError, match="temperature > 0"):
        panel.sample_view(0.0)
    with pytest.raises(ValueError, match="2 names for 3 images"):
        SamplerPanel(panel.generator, panel.images[:3], ["a", "b"])
    with pytest.raises(ValueError, match="2 position bins for 3 images"):
        SamplerPanel(panel.generator, panel.images[:3], bins=[0, 1])
    with pytest.raises(ValueError, match=r"128 x 64 slices give \(8, 4\) maps, the prior models \(16, 8\)"):
        SamplerPanel(panel.generator, panel.images[:2, :128, :64])
    with pytest.raises(ValueError, match="the slider reaches slices 0 .. 60, the panel has 60"):
        panel.widget(ipywidgets.IntSlider(min=0, max=len(panel)))


def test_the_panel_widget_renders_on_each_click(panel):
    panel.widget()
    assert (panel.rows.min, panel.rows.max) == (0, 16)
    assert (panel.temperature.min, panel.temperature.max, panel.temperature.value) == (0.5, 1.5, 1.0)
    assert [v for _, v in panel.position.options] == [RANDOM, *range(8)]
    assert panel.sample_button.description == "sample" and "sampler-sample" in panel.sample_button._dom_classes
    assert panel.complete_button.description == "complete from this row"
    assert panel.sample_state is None and panel.complete_state is None
    pictures = [bytes(panel.sample_image.value)]
    for seed in (0, 1):
        panel.sample_button.click()
        assert panel.sample_state["seed"] == seed and panel.seed.value == seed + 1
        pictures.append(bytes(panel.sample_image.value))
        assert pictures[-1].startswith(PNG) and pictures[-1] != pictures[-2]
    assert pictures[-1] == panel.render_sample(panel.sample_view(1.0, None, 1))
    panel.position.value, panel.temperature.value = 2, 1.5
    panel.sample_button.click()
    assert panel.sample_state["bins"].tolist() == [2] * SAMPLES and panel.sample_state["temperature"] == 1.5

    waiting = bytes(panel.complete_image.value)
    panel.slider.value, panel.rows.value = 12, 4
    panel.complete_button.click()
    state = panel.complete_state
    assert (state["index"], state["rows"], state["seed"], state["temperature"]) == (12, 4, 3, 1.5)
    assert bytes(panel.complete_image.value) == panel.render_completion(state) != waiting


def test_the_panel_follows_the_explorers_slider(panel):
    slider = ipywidgets.IntSlider(value=7, min=0, max=len(panel) - 1)
    box = panel.widget(slider)
    assert panel.slider is slider and slider not in box.children[1].children[1].children
    waiting = bytes(panel.complete_image.value)
    panel.complete_button.click()
    assert panel.complete_state["index"] == 7 and bytes(panel.complete_image.value) != waiting
    slider.value = 9  # a new slice: the old completion goes
    assert panel.complete_state is None and bytes(panel.complete_image.value) == waiting
    panel.complete_button.click()
    assert panel.complete_state["index"] == 9
