"""The codebook explorer: which code is used where on a slice, and what each code decodes to.

All slices are encoded once; `view` returns the data for one (slice, code) state, `figure` draws it,
`widget` wraps it in a slider and a code dropdown, and `explorer_grid` is the static figure for
notebooks and the README. `edit_view` / `render_edit` set one cell of a map to another code and decode it, the
change bounded by `decoder_reach`. Index maps colour each code by the mean intensity it decodes to
(`code_intensity`, `intensity_map`, usable on any VQ-VAE's maps). Every displayed image and index map goes
through `viz.oriented`, so a latent cell and its downsample x downsample pixel block sit at the same place on
screen.

`SamplerPanel` goes with it: new slices drawn from a prior (`prior.SliceGenerator`), and completions of a
real slice whose first code rows are kept, with the same view / render / widget split.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from . import metrics, viz
from .train import reconstruct

if TYPE_CHECKING:
    import ipywidgets

    from .prior import SliceGenerator

NO_CODE = -1  # the dropdown value meaning "no code chosen" (a Dropdown shows value None as blank)
HIGHLIGHT = np.array([1.0, 0.15, 0.35])  # overlay colour of the chosen code's pixel blocks
INTENSITY_CMAP = "viridis"  # index maps: each code by the mean intensity it decodes to; no red, so HIGHLIGHT stands out
WASH = 0.45  # with a code highlighted, the other cells keep this share of their colour (the rest white)
MARK = 8.0  # side (points) of the square drawn round each highlighted cell, visible where a cell is a few pixels
PATCH_CELLS = 4  # side of the decoded code patch, in latent cells
PATCH_MARGIN = 4  # extra cells decoded around it so decoder border effects stay outside the patch
FLAT = 0.01  # a code patch whose intensities span less than this is drawn as one grey, not stretched
WIDGET_DPI = 72  # widget PNGs are rendered small so an update stays well under 0.3 s
RANDOM = -1  # the position dropdown's value meaning "draw the bins at random"
BLANK = "#4a5878"  # colour of the rows a completion drops (NaN pixels)
PANEL_SIZE = (2.1, 1.5)  # inches per sampler panel: a 256 x 128 slice shown landscape
SAMPLES, COMPLETIONS = 4, 3  # slices the sampler panel draws per click


@torch.no_grad()
def code_patches(model, codes: Sequence[int] | np.ndarray, device: str | torch.device | None = None,
                 batch_size: int = 64) -> np.ndarray:
    """What each code decodes to: a map of PATCH_CELLS + 2 PATCH_MARGIN cells a side filled with the code, decoded,
    its central PATCH_CELLS x PATCH_CELLS cells (the margin keeps the decoder's border effects out).

    model: a VQVAE (`decode_indices`, `config.downsample`); device: where it runs (default: where the model is).
    Returns (len(codes), P, P) float32, P = PATCH_CELLS * downsample: the decoder's own output, not clipped (a
    map of one code is far from any slice, and may decode above 1).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
    n, d = PATCH_CELLS + 2 * PATCH_MARGIN, int(model.config.downsample)
    m, p = PATCH_MARGIN * d, PATCH_CELLS * d
    out = np.empty((len(codes), p, p), dtype=np.float32)
    for start in range(0, len(codes), batch_size):
        chunk = codes[start:start + batch_size].to(device)
        maps = chunk[:, None, None].expand(-1, n, n)
        out[start:start + len(chunk)] = model.decode_indices(maps)[:, 0, m:m + p, m:m + p].float().cpu()
    return out


def code_intensity(model, device: str | torch.device | None = None, batch_size: int = 64) -> np.ndarray:
    """(K,) float32: the mean intensity of what each code of the codebook decodes to (`code_patches`)."""
    return code_patches(model, np.arange(int(model.config.codebook_size)), device, batch_size).mean(axis=(1, 2))


