"""The series' website (`make book`): built from the notebooks the tests executed in smoke mode, then read in
headless Chromium: every page loads with no failed request and none leaving 127.0.0.1, every image loads, the
maths is typeset by MathJax, every internal link (and its #anchor) resolves, and the search finds a chapter.
Without a Chromium the browser test is skipped, saying so; with HIPMRI_REQUIRE_BROWSER=1 (as in CI) it fails."""

import re
import urllib.parse
import urllib.request

import jupytext
import pytest

from vqvae_lib import book, pageserver, runner
from vqvae_lib.cli import main

CHAPTERS = [p.stem for p in runner.notebook_paths()]
# The page's text outside code and typeset maths, where a raw `$\beta$` would show that maths was not rendered.
PROSE = """() => { const a = (document.querySelector('article') || document.body).cloneNode(true);
    a.querySelectorAll('pre, code, .math, mjx-container').forEach(e => e.remove()); return a.textContent; }"""


@pytest.mark.parametrize("script", runner.notebook_paths(), ids=lambda p: p.stem[:2])
def test_each_chapter_opens_with_goals_prerequisites_and_run_time(script):
    first = next(c for c in jupytext.read(script).cells if c.cell_type == "markdown").source
    assert first.startswith(f"# {script.stem[:2]} · ")
    goals = first[first.index("You will learn"):first.index("**Prerequisites:**")]
    assert goals.count("\n- ") >= 3, "the learning goals are a list"
    assert "**Expected run time:**" in first and "CPU" in first


@pytest.mark.parametrize("script", runner.notebook_paths(), ids=lambda p: p.stem[:2])
def test_each_question_has_a_hidden_worked_answer(script):
    cells = jupytext.read(script).cells
    start = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and "## Questions" in c.source)
    questions = [c for c in cells[start:] if c.cell_type == "markdown" and "**Question " in c.source]
    assert len(questions) >= 3
    for n, cell in enumerate(questions, 1):
        assert cell.source.count(f"**Question {n}.**") == 1, f"question {n} is not the {n}th"
        answer = cell.source.split("<details><summary>Answer</summary>", 1)
        assert len(answer) == 2 and "</details>" in answer[1], f"question {n} has no hidden answer"
        assert answer[1].split("</details>")[0].strip(), f"question {n}'s answer is empty"
    for cell in cells[start:]:  # computed answers: hidden on the site and collapsed in JupyterLab
        if cell.cell_type == "code":
            assert "hide-cell" in cell.metadata.get("tags", [])
            assert cell.metadata.get("jupyter") == {"source_hidden": True, "outputs_hidden": True}


def test_front_page_links_go_to_chapters_github_or_stay_relative():
    readme = ("See [01](notebooks/01_data_exploration.py), [the data](data/README.md), [binder](binder/), "
              "![shot](figures/a.png), [up](#quick-start) and [paper](https://arxiv.org/abs/1711.00937).")
    page = book.front_page(readme, CHAPTERS, "https://github.com/o/n")
    assert "[01](01_data_exploration.ipynb)" in page
    assert "[the data](https://github.com/o/n/blob/main/data/README.md)" in page
    assert "[binder](https://github.com/o/n/tree/main/binder/)" in page
    assert "![shot](figures/a.png)" in page and "[up](#quick-start)" in page
    assert "[paper](https://arxiv.org/abs/1711.00937)" in page
    toc = page[page.index("```{toctree}"):]
    assert [line for line in toc.splitlines() if line in CHAPTERS] == CHAPTERS


def test_a_missing_executed_notebook_is_named(tmp_path, capsys):
    for stem in CHAPTERS[:3]:
        (tmp_path / f"{stem}.ipynb").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"no executed notebook {tmp_path / CHAPTERS[3]}.ipynb: run `make "
                                                "figures` first"):
        book.build(tmp_path, tmp_path / "site")
    assert not (tmp_path / "site").exists()
    assert main(["book", "--executed", str(tmp_path), "--out", str(tmp_path / "site")]) == 2
    assert f"error: no executed notebook {tmp_path / CHAPTERS[3]}.ipynb" in capsys.readouterr().err


def test_a_folder_that_is_not_a_site_is_never_cleared(executed, tmp_path):
    notebooks, _ = executed
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{mine} exists and is not a site built by `make book`"):
        book.build(notebooks["01"].parent, mine)
    assert (mine / "thesis.tex").read_text() == "mine"


