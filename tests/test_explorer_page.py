"""The explorer page's inputs, error text and token, without a browser (tests/test_browser.py drives the page)."""

import json
import urllib.error
import urllib.request

import ipywidgets
import psutil
import pytest

from vqvae_lib import explorer_page, pageserver, runner

from test_explorer import tiny_generator

CHECKPOINT = runner.REPO / "checkpoints" / "default.pt"


def test_paths_come_from_the_environment_relative_to_the_repository(tmp_path):
    assert explorer_page.inputs({}) == (runner.REPO / "data" / "phantom", CHECKPOINT, "cpu")
    data_dir, ckpt, device = explorer_page.inputs({explorer_page.DATA_ENV: "elsewhere",
                                                   explorer_page.CHECKPOINT_ENV: str(tmp_path / "m.pt"),
                                                   explorer_page.DEVICE_ENV: "cuda:1"})
    assert data_dir == runner.REPO / "elsewhere" and ckpt == tmp_path / "m.pt" and device == "cuda:1"
    assert explorer_page.generator_inputs({}) == (runner.REPO / "checkpoints" / "gen_8x.pt",
                                                  runner.REPO / "checkpoints" / "transformer_gen.pt")
    assert explorer_page.generator_inputs({explorer_page.GEN_CHECKPOINT_ENV: "g.pt",
                                           explorer_page.PRIOR_ENV: str(tmp_path / "p.pt")}) == (
        runner.REPO / "g.pt", tmp_path / "p.pt")


def test_a_device_that_is_not_there_is_named_on_the_page(tiny_phantom, monkeypatch):
    monkeypatch.setenv(explorer_page.DATA_ENV, str(tiny_phantom))
    monkeypatch.setenv(explorer_page.DEVICE_ENV, "cuda:7")
    page = explorer_page.app()
    assert isinstance(page, ipywidgets.HTML) and "device &#x27;cuda:7&#x27; requested" in page.value
    assert "Device: cuda:7 (set EXPLORER_DEVICE)" in page.value


@pytest.mark.parametrize("missing", ["data", "checkpoint"])
def test_a_missing_input_is_named_on_the_page(missing, tiny_phantom, tmp_path, monkeypatch):
    absent = tmp_path / "absent"
    monkeypatch.setenv(explorer_page.DATA_ENV, str(absent if missing == "data" else tiny_phantom))
    monkeypatch.setenv(explorer_page.CHECKPOINT_ENV, str(absent if missing == "checkpoint" else CHECKPOINT))
    page = explorer_page.app()
    assert isinstance(page, ipywidgets.HTML)
    assert 'class="explorer-error"' in page.value and f"{absent} does not exist" in page.value


def _find(widget: ipywidgets.Widget, css: str) -> ipywidgets.Widget | None:
    """The widget under `widget` that has the CSS class `css`."""
    if css in getattr(widget, "_dom_classes", ()):
        return widget
    found = [w for child in getattr(widget, "children", ()) if (w := _find(child, css)) is not None]
    return found[0] if found else None


@pytest.fixture(scope="module")
def generator(tiny_phantom, tmp_path_factory):
    return tiny_generator(tiny_phantom, tmp_path_factory.getbasetemp())


@pytest.fixture
def page_env(tiny_phantom, generator, monkeypatch):
    """The page on the tiny phantom with the tiny VQ-VAE in the explorer and the sampler panel."""
    vq, prior = generator
    for name, value in [(explorer_page.DATA_ENV, tiny_phantom), (explorer_page.CHECKPOINT_ENV, vq),
                        (explorer_page.GEN_CHECKPOINT_ENV, vq), (explorer_page.PRIOR_ENV, prior)]:
        monkeypatch.setenv(name, str(value))
    return generator


def test_the_sampler_panel_follows_the_explorers_slider(page_env, tiny_phantom):
    page = explorer_page.app()
    slider, complete = _find(page, "explorer-slice"), _find(page, "sampler-complete")
    assert _find(page, "sampler-error") is None and _find(page, "sampler-sample") is not None
    slider.value = 20
    complete.click()
    reference = explorer_page.load_sampler(tiny_phantom, *page_env, "cpu")
    expected = reference.render_completion(reference.complete_view(20, _find(page, "sampler-rows").value, seed=0))
    assert bytes(_find(page, "sampler-complete-image").value) == expected


@pytest.mark.parametrize("broken", ["missing prior", "another VQ-VAE"])
def test_without_its_generator_the_page_names_it_and_the_explorer_works(broken, page_env, tmp_path, monkeypatch):
    if broken == "missing prior":
        monkeypatch.setenv(explorer_page.PRIOR_ENV, str(tmp_path / "absent.pt"))
        reason = f"checkpoint {tmp_path / 'absent.pt'} does not exist"
    else:
        monkeypatch.setenv(explorer_page.GEN_CHECKPOINT_ENV, str(CHECKPOINT))
        reason = "was trained on the codes of another VQ-VAE checkpoint"
    explorer, error = explorer_page.app().children
    assert isinstance(error, ipywidgets.HTML) and 'class="sampler-error"' in error.value
    assert reason in error.value
    assert "(set EXPLORER_GEN_CHECKPOINT)" in error.value and "(set EXPLORER_PRIOR)" in error.value
    slider, image = _find(explorer, "explorer-slice"), _find(explorer, "explorer-image")
    before = bytes(image.value)
    slider.value = slider.value + 1
    assert bytes(image.value) != before


def test_the_page_notebook_is_not_part_of_the_series(tmp_path):
    assert explorer_page.APP not in runner.notebook_paths()  # `make figures` must not execute it
    nb = json.loads(explorer_page.notebook(tmp_path).read_text())
    assert nb["metadata"]["kernelspec"]["name"] == runner.KERNEL
    assert any("explorer_page.app()" in "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # urlopen raises HTTPError with the redirect's status instead


def _status(url: str) -> tuple[int, str]:
    """The HTTP status of GET `url` (redirects not followed) and where a redirect points."""
    try:
        with urllib.request.build_opener(_NoRedirect).open(url, timeout=120) as answer:
            answer.read()
            return answer.status, ""
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Location", "")


def test_the_page_needs_its_token_and_no_command_line_shows_it(tiny_phantom, tmp_path):
    env = {explorer_page.DATA_ENV: str(tiny_phantom), explorer_page.CHECKPOINT_ENV: str(CHECKPOINT)}
    with open(tmp_path / "voila.log", "w") as log, \
            pageserver.serve(explorer_page.notebook(tmp_path), env=env, log=log) as server:
        status, location = _status(server.base)
        assert status in (302, 403) and (status == 403 or "/login" in location)
        assert _status(f"{server.base}?token=wrong{server.token[5:]}")[0] in (302, 403)
        assert _status(server.url) == (200, "")
        kernels = psutil.Process(server.process.pid).children(recursive=True)
        assert kernels, "the page started no kernel"
        assert pageserver.showing(server.token) == []
        assert server.token not in " ".join(server.process.args)
