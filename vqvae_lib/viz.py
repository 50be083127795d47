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
from matplotlib.lines import Line2D
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


def bare(ax) -> None:
    """Hide an image panel's ticks and frame."""
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _show(ax, image: np.ndarray, title: str | None = None, vmax: float | None = None) -> None:
    ax.imshow(oriented(image), cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
    bare(ax)
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


def receptive_fields(image: np.ndarray, fields: Sequence[np.ndarray], titles: Sequence[str],
                     path: str | Path | None) -> plt.Figure:
    """A slice with the pixels one central latent cell depends on. fields: (H, W) bool maps, one per panel."""
    fig, axes = plt.subplots(1, len(fields), figsize=(3.4 * len(fields), 2.2), squeeze=False)
    for ax, field, title in zip(axes[0], fields, titles):
        _show(ax, image, title, float(np.percentile(image, 99.5)))
        overlay = np.zeros((*oriented(field).shape, 4))
        overlay[oriented(field)] = matplotlib.colors.to_rgba("#ff006e", 0.45)
        ax.imshow(overlay, interpolation="nearest")
    fig.tight_layout()
    return save(fig, path)


def latent_grids(image: np.ndarray, factors: Sequence[int], path: str | Path | None) -> plt.Figure:
    """A slice with the latent cells of each downsampling factor drawn over it."""
    fig, axes = plt.subplots(1, len(factors), figsize=(3.4 * len(factors), 2.2), squeeze=False)
    shown = oriented(image)
    for ax, factor in zip(axes[0], factors):
        _show(ax, image, f"{factor}x: {image.shape[0] // factor} x {image.shape[1] // factor} codes",
              float(np.percentile(image, 99.5)))
        for r in np.arange(factor, shown.shape[0], factor):
            ax.axhline(r - 0.5, color="#3a86ff", lw=0.4, alpha=0.8)
        for c in np.arange(factor, shown.shape[1], factor):
            ax.axvline(c - 0.5, color="#3a86ff", lw=0.4, alpha=0.8)
    fig.tight_layout()
    return save(fig, path)


def curves(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]], path: str | Path | None,
           *, xlabel: str = "epoch", logy: bool | Sequence[str] = False, logx: bool = False, ncols: int = 3,
           ylim: Mapping[str, tuple[float | None, float | None]] | None = None,
           mark: Mapping[str, float] | None = None) -> plt.Figure:
    """Line plots, one panel per title. panels: {title: {series label: (x, y)}}; logy: True or panel titles;
    logx: a log-2 x axis for every panel, ticked at the x values (e.g. codebook sizes); ylim: {panel title:
    (bottom, top)}, None keeping that end automatic (e.g. (0, None) so a small change is not magnified);
    mark: {label: x} drawn as a vertical line in every panel, each with one entry in a legend below the panels
    (e.g. {"best epoch": 12})."""
    unknown = sorted(set(ylim or {}) - set(panels))
    if unknown:
        raise ValueError(f"ylim names panels that do not exist: {unknown}; the panels are {list(panels)}")
    fig, axes = _grid(len(panels), min(ncols, len(panels)), (3.6, 2.6))
    palette = ["#264653", "#e76f51", "#2a9d8f", "#e9c46a", "#8338ec"]
    mark_styles = ("--", ":", "-.")
    for ax, (title, series) in zip(axes, panels.items()):
        for i, (label, (x, y)) in enumerate(series.items()):
            ax.plot(x, y, label=label, color=palette[i % len(palette)], lw=1.6,
                    marker="o" if len(x) < 3 else None, ms=4)
        for k, x in enumerate((mark or {}).values()):
            ax.axvline(x, color="#6c757d", ls=mark_styles[k % 3], lw=1.1, zorder=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        if logy is True or (not isinstance(logy, bool) and title in logy):
            ax.set_yscale("log")
        if logx:
            ticks = sorted({v for x, _ in series.values() for v in x})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=8)
            ax.minorticks_off()
        if title in (ylim or {}):
            ax.set_ylim(*ylim[title])
        if len(series) > 1:
            ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    if mark:
        handles = [Line2D([], [], color="#6c757d", ls=mark_styles[k % 3], lw=1.1, label=f"{label}: {x:g}")
                   for k, (label, x) in enumerate(mark.items())]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles),
                   frameon=False, fontsize=9)
    return save(fig, path)