@pytest.fixture(scope="module")
def site(executed, tmp_path_factory):
    """The site built from the smoke-executed notebooks (the README's figures from figures/), built twice: a
    rebuild replaces the first."""
    notebooks, _ = executed
    out = tmp_path_factory.mktemp("book") / "site"
    book.build(notebooks["01"].parent, out)
    (out / "html" / "stale.html").write_text("from the first build")
    index = book.build(notebooks["01"].parent, out)
    assert not (out / "html" / "stale.html").exists()
    return index.parent


def test_every_chapter_is_a_page_in_notebook_order(site):
    assert {f"{stem}.html" for stem in CHAPTERS} <= {p.name for p in site.glob("*.html")}
    index = (site / "index.html").read_text()
    links = [m for m in re.findall(r'href="(\d\d_\w+)\.html"', index)]
    assert list(dict.fromkeys(links)) == CHAPTERS  # the navigation lists them in order
    page = (site / "03_vector_quantizer.html").read_text()
    assert "Prerequisites:" in page and "Expected run time:" in page
    assert "<details>" in page and "<summary>Answer</summary>" in page  # the hidden worked answers
    assert "<img" in page


def _links(tab) -> list[str]:
    return tab.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")


def test_the_site_in_chromium(site, chromium_found):
    pages = sorted(p.name for p in site.glob("*.html"))
    with book.serve(site) as base, pageserver.chromium() as browser:
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        requested, failed = [], []
        tab.on("request", lambda r: requested.append(r.url))
        tab.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}"))
        tab.on("response", lambda r: r.status >= 400 and failed.append(f"{r.url}: HTTP {r.status}"))
        internal, maths_pages = set(), 0
        for name in pages:
            tab.goto(base + name, wait_until="networkidle")
            book.typeset(tab)
            broken = tab.eval_on_selector_all("img", "imgs => imgs.filter(i => !i.complete || i.naturalWidth == 0)"
                                                     ".map(i => i.src)")
            assert broken == [], f"{name}: images that did not load: {broken}"
            maths = tab.locator(".math").count()
            typeset = tab.locator(".math mjx-container").count()
            assert typeset == maths, f"{name}: {maths - typeset} of {maths} formulas not typeset"
            maths_pages += maths > 0
            prose = tab.evaluate(PROSE)
            assert not re.search(r"\$[^$\n]*\\[a-z]+", prose), f"{name}: raw $...$ maths left in the text"
            internal |= {url for url in _links(tab) if url.startswith(base)}
        assert maths_pages >= 6, "maths is typeset on too few pages"
        tab.goto(base + "03_vector_quantizer.html", wait_until="networkidle")
        answers = tab.locator("details:has(> summary:text-is('Answer'))")
        assert answers.count() >= 3 and tab.locator("details[open]:has(> summary:text-is('Answer'))").count() == 0
        assert not answers.first.locator("p").first.is_visible()  # hidden until opened
        answers.first.locator("summary").click()
        assert answers.first.locator("p").first.is_visible()
        code = tab.locator("div.cell_input").first
        assert code.is_visible()
        tab.locator("button.cell-toggle").first.click()  # code cells fold away, outputs stay
        assert not code.is_visible() and tab.locator("button.cell-toggle").first.inner_text() == "show code"
        # the search page finds a chapter by a word of its text
        tab.goto(base + "search.html?q=straight-through", wait_until="networkidle")
        tab.wait_for_selector("#search-results li", timeout=30000)
        assert "03 · The vector quantizer" in tab.inner_text("#search-results")
        for url in sorted(internal):  # while the site is served
            path, _, anchor = url.partition("#")
            with urllib.request.urlopen(path, timeout=30) as answer:
                assert answer.status == 200, url
                html = answer.read().decode("utf-8", "replace")
            if anchor and path.endswith(".html"):
                assert f'id="{urllib.parse.unquote(anchor)}"' in html, f"{url}: no element with that id"
    assert failed == []
    outside = [url for url in requested if urllib.parse.urlsplit(url).hostname != pageserver.HOST]
    assert outside == [], f"requests leaving 127.0.0.1: {outside[:5]}"


def test_the_book_command_writes_the_site_and_a_screenshot(site, chromium_found, tmp_path, capsys):
    shot = tmp_path / "page.png"
    assert main(["book", "--executed", str(site.parent / "src"), "--out", str(tmp_path / "site"),
                 "--screenshot", str(shot)]) == 0
    out = capsys.readouterr().out
    assert f"wrote the site {tmp_path / 'site' / 'html' / 'index.html'}" in out and f"wrote {shot}" in out
    from PIL import Image
    image = Image.open(shot)
    assert image.size == (1280, 900) and not image.info  # no text chunks: regenerated files change only with pixels
