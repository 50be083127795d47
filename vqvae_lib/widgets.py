"""Interactive panels for notebooks 01-04, and `show`, which puts any panel into a notebook.

Each panel follows `explorer.CodebookExplorer`: `view(...)` returns the data of one state (arrays and numbers),
`draw(fig, state)` draws it on a `matplotlib.figure.Figure`, `render_png(state)` renders that off-screen (Agg
canvas, no pyplot), `widget()` wires ipywidgets controls to them, and `static_png()` is the default state's
picture, which `show` displays in headless runs.

- `ScanBrowser` (01): the slices of one scan, with the label map over them;
- `ReceptiveFieldPanel` (02): the pixels one latent cell depends on, measured by gradients;
- `ToyQuantizerPanel` (03): notebook 03's 2D toy, retrained for each choice of fixes, beta and K;
- `CurvesPanel` (04): the training curves of the committed runs in checkpoints/MANIFEST.json.

Slices are drawn with `viz.oriented`: stored rows (A-P) run left to right on screen, stored columns bottom to top.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import matplotlib.colors
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from . import viz
from .data import LABELS
from .explorer import CodebookExplorer, SamplerPanel, _png, _vmax
from .model import VQVAE, ModelConfig
from .quantizer import VectorQuantizer, nearest_code

if TYPE_CHECKING:
    import ipywidgets

    from .data import SplitData

LABEL_ALPHA = 0.45  # label overlay opacity, as in the overlay row of `viz.slices_and_labels`
FIELD_COLOUR = "#ff006e"  # receptive field overlay, as in `viz.receptive_fields`
CELL_COLOUR = "#3a86ff"  # the chosen latent cell's own pixel block
SLICE_SIZE = (4.6, 2.7)  # inches of a one-slice picture: a 256 x 128 slice shown landscape
TOY_STEPS = 150  # training steps of the toy panel: enough for restarts (about 45 unused steps) to act, ~0.3 s
TOY_GRID = 160  # points per side of the grid on which the toy's Voronoi cells are drawn
CURVE_COLOURS = ("#264653", "#e76f51", "#2a9d8f", "#e9c46a", "#8338ec", "#ff006e", "#3a86ff", "#8d99ae",
                 "#6a994e", "#bc4749")


class Panel(Protocol):
    """What `show` needs of a panel."""

    def widget(self) -> ipywidgets.VBox: ...

    def static_png(self) -> bytes: ...


def show(panel: Panel, interactive: bool) -> None:
    """Display a panel in a notebook: its live widget if `interactive`, else its default picture as an image and a
    Markdown note on how to run it live."""
    from IPython.display import Image, Markdown, display

    if interactive:
        display(panel.widget())
        return
    note = ("*This is a live widget, shown here as a still picture of its first state.* To use it, run `make lab`, "
            "open this notebook, set `INTERACTIVE = True` in the parameter cell and run the notebook.")
    if isinstance(panel, (CodebookExplorer, SamplerPanel)):
        note += " `make explorer` serves the codebook explorer and the sampler as a web page."
    display(Image(data=panel.static_png(), format="png"))
    display(Markdown(note))


def _slice_axes(fig: Figure, image: np.ndarray, vmax: float):
    """One axes filling `fig` with the (H, W) slice drawn oriented in grey."""
    ax = fig.subplots()
    ax.imshow(viz.oriented(image), cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
    viz.bare(ax)
    return ax


# ------------------------------------------------------------------------------------------------- notebook 01


class _Drawn:
    """`render_png` and `static_png` of a panel with `view()` and `draw(fig, state)`, drawn FIGSIZE inches."""

    FIGSIZE: tuple[float, float] = SLICE_SIZE

    def render_png(self, state: dict) -> bytes:
        """PNG bytes of one state, drawn off-screen."""
        return _png(self.draw(Figure(figsize=self.FIGSIZE), state))

    def static_png(self) -> bytes:
        """The default state's picture: `view()` with its defaults."""
        return self.render_png(self.view())


