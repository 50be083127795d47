"""End to end in a headless Chromium: the explorer's Voilà page, and the series in `python make.py lab`.

The page is served from notebooks/explorer_app.py on the tiny phantom with the committed checkpoint, its
sampler panel with a tiny VQ-VAE and prior trained here. The test moves the slice slider and chooses a code in
the browser, and checks each time that the picture the page shows is the one CodebookExplorer renders in this
process for that state, and that the chosen code's cells, and only those, are drawn in the highlight colour on
the page's index map; it edits one cell's code (row, column and code typed in, "apply" clicked) and checks the
edit's picture the same way; then it clicks "sample" twice and "complete from this row" on the slice it moved to, and
checks each new picture against SamplerPanel's rendering here. Without a Chromium (or Chrome) the tests are
skipped, saying so; with HIPMRI_REQUIRE_BROWSER=1 (as in CI) they fail instead.
"""

import io
import secrets
import sys
import urllib.error
import urllib.request

import numpy as np
import psutil
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from vqvae_lib import explorer_page, pageserver, runner, viz
from vqvae_lib.explorer import HIGHLIGHT, WIDGET_DPI, CodebookExplorer

from test_explorer import tiny_generator

CHECKPOINT = runner.REPO / "checkpoints" / "default.pt"


pytestmark = pytest.mark.usefixtures("chromium_found")


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _assert_same_picture(shown: bytes, expected: bytes) -> None:
    """The page's PNG is the Python rendering: identical, or (other float rounding in the kernel) nearly so."""
    if shown == expected:
        return
    a, b = _pixels(shown), _pixels(expected)
    assert a.shape == b.shape
    off = np.abs(a - b).max(axis=2) > 2
    assert off.mean() < 1e-3, f"{off.sum()} of {off.size} pixels differ from the Python rendering"


def _index_map_cells(explorer: CodebookExplorer, state: dict, png: bytes) -> np.ndarray:
    """(h', w', 3) colours of the page's index-map panel at each latent cell's centre, in display orientation."""
    fig = Figure(figsize=(10.5, 2.0), dpi=WIDGET_DPI)  # the figure render_png draws, to find the panel
    explorer._draw(fig, state)
    FigureCanvasAgg(fig).draw()
    h, w = viz.oriented(state["indices"]).shape
    cols, rows = np.meshgrid(np.arange(w), np.arange(h))
    x, y = fig.axes[1].transData.transform(np.column_stack([cols.ravel(), rows.ravel()])).T
    pixels = _pixels(png)
    assert pixels.shape[:2] == (round(fig.bbox.height), round(fig.bbox.width))
    return pixels[(fig.bbox.height - y).astype(int), x.astype(int)].reshape(h, w, 3)


def _highlighted(cells: np.ndarray) -> np.ndarray:
    return (np.abs(cells - np.round(HIGHLIGHT * 255)) <= 1).all(axis=2)


@pytest.fixture(scope="module")
def reference(tiny_phantom):
    """The explorer in this process, on the page's data, and the slice the page starts on."""
    return explorer_page.load_explorer(tiny_phantom, CHECKPOINT, device="cpu")


@pytest.fixture(scope="module")
def generator(tiny_phantom, tmp_path_factory):
    """The sampler panel's (VQ-VAE, prior) checkpoints."""
    return tiny_generator(tiny_phantom, tmp_path_factory.getbasetemp())


