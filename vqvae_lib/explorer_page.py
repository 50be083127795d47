"""The codebook explorer as a standalone web page, served by Voilà (`make explorer`).

The page is `notebooks/explorer_app.py`: it displays `app()`, the explorer widget of `vqvae_lib.explorer` on
the test split of $EXPLORER_DATA_DIR (default data/phantom) with the VQ-VAE of $EXPLORER_CHECKPOINT (default
checkpoints/default.pt), computed on $EXPLORER_DEVICE (default cpu, so the page shows the same pictures on any
machine); relative paths are taken from the repository root. Below it, linked to the explorer's slice slider,
the sampler panel (`explorer.SamplerPanel`) draws new slices and completes the current one with the VQ-VAE of
$EXPLORER_GEN_CHECKPOINT (default checkpoints/gen_8x.pt) and the prior of $EXPLORER_PRIOR (default
checkpoints/transformer_gen.pt), on the same split; when they cannot be loaded the page says why in its place
and the explorer works on. The functions below the app drive the page in a browser (the end-to-end test and
the README screenshot use them), and

    python -m vqvae_lib.explorer_page serve [--port N]
    python -m vqvae_lib.explorer_page screenshot PATH

serve the page until Ctrl-C, or write a screenshot of it.
"""

from __future__ import annotations

import argparse
import html
import io
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import checkpoint, data, pageserver, prior, runner, train
from .explorer import CodebookExplorer, SamplerPanel

if TYPE_CHECKING:
    from collections.abc import Callable

    import ipywidgets
    from playwright.sync_api import Page

DATA_ENV, DEFAULT_DATA = "EXPLORER_DATA_DIR", "data/phantom"
CHECKPOINT_ENV, DEFAULT_CHECKPOINT = "EXPLORER_CHECKPOINT", "checkpoints/default.pt"
DEVICE_ENV, DEFAULT_DEVICE = "EXPLORER_DEVICE", "cpu"  # a page is light work; cpu gives the same picture anywhere
GEN_CHECKPOINT_ENV, DEFAULT_GEN_CHECKPOINT = "EXPLORER_GEN_CHECKPOINT", "checkpoints/gen_8x.pt"
PRIOR_ENV, DEFAULT_PRIOR = "EXPLORER_PRIOR", "checkpoints/transformer_gen.pt"
APP = runner.NOTEBOOK_DIR / "explorer_app.py"
SPLIT = "test"
# The widgets of CodebookExplorer.widget() and SamplerPanel.widget() in the ipywidgets 8 front end.
SLIDER = ".explorer-slice"
SLIDER_HANDLE = f"{SLIDER} .noUi-handle"
CODE_SELECT = ".explorer-code select"
IMAGE = "img.explorer-image"
ERROR = ".explorer-error"
EDIT_ROW, EDIT_COL, EDIT_CODE = ".explorer-edit-row input", ".explorer-edit-col input", ".explorer-edit-code input"
EDIT_BUTTON = "button.explorer-edit-apply"
EDIT_IMAGE = "img.explorer-edit-image"
SAMPLE_BUTTON = "button.sampler-sample"
SAMPLE_IMAGE = "img.sampler-sample-image"
ROWS = ".sampler-rows"
COMPLETE_BUTTON = "button.sampler-complete"
COMPLETION_IMAGE = "img.sampler-complete-image"
SAMPLER_ERROR = ".sampler-error"


def resolve(value: str | None, default: str) -> Path:
    """A path from an environment variable (or its default); relative ones are taken from the repository."""
    return runner.in_repo(value or default)


def inputs(environ: dict[str, str] | None = None) -> tuple[Path, Path, str]:
    """The page's (data folder, checkpoint, device) from the environment."""
    environ = os.environ if environ is None else environ
    return (resolve(environ.get(DATA_ENV), DEFAULT_DATA),
            resolve(environ.get(CHECKPOINT_ENV), DEFAULT_CHECKPOINT), environ.get(DEVICE_ENV) or DEFAULT_DEVICE)


def generator_inputs(environ: dict[str, str] | None = None) -> tuple[Path, Path]:
    """The sampler panel's (VQ-VAE checkpoint, prior checkpoint) from the environment."""
    environ = os.environ if environ is None else environ
    return (resolve(environ.get(GEN_CHECKPOINT_ENV), DEFAULT_GEN_CHECKPOINT),
            resolve(environ.get(PRIOR_ENV), DEFAULT_PRIOR))


