import re

import matplotlib.pyplot as plt
import numpy as np
import pytest

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


def _legend_boxes(fig: plt.Figure) -> list:
    """Window extents (Agg, after a draw) of every axes and figure legend of `fig`."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    assert legends, "the figure has no legend"
    return [legend.get_window_extent(renderer) for legend in legends]


def _covered(fig: plt.Figure, whole_axes: bool = False) -> list[str]:
    """The data artists (bars, lines, markers, images, value labels) that a legend of `fig` overlaps; with
    whole_axes, the axes a legend overlaps anywhere."""
    boxes = _legend_boxes(fig)
    renderer = fig.canvas.get_renderer()
    hits = []
    for ax in fig.axes:
        artists = [ax] if whole_axes else [*ax.patches, *ax.lines, *ax.collections, *ax.images, *ax.texts]
        for artist in artists:
            extent = artist.get_window_extent(renderer)
            if not np.all(np.isfinite(extent.extents)) or (extent.width == 0 and extent.height == 0):
                continue  # an empty scatter
            hits += [f"{ax.get_title()!r}: {artist}" for box in boxes if box.overlaps(extent)]
    return hits


def test_distributions_compare_groups_of_different_sizes_with_readable_means_and_labelled_axes():
    rng = np.random.default_rng(0)
    groups = {"real (training)": rng.normal(0.0050, 0.0004, 1440), "VQ-VAE samples": rng.normal(0.0017, 0.0001, 12),
              "VAE samples": rng.normal(0.0021, 0.0001, 12)}
    fig = viz.distributions({"high-frequency share": groups}, None, baselines={"high-frequency share": {"x": 0.004}})
    ax = fig.axes[0]
    for bars in ax.containers:  # one per group: densities, so each integrates to 1 whatever its size
        assert sum(b.get_height() * b.get_width() for b in bars) == pytest.approx(1.0)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    means = [float(re.search(r"mean ([0-9.]+)\)", t).group(1)) for t in texts[:3]]
    assert means == pytest.approx([float(np.mean(v)) for v in groups.values()], rel=0.01)  # not "0.01", "0.00"
    assert texts[0] == "real (training) (n = 1,440, mean 0.00500)" and texts[3] == "x (0.00400)"
    assert ax.get_xlabel() == "high-frequency share" and ax.get_ylabel() == "density"
    assert _covered(fig) == []
    plt.close(fig)


def test_toy_codebooks_count_coinciding_dead_codes_and_keep_the_legend_off_the_panels():
    rng = np.random.default_rng(0)
    points = rng.normal(0, 1, (200, 2)) + 3
    dead_at_origin = np.vstack([rng.normal(0, 1e-3, (30, 2)), [[3.0, 3.0], [4.0, 2.0]]])
    used = np.arange(32) >= 30
    spread = np.vstack([np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(30, 2), [[3.5, 3.5], [4.5, 2.5]]])
    fig = viz.toy_codebooks(points, {"plain": {0: (dead_at_origin, used)}, "spread": {0: (spread, used)}}, None)
    collapsed, apart = fig.axes
    assert [t.get_text() for t in collapsed.texts] == ["30 dead codes here"]
    assert len(collapsed.collections[2].get_offsets()) == 30  # every dead code is still drawn
    assert len(apart.texts) == 0  # codes apart are each their own marker: nothing to count
    assert _covered(fig, whole_axes=True) == []
    plt.close(fig)


def test_per_group_bars_start_at_zero_under_a_legend_that_covers_none_of_them():
    fig = viz.per_group(["case 040\nweek 5", "case 040\nweek 7"], {"default": [0.937, 0.938], "8x": [0.78, 0.782],
                                                                   "seed, 8x": [0.609, 0.614]}, None, ylabel="SSIM")
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 0.938
    assert len(ax.texts) == 6 and _covered(fig) == []  # bars and their value labels are clear of the legend
    plt.close(fig)


def test_curves_take_per_panel_y_limits_and_mark_an_epoch_in_every_panel():
    epochs = list(range(1, 16))
    panels = {"loss": {"training": (epochs, [1 / e for e in epochs]),
                       "validation": (epochs, [1.1 / e for e in epochs])},
              "channels used": {"VAE": (epochs, [57 + e % 8 for e in epochs])}}
    fig = viz.curves(panels, None, ylim={"channels used": (0, None)}, mark={"best epoch (validation SSIM)": 12})
    loss, channels = fig.axes
    assert channels.get_ylim()[0] == 0 and channels.get_ylim()[1] >= 64 and loss.get_ylim()[0] > 0
    for ax in (loss, channels):
        assert [list(line.get_xdata()) for line in ax.lines if line.get_linestyle() == "--"] == [[12, 12]]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["best epoch (validation SSIM): 12"]
    fig.canvas.draw()
    below = fig.legends[0].get_window_extent(fig.canvas.get_renderer())
    assert not any(below.overlaps(ax.get_window_extent()) for ax in fig.axes)  # under the panels, not on them
    plt.close(fig)
    with pytest.raises(ValueError, match="channels"):
        viz.curves(panels, None, ylim={"channels": (0, None)})


def test_code_usage_panels_share_one_y_axis():
    fig = viz.code_usage({"healthy": np.arange(512, 0, -1), "collapsed": np.r_[np.full(11, 1000), np.zeros(501)]}, None)
    healthy, collapsed = fig.axes
    assert healthy.get_shared_y_axes().joined(healthy, collapsed)
    assert healthy.get_ylim() == collapsed.get_ylim() and healthy.get_ylim()[0] < 1 / 512 * 0.5
    assert healthy.get_ylabel() == "share of cells"
    plt.close(fig)


def test_image_rows_put_each_caption_over_its_own_image():
    rng = np.random.default_rng(0)
    images = [rng.random((32, 16)) for _ in range(2)]
    rows = {"sampled": images, "real (test)": images}
    captions = {"sampled": ["drawn for bin 6", "drawn for bin 5"], "real (test)": ["case_040 slice_3 (bin 0)", "c"]}
    fig = viz.image_rows(rows, ["col 1", "col 2"], None, captions=captions)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
    texts = ["col 1\ndrawn for bin 6", "col 2\ndrawn for bin 5", "case_040 slice_3 (bin 0)", "c"]
    for k, (ax, text) in enumerate(zip(fig.axes, texts)):
        assert ax.get_title() == text
        caption = ax.title.get_window_extent(renderer)
        assert boxes[k].y1 <= caption.y0 and not any(caption.overlaps(b) for b in boxes)  # above its image
        gaps = [caption.y0 - b.y1 if b.x0 < caption.x1 and caption.x0 < b.x1 else np.inf for b in boxes]
        assert int(np.argmin([g if g >= 0 else np.inf for g in gaps])) == k  # its own image is the nearest below
    plt.close(fig)
