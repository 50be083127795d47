"""Diagrams for the notebooks: the VQ-VAE data flow, the stop-gradients of the VQ losses, and the gated
PixelCNN's stacks. Each function draws one figure and saves (and shows) it with `viz.save`.

The boxes and arrows are drawn in inch coordinates (an axes filling the figure, one data unit per inch), so
sizes and gaps mean the same in every diagram. One palette: forward values blue, gradients orange, blocked
gradients at a dark red stop-gradient mark. The PixelCNN's receptive fields are not drawn by hand: they are
the nonzero gradients of a small randomly initialised `PixelCNNPrior`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch, Polygon, RegularPolygon

from .data import WORK_SHAPE
from .model import ModelConfig
from .prior import GatedLayer, PixelCNNPrior, PriorConfig
from .viz import save

FORWARD = "#33658a"
BACKWARD = "#e76f51"
STOP = "#9b2226"
INK = "#1b263b"
TENSOR = "#edf2f4"  # fill of tensors (values)
NETWORK = "#d7e6f2"  # fill of learned networks
CODEBOOK = "#fbe8b0"  # fill of the codebook and its codes
VERTICAL = "#4d7ea8"
HORIZONTAL = "#2a9d8f"
UNSEEN = "#dee2e6"  # earlier positions out of reach
LATER = "#ffffff"

# Receptive-field categories, in the order of FIELD_COLOURS.
LATER_CELL, UNSEEN_CELL, ABOVE_CELL, LEFT_CELL, TARGET_CELL = range(5)
FIELD_COLOURS = (LATER, UNSEEN, VERTICAL, HORIZONTAL, BACKWARD)


def _canvas(width: float, height: float) -> tuple[plt.Figure, plt.Axes]:
    """A figure whose one axes spans it in inch units, without frame or ticks."""
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def _box(ax: plt.Axes, cx: float, cy: float, w: float, h: float, text: str, fill: str, size: float = 10.5
         ) -> tuple[float, float, float, float]:
    """A rounded box centred at (cx, cy) with centred text; returns its (left, right, bottom, top)."""
    ax.add_patch(FancyBboxPatch((cx - w / 2, cy - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.09",
                                facecolor=fill, edgecolor=INK, lw=1.1, zorder=2))
    ax.text(cx, cy, text, ha="center", va="center", fontsize=size, color=INK, zorder=3, linespacing=1.5)
    return cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2


def _trapezoid(ax: plt.Axes, cx: float, cy: float, w: float, h_left: float, h_right: float, text: str) -> None:
    """A network drawn as a trapezoid narrowing (encoder) or widening (decoder) from left to right."""
    x0, x1 = cx - w / 2, cx + w / 2
    ax.add_patch(Polygon([(x0, cy - h_left / 2), (x1, cy - h_right / 2), (x1, cy + h_right / 2),
                          (x0, cy + h_left / 2)], closed=True, facecolor=NETWORK, edgecolor=INK, lw=1.1, zorder=2))
    ax.text(cx, cy, text, ha="center", va="center", fontsize=10.5, color=INK, zorder=3)


def _arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float], colour: str, rad: float = 0.0,
           lw: float = 1.8) -> FancyArrowPatch:
    """An arrow from start to end, bent by rad (arc3: the control point is rad x the length off the chord)."""
    arrow = FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color=colour, lw=lw,
                            connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0, zorder=4)
    ax.add_patch(arrow)
    return arrow


def _legend(ax: plt.Axes, loc: str, anchor: tuple[float, float], blocked: bool = False) -> None:
    handles = [Line2D([], [], color=FORWARD, lw=2, label="forward pass (values)"),
               Line2D([], [], color=BACKWARD, lw=2, label="backward pass (gradients)")]
    if blocked:
        handles.append(Line2D([], [], color=STOP, marker="8", markersize=11, lw=0,
                              label=r"stop-gradient $\mathrm{sg}[\cdot]$: value passes, gradient does not"))
    ax.legend(handles=handles, loc=loc, bbox_to_anchor=anchor, bbox_transform=ax.transData, frameon=False,
              fontsize=10, ncol=len(handles), handlelength=2.4, columnspacing=2.0)


def vqvae_dataflow(path: str | Path | None, config: ModelConfig | None = None,
                   image_shape: tuple[int, int] = WORK_SHAPE) -> plt.Figure:
    """The VQ-VAE's forward pass x -> encoder -> z_e -> nearest code -> z_q -> decoder -> x̂ and its backward
    pass, with the straight-through copy of the decoder's gradient from z_q to z_e. Shapes (without the batch
    axis) are those of `config` (default: ModelConfig()) on (H, W) = image_shape images."""
    config = config or ModelConfig()
    height, width = image_shape
    d = config.downsample
    image = f"{config.in_channels} × {height} × {width}"
    latent = f"{config.embed_dim} × {height // d} × {width // d}"
    fig, ax = _canvas(13.7, 4.0)
    y = 1.95
    x_box = _box(ax, 0.8, y, 1.3, 0.9, f"$x$\n{image}", TENSOR)
    _trapezoid(ax, 2.45, y, 1.3, 1.4, 0.75, "encoder")
    ze_box = _box(ax, 4.1, y, 1.25, 0.9, f"$z_e(x)$\n{latent}", TENSOR)
    near = _box(ax, 6.25, y, 2.25, 1.15, "nearest code\n" + r"$k = \mathrm{argmin}_j\,\|z_e - e_j\|$"
                + f"\nindices $k$: {height // d} × {width // d}", CODEBOOK, size=10)
    zq_box = _box(ax, 8.4, y, 1.25, 0.9, f"$z_q(x) = e_k$\n{latent}", TENSOR)
    _trapezoid(ax, 10.05, y, 1.3, 0.75, 1.4, "decoder")
    xh_box = _box(ax, 11.75, y, 1.3, 0.9, f"$\\hat{{x}}$\n{image}", TENSOR)
    loss = _box(ax, 13.1, y, 0.95, 0.9, "loss\n" + r"$\|x - \hat{x}\|^2$", TENSOR, size=10)

    # The codebook: a strip of code vectors above the nearest-code step.
    cells, cell, top = 8, 0.22, y + 1.55
    left = 6.25 - cells * cell / 2
    for i in range(cells):
        ax.add_patch(plt.Rectangle((left + i * cell, top - cell), cell, cell, facecolor=CODEBOOK, edgecolor=INK,
                                   lw=0.9, zorder=2))
    ax.text(left - 0.1, top - cell / 2, "$e_1$", ha="right", va="center", fontsize=10, color=INK)
    ax.text(left + cells * cell + 0.1, top - cell / 2, "$e_K$", ha="left", va="center", fontsize=10, color=INK)
    ax.text(6.25, top + 0.12, f"codebook: K = {config.codebook_size} vectors of D = {config.embed_dim}",
            ha="center", va="bottom", fontsize=10, color=INK)

    gap = 0.06
    for a, b in ((x_box[1], 1.8), (3.1, ze_box[0]), (ze_box[1], near[0]), (near[1], zq_box[0]), (zq_box[1], 9.4),
                 (10.7, xh_box[0]), (xh_box[1], loss[0])):
        _arrow(ax, (a + gap, y), (b - gap, y), FORWARD)
    _arrow(ax, (6.25, top - cell - gap), (6.25, near[3] + gap), FORWARD)
    ax.text(6.35, (top - cell + near[3]) / 2, "compare with every $e_j$", ha="left", va="center", fontsize=9,
            color=FORWARD)

    # Backward: from the loss back through the decoder, copied over the nearest-code step, into the encoder.
    below = x_box[2] - gap
    _arrow(ax, (13.1, below), (8.4, below), BACKWARD, rad=-0.3)
    ax.text(10.75, below - 0.8, r"through the decoder: $\nabla_{z_q} L$", ha="center", va="top", fontsize=11,
            color=BACKWARD)
    _arrow(ax, (8.4, below), (4.1, below), BACKWARD, rad=-0.32)
    ax.text(6.25, below - 0.8, "straight-through copy\n" + r"$\nabla_{z_e} L = \nabla_{z_q} L$", ha="center",
            va="top", fontsize=11, color=BACKWARD, fontweight="bold", linespacing=1.4)
    ax.text(6.25, near[2] - 0.1, "argmin: no gradient", ha="center", va="top", fontsize=9, color=STOP)
    _arrow(ax, (4.1, below), (2.45, y - 0.5), BACKWARD, rad=-0.4)
    ax.text(3.25, below - 0.5, "into the encoder", ha="center", va="top", fontsize=10, color=BACKWARD)
    _legend(ax, "upper left", (0.05, 3.95))
    return save(fig, path)


def _stop_mark(ax: plt.Axes, centre: tuple[float, float]) -> None:
    ax.add_patch(RegularPolygon(centre, 8, radius=0.24, orientation=np.pi / 8, facecolor=STOP, edgecolor="white",
                                lw=1.2, zorder=6))
    ax.text(*centre, "sg", ha="center", va="center", fontsize=9, color="white", fontweight="bold", zorder=7)


def _offset(a: tuple[float, float], b: tuple[float, float], by: float) -> tuple[np.ndarray, np.ndarray]:
    """The segment a-b moved sideways by `by` (to the left of the direction a -> b)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    t = (b - a) / np.linalg.norm(b - a)
    n = np.array([-t[1], t[0]]) * by
    return a + n, b + n