class ScanBrowser(_Drawn):
    """Every scan of a split, slice by slice, with its labels over the slice.

    split: a `data.SplitData`; with masks=None the label overlay is never shown. After construction: `scans`, the
    (case, week) pairs in order, and `rows`, per scan the (n,) int64 rows of the split ordered by slice index.
    """

    def __init__(self, split: SplitData):
        if len(split) == 0:
            raise ValueError(f"the {split.split} split has no slices")
        self.split = split
        cases, weeks, slices = split.cases, split.weeks, split.indices
        self.scans = sorted(set(zip(cases.tolist(), weeks.tolist())))
        rows = [np.flatnonzero((cases == c) & (weeks == w)) for c, w in self.scans]
        self.rows = [r[np.argsort(slices[r], kind="stable")] for r in rows]
        self.colours = matplotlib.colors.to_rgba_array(viz.LABEL_COLOURS)  # (6, 4): label -> RGBA
        self.colours[:, 3] = LABEL_ALPHA
        self.colours[0, 3] = 0.0  # background stays clear

    def __len__(self) -> int:
        return len(self.scans)

    def view(self, scan: int = 0, position: int | None = None, labels: bool = True) -> dict:
        """Slice `position` (default: the middle one) of scan `scan` (an index into `scans`), labels on or off.

        Keys: scan, case, week, position, n_slices, row (into the split), slice (its index in the scan), name;
        image (H, W) float32; mask (H, W) uint8 or None; labels (whether the overlay is shown); overlay (H, W, 4)
        RGBA, the label colours of `viz.slices_and_labels` (all clear when labels is False); present (the names of
        the labels other than background on the slice); vmax (grey value shown as white).
        """
        if not 0 <= scan < len(self):
            raise IndexError(f"scan {scan} outside [0, {len(self)})")
        rows = self.rows[scan]
        position = len(rows) // 2 if position is None else int(position)
        if not 0 <= position < len(rows):
            raise IndexError(f"position {position} outside the scan's {len(rows)} slices")
        row = int(rows[position])
        image = np.asarray(self.split.images[row], dtype=np.float32)
        mask = None if self.split.masks is None else np.asarray(self.split.masks[row])
        shown = labels and mask is not None
        overlay = self.colours[mask] if shown else np.zeros((*image.shape, 4))
        present = [] if mask is None else [LABELS[k] for k in np.unique(mask) if k > 0]
        case, week = self.scans[scan]
        return {"scan": scan, "case": case, "week": week, "position": position, "n_slices": len(rows), "row": row,
                "slice": int(self.split.files[row].index), "name": self.split.files[row].name, "image": image,
                "mask": mask, "labels": shown, "overlay": overlay, "present": present, "vmax": _vmax(image)}

    def draw(self, fig: Figure, state: dict) -> Figure:
        """The slice, its label overlay when shown, and a legend of the labels on it."""
        ax = _slice_axes(fig, state["image"], state["vmax"])
        if state["labels"]:
            ax.imshow(viz.oriented(state["overlay"]), interpolation="nearest")
            handles = [Patch(color=viz.LABEL_COLOURS[LABELS.index(n)], label=n) for n in state["present"]]
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=max(len(handles), 1),
                      frameon=False, fontsize=8, handlelength=1.0, columnspacing=0.8)
        ax.set_title(f"case {state['case']:03d}, week {state['week']}: slice {state['slice']} "
                     f"({state['position'] + 1} of {state['n_slices']})", fontsize=9)
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.12, top=0.9)
        return fig

    def widget(self) -> ipywidgets.VBox:
        """A scan dropdown, a slice slider through the scan, a labels checkbox and the picture (ipywidgets.VBox).

        Sets self.scan (Dropdown of scan indices), self.slider (position in the scan), self.labels (Checkbox,
        disabled without masks), self.image (ipywidgets.Image) and self.state (the current `view`). A new scan
        keeps the slider's position where that scan has it, else moves it to the scan's last slice.
        """
        import ipywidgets as w

        self.state = self.view()
        self.scan = w.Dropdown(options=[(f"case {c:03d}, week {wk}", i) for i, (c, wk) in enumerate(self.scans)],
                               value=0, description="scan")
        self.slider = w.IntSlider(value=self.state["position"], min=0, max=self.state["n_slices"] - 1,
                                  description="slice", continuous_update=False)
        self.labels = w.Checkbox(value=self.state["labels"], description="labels",
                                 disabled=self.split.masks is None)
        self.image = w.Image(value=self.render_png(self.state), format="png")
        syncing = False

        def render(_=None) -> None:
            if not syncing:
                self.state = self.view(self.scan.value, self.slider.value, self.labels.value)
                self.image.value = self.render_png(self.state)

        def on_scan(change) -> None:
            nonlocal syncing
            syncing = True  # a shorter scan clamps the slider, which would render once more
            try:
                self.slider.max = len(self.rows[change["new"]]) - 1
            finally:
                syncing = False
            render()

        self.scan.observe(on_scan, names="value")
        self.slider.observe(render, names="value")
        self.labels.observe(render, names="value")
        return w.VBox([w.HBox([self.scan, self.slider, self.labels]), self.image])


