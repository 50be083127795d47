import itertools

import matplotlib.colors as mcolors
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.patches import FancyArrowPatch

from vqvae_lib import diagrams
from vqvae_lib.model import VQVAE, ModelConfig
from vqvae_lib.prior import PixelCNNPrior, PriorConfig


def _texts(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in fig.findobj(plt.Text)
            if t.get_visible() and t.get_text().strip()]


def _check_saved_and_unoverlapped(fig, path, labels):
    image = mpimg.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 600 and image[..., :3].std() > 0.05
    texts = _texts(fig)
    joined = "\n".join(t for t, _ in texts)
    for label in labels:
        assert label in joined, label
    for (a, box_a), (b, box_b) in itertools.combinations(texts, 2):
        assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"


def expected_field(shape, target, layers, reach):
    """What a gated PixelCNN's logits at target may see after `layers` layers of kernel 2 reach + 1: the rows
    1 + layers * reach above it, layers * reach columns either side, and layers * reach + 1 columns to its left
    in its own row (the first horizontal layer's kernel is reach + 1 wide and shifted off the target)."""
    i, j = target
    rows, cols = np.indices(shape)
    span = layers * reach
    above = (rows < i) & (rows >= i - 1 - span) & (abs(cols - j) <= span)
    left = (rows == i) & (cols < j) & (cols >= j - span - 1)
    return above | left


def test_dataflow_shapes_match_a_real_model_and_arrows_come_in_both_colours(tmp_path):
    config = ModelConfig(hidden=8, res_hidden=4, n_res=1, downsample=8, codebook_size=32, embed_dim=16,
                         ema=False, init="uniform", restart=False)
    model = VQVAE(config).eval()
    x = torch.rand(1, 1, 64, 32)
    out = model(x)
    z_e = model.encoder(x)
    fig = diagrams.vqvae_dataflow(tmp_path / "flow.png", config, image_shape=(64, 32))
    image, latent = " × ".join(map(str, x.shape[1:])), " × ".join(map(str, z_e.shape[1:]))
    indices = " × ".join(map(str, out.vq.indices.shape[1:]))
    assert (image, latent, indices) == ("1 × 64 × 32", "16 × 8 × 4", "8 × 4")
    assert tuple(out.recon.shape) == tuple(x.shape) and out.vq.quantized.shape == z_e.shape
    _check_saved_and_unoverlapped(fig, tmp_path / "flow.png", [
        "encoder", "decoder", "nearest code", "$z_e(x)$", "$z_q(x) = e_k$", "$\\hat{x}$", "$e_1$", "$e_K$",
        f"$x$\n{image}", f"$z_e(x)$\n{latent}", f"indices $k$: {indices}", "K = 32 vectors of D = 16",
        "straight-through copy", "\\nabla_{z_e} L = \\nabla_{z_q} L", "argmin: no gradient"])
    colours = [mcolors.to_hex(a.get_edgecolor()) for a in fig.findobj(FancyArrowPatch)]
    assert colours.count(diagrams.FORWARD) >= 8 and colours.count(diagrams.BACKWARD) == 3
    plt.close(fig)


def test_stop_gradients_block_the_encoder_in_one_loss_and_the_code_in_the_other(tmp_path):
    fig = diagrams.vq_stop_gradients(tmp_path / "sg.png")
    _check_saved_and_unoverlapped(fig, tmp_path / "sg.png", [
        "codebook loss", "commitment loss", "$\\|\\mathrm{sg}[z_e] - e\\|^2$",
        "$\\beta\\,\\|z_e - \\mathrm{sg}[e]\\|^2$",
        "only the code $e$ moves", "only the encoder moves", "moves the code", "trains the encoder", "sg"])
    texts = [t.get_text() for t in fig.findobj(plt.Text)]
    assert texts.count("sg") == 2 and texts.count("blocked") == 2
    # The codebook loss's open gradient ends on the codebook's side (right half of its panel), the
    # commitment loss's on the encoder's side (left half of its panel).
    ax = fig.axes[0]
    moved = {t.get_text(): t.get_position()[0] for t in ax.texts if t.get_text() in ("moves the code",
                                                                                    "trains the encoder")}
    assert 3.2 < moved["moves the code"] < 6.5 and 6.5 < moved["trains the encoder"] < 6.8 + 3.0
    colours = [mcolors.to_hex(a.get_edgecolor()) for a in fig.findobj(FancyArrowPatch)]
    assert colours.count(diagrams.BACKWARD) == 4  # two open paths, each loss -> input -> its maker
    plt.close(fig)


@pytest.mark.parametrize("kernel", [3, 5])
def test_receptive_fields_are_exactly_the_earlier_positions_within_reach(kernel):
    torch.manual_seed(0)
    shape, target, reach = (13, 15), (8, 7), kernel // 2
    for layers in (1, 2, 3):
        model = PixelCNNPrior(PriorConfig(codebook_size=5, channels=6, layers=layers, kernel=kernel,
                                          positions=0)).double()
        seen = diagrams.receptive_field(model, shape, target)
        expected = expected_field(shape, target, layers, reach)
        assert (seen == expected).all(), (kernel, layers)
        order = np.arange(seen.size).reshape(shape)
        assert not seen[order >= target[0] * shape[1] + target[1]].any()  # the target and everything later
        assert seen[target[0] - 1, target[1] + 1]  # the upper right neighbour: no blind spot
        assert diagrams.blind_spots(seen, target) == 0
    vertical, horizontal = diagrams.stack_masks(model.layers[0], shape, target)
    assert (vertical == expected_field(shape, target, 1, reach) & (np.indices(shape)[0] < target[0])).all()
    assert (horizontal == expected_field(shape, target, 1, reach) & (np.indices(shape)[0] == target[0])).all()


def test_blind_spots_counts_the_holes_of_a_masked_pixelcnn():
    seen = expected_field((9, 9), (5, 4), 2, 1)
    seen[4, 5:] = False  # the classic PixelCNN's blind spot: the upper right
    assert diagrams.blind_spots(seen, (5, 4)) == 2 and diagrams.blind_spots(expected_field((9, 9), (5, 4), 2, 1),
                                                                            (5, 4)) == 0


def test_pixelcnn_stacks_draws_the_measured_fields(tmp_path):
    shape, target, layers = (11, 11), (7, 5), (1, 2, 4)
    fig = diagrams.pixelcnn_stacks(tmp_path / "px.png", shape=shape, target=target, layers=layers)
    _check_saved_and_unoverlapped(fig, tmp_path / "px.png", [
        "vertical stack", "horizontal stack", "after 1 layer: 8 seen", "after 2 layers: 18 seen",
        "after 4 layers: 50 seen", "no blind spot", "later: never seen", "the predicted position"])
    drawn = [ax.images[0].get_array() for ax in fig.axes]
    expected = [expected_field(shape, target, 1, 1) & (np.indices(shape)[0] < target[0]),
                expected_field(shape, target, 1, 1) & (np.indices(shape)[0] == target[0])]
    expected += [expected_field(shape, target, n, 1) for n in layers]
    for cells, seen in zip(drawn, expected, strict=True):
        assert (np.asarray(cells) == diagrams.field_cells(seen, target)).all()
        assert cells[target] == diagrams.TARGET_CELL
        assert ((cells == diagrams.ABOVE_CELL) | (cells == diagrams.LEFT_CELL)).sum() == seen.sum()
    plt.close(fig)