def _loss_panel(ax: plt.Axes, ox: float, oy: float, title: str, loss: str, stops_encoder: bool) -> None:
    """One VQ loss at offset (ox, oy): encoder -> z_e and codebook -> e feed the loss; the stop-gradient sits on
    one input, so the loss's gradient reaches only the other one and what made it."""
    ax.text(ox + 3.0, oy + 4.2, title, ha="center", va="center", fontsize=11.5, color=INK, fontweight="bold")
    moved = "only the code $e$ moves" if stops_encoder else "only the encoder moves"
    ax.text(ox + 3.0, oy + 3.85, moved, ha="center", va="center", fontsize=10.5, color=INK)
    nodes = {"z": (_box(ax, ox + 1.0, oy + 3.0, 1.5, 0.55, "encoder", NETWORK),
                   _box(ax, ox + 1.0, oy + 2.0, 1.0, 0.55, "$z_e$", TENSOR)),
             "e": (_box(ax, ox + 5.0, oy + 3.0, 1.5, 0.55, "codebook", CODEBOOK),
                   _box(ax, ox + 5.0, oy + 2.0, 1.0, 0.55, "$e = e_k$", CODEBOOK))}
    lo = _box(ax, ox + 3.0, oy + 0.3, 2.5, 0.6, loss, TENSOR)
    inward = {"z": 1, "e": -1}  # towards the middle of the panel
    gap = 0.06
    for name, (src, dst) in nodes.items():
        cx = (src[0] + src[1]) / 2 - 0.15 * inward[name]
        _arrow(ax, (cx, src[2] - gap), (cx, dst[3] + gap), FORWARD)
    inputs = {"z": ((nodes["z"][1][1] - 0.2, nodes["z"][1][2] - gap), (lo[0] + 0.55, lo[3] + gap)),
              "e": ((nodes["e"][1][0] + 0.2, nodes["e"][1][2] - gap), (lo[1] - 0.55, lo[3] + gap))}
    for a, b in inputs.values():
        _arrow(ax, a, b, FORWARD)
    blocked, open_ = ("z", "e") if stops_encoder else ("e", "z")
    # Blocked: the gradient from the loss runs up beside the input's edge and ends in a bar before the mark.
    a, b = (np.asarray(p) for p in inputs[blocked])
    mark = b + 0.62 * (a - b)
    along = (a - b) / np.linalg.norm(a - b)
    start, _ = _offset(b, a, 0.17 * inward[blocked])
    end = start + along * (np.linalg.norm(mark - b) - 0.32)
    ax.plot(*zip(start, end), color=BACKWARD, lw=2.0, zorder=4, solid_capstyle="butt")
    bar = np.array([-along[1], along[0]]) * 0.13
    ax.plot(*zip(end - bar, end + bar), color=BACKWARD, lw=2.6, zorder=4, solid_capstyle="butt")
    _stop_mark(ax, tuple(mark))
    ax.text(mark[0] - inward[blocked] * 0.4, mark[1], "blocked", ha="right" if inward[blocked] > 0 else "left",
            va="center", fontsize=10, color=STOP, fontweight="bold")
    # Open: the gradient reaches the input and, through it, the network or codebook that made it.
    a, b = inputs[open_]
    s, t = _offset(b, a, 0.17 * inward[open_])
    _arrow(ax, tuple(s), tuple(t), BACKWARD, lw=2.0)
    src, node = nodes[open_]
    cx = (node[0] + node[1]) / 2 + 0.15 * inward[open_]
    _arrow(ax, (cx, node[3] + gap), (cx, src[2] - gap), BACKWARD, lw=2.0)
    what = "trains the encoder" if open_ == "z" else "moves the code"
    ax.text(cx + 0.15 * inward[open_], (node[3] + src[2]) / 2, what, ha="left" if inward[open_] > 0 else "right",
            va="center", fontsize=10, color=BACKWARD)