# ------------------------------------------------------------------------------------------------- notebook 02


def gradient_field(encoder: torch.nn.Module, image: torch.Tensor, row: int, col: int) -> np.ndarray:
    """|gradient| of latent cell (row, col) (its channels summed) with respect to the input, as notebook 02
    measures receptive fields: image (1, 1, H, W) -> (H, W) float32, non-zero exactly on the pixels the cell
    depends on."""
    x = image.detach().clone().requires_grad_(True)
    z = encoder(x)
    z[0, :, row, col].sum().backward()
    return x.grad[0, 0].abs().numpy()


class ReceptiveFieldPanel(_Drawn):
    """The receptive field of any latent cell at several downsampling factors, measured from untrained encoders.

    image: (H, W) float slice, kept as `slice`. config: the model whose encoder is measured; one encoder per factor in `factors`
    is built from it with that `downsample` (weights drawn from `seed`, the global RNG untouched). The field does
    not depend on the weights: a cell's gradient is non-zero on every pixel its convolutions reach.
    """

    def __init__(self, image: np.ndarray, config: ModelConfig, factors: Sequence[int] = (4, 8, 16), seed: int = 0):
        image = np.array(image, dtype=np.float32)  # a copy: the split's memmap is read-only
        if image.ndim != 2:
            raise ValueError(f"image must be (H, W), got shape {image.shape}")
        if not factors:
            raise ValueError("ReceptiveFieldPanel needs at least one downsampling factor")
        self.slice = image
        self.factors = tuple(int(f) for f in factors)
        self.encoders: dict[int, torch.nn.Module] = {}
        self.grids: dict[int, tuple[int, int]] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for factor in self.factors:
                model = VQVAE(ModelConfig(**{**config.to_dict(), "downsample": factor})).eval()
                self.grids[factor] = model.latent_shape(image.shape)
                self.encoders[factor] = model.encoder
        self._input = torch.from_numpy(image)[None, None]

    def view(self, row: int | None = None, col: int | None = None, factor: int | None = None) -> dict:
        """Latent cell (row, col) (default: the central one) of the `factor`x grid (default: the first factor).

        Keys: factor, row, col, grid (h, w); gradient (H, W) float32 (`gradient_field`); field (H, W) bool
        (gradient > 0); cell (H, W) bool, the cell's own factor x factor pixel block; rows, cols: the first and
        last pixel row and column of the field; size (height, width) of its bounding box in pixels.
        """
        factor = self.factors[0] if factor is None else int(factor)
        if factor not in self.grids:
            raise ValueError(f"factor {factor} is not one of {self.factors}")
        h, w = self.grids[factor]
        row = h // 2 if row is None else int(row)
        col = w // 2 if col is None else int(col)
        if not (0 <= row < h and 0 <= col < w):
            raise IndexError(f"cell ({row}, {col}) outside the {h} x {w} grid of {factor}x")
        gradient = gradient_field(self.encoders[factor], self._input, row, col)
        field = gradient > 0
        cell = np.zeros(field.shape, dtype=bool)
        cell[row * factor:(row + 1) * factor, col * factor:(col + 1) * factor] = True
        rows, cols = np.flatnonzero(field.any(1)), np.flatnonzero(field.any(0))
        return {"factor": factor, "row": row, "col": col, "grid": (h, w), "gradient": gradient, "field": field,
                "cell": cell, "rows": (int(rows[0]), int(rows[-1])), "cols": (int(cols[0]), int(cols[-1])),
                "size": (int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1))}

    def draw(self, fig: Figure, state: dict) -> Figure:
        """The slice with the field (FIELD_COLOUR) and the cell's own block (CELL_COLOUR) over it."""
        ax = _slice_axes(fig, self.slice, _vmax(self.slice))
        overlay = np.zeros((*state["field"].shape, 4))
        overlay[state["field"]] = matplotlib.colors.to_rgba(FIELD_COLOUR, 0.45)
        overlay[state["cell"]] = matplotlib.colors.to_rgba(CELL_COLOUR, 0.9)
        ax.imshow(viz.oriented(overlay), interpolation="nearest")
        height, width = state["size"]
        ax.set_title(f"{state['factor']}x: cell ({state['row']}, {state['col']}) of {state['grid'][0]} x "
                     f"{state['grid'][1]} sees {height} x {width} px", fontsize=9)
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.9)
        return fig

    def widget(self) -> ipywidgets.VBox:
        """A factor chooser, row and column sliders over the latent grid and the picture (ipywidgets.VBox).

        Sets self.factor (ToggleButtons), self.row, self.col (IntSliders, latent coordinates of the stored array:
        on screen rows run left to right and columns bottom to top), self.image and self.state. A new factor keeps
        the cell at the same place on the slice (row and col scaled by the ratio of the factors).
        """
        import ipywidgets as w

        self.state = self.view()
        h, w_ = self.grids[self.state["factor"]]
        self.factor = w.ToggleButtons(options=[(f"{f}x", f) for f in self.factors], value=self.state["factor"],
                                      description="factor")
        self.row = w.IntSlider(value=self.state["row"], min=0, max=h - 1, description="row",
                               continuous_update=False)
        self.col = w.IntSlider(value=self.state["col"], min=0, max=w_ - 1, description="col",
                               continuous_update=False)
        self.image = w.Image(value=self.render_png(self.state), format="png")
        syncing = False

        def render(_=None) -> None:
            if not syncing:
                self.state = self.view(self.row.value, self.col.value, self.factor.value)
                self.image.value = self.render_png(self.state)

        def on_factor(change) -> None:
            nonlocal syncing
            old, new = change["old"], change["new"]
            h, w_ = self.grids[new]
            syncing = True  # moving both sliders would render twice
            try:
                row, col = self.row.value * old // new, self.col.value * old // new
                self.row.max, self.col.max = h - 1, w_ - 1
                self.row.value, self.col.value = min(row, h - 1), min(col, w_ - 1)
            finally:
                syncing = False
            render()

        self.factor.observe(on_factor, names="value")
        self.row.observe(render, names="value")
        self.col.observe(render, names="value")
        return w.VBox([self.factor, w.HBox([self.row, self.col]), self.image])


