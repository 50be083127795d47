"""Shared fixtures: one tiny phantom (5 scans, 300 slices) generated once per test session."""

import pytest

from vqvae_lib import phantom


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom") / "hipmri"
    phantom.generate(root, seed=0, size="tiny", workers=2, progress=False)
    return root
