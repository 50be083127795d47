"""Figures for the notebooks. Every function draws one figure, saves it and shows it.

Saving is reproducible: a fixed DPI and no software/date metadata, so a regenerated PNG only changes
when the picture does. In a Jupyter kernel the figure is displayed and closed; elsewhere it is
returned open for the caller.

Slices are shown in the radiological sagittal convention, superior up and anterior left: the stored
array (A-P rows, body-axis columns) rotated a quarter turn (`oriented`). The arrays themselves are
never changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from .data import LABELS

DPI = 110
LABEL_COLOURS = ("#000000", "#8d99ae", "#f4d35e", "#3a86ff", "#8338ec", "#ff006e")
SPLIT_COLOURS = {"train": "#2a9d8f", "validate": "#e9c46a", "test": "#e76f51"}
plt.rcParams.update({"figure.facecolor": "white", "axes.spines.top": False, "axes.spines.right": False,
                     "font.size": 10})


def oriented(image: np.ndarray) -> np.ndarray:
    """(H, W) stored slice -> (W, H) display array, superior up and anterior left."""
    return np.rot90(image)


def save(fig: plt.Figure, path: str | Path | None) -> plt.Figure:
    """Save `fig` as a metadata-free PNG at `path` (if given) and display it when in a kernel."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return fig
    if get_ipython() is not None and getattr(get_ipython(), "kernel", None) is not None:
        display(fig)
        plt.close(fig)
    return fig


def _grid(n: int, ncols: int, panel: tuple[float, float]):
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return fig, axes.ravel()


def _show(ax, image: np.ndarray, title: str | None = None, vmax: float | None = None) -> None:
    ax.imshow(oriented(image), cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)


def _label_rgba(labels: np.ndarray, alpha: float) -> np.ndarray:
    colours = matplotlib.colors.to_rgba_array(LABEL_COLOURS)
    colours[:, 3] = alpha
    colours[0, 3] = 0
    return colours[oriented(labels)]


def _label_legend(fig: plt.Figure) -> None:
    handles = [Patch(color=c, label=n) for n, c in zip(LABELS[1:], LABEL_COLOURS[1:])]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
               bbox_to_anchor=(0.5, -0.02))


def montage(images: Sequence[np.ndarray], titles: Sequence[str], path: str | Path | None, *,
            ncols: int = 6, suptitle: str | None = None) -> plt.Figure:
    """A grid of slices with a shared grey scale. images: sequence of (H, W) arrays."""
    fig, axes = _grid(len(images), ncols, (2.4, 1.7))
    vmax = float(np.percentile(np.stack([np.asarray(i) for i in images]), 99.5))
    for ax, img, title in zip(axes, images, titles):
        _show(ax, img, title, vmax)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout(h_pad=0.6, w_pad=0.4)
    return save(fig, path)


