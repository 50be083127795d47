"""Shared fixtures, each made once per test session: one tiny phantom (5 scans, 300 slices), and every notebook
executed on it in smoke mode; and `chromium_found`, for the tests that drive a browser."""

import os

import pytest

from vqvae_lib import pageserver, phantom, runner


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom") / "hipmri"
    phantom.generate(root, seed=0, size="tiny", workers=2, progress=False)
    return root


@pytest.fixture(scope="session")
def executed(tiny_phantom, tmp_path_factory):
    """Every notebook executed in smoke mode on the tiny phantom (tests/test_notebooks.py checks them; the book
    test builds the site from them): {prefix: executed .ipynb}, and the folder of their figures."""
    build = tmp_path_factory.mktemp("build")
    figs = build / "figures"
    # The device the tests' assertions mean (DEVICE="auto" would pick a GPU where there is one).
    params = {"SMOKE": True, "DATA_DIR": str(tiny_phantom), "FIG_DIR": str(figs), "SEED": 0, "DEVICE": "cpu"}
    runner.check_kernel(runner.KERNEL)
    # A run folder per notebook, as their defaults have: each trains a model of its own kind.
    paths = [runner.execute(p, build, {**params, "RUN_DIR": str(build / "runs" / p.stem)}, progress=False)
             for p in runner.notebook_paths()]
    return {p.stem[:2]: p for p in paths}, figs


@pytest.fixture
def chromium_found():
    """Skip the test, saying why, where no Chromium or Chrome is found; with HIPMRI_REQUIRE_BROWSER=1 (as in CI)
    fail it instead."""
    try:
        pageserver.find_chromium()
    except pageserver.BrowserMissing as e:
        if os.environ.get("HIPMRI_REQUIRE_BROWSER") == "1":
            raise
        pytest.skip(f"browser tests skipped: {e}")
