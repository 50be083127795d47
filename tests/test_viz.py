import matplotlib.pyplot as plt
import numpy as np

from vqvae_lib import viz


def _figure():
    rng = np.random.default_rng(0)
    images = [rng.random((32, 16)).astype(np.float32) for _ in range(3)]
    return viz.montage(images, ["a", "b", "c"], None, ncols=2)


def test_saved_png_is_byte_stable_and_carries_no_software_stamp(tmp_path):
    fig = _figure()
    viz.save(fig, tmp_path / "a.png")
    viz.save(fig, tmp_path / "b.png")
    plt.close(fig)
    a, b = (tmp_path / "a.png").read_bytes(), (tmp_path / "b.png").read_bytes()
    assert a == b and a.startswith(b"\x89PNG")
    assert b"Software" not in a and b"matplotlib" not in a


def test_montage_with_one_row_and_empty_panels():
    fig = _figure()  # 3 images on a 2-column grid: one empty panel
    axes = fig.axes
    assert len(axes) == 4 and not axes[3].axison
    plt.close(fig)


def test_slices_are_shown_superior_up_anterior_left():
    stored = np.zeros((4, 3))
    stored[0, 2] = 1  # most anterior row, most superior column
    shown = viz.oriented(stored)
    assert shown.shape == (3, 4) and shown[0, 0] == 1


def test_patient_splits_grid_marks_a_scan_in_two_splits_red():
    fig = viz.patient_splits({"train": [(4, 0), (4, 1)], "test": [(4, 1), (5, 0)]}, None)
    grid = fig.axes[0].images[0].get_array()
    colours = fig.axes[0].images[0].get_cmap().colors
    plt.close(fig)
    assert colours[int(grid[0, 1])] == "#d00000"  # case 004 week 1 is in both splits
    assert colours[int(grid[0, 0])] == viz.SPLIT_COLOURS["train"]


def test_ablation_labels_every_bar_and_marks_the_highlighted_variant(tmp_path):
    fig = viz.ablation(["plain", "all three"], {"codes": [2, 325], "SSIM": [0.526, 0.592], "bits": [1982.4, 14638.0]},
                       tmp_path / "a.png", highlight="all three", formats={"bits": ",.0f"}, ncols=2)
    axes = [ax for ax in fig.axes if ax.patches]
    assert [ax.get_title() for ax in axes] == ["codes", "SSIM", "bits"] and (tmp_path / "a.png").is_file()
    assert [t.get_text() for t in axes[2].texts] == ["1,982", "14,638"]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["plain", "all three"]
    plain, best = axes[1].patches
    assert plain.get_facecolor() != best.get_facecolor() and best.get_width() == 0.592
    plt.close(fig)


def test_fsq_grid_draws_every_code(tmp_path):
    inputs = np.linspace(-3, 3, 50)
    fig = viz.fsq_grid([4, 3], np.stack([np.tanh(inputs) * 1.5, np.tanh(inputs)]), inputs, tmp_path / "f.png")
    grid = fig.axes[1]
    assert grid.get_title() == "4 x 3 = 12 codes" and len(grid.collections[0].get_offsets()) == 12
    plt.close(fig)


def test_likelihood_maps_share_one_colour_scale_and_outline_the_lesion(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.random((32, 16)).astype(np.float32) for _ in range(2)]
    bits = [np.full((4, 2), 1.0), np.full((4, 2), 3.0)]
    lesion = np.zeros((32, 16), dtype=bool)
    lesion[10:14, 6:10] = True
    fig = viz.likelihood_maps(images, bits, ["normal", "lesion"], tmp_path / "s.png", outlines=[None, lesion])
    heat = [ax.images[0] for ax in fig.axes[2:4]]
    assert all(h.get_clim() == heat[0].get_clim() for h in heat) and heat[0].get_clim()[1] >= 3.0
    assert heat[0].get_array().shape == (16, 32)  # upsampled to the slice, shown as slices are (oriented)
    assert [len(ax.collections) > 0 for ax in fig.axes[:4]] == [False, True, False, True]  # outlines on both rows
    assert [ax.get_xlabel() for ax in fig.axes[2:4]] == ["sum 8 bits", "sum 24 bits"]
    assert len(fig.axes) == 5 and fig.axes[4].get_ylabel() == "bits"  # the colour bar
    plt.close(fig)