def test_the_explorer_page_in_chromium(tiny_phantom, reference, generator, tmp_path, capsys):
    explorer, start = reference
    sampler = explorer_page.load_sampler(tiny_phantom, *generator, "cpu")
    env = {explorer_page.DATA_ENV: str(tiny_phantom), explorer_page.CHECKPOINT_ENV: str(CHECKPOINT),
           explorer_page.GEN_CHECKPOINT_ENV: str(generator[0]), explorer_page.PRIOR_ENV: str(generator[1])}
    with open(tmp_path / "voila.log", "w") as log, \
            pageserver.serve(explorer_page.notebook(tmp_path), env=env, log=log) as server:
        process = psutil.Process(server.process.pid)
        listening = [c.laddr for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == pageserver.HOST for addr in listening)
        with urllib.request.urlopen(server.base, timeout=30) as answer:  # no token: sent to the login page
            assert answer.url.startswith(f"{server.base}login")

        with pageserver.chromium() as browser:
            page = browser.new_page(viewport={"width": 1000, "height": 600})
            explorer_page.open_page(page, server.url)
            kernels = process.children(recursive=True)
            assert kernels, "Voilà started no kernel"
            assert pageserver.showing(server.token) == [], "the token is on a command line"
            assert "import" not in page.inner_text("body")  # the page shows no code
            assert page.locator(".cm-editor, .jp-CodeMirrorEditor").count() == 0
            first = explorer_page.image_png(page)
            _assert_same_picture(first, explorer.render_png(explorer.view(start)))
            assert not _highlighted(_index_map_cells(explorer, explorer.view(start), first)).any()

            explorer_page.step_slider(page)  # ArrowRight on the slider's handle
            k = start + 1
            assert page.inner_text(f"{explorer_page.SLIDER} .widget-readout") == str(k)
            moved = explorer_page.image_png(page)
            assert moved != first
            _assert_same_picture(moved, explorer.render_png(explorer.view(k)))

            codes = explorer.codes_by_use(k)
            code = codes[len(codes) // 4][0]  # used, but not everywhere
            explorer_page.choose_code(page, code)
            state = explorer.view(k, code)
            chosen = explorer_page.image_png(page)
            assert chosen != moved
            _assert_same_picture(chosen, explorer.render_png(state))
            shown = _highlighted(_index_map_cells(explorer, state, chosen))
            np.testing.assert_array_equal(shown, viz.oriented(explorer.indices[k] == code))
            assert shown.sum() == state["usage"] > 0

            row, col = explorer.indices.shape[1] // 3, explorer.indices.shape[2] // 2
            new = code if code != explorer.indices[k, row, col] else (code + 1) % explorer.n_codes
            waiting = explorer_page.image_png(page, explorer_page.EDIT_IMAGE)
            explorer_page.edit_cell(page, row, col, new)
            edited = explorer_page.image_png(page, explorer_page.EDIT_IMAGE)
            assert edited != waiting
            edit = explorer.edit_view(k, row, col, new)
            assert edit["difference"].any()
            _assert_same_picture(edited, explorer.render_edit(edit))

            assert page.locator(explorer_page.SAMPLER_ERROR).count() == 0
            pictures = [explorer_page.image_png(page, explorer_page.SAMPLE_IMAGE)]
            for seed in (0, 1):  # each click draws with the seed shown, then advances it
                explorer_page.click_sample(page)
                pictures.append(explorer_page.image_png(page, explorer_page.SAMPLE_IMAGE))
                assert pictures[-1] != pictures[-2]
                _assert_same_picture(pictures[-1], sampler.render_sample(sampler.sample_view(1.0, None, seed)))
            rows = 5
            waiting = explorer_page.image_png(page, explorer_page.COMPLETION_IMAGE)
            explorer_page.complete_from_row(page, rows)
            completed = explorer_page.image_png(page, explorer_page.COMPLETION_IMAGE)
            assert completed != waiting
            _assert_same_picture(completed, sampler.render_completion(sampler.complete_view(k, rows, seed=2)))
            np.testing.assert_array_equal(sampler.images[k], explorer.images[k])  # the same slice as the explorer's
            version = browser.version
    assert server.process.poll() is not None, "Voilà still runs"
    assert not [p for p in kernels if p.is_running()], "a kernel outlived the server"
    with capsys.disabled():
        print(f"\nbrowser test: executed in Chromium {version} against Voilà on {server.base}: slider moved to "
              f"slice {k}, code {code} chosen ({state['usage']} cells highlighted), cell ({row}, {col}) set to code "
              f"{new}, sampled twice, completed from row {rows}")


def test_lab_opens_a_script_as_a_notebook_with_live_widgets(tiny_phantom, reference, tmp_path, capsys):
    """`python make.py lab` (no make) on a copy of the page's script (JupyterLab writes checkpoints beside what
    it opens)."""
    explorer, start = reference
    root = tmp_path / "lab"
    (root / "notebooks").mkdir(parents=True)
    script = root / "notebooks" / explorer_page.APP.name
    script.write_bytes(explorer_page.APP.read_bytes())
    port, token = pageserver.free_port(), secrets.token_hex(24)
    lab_args = ["--no-browser", f"--port={port}", "--ServerApp.port_retries=0"]
    env = {pageserver.TOKEN_ENV: token,  # not on the command line, which `ps` shows every user
           explorer_page.DATA_ENV: str(tiny_phantom), explorer_page.CHECKPOINT_ENV: str(CHECKPOINT),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),  # not the user's own settings
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "run")}
    command = [sys.executable, str(runner.REPO / "make.py"), "lab", "--lab-dir", str(root), "--", *lab_args]
    with open(tmp_path / "lab.log", "w") as log, pageserver.run_server(command, port, env=env, log=log), \
            pageserver.chromium() as browser:
        with pytest.raises(urllib.error.HTTPError, match="403"):  # the server took the token from the environment
            urllib.request.urlopen(f"http://{pageserver.HOST}:{port}/api/status", timeout=30)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        try:
            page.goto(f"http://{pageserver.HOST}:{port}/lab/tree/notebooks/{script.name}?token={token}")
            page.wait_for_selector(".jp-NotebookPanel .jp-CodeCell", timeout=120_000)  # a notebook, not an editor
            assert page.locator(".jp-FileEditor").count() == 0
            # the committed kernelspec (python3: the lab's own Python), connected and idle (a cell run before that
            # is not executed)
            page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=120_000)
            page.click(".jp-CodeCell .jp-InputArea-editor")
            page.keyboard.press("Control+Enter")  # run the cell
            page.wait_for_selector(f"{explorer_page.IMAGE}[src]", timeout=120_000)
            assert pageserver.showing(token) == [], "the token is on a command line"
            _assert_same_picture(explorer_page.image_png(page), explorer.render_png(explorer.view(start)))
            explorer_page.step_slider(page)
            _assert_same_picture(explorer_page.image_png(page), explorer.render_png(explorer.view(start + 1)))
        finally:
            page.screenshot(path=tmp_path / "lab.png")  # for a failure's post-mortem
        version = browser.version
    with capsys.disabled():
        print(f"\nbrowser test: `python make.py lab` checked in Chromium {version}: {script.name} opened as a notebook in "
              "JupyterLab, its explorer widget ran and followed the slider")