def _coincident(points: np.ndarray, tol: float) -> list[np.ndarray]:
    """Indices of points (N, 2) grouped where they lie within `tol` of a group's first point."""
    left, groups = list(range(len(points))), []
    while left:
        near = np.abs(points[left] - points[left[0]]).max(1) <= tol
        groups.append(np.asarray(left)[near])
        left = [i for i, n in zip(left, near) if not n]
    return groups


def toy_codebooks(points: np.ndarray, runs: Mapping[str, Mapping[int, tuple[np.ndarray, np.ndarray]]],
                  path: str | Path | None) -> plt.Figure:
    """2D points, codebook vectors and their Voronoi cells at several steps; one row per run.

    points: (N, 2); runs: {name: {step: (codebook (K, 2), used (K,) bool)}}. Dead codes that coincide on screen
    (within 1 % of the axis range) are annotated with their count; the legend sits below the panels.
    """
    steps = max(len(r) for r in runs.values())
    fig, axes = plt.subplots(len(runs), steps, figsize=(2.7 * steps, 2.8 * len(runs)), squeeze=False)
    every = np.concatenate([points] + [c for r in runs.values() for c, _ in r.values()])
    lo, hi = float(every.min()) - 0.5, float(every.max()) + 0.5
    grid = np.linspace(lo, hi, 240)
    gx, gy = np.meshgrid(grid, grid)
    flat = np.stack([gx.ravel(), gy.ravel()], 1)
    for row, (name, shots) in zip(axes, runs.items()):
        for ax, (step, (codebook, used)) in zip(row, sorted(shots.items())):
            cell = ((flat[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1).reshape(gx.shape)
            ax.imshow(cell % 20, cmap="tab20", alpha=0.35, origin="lower", interpolation="nearest",
                      extent=(lo, hi, lo, hi))
            ax.scatter(points[:, 0], points[:, 1], s=1.5, color="#555555", alpha=0.5, linewidths=0)
            ax.scatter(*codebook[used].T, s=26, color="#e63946", edgecolors="white", linewidths=0.6)
            dead = codebook[~used]
            ax.scatter(*dead.T, s=26, color="black", marker="x", linewidths=1.0)
            for group in _coincident(dead, 0.01 * (hi - lo)):
                if len(group) > 1:
                    at = dead[group].mean(0)
                    right, up = at < (lo + hi) / 2  # point the label into the panel
                    ax.annotate(f"{len(group)} dead codes here", at, xytext=(10 if right else -10, 10 if up else -10),
                                textcoords="offset points", ha="left" if right else "right",
                                va="bottom" if up else "top", fontsize=7,
                                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.85),
                                arrowprops=dict(arrowstyle="-", color="black", lw=0.6))
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"step {step}: {int(used.sum())}/{len(used)} used", fontsize=9)
        row[0].set_ylabel(name)
    fig.tight_layout()
    handles = [Line2D([], [], ls="", marker="o", ms=5, color="#e63946", markeredgecolor="white", label="used code"),
               Line2D([], [], ls="", marker="x", ms=5, color="black", label="dead code (no point assigned)"),
               Line2D([], [], ls="", marker="o", ms=2, color="#555555", label="training points")]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False, fontsize=9)
    return save(fig, path)


def reconstructions(originals: Sequence[np.ndarray], recons: Sequence[np.ndarray], titles: Sequence[str],
                    path: str | Path | None, *, error_gain: float = 4.0) -> plt.Figure:
    """Columns of slices: original, reconstruction and |error| x error_gain. Each (H, W) in [0, 1]."""
    n = len(originals)
    fig, axes = plt.subplots(3, n, figsize=(2.7 * n, 4.4), squeeze=False)
    for j, (x, r, title) in enumerate(zip(originals, recons, titles)):
        _show(axes[0, j], x, title, 1.0)
        _show(axes[1, j], r, None, 1.0)
        _show(axes[2, j], np.clip(np.abs(np.asarray(r) - np.asarray(x)) * error_gain, 0, 1), None, 1.0)
    for ax, name in zip(axes[:, 0], ("original", "reconstruction", f"|error| x {error_gain:g}")):
        ax.set_ylabel(name)
    fig.tight_layout()
    return save(fig, path)