def intensity_map(indices: np.ndarray, intensity: np.ndarray, highlight: np.ndarray | None = None,
                  vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """(h, w) code indices -> (h, w, 3) RGB, code k coloured by intensity[k] on the INTENSITY_CMAP scale from vmin
    to vmax, so brighter-decoding codes get brighter colours and the map shows the anatomy.

    intensity: (K,) per code, e.g. `code_intensity(model)`. With a highlight ((h, w) bool) that has any cell set,
    those cells take the HIGHLIGHT colour and all others are washed out towards white.
    """
    norm = np.clip((np.asarray(intensity, dtype=np.float64) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    rgb = plt.get_cmap(INTENSITY_CMAP)(norm[indices])[..., :3]
    if highlight is not None and highlight.any():
        rgb[~highlight] = WASH * rgb[~highlight] + (1 - WASH)
        rgb[highlight] = HIGHLIGHT
    return rgb


def decoder_reach(model, row: int, col: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The pixels a change of latent cell (row, col) can change in the decoded (H, W) image: the half-open box
    (top, bottom, left, right), from the kernels, strides and paddings of the decoder's convolutions taken in
    module order (a residual branch reaches no further than its convolutions)."""
    lo, hi = np.array([row, col]), np.array([row, col])
    for layer in model.decoder.modules():
        if isinstance(layer, torch.nn.ConvTranspose2d):  # input i feeds outputs i s - p .. i s - p + (k - 1) dil
            s, p, k, dil = (np.array(getattr(layer, a)) for a in ("stride", "padding", "kernel_size", "dilation"))
            lo, hi = lo * s - p, hi * s - p + (k - 1) * dil
        elif isinstance(layer, torch.nn.Conv2d):  # output o reads inputs o s - p .. o s - p + (k - 1) dil
            s, p, k, dil = (np.array(getattr(layer, a)) for a in ("stride", "padding", "kernel_size", "dilation"))
            lo, hi = -((-(lo + p - (k - 1) * dil)) // s), (hi + p) // s
    (top, left), (bottom, right) = np.maximum(lo, 0), np.minimum(hi + 1, shape)
    return int(top), int(bottom), int(left), int(right)


def _display_box(top: int, bottom: int, left: int, right: int, width: int) -> tuple[float, float, float, float]:
    """A half-open box of a stored (., width) array -> (x, y, dx, dy) of the same pixels in `viz.oriented` display
    coordinates, as a Rectangle takes them."""
    return top - 0.5, width - right - 0.5, bottom - top, right - left


def _block_mask(cells: np.ndarray, d: int, shape: tuple[int, int]) -> np.ndarray:
    """(h, w) bool cell mask -> (H, W) bool pixel mask, each cell a d x d block."""
    up = np.repeat(np.repeat(cells, d, axis=0), d, axis=1)
    out = np.zeros(shape, dtype=bool)
    H, W = min(shape[0], up.shape[0]), min(shape[1], up.shape[1])
    out[:H, :W] = up[:H, :W]
    return out


def _vmax(image: np.ndarray) -> float:
    """The grey value shown as white: the 99.5th percentile, so a few hot pixels do not dim the slice."""
    return max(float(np.nanpercentile(image, 99.5)), 1e-6)


def _png(fig: Figure) -> bytes:
    """PNG bytes of an off-screen figure, without metadata."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=WIDGET_DPI, metadata={"Software": None})
    return buf.getvalue()


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a (H, W) bool mask that touch a pixel outside it (4-neighbourhood or the border)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner


def _slices_and_names(images: np.ndarray, names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """Slices (N, H, W) as float32 and their N names (default "slice i"); ValueError for other shapes or counts."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3:
        raise ValueError(f"images must be (N, H, W), got shape {images.shape}")
    names = [f"slice {i}" for i in range(len(images))] if names is None else list(names)
    if len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images")
    return images, names


class CodebookExplorer:
    """Encoded test slices with their index maps and reconstructions, for browsing the codebook.

    model: a VQVAE (`encode`, `decode_indices`, `config.codebook_size`, `config.downsample`), already
    on `device`; it is put in eval mode. images: (N, H, W) float in [0, 1]. names: N slice names
    (default "slice i"). After construction: `indices` (N, h, w) int64, `recon` (N, H, W) float32
    clipped to [0, 1], `intensity` (K,) the mean intensity each code decodes to (`code_intensity`).
    """

    def __init__(self, model, images: np.ndarray, names: Sequence[str] | None = None, *,
                 device: str | torch.device = "cpu", batch_size: int = 64, progress: bool = False):
        images, names = _slices_and_names(images, names)
        self.model = model
        self.images = images
        self.names = names
        self.device = torch.device(device)
        self.n_codes = int(model.config.codebook_size)
        self.downsample = int(model.config.downsample)
        self.model.eval()
        self.recon, self.indices = reconstruct(model, images, batch_size, self.device, progress=progress)
        self._patches = code_patches(model, np.arange(self.n_codes), self.device, batch_size)
        self.intensity = self._patches.mean(axis=(1, 2))

    def __len__(self) -> int:
        return len(self.images)

    def code_patch(self, code: int) -> np.ndarray:
        """What one code decodes to (`code_patches`): (P, P) float32, P = PATCH_CELLS * downsample."""
        return self._patches[self._check_code(code)]

    def _check_code(self, code: int) -> int:
        code = int(code)
        if not 0 <= code < self.n_codes:
            raise ValueError(f"code {code} outside the codebook [0, {self.n_codes})")
        return code

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"slice {index} outside [0, {len(self)})")
        return index % len(self)

    def codes_by_use(self, index: int) -> list[tuple[int, int]]:
        """(code, cells) pairs of one slice, most used first (ties by code)."""
        codes, counts = np.unique(self.indices[index], return_counts=True)
        return sorted(zip(codes.tolist(), counts.tolist()), key=lambda cc: (-cc[1], cc[0]))

    def body_code(self, index: int, threshold: float = 0.3) -> int:
        """The code slice `index` uses most inside the body: over the cells whose pixel block has a mean intensity
        above `threshold` (the most used code of all its cells if none does)."""
        d = self.downsample
        h, w = self.indices.shape[1:]
        bright = self.images[index][:h * d, :w * d].reshape(h, d, w, d).mean(axis=(1, 3)) > threshold
        codes, cells = np.unique(self.indices[index][bright], return_counts=True)
        return int(codes[cells.argmax()]) if len(codes) else self.codes_by_use(index)[0][0]

    def view(self, index: int, code: int | None = None) -> dict:
        """The data for one state: slice `index` with `code` highlighted (None: no code).

        Keys: index, name, code; image, recon (H, W) float32; indices (h, w) int64; highlight (h, w)
        bool (indices == code); pixel_highlight (H, W) bool (highlight blown up to d x d blocks);
        code_patch (P, P) float32 or None; codes_in_slice sorted unique codes; usage (cells using code).
        """
        index = self._check_index(index)
        indices = self.indices[index]
        if code is None:
            highlight = np.zeros(indices.shape, dtype=bool)
            patch = None
        else:
            code = self._check_code(code)
            highlight = indices == code
            patch = self.code_patch(code)
        return {
            "index": index,
            "name": self.names[index],
            "code": code,
            "image": self.images[index],
            "indices": indices,
            "recon": self.recon[index],
            "highlight": highlight,
            "pixel_highlight": _block_mask(highlight, self.downsample, self.images.shape[1:]),
            "code_patch": patch,
            "codes_in_slice": np.unique(indices),
            "usage": int(highlight.sum()),
        }

    @torch.no_grad()
    def edit_view(self, index: int, row: int, col: int, code: int) -> dict:
        """Slice `index` with the code of latent cell (row, col) of its index map set to `code`, both maps decoded.

        Keys: index, name, row, col, code, old_code; indices (h, w) int64 the slice's map, edited (h, w) the map
        with the cell changed; original, decoded (H, W) float32 in [0, 1] the two maps decoded (in one batch);
        difference (H, W) decoded - original; reach (top, bottom, left, right) the half-open pixel box the decoder
        lets the cell change (`decoder_reach`); cell (top, bottom, left, right) the cell's own pixel block.
        """
        index = self._check_index(index)
        indices = self.indices[index]
        h, w = indices.shape
        for name, value, size in (("row", row, h), ("col", col, w)):
            if not 0 <= value < size:
                raise ValueError(f"{name} {value} outside the index map's {h} x {w} cells: {name} in [0, {size})")
        row, col, code = int(row), int(col), self._check_code(code)
        edited = indices.copy()
        edited[row, col] = code
        maps = torch.from_numpy(np.stack([indices, edited])).to(self.device)
        original, decoded = self.model.decode_indices(maps)[:, 0].float().clamp(0, 1).cpu().numpy()
        d = self.downsample
        return {"index": index, "name": self.names[index], "row": row, "col": col, "code": code,
                "old_code": int(indices[row, col]), "indices": indices, "edited": edited, "original": original,
                "decoded": decoded, "difference": decoded - original,
                "reach": decoder_reach(self.model, row, col, original.shape),
                "cell": (row * d, (row + 1) * d, col * d, (col + 1) * d)}

    def index_map(self, indices: np.ndarray, highlight: np.ndarray | None = None) -> np.ndarray:
        """(h, w) code indices -> (h, w, 3) RGB, each code by the intensity it decodes to (`intensity_map`)."""
        return intensity_map(indices, self.intensity, highlight)

    def _draw(self, fig: Figure, state: dict) -> Figure:
        """Draw one state as one row: image (+overlay), index map, reconstruction, code patch."""
        axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [2, 2, 2, 1]})
        vmax = _vmax(state["image"])
        code, usage = state["code"], state["usage"]
        axes[0].imshow(viz.oriented(state["image"]), cmap="gray", vmin=0, vmax=vmax,
                       interpolation="nearest")
        if code is not None:
            mask = state["pixel_highlight"]
            overlay = np.zeros(mask.shape + (4,))
            overlay[..., :3] = HIGHLIGHT
            overlay[..., 3] = np.where(_outline(mask), 1.0, np.where(mask, 0.45, 0.0))
            axes[0].imshow(viz.oriented(overlay), interpolation="nearest")
            rows, cols = np.nonzero(state["highlight"])
            d, width = self.downsample, mask.shape[1]
            limits = axes[0].get_xlim(), axes[0].get_ylim()
            axes[0].scatter((rows + 0.5) * d - 0.5, width - (cols + 0.5) * d - 0.5, s=MARK ** 2, marker="s",
                            facecolors="none", edgecolors=[HIGHLIGHT], linewidths=1.5)
            axes[0].set_xlim(limits[0])
            axes[0].set_ylim(limits[1])
        axes[0].set_title(state["name"], fontsize=9)
        axes[1].imshow(viz.oriented(self.index_map(state["indices"], state["highlight"])),
                       interpolation="nearest")
        n_used = len(state["codes_in_slice"])
        axes[1].set_title(f"codes by decoded intensity ({n_used} codes)" if code is None
                          else f"code {code}: {usage} of {state['indices'].size} cells", fontsize=9)
        axes[2].imshow(viz.oriented(state["recon"]), cmap="gray", vmin=0, vmax=vmax,
                       interpolation="nearest")
        axes[2].set_title("reconstruction", fontsize=9)
        if state["code_patch"] is None:
            axes[3].text(0.5, 0.5, "choose\na code", ha="center", va="center", fontsize=9, color="grey")
        else:
            patch = state["code_patch"]
            lo, hi = float(patch.min()), float(patch.max())
            if hi - lo < FLAT:  # one grey: drawn as that grey of the [0, 1] scale, its value in the title
                axes[3].imshow(viz.oriented(patch), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                axes[3].set_title(f"code {code} alone\none grey: {lo:.2f}", fontsize=8)
            else:
                axes[3].imshow(viz.oriented(patch), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
                axes[3].set_title(f"code {code} alone\nown scale {lo:.2f}-{hi:.2f}", fontsize=8)
        for ax in axes:
            viz.bare(ax)
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.84, wspace=0.08)
        return fig

    def figure(self, index: int, code: int | None = None,
               path: str | Path | None = None) -> plt.Figure:
        """One state as a saved, displayed figure (see `_draw`)."""
        fig = plt.figure(figsize=(10.5, 2.0))
        self._draw(fig, self.view(index, code))
        return viz.save(fig, path)

    def render_png(self, state: dict) -> bytes:
        """PNG bytes of one state, drawn off-screen (no pyplot figure, nothing displayed)."""
        fig = Figure(figsize=(10.5, 2.0))
        self._draw(fig, state)
        return _png(fig)

    def static_png(self) -> bytes:
        """PNG bytes of the widget's first state: slice 0, no code chosen."""
        return self.render_png(self.view(0))

    def _draw_edit(self, fig: Figure, state: dict) -> Figure:
        """Draw an `edit_view` state as one row: edited index map, original and edited decodings, their difference;
        the edited cell outlined on each, the decoder's reach dashed on the difference."""
        axes = fig.subplots(1, 4)
        vmax = _vmax(state["original"])
        change = max(float(np.abs(state["difference"]).max()), 1e-6)
        h, w = state["indices"].shape
        r, c = state["row"], state["col"]
        panels = [(self.index_map(state["edited"]), {}, f"cell ({r}, {c}): code {state['old_code']} -> "
                                                         f"{state['code']}"),
                  (state["original"], {"cmap": "gray", "vmin": 0, "vmax": vmax}, "original decoding"),
                  (state["decoded"], {"cmap": "gray", "vmin": 0, "vmax": vmax}, "edited decoding"),
                  (state["difference"], {"cmap": "PuOr_r", "vmin": -change, "vmax": change},
                   f"edited - original (+-{change:.2f})")]
        for k, (ax, (image, style, title)) in enumerate(zip(axes, panels)):
            ax.imshow(viz.oriented(image), interpolation="nearest", **style)
            x, y, dx, dy = _display_box(r, r + 1, c, c + 1, w) if k == 0 else _display_box(
                *state["cell"], state["original"].shape[1])
            ax.add_patch(Rectangle((x, y), dx, dy, fill=False, edgecolor=HIGHLIGHT, linewidth=1.5))
            ax.set_title(title, fontsize=9)
            viz.bare(ax)
        x, y, dx, dy = _display_box(*state["reach"], state["original"].shape[1])
        axes[3].add_patch(Rectangle((x, y), dx, dy, fill=False, edgecolor="black", linewidth=1, linestyle="--"))
        fig.suptitle(f"{state['name']}: dashed, the pixels the decoder lets one cell reach", fontsize=9)
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.76, wspace=0.08)
        return fig

    def render_edit(self, state: dict) -> bytes:
        """PNG bytes of an `edit_view` state, drawn off-screen."""
        return _png(self._draw_edit(Figure(figsize=(10.5, 2.2)), state))

    def _code_options(self, index: int) -> list[tuple[str, int]]:
        return [("no code", NO_CODE)] + [(f"code {c} ({n} cells)", c) for c, n in self.codes_by_use(index)]

    def widget(self) -> ipywidgets.VBox:
        """A slider over slices, a dropdown of the slice's codes and the rendered figure, and below them a cell
        editor (ipywidgets.VBox).

        Sets self.slider, self.code (Dropdown; value NO_CODE means none), self.image (ipywidgets.Image)
        and self.state (the current `view` dict); changing either control re-renders. The editor: self.edit_row,
        self.edit_col (BoundedIntText, a latent cell of the index map; default its centre), self.edit_code
        (BoundedIntText, the code to put there), self.edit_button ("apply") renders `edit_view` of the current slice
        into self.edit_image and sets self.edit_state (None before, and again after a slice change). CSS classes for
        a page driver: explorer-slice, explorer-code, explorer-image, explorer-edit-row, explorer-edit-col,
        explorer-edit-code, explorer-edit-apply, explorer-edit-image.
        """
        import ipywidgets as w

        self.slider = w.IntSlider(value=0, min=0, max=max(len(self) - 1, 0), description="slice",
                                  continuous_update=False).add_class("explorer-slice")
        self.code = w.Dropdown(options=self._code_options(0), value=NO_CODE, description="code"
                               ).add_class("explorer-code")
        self.state = self.view(0)
        self.image = w.Image(value=self.render_png(self.state), format="png").add_class("explorer-image")
        syncing = False

        height, width = self.indices.shape[1:]
        small = w.Layout(width="150px")
        self.edit_row = w.BoundedIntText(value=height // 2, min=0, max=height - 1, description="row", layout=small
                                         ).add_class("explorer-edit-row")
        self.edit_col = w.BoundedIntText(value=width // 2, min=0, max=width - 1, description="col", layout=small
                                         ).add_class("explorer-edit-col")
        self.edit_code = w.BoundedIntText(value=0, min=0, max=self.n_codes - 1, description="new code",
                                          style={"description_width": "initial"}, layout=small
                                          ).add_class("explorer-edit-code")
        self.edit_button = w.Button(description="apply", layout=w.Layout(width="auto")).add_class("explorer-edit-apply")
        placeholder = Figure(figsize=(10.5, 2.2))
        placeholder.text(0.5, 0.5, "choose a cell and a code, then apply", ha="center", va="center", fontsize=10,
                         color="grey")
        waiting = _png(placeholder)
        self.edit_image = w.Image(value=waiting, format="png").add_class("explorer-edit-image")
        self.edit_state = None

        def chosen() -> int | None:
            value = self.code.value
            return None if value is None or value == NO_CODE else int(value)

        def render() -> None:
            self.state = self.view(self.slider.value, chosen())
            self.image.value = self.render_png(self.state)

        def on_slice(change) -> None:
            nonlocal syncing
            keep = chosen()
            options = self._code_options(change["new"])
            syncing = True  # replacing the options fires value changes: render once, below
            try:
                self.code.options = options
                self.code.value = keep if keep in {v for _, v in options[1:]} else NO_CODE
            finally:
                syncing = False
            render()
            if self.edit_state is not None:
                self.edit_state = None
                self.edit_image.value = waiting

        def on_code(change) -> None:
            if not syncing:
                render()

        def on_edit(_) -> None:
            self.edit_state = self.edit_view(self.slider.value, self.edit_row.value, self.edit_col.value,
                                             self.edit_code.value)
            self.edit_image.value = self.render_edit(self.edit_state)

        self.slider.observe(on_slice, names="value")
        self.code.observe(on_code, names="value")
        self.edit_button.on_click(on_edit)
        edit = w.VBox([w.HTML("<b>Edit</b> one cell of the index map (on screen rows count from the left, columns "
                              "from the bottom) and see what the decoder makes of it"),
                       w.HBox([self.edit_row, self.edit_col, self.edit_code, self.edit_button]), self.edit_image])
        return w.VBox([w.HBox([self.slider, self.code]), self.image, edit])


def explorer_grid(explorer: CodebookExplorer, indices: Sequence[int],
                  path: str | Path | None) -> plt.Figure:
    """The static explorer figure: one row per chosen slice; image, code index map (each code by the intensity it
    decodes to, on the colour bar below), reconstruction.

    Reconstruction titles carry the slice's SSIM against the image (`metrics.ssim_psnr`).
    """
    if len(indices) == 0:
        raise ValueError("explorer_grid needs at least one slice index")
    rows = [explorer.view(i) for i in indices]
    ssims, _ = metrics.ssim_psnr(np.stack([r["recon"] for r in rows]), np.stack([r["image"] for r in rows]))
    fig, axes = plt.subplots(len(rows), 3, figsize=(8.4, 1.75 * len(rows) + 0.8), squeeze=False, layout="constrained")
    for ax_row, state, ssim in zip(axes, rows, ssims):
        image, recon = state["image"], state["recon"]
        vmax = _vmax(image)
        ax_row[0].imshow(viz.oriented(image), cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        ax_row[0].set_title(state["name"], fontsize=9)
        ax_row[1].imshow(viz.oriented(explorer.index_map(state["indices"])), interpolation="nearest")
        ax_row[1].set_title(f"code indices ({len(state['codes_in_slice'])} codes)", fontsize=9)
        ax_row[2].imshow(viz.oriented(recon), cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        ax_row[2].set_title(f"reconstruction (SSIM {ssim:.3f})", fontsize=9)
        for ax in ax_row:
            viz.bare(ax)
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), INTENSITY_CMAP), ax=axes[:, 1], location="bottom",
                       fraction=0.08, aspect=30)
    bar.set_label("code coloured by the mean intensity it decodes to", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return viz.save(fig, path)


class SamplerPanel:
    """New slices from a VQ-VAE's prior, and completions of real slices from a kept part of their code map.

    generator: a `prior.SliceGenerator`. images: (N, H, W) float in [0, 1], the real slices to complete. names:
    N slice names (default "slice i"). bins: (N,) their slice-position bins (`prior.position_bins`), the bin
    each slice is completed at (default bin 0). After construction: `maps` (N, h, w) int64, the slices' index
    maps. Rows are latent rows, each H / h pixel rows; on screen (`viz.oriented`) they are columns, so the kept
    part of a completion is the left of each picture.
    """

    def __init__(self, generator: SliceGenerator, images: np.ndarray, names: Sequence[str] | None = None,
                 bins: np.ndarray | None = None):
        images, names = _slices_and_names(images, names)
        if bins is not None and len(bins) != len(images):
            raise ValueError(f"{len(bins)} position bins for {len(images)} images")
        self.generator = generator
        self.images = images
        self.names = names
        self.bins = None if bins is None else np.asarray(bins, dtype=np.int64)
        self.maps = generator.encode(images)
        if self.maps.shape[1:] != generator.latent_shape:
            raise ValueError(f"{images.shape[1]} x {images.shape[2]} slices give {self.maps.shape[1:]} maps, the "
                             f"prior models {generator.latent_shape}")

    def __len__(self) -> int:
        return len(self.images)

    def _caption(self, b: int) -> str:
        return f"bin {b} of {self.generator.positions}" if self.generator.positions else "unconditioned"

    def sample_view(self, temperature: float = 1.0, position: int | None = None, seed: int = 0,
                    n: int = SAMPLES) -> dict:
        """n new slices at slice-position bin `position` (None: each bin drawn at random with the seed).

        Keys: images (n, H, W) float32; maps (n, h, w) int64; bins (n,); captions (one per slice, with its bin);
        temperature, position, seed.
        """
        images, maps, bins = self.generator.sample(n, position=position, seed=seed, temperature=temperature)
        return {"images": images, "maps": maps, "bins": bins, "captions": [self._caption(b) for b in bins],
                "temperature": temperature, "position": position, "seed": seed}

    def complete_view(self, index: int, rows: int, seed: int = 0, n: int = COMPLETIONS, temperature: float = 1.0
                      ) -> dict:
        """Slice `index` with its first `rows` latent rows kept and n completions of the rest.

        Keys: index, name, rows, cut (the first dropped pixel row, rows * H / h), position (the bin the prior
        completes at), seed, temperature; image (H, W) the real slice; map (h, w) its index map; kept (H, W)
        float32 its reconstruction with the dropped pixel rows NaN; images (n, H, W), maps (n, h, w) the
        completions (maps[:, :rows] == map[:rows]).
        """
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"slice {index} outside [0, {len(self)})")
        index %= len(self)
        height = self.generator.latent_shape[0]
        if not 0 <= rows <= height:
            raise ValueError(f"rows must be in [0, {height}] (latent rows kept), got {rows}")
        position = 0 if self.bins is None else int(self.bins[index])
        images, maps = self.generator.complete(self.maps[index], rows, n, position=position, seed=seed,
                                               temperature=temperature)
        cut = rows * self.images.shape[1] // height
        kept = self.generator.decode(self.maps[index:index + 1])[0]
        kept[cut:] = np.nan
        return {"index": index, "name": self.names[index], "rows": rows, "cut": cut, "position": position,
                "seed": seed, "temperature": temperature, "image": self.images[index], "map": self.maps[index],
                "kept": kept, "images": images, "maps": maps}

    def _draw_samples(self, fig: Figure, state: dict) -> Figure:
        """One row: each sample with its bin."""
        axes = np.atleast_1d(fig.subplots(1, len(state["images"])))
        for ax, image, caption in zip(axes, state["images"], state["captions"]):
            ax.imshow(viz.oriented(image), cmap="gray", vmin=0, vmax=_vmax(image), interpolation="nearest")
            ax.set_title(caption, fontsize=9)
            viz.bare(ax)
        fig.suptitle(f"temperature {state['temperature']:.2f}, seed {state['seed']}", fontsize=9)
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.76, wspace=0.08)
        return fig

    def _draw_completion(self, fig: Figure, state: dict) -> Figure:
        """One row: the real slice, what is kept of its reconstruction, the completions; a line at the cut."""
        n = len(state["images"])
        axes = fig.subplots(1, n + 2)
        vmax = _vmax(state["image"])
        gray = plt.get_cmap("gray").with_extremes(bad=BLANK)
        height = self.generator.latent_shape[0]
        panels = [(state["image"], f"real ({self._caption(state['position'])})"),
                  (state["kept"], f"{state['rows']} of {height} rows kept")]
        panels += [(image, f"completion {i + 1}") for i, image in enumerate(state["images"])]
        for k, (ax, (image, title)) in enumerate(zip(axes, panels)):
            ax.imshow(viz.oriented(image), cmap=gray, vmin=0, vmax=vmax, interpolation="nearest")
            if k:
                ax.axvline(state["cut"] - 0.5, color=HIGHLIGHT, linewidth=1)
            ax.set_title(title, fontsize=9)
            viz.bare(ax)
        fig.suptitle(f"{state['name']}: temperature {state['temperature']:.2f}, seed {state['seed']}", fontsize=9)
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.76, wspace=0.08)
        return fig

    @staticmethod
    def _figure(panels: int) -> Figure:
        return Figure(figsize=(PANEL_SIZE[0] * panels, PANEL_SIZE[1]))

    def render_sample(self, state: dict) -> bytes:
        """PNG bytes of a `sample_view` state, drawn off-screen."""
        return _png(self._draw_samples(self._figure(len(state["images"])), state))

    def render_completion(self, state: dict) -> bytes:
        """PNG bytes of a `complete_view` state, drawn off-screen."""
        return _png(self._draw_completion(self._figure(len(state["images"]) + 2), state))

    def static_png(self) -> bytes:
        """PNG bytes of what the widget's first "sample" click shows: temperature 1, bins drawn at random, seed 0."""
        return self.render_sample(self.sample_view())

    def _placeholder(self, text: str, panels: int) -> bytes:
        fig = self._figure(panels)
        fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, color="grey")
        return _png(fig)

    def widget(self, slider: ipywidgets.IntSlider | None = None) -> ipywidgets.VBox:
        """A "Sample" box and a "Complete" box (ipywidgets.VBox), each with a button that renders into its picture.

        Sample: self.temperature (FloatSlider), self.position (Dropdown; RANDOM: drawn bins), self.seed
        (BoundedIntText), self.sample_button, self.sample_image. Complete: self.rows (IntSlider, latent rows kept,
        0 .. h), self.complete_button and self.complete_image, on the slice of `slider` (the explorer's; default an
        own one, shown in the box), set as self.slider. Both buttons use the temperature and the seed, and advance
        the seed by one so the next click draws new slices; a new slice clears the completion. self.sample_state
        and self.complete_state hold the last views (None before the first click). CSS classes for a page driver:
        sampler-sample, sampler-sample-image, sampler-rows, sampler-complete, sampler-complete-image.
        """
        import ipywidgets as w

        if slider is not None and (slider.min < 0 or slider.max >= len(self)):
            raise ValueError(f"the slider reaches slices {slider.min} .. {slider.max}, the panel has {len(self)}")
        own = slider is None
        self.slider = w.IntSlider(value=0, min=0, max=max(len(self) - 1, 0), description="slice",
                                  continuous_update=False) if own else slider
        label = {"description_width": "initial"}  # descriptions in full, not clipped
        self.temperature = w.FloatSlider(value=1.0, min=0.5, max=1.5, step=0.05, description="temperature",
                                         continuous_update=False, style=label)
        bins = [(f"bin {b}", b) for b in range(self.generator.positions)]
        self.position = w.Dropdown(options=[("random", RANDOM)] + bins, value=RANDOM, description="position",
                                   style=label, layout=w.Layout(width="170px"))
        self.seed = w.BoundedIntText(value=0, min=0, max=2**31 - 1, description="seed", style=label,
                                     layout=w.Layout(width="160px"))
        self.sample_button = w.Button(description="sample", layout=w.Layout(width="auto")).add_class("sampler-sample")
        self.sample_image = w.Image(value=self._placeholder("press sample", SAMPLES), format="png"
                                    ).add_class("sampler-sample-image")
        self.rows = w.IntSlider(value=self.generator.latent_shape[0] // 2, min=0, max=self.generator.latent_shape[0],
                                description="rows kept", continuous_update=False, style=label).add_class("sampler-rows")
        self.complete_button = w.Button(description="complete from this row", layout=w.Layout(width="auto")
                                        ).add_class("sampler-complete")
        waiting = self._placeholder("press complete from this row", COMPLETIONS + 2)
        self.complete_image = w.Image(value=waiting, format="png").add_class("sampler-complete-image")
        self.sample_state = self.complete_state = None

        def next_seed() -> int:
            seed = self.seed.value
            self.seed.value = min(seed + 1, self.seed.max)
            return seed

        def on_sample(_) -> None:
            position = None if self.position.value == RANDOM else self.position.value
            self.sample_state = self.sample_view(self.temperature.value, position, next_seed())
            self.sample_image.value = self.render_sample(self.sample_state)

        def on_complete(_) -> None:
            self.complete_state = self.complete_view(self.slider.value, self.rows.value, next_seed(),
                                                     temperature=self.temperature.value)
            self.complete_image.value = self.render_completion(self.complete_state)

        def on_slice(_) -> None:
            if self.complete_state is not None:
                self.complete_state = None
                self.complete_image.value = waiting

        self.sample_button.on_click(on_sample)
        self.complete_button.on_click(on_complete)
        self.slider.observe(on_slice, names="value")
        sample = w.VBox([w.HTML("<b>Sample</b> new slices from the prior"),
                         w.HBox([self.temperature, self.position, self.seed, self.sample_button]), self.sample_image])
        complete = w.VBox([w.HTML("<b>Complete</b> the slice from its first code rows"),
                           w.HBox(([self.slider] if own else []) + [self.rows, self.complete_button]),
                           self.complete_image])
        return w.VBox([sample, complete])
