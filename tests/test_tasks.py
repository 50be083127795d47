"""The main jobs without make (`vqvae_lib.tasks`, `python make.py`), and the parts that differ by system: the
browser lookup and the page server's shutdown."""

import json
import logging
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from vqvae_lib import cli, pageserver, runner, tasks


def test_figures_runs_the_notebooks_and_skips_the_screenshot_without_a_browser(tiny_phantom, tmp_path, monkeypatch,
                                                                               caplog):
    source = tmp_path / "notebooks"
    source.mkdir()
    shutil.copy(runner.NOTEBOOK_DIR / "01_data_exploration.py", source)
    monkeypatch.setenv(pageserver.CHROMIUM_ENV, str(tmp_path / "no-browser"))
    with caplog.at_level(logging.WARNING):
        executed = tasks.figures(tiny_phantom, tmp_path / "figures", tmp_path / "build", notebook_dir=source,
                                 smoke=True)
    assert [p.name for p in executed] == ["01_data_exploration.ipynb"]
    cells = json.loads(executed[0].read_text())["cells"]
    assert not [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert (tmp_path / "figures" / "01_slices_and_labels.png").is_file()
    assert not (tmp_path / "figures" / tasks.SCREENSHOT).exists()
    assert f"{tasks.SCREENSHOT} was not regenerated" in caplog.text and "no-browser is not a file" in caplog.text


def test_only_the_default_phantom_is_generated_on_demand(tmp_path):
    with pytest.raises(FileNotFoundError, match="typo does not exist"):
        tasks.ensure_phantom(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()
    assert runner.in_repo("data/phantom") == tasks.DEFAULT_PHANTOM


def test_the_browser_is_found_on_the_path_or_named_by_chromium(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "chromium"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.delenv(pageserver.CHROMIUM_ENV, raising=False)
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.setattr(pageserver, "_BROWSER_PATHS", ())
    assert pageserver.find_chromium() == fake
    fake.unlink()
    with pytest.raises(pageserver.BrowserMissing, match="no Chromium or Chrome found; install Chromium"):
        pageserver.find_chromium()
    other = tmp_path / "chrome.exe"
    other.write_text("")
    monkeypatch.setenv(pageserver.CHROMIUM_ENV, str(other))
    assert pageserver.find_chromium() == other


@pytest.mark.parametrize("posix", [True, False])
def test_a_server_and_its_children_are_stopped_on_every_system(posix, monkeypatch):
    """Windows has no process groups to signal: there the server is terminated and its children one by one."""
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                               "time.sleep(120)"], start_new_session=True)
    try:
        server = psutil.Process(parent.pid)
        while not server.children():
            time.sleep(0.05)
        child = server.children()[0]
        monkeypatch.setattr(pageserver, "POSIX", posix)
        pageserver.stop(parent, grace=5)
        assert parent.poll() is not None
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        if parent.poll() is None:
            parent.kill()


def test_make_py_refuses_an_old_python():
    """make.py itself is run by whatever python the user has: an old one gets one line, not a failed pip."""
    probe = ("import runpy, sys; sys.version_info = (3, 9, 0); sys.argv = ['make.py', 'setup']; "
             f"runpy.run_path({str(runner.REPO / 'make.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 1 and "needs Python 3.11 or newer" in result.stderr


def test_a_failing_notebook_is_one_line_naming_it_and_its_cell(tiny_phantom, tmp_path, capsys):
    source = tmp_path / "notebooks"
    source.mkdir()
    (source / "01_broken.py").write_text('# %% tags=["parameters"]\nSMOKE = False\n\n'
                                         '# %%\nraise ValueError("bad slice")\n')
    code = cli.main(["notebooks", "--notebook-dir", str(source), "--data-dir", str(tiny_phantom),
                     "--fig-dir", str(tmp_path / "figures"), "--build", str(tmp_path / "build")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: 01_broken.py failed: ValueError: bad slice (traceback in cell 3 of ")  # 2: injected
    assert err.endswith("01_broken.ipynb)")