def image_rows(rows: Mapping[str, Sequence[np.ndarray]], titles: Sequence[str] | None, path: str | Path | None, *,
               captions: Mapping[str, Sequence[str]] | None = None) -> plt.Figure:
    """One row of slices per entry of rows {row label: [(H, W) images in [0, 1]]}, on the same grey scale;
    titles label the top row's columns, captions {row label: [text]} stand over each image of a row (under
    the column title in the top row), so every caption is next to its own image and none to another row's."""
    n = max(len(images) for images in rows.values())
    height = 1.45 + 0.15 * bool(captions)
    fig, axes = plt.subplots(len(rows), n, figsize=(2.3 * n + 0.4, height * len(rows) + 0.35), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            if c >= len(images):
                ax.axis("off")
                continue
            lines = [titles[c]] if titles is not None and r == 0 else []
            lines += [captions[label][c]] if captions and label in captions else []
            _show(ax, images[c], None, 1.0)
            ax.set_title("\n".join(lines), fontsize=8 if captions else 9)
        axes[r, 0].set_ylabel(label)
    fig.tight_layout()
    return save(fig, path)


def influence_map(influence: np.ndarray, target: tuple[int, int], path: str | Path | None) -> plt.Figure:
    """Which positions of a grid change the prediction at `target`: influence (h, w) >= 0 (0: none), drawn in
    grid coordinates (not oriented like a slice) with the target outlined and the positions after it shaded."""
    h, w = influence.shape
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    order = np.arange(h * w).reshape(h, w)
    later = order >= target[0] * w + target[1]
    shown = np.where(influence > 0, 1.0, 0.0) + 0.25 * later
    ax.imshow(shown, cmap="Blues", vmin=0, vmax=1.3)
    ax.add_patch(plt.Rectangle((target[1] - 0.5, target[0] - 0.5), 1, 1, fill=False, color="#e76f51", lw=2.5))
    ax.set_xticks(range(w))
    ax.set_yticks(range(h))
    ax.tick_params(labelsize=7)
    ax.set_title("dark: changes the logits at the red position\nlight: after it in raster order", fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def likelihood_maps(images: Sequence[np.ndarray], surprise: Sequence[np.ndarray], titles: Sequence[str],
                    path: str | Path | None, *, outlines: Sequence[np.ndarray | None] | None = None) -> plt.Figure:
    """Where a prior is surprised: slices (H, W) in [0, 1] (top row) and each one's per-position NLL in bits
    (h, w) below it, upsampled to the slice and on one colour scale; outlines (H, W) bool (or None) are drawn
    on both rows."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.3 * n + 1.2, 3.3), squeeze=False)
    vmax = float(np.percentile(np.concatenate([np.ravel(s) for s in surprise]), 99.5))
    for c, (image, bits, title) in enumerate(zip(images, surprise, titles)):
        factor = image.shape[0] // bits.shape[0]
        _show(axes[0, c], image, title, 1.0)
        heat = axes[1, c].imshow(oriented(np.kron(bits, np.ones((factor, factor)))), cmap="magma", vmin=0, vmax=vmax,
                                 interpolation="nearest")
        bare(axes[1, c])
        axes[1, c].set_xlabel(f"sum {bits.sum():,.0f} bits", fontsize=8)
        outline = outlines[c] if outlines is not None else None
        if outline is not None and outline.any():
            for ax in axes[:, c]:
                ax.contour(oriented(outline.astype(float)), levels=[0.5], colors="#2a9d8f", linewidths=1.2)
    axes[0, 0].set_ylabel("slice")
    axes[1, 0].set_ylabel("NLL per position")
    fig.colorbar(heat, ax=axes[1, :].tolist(), label="bits", shrink=0.9)
    return save(fig, path)


def _decimals(span: float) -> int:
    """Decimals that give three significant digits of `span`: numbers that differ on a plot of that range
    differ in print (0.0050 and 0.0017 on a range of 0.005, not "0.01" and "0.00")."""
    return max(0, 2 - int(np.floor(np.log10(span)))) if span > 0 else 3


def distributions(values: Mapping[str, Mapping[str, np.ndarray]], path: str | Path | None,
                  baselines: Mapping[str, Mapping[str, float]] | None = None) -> plt.Figure:
    """Histograms per metric and model, as densities so groups of different sizes compare, the metric on the x
    axis and the legend (means to three significant digits of the panel's range) right of each panel.
    values: {metric: {model: (N,) array}}; baselines: {metric: {name: x}} drawn as vertical lines."""
    fig, axes = plt.subplots(1, len(values), figsize=(6.8 * len(values), 2.9), squeeze=False)
    palette = ["#264653", "#e76f51", "#2a9d8f", "#e9c46a", "#8338ec", "#8d99ae"]
    for ax, (metric, series) in zip(axes[0], values.items()):
        marks = (baselines or {}).get(metric, {})
        lo = min(float(np.min(v)) for v in series.values())
        hi = max(float(np.max(v)) for v in series.values())
        digits = _decimals(max([hi, *marks.values()]) - min([lo, *marks.values()]))
        bins = np.linspace(lo, hi, 40) if hi > lo else 40  # one value everywhere: numpy picks the bins
        for i, (name, v) in enumerate(series.items()):
            ax.hist(v, bins=bins, density=True, alpha=0.55, color=palette[i % len(palette)],
                    label=f"{name} (n = {len(v):,}, mean {np.mean(v):.{digits}f})")
        for k, (name, x) in enumerate(marks.items()):
            ax.axvline(x, color="black", ls=("--", ":", "-.")[k % 3], lw=1, label=f"{name} ({x:.{digits}f})")
        ax.set_xlabel(metric)
        ax.set_ylabel("density")
        ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return save(fig, path)


def per_group(groups: Sequence[str], values: Mapping[str, Sequence[float]], path: str | Path | None, *,
              ylabel: str) -> plt.Figure:
    """Grouped bars from 0, e.g. mean SSIM per scan for each model, each labelled with its value; the legend
    sits above the axes. values: {series: one value per group}."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) * len(values)), 3.2))
    x = np.arange(len(groups))
    width = 0.8 / len(values)
    palette = ["#264653", "#e76f51", "#2a9d8f", "#e9c46a"]
    for i, (name, ys) in enumerate(values.items()):
        bars = ax.bar(x + (i - (len(values) - 1) / 2) * width, ys, width, label=name, color=palette[i % 4])
        ax.bar_label(bars, [f"{y:.3f}" for y in ys], fontsize=7)
    ax.set_xticks(x, groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.12)  # room for the bar labels; bars start at 0
    ax.legend(frameon=False, fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.02), ncol=len(values))
    fig.tight_layout()
    return save(fig, path)


def rate_distortion(curves: Mapping[str, Sequence[Mapping[str, float]]],
                    points: Mapping[str, Sequence[Mapping[str, float | str]]], path: str | Path | None, *,
                    metrics: Sequence[str] = ("ssim", "psnr")) -> plt.Figure:
    """Quality against bits per slice (log scale), one panel per metric, with a shared x axis.

    curves: {codec: [{"bits_per_slice":, metric: ...}, ...]} drawn as lines with markers (`rate.codec_curve`);
    points: {group, e.g. "VQ-VAE 4x": [{"bits_per_slice":, metric: ..., "label": "K=512"}, ...]} drawn as
    markers annotated with their labels. The legend sits below the panels.
    """
    names = {"ssim": "SSIM (7x7 uniform)", "ssim_gaussian": "SSIM (11x11 Gaussian)", "psnr": "PSNR (dB)"}
    palette = ["#264653", "#2a9d8f", "#e9c46a", "#8d99ae", "#3a86ff"]
    markers = [("D", "#e76f51"), ("s", "#8338ec"), ("^", "#ff006e"), ("P", "#000000")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.3), sharex=True, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, (codec, curve) in enumerate(curves.items()):
            ax.plot([p["bits_per_slice"] for p in curve], [p[metric] for p in curve], label=codec,
                    color=palette[i % len(palette)], lw=1.4, marker="o", ms=3.5)
        for i, (group, group_points) in enumerate(points.items()):
            marker, colour = markers[i % len(markers)]
            xs, ys = [p["bits_per_slice"] for p in group_points], [p[metric] for p in group_points]
            ax.scatter(xs, ys, marker=marker, s=50, color=colour, edgecolors="white", linewidths=0.5, zorder=3,
                       label=group)
            for x, y, p in zip(xs, ys, group_points):
                ax.annotate(str(p["label"]), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("bits per slice (log scale)")
        ax.set_ylabel(names.get(metric, metric))
        ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 5) or 1,
               frameon=False)
    return save(fig, path)


def code_usage(counts: Mapping[str, np.ndarray], path: str | Path | None) -> plt.Figure:
    """Code usage histograms, codes sorted from most to least used, on one shared log y axis so the models
    compare. counts: {model: (K,) counts}."""
    fig, axes = plt.subplots(1, len(counts), figsize=(4.6 * len(counts), 2.8), sharey=True, squeeze=False)
    for ax, (name, c) in zip(axes[0], counts.items()):
        c = np.sort(np.asarray(c))[::-1]
        share = c / max(c.sum(), 1)
        ax.bar(np.arange(len(c)), share, width=1.0, color="#2a9d8f")
        ax.set_yscale("log")
        ax.set_title(f"{name}: {int((c > 0).sum())} of {len(c)} codes used")
        ax.set_xlabel("code (sorted by use)")
    axes[0, 0].set_ylabel("share of cells")
    fig.tight_layout()
    return save(fig, path)


def ablation(variants: Sequence[str], metrics: Mapping[str, Sequence[float]], path: str | Path | None, *,
             highlight: str | None = None, formats: Mapping[str, str] | None = None, ncols: int = 3) -> plt.Figure:
    """Horizontal bars, one panel per metric (up to `ncols` a row) and one bar per variant (top to bottom, in
    order), each labelled with its value. metrics: {metric name: one value per variant}; highlight: a variant
    drawn in a second colour (e.g. the default recipe); formats: {metric name: format spec} (default ".3g")."""
    formats = formats or {}
    ncols = min(ncols, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols + 1.2, nrows * (0.3 * len(variants) + 1.1)),
                             sharey=True, squeeze=False)
    y = np.arange(len(variants))
    colours = ["#e76f51" if v == highlight else "#264653" for v in variants]
    for ax, (name, values) in zip(axes.ravel(), metrics.items()):
        bars = ax.barh(y, values, color=colours, height=0.7)
        ax.bar_label(bars, [format(v, formats.get(name, ".3g")) for v in values], fontsize=7, padding=2)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, max(max(values), 1e-12) * 1.3)
        ax.tick_params(axis="x", labelsize=7)
    for ax in axes.ravel()[len(metrics):]:
        ax.axis("off")
    for row in axes:
        row[0].set_yticks(y, variants, fontsize=8)
    axes[0, 0].invert_yaxis()
    fig.tight_layout()
    return save(fig, path)


