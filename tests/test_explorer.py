"""The codebook explorer, driven from Python (no browser), on a tiny untrained VQ-VAE; the sampler panel on a
tiny VQ-VAE and transformer prior trained for one epoch on the tiny phantom."""

from pathlib import Path

import ipywidgets
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from vqvae_lib import data, metrics, viz
from vqvae_lib import prior as P
from vqvae_lib import train as T
from vqvae_lib.explorer import (COMPLETIONS, HIGHLIGHT, NO_CODE, PATCH_CELLS, PATCH_MARGIN, RANDOM, SAMPLES,
                                CodebookExplorer, SamplerPanel, explorer_grid)
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
    assert patch.shape == (PATCH_CELLS * D, PATCH_CELLS * D) and patch.min() >= 0 and patch.max() <= 1


def test_code_patch_is_the_centre_of_a_map_filled_with_that_code(explorer, model):
    code = int(explorer.indices[0, 0, 0])
    n, m, p = PATCH_CELLS + 2 * PATCH_MARGIN, PATCH_MARGIN * D, PATCH_CELLS * D
    full = model.decode_indices(torch.full((1, n, n), code))[0, 0].clamp(0, 1).numpy()
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
    rgba = explorer.index_map_rgba(state["indices"], state["highlight"])
    np.testing.assert_array_equal(rgba[state["highlight"], :3], np.tile(HIGHLIGHT, (state["usage"], 1)))
    np.testing.assert_array_equal(rgba[~state["highlight"]], explorer.index_map_rgba(state["indices"])[
        ~state["highlight"]] * [0.3, 0.3, 0.3, 1] + [0.7, 0.7, 0.7, 0])
    np.testing.assert_array_equal(shown_map, viz.oriented(explorer.index_map_rgba(state["indices"],
                                                                                  state["highlight"])))
    np.testing.assert_array_equal(axes[0].images[0].get_array(), viz.oriented(state["image"]))
    overlay = np.asarray(axes[0].images[1].get_array())
    np.testing.assert_array_equal(overlay[..., 3] > 0, viz.oriented(state["pixel_highlight"]))
    plt.close(fig)


def test_explorer_grid_has_a_row_per_slice_with_its_ssim(explorer, tmp_path):
    fig = explorer_grid(explorer, [0, 3, 5], tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes().startswith(PNG)
    assert len(fig.axes) == 9
    ssim, _ = metrics.ssim_psnr(explorer.recon[[0, 3, 5]], explorer.images[[0, 3, 5]])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "s0" and titles[3] == "s3"
    assert titles[5] == f"reconstruction (SSIM {ssim[1]:.3f})"
    np.testing.assert_array_equal(fig.axes[4].images[0].get_array(),
                                  viz.oriented(explorer.index_map_rgba(explorer.indices[3])))
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