def vq_stop_gradients(path: str | Path | None) -> plt.Figure:
    """Where the stop-gradients sit in the two VQ losses: the codebook loss ||sg[z_e] - e||² sends gradient only
    to the code, the commitment loss beta ||z_e - sg[e]||² only to the encoder."""
    fig, ax = _canvas(13.0, 4.85)
    _loss_panel(ax, 0.2, 0.5, "codebook loss", r"$\|\mathrm{sg}[z_e] - e\|^2$", stops_encoder=True)
    _loss_panel(ax, 6.8, 0.5, "commitment loss", r"$\beta\,\|z_e - \mathrm{sg}[e]\|^2$", stops_encoder=False)
    ax.plot([6.5, 6.5], [0.6, 4.75], color=UNSEEN, lw=1.2)
    _legend(ax, "lower center", (6.5, 0.0), blocked=True)
    return save(fig, path)


def _seen(output: torch.Tensor, inputs: torch.Tensor, at: tuple[int, int]) -> np.ndarray:
    """(h, w) bool: where inputs (1, C, h, w) has a nonzero gradient of output (1, C', h, w) summed at `at`."""
    (grad,) = torch.autograd.grad(output[0, :, at[0], at[1]].sum(), inputs)
    return (grad[0].abs().sum(0) > 0).numpy()


