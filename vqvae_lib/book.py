"""The series as a static website (`make book`): Sphinx with myst-nb and the book theme renders the notebooks as
`make figures` executed them (BUILD/executed/NN_slug.ipynb; nothing is executed again), with the README as the
front page. The configuration and the site's own CSS/JavaScript are in book/ at the repository's root.

    python -m vqvae_lib book [--executed build/executed] [--out build/book] [--screenshot figures/book_page.png]

The site is OUT/html/ (open OUT/html/index.html, or publish the folder on any static host); OUT/src/ holds the
pages Sphinx was given. Everything a page loads (theme, MathJax, fonts) comes from the installed packages: no
page requests anything from another host, which tests/test_book.py checks in Chromium.
"""

from __future__ import annotations

import functools
import http.server
import io
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import pageserver, runner

CONFIG_DIR = runner.REPO / "book"
README = runner.REPO / "README.md"
DEFAULT_EXECUTED = runner.REPO / "build" / "executed"
DEFAULT_OUT = runner.REPO / "build" / "book"
SCREENSHOT = "book_page.png"
SCREENSHOT_PAGE = "03_vector_quantizer.html"
SCREENSHOT_SECTION = "the-loss-terms"  # the VQ-VAE loss in LaTeX and the stop-gradient diagram
_LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s]+)\)")


def executed_notebooks(executed: Path, source: Path = runner.NOTEBOOK_DIR) -> list[Path]:
    """The executed copy of every numbered notebook, in order; FileNotFoundError naming the first one missing."""
    paths = [executed / f"{script.stem}.ipynb" for script in runner.notebook_paths(source=source)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no executed notebook {path}: run `make figures` first (the site shows the "
                                    "notebooks as it executed them)")
    return paths


def front_page(readme: str, chapters: list[str], repository: str) -> str:
    """The README as the site's front page: links to a notebook's script go to its chapter, links to other files
    of the repository go to them on GitHub, figures stay relative; a table of contents of the chapters follows."""
    def link(match: re.Match) -> str:
        target = match.group(1)
        path, _, anchor = target.partition("#")
        if path.startswith("figures/"):
            return match.group(0)
        stem = Path(path).stem
        if path.startswith("notebooks/") and stem in chapters:
            return f"]({stem}.ipynb{'#' + anchor if anchor else ''})"
        kind = "tree" if path.endswith("/") else "blob"
        return f"]({repository}/{kind}/main/{target})"

    toc = "\n".join(["", "```{toctree}", ":hidden:", ":caption: Chapters", "", *chapters, "```", ""])
    return _LINK.sub(link, readme) + toc


def _replace_site(out: Path) -> None:
    """Clear OUT for a new build, refusing a folder that holds anything but an earlier build of this site."""
    if out.exists() and any(out.iterdir()) and not (out / "html" / ".buildinfo").is_file():
        raise FileExistsError(f"{out} exists and is not a site built by `make book`; choose another --out")
    shutil.rmtree(out, ignore_errors=True)


def build(executed: Path = DEFAULT_EXECUTED, out: Path = DEFAULT_OUT, fig_dir: Path = runner.REPO / "figures",
          source: Path = runner.NOTEBOOK_DIR, quiet: bool = True) -> Path:
    """Build the site from the executed notebooks in `executed` (and the README's figures in `fig_dir`) into
    OUT/html; returns OUT/html/index.html. Sphinx warnings (a broken link, a missing image) fail the build."""
    notebooks = executed_notebooks(executed, source)
    if not fig_dir.is_dir():
        raise FileNotFoundError(f"no figures folder {fig_dir}: run `make figures` first")
    _replace_site(out)
    src, html = out / "src", out / "html"
    shutil.copytree(CONFIG_DIR, src, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(fig_dir, src / "figures")
    for path in notebooks:
        shutil.copy2(path, src / path.name)
    url, _ = runner.repository()
    (src / "index.md").write_text(front_page(README.read_text(encoding="utf-8"), [p.stem for p in notebooks], url),
                                  encoding="utf-8")
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-n", *(["-q"] if quiet else []),
               str(src), str(html)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"sphinx-build failed for {src}:\n{done.stderr.strip() or done.stdout[-3000:]}")
    return html / "index.html"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        pass


@contextmanager
def serve(html: Path) -> Iterator[str]:
    """Serve the built site `html` on 127.0.0.1 (a free port) while in the block; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(html))
    server = http.server.ThreadingHTTPServer((pageserver.HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{pageserver.HOST}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def typeset(tab) -> None:
    """Wait until MathJax has typeset the open page's maths (Sphinx loads it only on pages with maths)."""
    tab.evaluate("""async () => {
        if (!document.querySelector('.math')) return;
        while (!(window.MathJax && MathJax.startup && MathJax.startup.promise))
            await new Promise(done => setTimeout(done, 50));
        await MathJax.startup.promise;
    }""")


def screenshot(html: Path, path: Path, page: str = SCREENSHOT_PAGE, section: str | None = SCREENSHOT_SECTION
               ) -> Path:
    """A PNG screenshot (no metadata) of one page of the built site, 1280x900 pixels from the top of `section`
    (an element id; None: the page's top), maths typeset."""
    from PIL import Image

    if not (html / page).is_file():
        raise FileNotFoundError(f"no page {html / page}: build the site first (`make book`)")
    with serve(html) as url, pageserver.chromium() as browser:
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.goto(url + page, wait_until="networkidle")
        typeset(tab)
        if section:
            if not tab.evaluate("id => { const e = document.getElementById(id); e && e.scrollIntoView(); return !!e; }",
                                section):
                raise ValueError(f"{html / page} has no element with id {section!r}")
            tab.wait_for_timeout(300)  # the theme's scroll-spy settles
        png = tab.screenshot()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(io.BytesIO(png)).save(path, optimize=True)
    return path