def load_explorer(data_dir: Path, checkpoint_path: Path, device: str = DEFAULT_DEVICE
                  ) -> tuple[CodebookExplorer, int]:
    """The explorer over the test split and the slice the page starts on (the middle of the first scan)."""
    dev = train.select_device(device)
    model, _ = checkpoint.load_model(checkpoint_path, map_location=dev)
    split = data.load_split(data_dir, SPLIT, progress=False)
    explorer = CodebookExplorer(model, np.asarray(split.images), [f.name for f in split.files], device=dev)
    first = [i for i, f in enumerate(split.files) if (f.case, f.week) == (split.files[0].case, split.files[0].week)]
    return explorer, first[len(first) // 2]


def load_sampler(data_dir: Path, gen_path: Path, prior_path: Path, device: str = DEFAULT_DEVICE) -> SamplerPanel:
    """The sampler panel over the test split: completions at each slice's own position bin."""
    generator = prior.load_generator(gen_path, prior_path, device)
    split = data.load_split(data_dir, SPLIT, progress=False)
    return SamplerPanel(generator, np.asarray(split.images), [f.name for f in split.files],
                        prior.position_bins(split, generator.positions))


def _sampler(data_dir: Path, device: str, slider: ipywidgets.IntSlider) -> ipywidgets.Widget:
    """The sampler panel on the explorer's slider, or the reason it cannot be built (an HTML widget)."""
    import ipywidgets as w

    gen_path, prior_path = generator_inputs()
    try:
        return load_sampler(data_dir, gen_path, prior_path, device).widget(slider)
    except (OSError, ValueError, RuntimeError) as e:
        hint = (f"VQ-VAE: {gen_path} (set {GEN_CHECKPOINT_ENV}). Prior trained on its codes: {prior_path} (set "
                f"{PRIOR_ENV}).")
        return w.HTML(f'<div class="sampler-error" style="color: #b00020"><b>The sampler cannot start:</b> '
                      f"{html.escape(str(e))}<br>{html.escape(hint)}</div>")


def app() -> ipywidgets.Widget:
    """The page's content: the explorer widget and below it the sampler panel (or the reason it cannot be built),
    or the reason the explorer cannot be built (an HTML widget)."""
    import ipywidgets as w

    data_dir, checkpoint_path, device = inputs()
    try:
        explorer, start = load_explorer(data_dir, checkpoint_path, device)
    except (OSError, ValueError, RuntimeError) as e:
        hint = (f"Data folder: {data_dir} (set {DATA_ENV}; `make data/phantom/PHANTOM.json` writes the default "
                f"phantom). Checkpoint: {checkpoint_path} (set {CHECKPOINT_ENV}). Device: {device} (set "
                f"{DEVICE_ENV}).")
        return w.HTML(f'<div class="explorer-error" style="color: #b00020"><b>The explorer cannot start:</b> '
                      f"{html.escape(str(e))}<br>{html.escape(hint)}</div>")
    box = explorer.widget()
    explorer.slider.value = start
    return w.VBox([box, _sampler(data_dir, device, explorer.slider)])


def notebook(build: Path = runner.REPO / "build") -> Path:
    """The page as an .ipynb for Voilà, in build/ipynb (the jupytext source is never modified)."""
    return runner.to_ipynb(APP, build / "ipynb")


def open_page(page: Page, url: str, timeout_ms: float = 120_000) -> None:
    """Load the page and wait until the explorer's picture (or its error text) is shown."""
    page.goto(url, timeout=timeout_ms)  # Voilà answers once the page's notebook has run
    page.wait_for_selector(f"{IMAGE}[src], {ERROR}", timeout=timeout_ms)
    if page.locator(ERROR).count():
        raise RuntimeError(f"the explorer page shows an error: {page.locator(ERROR).inner_text()}")


def image_png(page: Page, image: str = IMAGE) -> bytes:
    """The PNG bytes a picture of the page shows (the explorer's, or the one `image` selects), fetched inside the
    page from the Image widget's blob: URL."""
    data_ = page.eval_on_selector(
        image, "async img => Array.from(new Uint8Array(await (await fetch(img.src)).arrayBuffer()))")
    return bytes(data_)


def _await_new_picture(page: Page, before: str, timeout_ms: float, image: str = IMAGE) -> None:
    page.wait_for_function("([sel, old]) => document.querySelector(sel).src !== old", arg=[image, before],
                           timeout=timeout_ms)


def step_slider(page: Page, key: str = "ArrowRight", timeout_ms: float = 60_000) -> None:
    """Move the slice slider with the keyboard on its handle (ArrowRight: next slice) and wait for the new
    picture."""
    before = page.get_attribute(IMAGE, "src")
    page.focus(SLIDER_HANDLE)
    page.keyboard.press(key)
    _await_new_picture(page, before, timeout_ms)


def code_labels(page: Page) -> list[str]:
    """The code dropdown's entries as shown ("no code", "code 337 (301 cells)", ...)."""
    return [t.replace("\xa0", " ") for t in page.eval_on_selector(CODE_SELECT, "s => [...s.options].map(o => o.text)")]


def choose_code(page: Page, code: int, timeout_ms: float = 60_000) -> None:
    """Choose `code` in the code dropdown and wait for the new picture."""
    before = page.get_attribute(IMAGE, "src")
    labels = code_labels(page)
    index = next((i for i, label in enumerate(labels) if label.startswith(f"code {code} (")), None)
    if index is None:
        raise ValueError(f"code {code} is not in the dropdown of the current slice: {labels}")
    page.select_option(CODE_SELECT, index=index)
    _await_new_picture(page, before, timeout_ms)


def _enter(page: Page, box: str, value: int, shown: Callable[[str], str]) -> None:
    """Type `value` into `box` and press Enter; ValueError if `shown(box)` then reads another number (the value
    was outside the control's range)."""
    page.fill(box, str(value))
    page.press(box, "Enter")
    if shown(box) != str(value):
        raise ValueError(f"{box} shows {shown(box)} after typing {value}: outside its range?")


def _click_for_picture(page: Page, button: str, image: str, timeout_ms: float) -> None:
    """Click `button` and wait until the picture `image` is replaced."""
    before = page.get_attribute(image, "src")
    page.click(button)
    _await_new_picture(page, before, timeout_ms, image)


def edit_cell(page: Page, row: int, col: int, code: int, timeout_ms: float = 60_000) -> None:
    """Type a latent cell (row, col) and a code into the editor, click "apply" and wait for the edit's picture;
    ValueError if a box shows another number than typed (outside its range)."""
    for box, value in ((EDIT_ROW, row), (EDIT_COL, col), (EDIT_CODE, code)):
        _enter(page, box, value, page.input_value)
    _click_for_picture(page, EDIT_BUTTON, EDIT_IMAGE, timeout_ms)


def click_sample(page: Page, timeout_ms: float = 120_000) -> None:
    """Click the sampler's "sample" button and wait for the new samples' picture."""
    _click_for_picture(page, SAMPLE_BUTTON, SAMPLE_IMAGE, timeout_ms)


def complete_from_row(page: Page, rows: int, timeout_ms: float = 120_000) -> None:
    """Set the latent rows kept (typed into the slider's readout), click "complete from this row" and wait for
    the new completions' picture; ValueError if the slider shows another number (outside its range)."""
    _enter(page, f"{ROWS} .widget-readout", rows, page.inner_text)
    _click_for_picture(page, COMPLETE_BUTTON, COMPLETION_IMAGE, timeout_ms)


def screenshot(path: Path, data_dir: Path, checkpoint_path: Path, device: str = DEFAULT_DEVICE) -> Path:
    """A screenshot of the page (metadata-free PNG) moved one slice on from the start, with the code that
    slice uses most inside the body chosen."""
    from PIL import Image

    explorer, start = load_explorer(data_dir, checkpoint_path, device)
    env = {DATA_ENV: str(data_dir), CHECKPOINT_ENV: str(checkpoint_path), DEVICE_ENV: device}
    nb = notebook()
    with open(nb.with_suffix(".log"), "w") as log, pageserver.serve(nb, env=env, log=log) as server, \
            pageserver.chromium() as browser:
        page = browser.new_page(viewport={"width": 1000, "height": 430})  # grows to the page's full height
        open_page(page, server.url)
        step_slider(page)
        choose_code(page, explorer.body_code(start + 1))
        png = page.screenshot(full_page=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(io.BytesIO(png)).save(path, optimize=True)  # PIL writes no text chunks
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqvae_lib.explorer_page", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the page on 127.0.0.1 until Ctrl-C")
    serve.add_argument("--port", type=int, help="default: a free port")
    shot = sub.add_parser("screenshot", help="write a PNG screenshot of the page")
    shot.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    data_dir, checkpoint_path, device = inputs()
    if args.command == "screenshot":
        print(f"wrote {screenshot(args.path, data_dir, checkpoint_path, device)}")
        return 0
    env = {DATA_ENV: str(data_dir), CHECKPOINT_ENV: str(checkpoint_path), DEVICE_ENV: device}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server on `kill` too, not only on Ctrl-C
    with pageserver.serve(notebook(), port=args.port, env=env) as server:
        print(f"\nThe codebook explorer ({data_dir}, {checkpoint_path}) is at\n\n    {server.url}\n\n"
              "open it in a browser; Ctrl-C stops the server.\n", flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            return 0
    return server.process.returncode


if __name__ == "__main__":
    sys.exit(main())