def stack_masks(layer: GatedLayer, shape: tuple[int, int], target: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """What one gated layer sees of its inputs (h, w) grid `shape`, measured by gradients at `target`: the
    vertical stack's part (the feed the horizontal stack receives at target, from the vertical input) and the
    horizontal stack's part (its output at target, from the horizontal input). Both (h, w) bool."""
    weight = layer.h_conv.weight
    channels = weight.shape[1]
    v = torch.randn(1, channels, *shape, dtype=weight.dtype, requires_grad=True)
    h = torch.randn(1, channels, *shape, dtype=weight.dtype, requires_grad=True)
    _, feed = layer.vertical(v, None)
    vertical = _seen(feed, v, target)
    horizontal = _seen(layer.horizontal(h, torch.zeros_like(feed), None), h, target)
    return vertical, horizontal


def receptive_field(model: PixelCNNPrior, shape: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """(h, w) bool: the positions whose code embedding has a nonzero gradient on the logits at `target`, for an
    unconditional `model` on a random map of `shape`."""
    embedded = []

    def keep(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        embedded.append(out)

    hook = model.embed.register_forward_hook(keep)
    try:
        logits = model(torch.randint(0, model.config.codebook_size, (1, *shape)))
    finally:
        hook.remove()
    (grad,) = torch.autograd.grad(logits[0, :, target[0], target[1]].sum(), embedded[0])
    return (grad[0].abs().sum(-1) > 0).numpy()


def field_cells(seen: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """(h, w) int categories of a receptive field seen (h, w) bool: LATER_CELL, UNSEEN_CELL, ABOVE_CELL (seen,
    in a row above), LEFT_CELL (seen, in the target's row) and TARGET_CELL."""
    rows, cols = np.indices(seen.shape)
    later = rows * seen.shape[1] + cols > target[0] * seen.shape[1] + target[1]
    cells = np.where(later, LATER_CELL, UNSEEN_CELL)
    cells[seen & (rows < target[0])] = ABOVE_CELL
    cells[seen & (rows == target[0])] = LEFT_CELL
    cells[target] = TARGET_CELL
    return cells


def blind_spots(seen: np.ndarray, target: tuple[int, int]) -> int:
    """How many earlier positions inside the span of a receptive field seen (h, w) bool are not in it: those in
    the rectangle of rows above that the seen rows and columns span, and those between the leftmost seen position
    of the target's row and the target."""
    rows, cols = np.nonzero(seen[:target[0]])
    holes = 0
    if len(rows):
        holes += int((~seen[rows.min():rows.max() + 1, cols.min():cols.max() + 1]).sum())
    left = np.nonzero(seen[target[0], :target[1]])[0]
    if len(left):
        holes += int((~seen[target[0], left.min():target[1]]).sum())
    return holes


def pixelcnn_stacks(path: str | Path | None, *, shape: tuple[int, int] = (11, 11), target: tuple[int, int] = (7, 5),
                    kernel: int = 3, layers: tuple[int, ...] = (1, 2, 4), channels: int = 16,
                    seed: int = 0) -> plt.Figure:
    """The gated PixelCNN's two stacks on a grid `shape`, measured by gradients of randomly initialised
    `PixelCNNPrior`s (float64, unconditional, `kernel`, `channels`): the vertical stack's mask (rows above) and
    the horizontal stack's (left in the row), both of the first layer, then the receptive field of `target` after
    each number of `layers`. The panels are drawn as `field_cells` images."""
    settings = dict(codebook_size=8, channels=channels, kernel=kernel, positions=0)
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        models = {n: PixelCNNPrior(PriorConfig(layers=n, **settings)).double() for n in layers}
        vertical, horizontal = stack_masks(models[min(layers)].layers[0], shape, target)
        fields = {n: receptive_field(models[n], shape, target) for n in layers}
    panels = [(vertical, "vertical stack, one layer:\nthe rows above"),
              (horizontal, "horizontal stack, one layer:\nthe left of the row")]
    for n, seen in fields.items():
        holes = blind_spots(seen, target)
        panels.append((seen, f"after {n} layer{'s' if n > 1 else ''}: {seen.sum()} seen,\n"
                             + ("no blind spot" if not holes else f"{holes} blind spots")))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.5 * len(panels), 3.3))
    cmap = ListedColormap(FIELD_COLOURS)
    for ax, (seen, title) in zip(axes, panels):
        ax.imshow(field_cells(seen, target), cmap=cmap, vmin=-0.5, vmax=len(FIELD_COLOURS) - 0.5)
        ax.set_xticks(np.arange(shape[1] + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(shape[0] + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="#adb5bd", lw=0.6)
        ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
        for spine in ax.spines.values():
            spine.set_visible(True)
            spine.set_color("#adb5bd")
        ax.set_title(title, fontsize=10.5, color=INK, linespacing=1.4)
    names = ("later: never seen", "earlier, out of reach", "seen: a row above", "seen: left in the row",
             "the predicted position")
    fig.legend(handles=[Patch(facecolor=c, edgecolor="#adb5bd", label=n) for c, n in zip(FIELD_COLOURS, names)],
               loc="lower center", ncol=len(names), frameon=False, fontsize=10, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.07, 1, 1), w_pad=1.5)
    return save(fig, path)
