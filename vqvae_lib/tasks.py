"""The project's main jobs as Python functions, the same on Linux, macOS and Windows: `figures`, `lab` and
`explorer` (CLI: `hipmri-vqvae figures|lab|explorer`; `make` and `python make.py` call them).

Relative paths are taken from the repository (`runner.in_repo`), not from where the command is run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from . import explorer_page, pageserver, phantom, readme, runner
from .claims import is_default_phantom

DEFAULT_PHANTOM = runner.REPO / "data" / "phantom"
SCREENSHOT = "05_explorer_page.png"
log = logging.getLogger(__name__)


def ensure_phantom(data_dir: Path) -> None:
    """Write the default phantom (small, seed 0) if `data_dir` is its folder and it is absent or unfinished (its
    manifest is written last); any other folder must exist already."""
    if (data_dir / phantom.MANIFEST).is_file():
        return
    if data_dir.resolve() != DEFAULT_PHANTOM.resolve():
        if not data_dir.is_dir():
            raise FileNotFoundError(f"data folder {data_dir} does not exist")
        return
    log.info("writing the default phantom to %s", data_dir)
    phantom.generate(data_dir, seed=0, size="small", force=True)


def figures(data_dir: str | Path = DEFAULT_PHANTOM, fig_dir: str | Path = "figures", build: str | Path = "build",
            *, notebook_dir: str | Path | None = None, smoke: bool = False, seed: int = 0,
            screenshot: bool = True) -> list[Path]:
    """Every figure: the default phantom if absent, every notebook executed (figures to `fig_dir`), then the
    explorer page's screenshot, which needs a Chromium: without one it is skipped with a warning. Returns the
    executed notebooks."""
    data_dir, fig_dir, build = runner.in_repo(data_dir), runner.in_repo(fig_dir), runner.in_repo(build)
    ensure_phantom(data_dir)
    params = {"SMOKE": smoke, "DATA_DIR": str(data_dir), "FIG_DIR": str(fig_dir), "SEED": seed}
    source = runner.in_repo(notebook_dir) if notebook_dir else runner.NOTEBOOK_DIR
    executed = runner.run_all(params, build, source=source)
    if not smoke and fig_dir == runner.in_repo("figures") and is_default_phantom(data_dir):
        for block in ("science", "generation"):
            readme.write_block(block, readme.expected_block(block))
        print(f"updated the science and generation results in {readme.README}")
    if screenshot:
        path = fig_dir / SCREENSHOT
        try:
            checkpoint = runner.in_repo(explorer_page.DEFAULT_CHECKPOINT)
            explorer_page.screenshot(path, data_dir, checkpoint, explorer_page.DEFAULT_DEVICE)
            print(f"wrote {path}")
        except pageserver.BrowserMissing as e:
            log.warning("%s was not regenerated: %s", path, e)
    return executed


def lab(lab_dir: str | Path = ".", args: list[str] | tuple[str, ...] = ()) -> int:
    """JupyterLab on 127.0.0.1 showing `lab_dir`, with the jupytext scripts opening as notebooks; `args`: more
    options for `jupyter lab`. A token goes in $JUPYTER_TOKEN, not in `args` (`ps` shows command lines)."""
    settings = Path(sys.prefix) / "etc" / "jupyter" / "labconfig" / "default_setting_overrides.json"
    try:
        subprocess.run([sys.executable, "-m", "jupytext_config", "--settings-file", str(settings),
                        "set-default-viewer", "python"], check=True)
    except (subprocess.CalledProcessError, OSError):
        log.warning("could not make the notebook viewer the default for .py files in %s: open them with "
                    "right click > Open With > Notebook", settings)
    root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    command = [sys.executable, "-m", "jupyterlab", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.root_dir={runner.in_repo(lab_dir)}", "--LabApp.default_url=/lab/tree/notebooks", *root,
               *args]
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def explorer(port: int | None = None) -> int:
    """The codebook explorer page (notebook 05) served by Voilà on 127.0.0.1 until Ctrl-C; the default phantom
    is written first if the page shows it and it is absent."""
    data_dir, _, _ = explorer_page.inputs()
    ensure_phantom(data_dir)
    return explorer_page.main(["serve"] + ([f"--port={port}"] if port else []))