# ------------------------------------------------------------------------------------------------- notebook 03


class ToyQuantizerPanel(_Drawn):
    """Notebook 03's 2D toy, retrained from scratch for each choice of fixes, commitment weight and codebook size.

    points: (N, 2) float, the toy data. Each state trains a `quantizer.VectorQuantizer` of K codes for `steps`
    Adam steps (learning rate `lr`, as the notebook's toy) on "encoder outputs" z, one per point, that start at
    the points: the loss is ||z - x||^2 (standing in for the reconstruction loss, it holds z at its point) plus the
    quantizer's own loss, codebook + beta x commitment. So beta = 0 keeps z on the data, as in the notebook's toy,
    and a larger beta pulls the encoder outputs towards their codes (to (x + beta e) / (1 + beta) at rest). All
    randomness comes from `seed`; the global RNG is left as it was.
    """

    FIGSIZE = (6.4, 3.0)

    def __init__(self, points: np.ndarray, *, steps: int = TOY_STEPS, lr: float = 0.05, seed: int = 0):
        points = np.asarray(points, dtype=np.float32)
        if points.ndim != 2 or points.shape[1] != 2:
            raise ValueError(f"points must be (N, 2), got shape {points.shape}")
        self.points, self.steps, self.lr, self.seed = points, steps, lr, seed
        self._grid = torch.from_numpy(points).T.reshape(1, 2, -1, 1)  # one "image" of N x 1 cells

    def view(self, kmeans: bool = False, ema: bool = False, restarts: bool = False, beta: float = 0.25,
             codes: int = 32) -> dict:
        """Train a toy quantizer with these settings (defaults: the paper's plain recipe, K = 32).

        Keys: the five settings; points (N, 2) the data; encoded (N, 2) the encoder outputs after training;
        codebook (K, 2); used (K,) bool, codes chosen by some encoded point (eval pass after training); n_used;
        dead (K - n_used); assignment (N,) int64 each point's code; error, mean squared distance of an encoded point
        to its code; restarts_done (codes restarted in training); active (steps,) codes chosen in each training step.
        """
        x = self._grid
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            vq = VectorQuantizer(codes, 2, beta=beta, ema=ema, init="kmeans" if kmeans else "uniform",
                                 restart=restarts)
            z = torch.nn.Parameter(x.clone())
            opt = torch.optim.Adam([z, *vq.parameters()], lr=self.lr)
            vq.train()
            active = []
            for _ in range(self.steps):
                out = vq(z)
                loss = F.mse_loss(z, x) + out.loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                active.append(len(torch.unique(out.indices)))
            vq.eval()
            with torch.no_grad():
                out = vq(z)
        assignment = out.indices.flatten().numpy()
        used = np.bincount(assignment, minlength=codes) > 0
        return {"kmeans": kmeans, "ema": ema, "restarts": restarts, "beta": beta, "codes": codes,
                "points": self.points, "encoded": z.detach()[0, :, :, 0].T.numpy().copy(),
                "codebook": vq.codebook.detach().numpy().copy(), "used": used, "n_used": int(used.sum()),
                "dead": int((~used).sum()), "assignment": assignment, "error": float(out.commitment),
                "restarts_done": vq.restarts_total, "active": np.array(active)}

    def draw(self, fig: Figure, state: dict) -> Figure:
        """Left: the plane with each code's Voronoi cell, the data (light), the encoded points (dark), used codes
        (red dots) and dead codes (black crosses). Right: the codes chosen at each training step."""
        plane, curve = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1]})
        codebook, used = state["codebook"], state["used"]
        every = np.concatenate([state["points"], state["encoded"], codebook])
        lo, hi = float(every.min()) - 0.5, float(every.max()) + 0.5
        grid = np.linspace(lo, hi, TOY_GRID, dtype=np.float32)
        gx, gy = np.meshgrid(grid, grid)
        flat = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1))
        cell = nearest_code(flat, torch.from_numpy(codebook)).numpy().reshape(gx.shape)
        plane.imshow(cell % 20, cmap="tab20", alpha=0.35, origin="lower", interpolation="nearest",
                     extent=(lo, hi, lo, hi))
        plane.scatter(*state["points"].T, s=1.5, color="#aaaaaa", alpha=0.5, linewidths=0, label="data")
        plane.scatter(*state["encoded"].T, s=1.5, color="#333333", alpha=0.6, linewidths=0, label="encoded")
        plane.scatter(*codebook[used].T, s=26, color="#e63946", edgecolors="white", linewidths=0.6, label="used")
        plane.scatter(*codebook[~used].T, s=26, color="black", marker="x", linewidths=1.0, label="dead")
        plane.set_xlim(lo, hi)
        plane.set_ylim(lo, hi)
        plane.set_xticks([])
        plane.set_yticks([])
        plane.legend(loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=4, fontsize=7, frameon=False,
                     markerscale=1.5, handletextpad=0.1, columnspacing=0.6)  # below: dead codes sit in a corner
        plane.set_title(f"{state['n_used']} of {state['codes']} codes used, {state['dead']} dead", fontsize=9)
        steps = np.arange(1, len(state["active"]) + 1)
        curve.plot(steps, state["active"], color="#264653", lw=1.4)
        curve.axhline(state["codes"], color="grey", lw=0.8, ls="--")
        curve.set_ylim(0, state["codes"] * 1.05)
        curve.set_xlabel("step", fontsize=8)
        curve.set_title("codes chosen per step", fontsize=9)
        curve.tick_params(labelsize=7)
        fixes = [name for key, name in (("kmeans", "k-means"), ("ema", "EMA"), ("restarts", "restarts"))
                 if state[key]] or ["plain"]
        fig.suptitle(f"{' + '.join(fixes)}, beta {state['beta']:g}: squared error {state['error']:.3f}, "
                     f"{state['restarts_done']} restarts", fontsize=9)
        fig.subplots_adjust(left=0.02, right=0.97, bottom=0.16, top=0.84, wspace=0.12)
        return fig

    def widget(self) -> ipywidgets.VBox:
        """Switches for the three fixes, beta and K sliders and the picture (ipywidgets.VBox); every change trains
        the toy again.

        Sets self.kmeans, self.ema, self.restarts (Checkboxes), self.beta (FloatSlider 0 .. 2), self.codes
        (IntSlider K, 2 .. 128), self.image and self.state.
        """
        import ipywidgets as w

        self.state = self.view()
        self.kmeans = w.Checkbox(value=False, description="k-means init")
        self.ema = w.Checkbox(value=False, description="EMA updates")
        self.restarts = w.Checkbox(value=False, description="dead-code restarts")
        self.beta = w.FloatSlider(value=self.state["beta"], min=0.0, max=2.0, step=0.05, description="beta",
                                  continuous_update=False)
        self.codes = w.IntSlider(value=self.state["codes"], min=2, max=128, description="K",
                                 continuous_update=False)
        self.image = w.Image(value=self.render_png(self.state), format="png")

        def render(_=None) -> None:
            self.state = self.view(self.kmeans.value, self.ema.value, self.restarts.value, self.beta.value,
                                   self.codes.value)
            self.image.value = self.render_png(self.state)

        for control in (self.kmeans, self.ema, self.restarts, self.beta, self.codes):
            control.observe(render, names="value")
        return w.VBox([w.HBox([self.kmeans, self.ema, self.restarts]), w.HBox([self.beta, self.codes]), self.image])