def gradient_fields(points: np.ndarray, code: np.ndarray, steps: Mapping[str, np.ndarray], path: str | Path | None
                    ) -> plt.Figure:
    """Where a gradient step moves encoder outputs quantised to one code, one panel per estimator.

    points: (N, 2) encoder outputs z; code: (2,) their code e; steps: {estimator: (N, 2) update of each z (minus
    its gradient)}. The axes are shared and equal, so directions and lengths compare across panels."""
    fig, axes = plt.subplots(1, len(steps), figsize=(3.4 * len(steps), 3.4), sharex=True, sharey=True,
                             squeeze=False)
    for ax, (name, step) in zip(axes[0], steps.items()):
        ax.quiver(points[:, 0], points[:, 1], step[:, 0], step[:, 1], angles="xy", scale_units="xy", scale=1,
                  color="#264653", width=0.006)
        ax.scatter(*points.T, s=14, color="#2a9d8f", label="encoder outputs z", zorder=3)
        ax.scatter(*code, s=70, marker="*", color="#e76f51", label="their code e", zorder=4)
        ax.plot([0], [0], "k+", ms=8)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("dimension 1")
    axes[0, 0].set_ylabel("dimension 2")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=2, frameon=False)
    fig.tight_layout()
    return save(fig, path)


def fsq_grid(levels: Sequence[int], bound: np.ndarray, inputs: np.ndarray, path: str | Path | None) -> plt.Figure:
    """FSQ in two channels: the bounding curve of each channel and the grid of codes it rounds to.

    levels: the two channels' numbers of values; inputs: (M,) channel inputs; bound: (2, M) each channel's bounded
    value there (before rounding)."""
    fig, (curve, grid) = plt.subplots(1, 2, figsize=(8.0, 3.4))
    for i, (level, colour) in enumerate(zip(levels, ("#264653", "#e76f51"))):
        curve.plot(inputs, bound[i], color=colour, lw=1.6, label=f"channel {i + 1}: {level} levels")
        curve.plot(inputs, np.round(bound[i]), color=colour, lw=1.0, ls="--")
    curve.set_xlabel("channel input")
    curve.set_ylabel("bounded (solid) and rounded (dashed)")
    curve.legend(frameon=False, fontsize=8)
    xs, ys = (np.arange(level) - level // 2 for level in levels)  # integer values of each channel
    gx, gy = np.meshgrid(xs / (levels[0] // 2), ys / (levels[1] // 2))
    grid.scatter(gx.ravel(), gy.ravel(), s=22, color="#2a9d8f")
    grid.set_xlabel("channel 1 code value")
    grid.set_ylabel("channel 2 code value")
    grid.set_title(f"{levels[0]} x {levels[1]} = {levels[0] * levels[1]} codes", fontsize=10)
    grid.set_aspect("equal")
    fig.tight_layout()
    return save(fig, path)


def show_source(obj) -> None:
    """Display the source of a library function or class, highlighted (plain text outside a notebook)."""
    import inspect

    from IPython.display import Code, display
    display(Code(inspect.getsource(obj), language="python"))