def slices_and_labels(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], titles: Sequence[str],
                      path: str | Path | None, *, suptitle: str | None = None) -> plt.Figure:
    """Three rows per column: slice, its label map, and the labels overlaid on the slice."""
    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(2.7 * n, 4.6), squeeze=False)
    for j, (img, lab, title) in enumerate(zip(images, labels, titles)):
        vmax = float(np.percentile(img, 99.5))
        _show(axes[0, j], img, title, vmax)
        axes[1, j].imshow(_label_rgba(lab, 1.0), interpolation="nearest")
        axes[1, j].set_facecolor("black")
        _show(axes[2, j], img, None, vmax)
        axes[2, j].imshow(_label_rgba(lab, 0.45), interpolation="nearest")
        for ax in axes[1:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, name in zip(axes[:, 0], ("slice", "labels", "overlay")):
        ax.set_ylabel(name)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    _label_legend(fig)
    return save(fig, path)


def split_counts(counts: Mapping[str, Mapping[str, int]], path: str | Path | None) -> plt.Figure:
    """Bars of patients, scans and slices per split. counts: {split: {"patients":, "scans":, "slices":}}."""
    kinds = ("patients", "scans", "slices")
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    for ax, kind in zip(axes, kinds):
        splits = list(counts)
        values = [counts[s][kind] for s in splits]
        bars = ax.bar(splits, values, color=[SPLIT_COLOURS.get(s, "grey") for s in splits])
        ax.bar_label(bars, [f"{v:,}" for v in values], fontsize=9)
        ax.set_title(kind)
        ax.set_yticks([])
        ax.spines["left"].set_visible(False)
    fig.tight_layout()
    return save(fig, path)


def shape_policies(original: np.ndarray, fitted: Mapping[str, np.ndarray], path: str | Path | None,
                   name: str = "") -> plt.Figure:
    """An odd-shaped slice and what each shape policy makes of it. fitted: {policy: (H, W)}."""
    panels = {f"original {original.shape[0]}x{original.shape[1]}": original}
    panels.update({f"{k} -> {v.shape[0]}x{v.shape[1]}": v for k, v in fitted.items()})
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels), 1.9))
    vmax = float(np.percentile(original, 99.5))
    for ax, (title, img) in zip(axes, panels.items()):
        _show(ax, img, title, vmax)
    if name:
        fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def intensity_histograms(raw: Mapping[str, np.ndarray], normalised: Mapping[str, np.ndarray],
                         path: str | Path | None) -> plt.Figure:
    """Voxel intensity histograms per split, in scanner units and after normalisation (log counts)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, data, title, unit in ((axes[0], raw, "scanner intensities", "intensity"),
                                  (axes[1], normalised, "normalised to [0, 1]", "value")):
        hi = max(float(np.percentile(v, 99.9)) for v in data.values())
        bins = np.linspace(0, hi if title.startswith("scanner") else 1, 120)
        for split, values in data.items():
            ax.hist(values, bins=bins, histtype="step", lw=1.5, density=True, label=split,
                    color=SPLIT_COLOURS.get(split, "grey"))
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(unit)
        ax.set_ylabel("density")
    axes[1].legend(frameon=False)
    fig.tight_layout()
    return save(fig, path)


def label_shares(shares: Mapping[str, Mapping[str, float]], path: str | Path | None) -> plt.Figure:
    """Grouped bars of the share of voxels per label (log scale). shares: {series: {label: fraction}}."""
    fig, ax = plt.subplots(figsize=(9, 3.2))
    n = len(shares)
    x = np.arange(len(LABELS))
    width = 0.8 / n
    palette = ["#264653", "#2a9d8f", "#e9c46a", "#e76f51", "#8d99ae"]
    for i, (series, values) in enumerate(shares.items()):
        ys = [values.get(name, 0.0) * 100 for name in LABELS]
        ax.bar(x + (i - (n - 1) / 2) * width, ys, width, label=series, color=palette[i % len(palette)])
    ax.set_yscale("log")
    ax.set_xticks(x, LABELS)
    ax.set_ylabel("% of voxels")
    ax.legend(frameon=False, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def patient_splits(scans: Mapping[str, Sequence[tuple[int, int]]], path: str | Path | None) -> plt.Figure:
    """Case x week grid coloured by split: each row must have one colour if splits are by patient.

    scans: {split: [(case, week), ...]}.
    """
    cases = sorted({c for v in scans.values() for c, _ in v})
    row = {c: i for i, c in enumerate(cases)}
    splits = list(scans)
    grid = np.full((len(cases), 8), -1)
    for k, split in enumerate(splits):
        for case, week in scans[split]:
            grid[row[case], week] = k if grid[row[case], week] in (-1, k) else len(splits)
    colours = ["#f1f1f1"] + [SPLIT_COLOURS.get(s, "grey") for s in splits] + ["#d00000"]
    fig, ax = plt.subplots(figsize=(3.4, 0.75 + 0.2 * len(cases)))
    ax.imshow(grid + 1, cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1, aspect="auto",
              interpolation="nearest")
    ax.set_yticks(range(len(cases)), [f"case {c:03d}" for c in cases], fontsize=7)
    ax.set_xticks(range(8), [str(w) for w in range(8)])
    ax.set_xlabel("week")
    handles = [Patch(color=SPLIT_COLOURS.get(s, "grey"), label=s) for s in splits]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.tight_layout()
    return save(fig, path)