# ------------------------------------------------------------------------------------------------- notebook 04


class CurvesPanel(_Drawn):
    """Training curves of the committed runs, from checkpoints/MANIFEST.json (`retrain.build`).

    manifest: its path. After construction: `histories` {run: [one record per epoch]} (run = checkpoint name
    without .pt), `best` {run: the best validation epoch `retrain` recorded, or None}, `metrics` (the numeric
    history keys any run has, sorted; "epoch" is the x axis), `default_metric` (val_ssim where present) and
    `default_runs` (the runs that record it).
    """

    FIGSIZE = (6.4, 2.8)

    def __init__(self, manifest: str | Path):
        entries = json.loads(Path(manifest).read_text())["checkpoints"]
        self.histories = {Path(name).stem: entry["history"] for name, entry in entries.items()}
        if not self.histories:
            raise ValueError(f"{manifest} lists no checkpoints")
        self.best = {Path(name).stem: entry.get("metrics", {}).get("best_validation_epoch", {}).get("epoch")
                     for name, entry in entries.items()}
        self.metrics = sorted({key for history in self.histories.values() for record in history
                               for key, value in record.items()
                               if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)})
        self.default_metric = "val_ssim" if "val_ssim" in self.metrics else self.metrics[0]
        self.default_runs = [run for run in self.histories if self._series(run, self.default_metric)[0].size]

    def _series(self, run: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, values) of the records of `run` that hold `metric`: (E,) int64, (E,) float64."""
        records = [r for r in self.histories[run] if metric in r]
        return (np.array([r["epoch"] for r in records], dtype=np.int64),
                np.array([r[metric] for r in records], dtype=np.float64))

    def view(self, metric: str | None = None, runs: Sequence[str] | None = None, log: bool = False) -> dict:
        """`metric` (default `default_metric`) over the epochs of `runs` (default `default_runs`), log y or not.

        Keys: metric, log; runs (the chosen runs that record the metric, in the order given); missing (those that
        do not); series {run: (epochs (E,) int64, values (E,) float64)}; best {run: (epoch, value) at the run's
        best validation epoch, or None where the manifest names none}.
        """
        metric = self.default_metric if metric is None else metric
        if metric not in self.metrics:
            raise ValueError(f"no run records {metric!r}; the metrics are {self.metrics}")
        runs = self.default_runs if runs is None else list(runs)
        unknown = [run for run in runs if run not in self.histories]
        if unknown:
            raise ValueError(f"unknown runs {unknown}; the manifest has {list(self.histories)}")
        series = {run: self._series(run, metric) for run in runs}
        series = {run: s for run, s in series.items() if s[0].size}
        best = {}
        for run, (epochs, values) in series.items():
            at = np.flatnonzero(epochs == self.best[run])
            best[run] = (int(epochs[at[0]]), float(values[at[0]])) if at.size else None
        return {"metric": metric, "log": log, "runs": list(series), "missing": [r for r in runs if r not in series],
                "series": series, "best": best}

    def draw(self, fig: Figure, state: dict) -> Figure:
        """One line per run, its best validation epoch marked by a star."""
        ax = fig.subplots()
        for i, run in enumerate(state["runs"]):
            epochs, values = state["series"][run]
            colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
            best = state["best"][run]
            label = run if best is None else f"{run} (best epoch {best[0]})"
            ax.plot(epochs, values, color=colour, lw=1.5, marker="o" if len(epochs) < 3 else None, ms=4, label=label)
            if best is not None:
                ax.plot(*best, marker="*", ms=11, color=colour, markeredgecolor="black", markeredgewidth=0.6)
        if state["runs"]:
            ax.legend(frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
            if state["log"]:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, f"no chosen run records {state['metric']}", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
        title = state["metric"]
        if state["missing"]:
            title += f" (not recorded by {', '.join(state['missing'])})"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.subplots_adjust(left=0.1, right=0.7, bottom=0.15, top=0.9)
        return fig

    def widget(self) -> ipywidgets.VBox:
        """A metric dropdown, a run multi-select, a log-scale checkbox and the picture (ipywidgets.VBox).

        Sets self.metric (Dropdown of `metrics`), self.runs (SelectMultiple of the runs), self.log (Checkbox),
        self.image and self.state.
        """
        import ipywidgets as w

        self.state = self.view()
        self.metric = w.Dropdown(options=self.metrics, value=self.state["metric"], description="metric")
        self.runs = w.SelectMultiple(options=list(self.histories), value=self.default_runs, description="runs",
                                     rows=min(len(self.histories), 6))
        self.log = w.Checkbox(value=False, description="log scale")
        self.image = w.Image(value=self.render_png(self.state), format="png")

        def render(_=None) -> None:
            self.state = self.view(self.metric.value, self.runs.value, self.log.value)
            self.image.value = self.render_png(self.state)

        for control in (self.metric, self.runs, self.log):
            control.observe(render, names="value")
        return w.VBox([w.HBox([self.metric, self.runs, self.log]), self.image])
