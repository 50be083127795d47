"""The hosted platforms: the published Colab notebooks (up to date, and run in a Colab-like environment) and the
mybinder.org configuration."""

import ast
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
import venv
from importlib import metadata

import jupytext
import nbformat
import papermill
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from vqvae_lib import runner
from vqvae_lib.cli import build_parser, main

BINDER = runner.REPO / "binder"
PROJECT = tomllib.loads(runner.PYPROJECT.read_text(encoding="utf-8"))["project"]
# The setup cell installs what is missing of the requirements and the notebooks extra, but these Jupyter apps.
SETUP_APPS = {"jupyterlab", "papermill", "jupytext"}
# Colab's preinstalled packages, at the oldest versions pyproject.toml allows (same major.minor as its bounds).
COLAB = {"torch": "2.13.0", "numpy": "2.1.3", "scipy": "1.14.1", "scikit-image": "0.24.0", "matplotlib": "3.9.4",
         "pillow": "10.4.0", "psutil": "5.9.8", "ipywidgets": "7.7.1", "ipykernel": "6.29.5"}
OLDER = {"tqdm": "4.65.0"}  # older than its bound: the setup cell warns and keeps it
ALSO = {"notebook": "6.5.7"}  # Colab's classic notebook, which holds jupyter_client below 8


def _requirements() -> dict[str, Requirement]:
    reqs = map(Requirement, PROJECT["dependencies"] + PROJECT["optional-dependencies"]["notebooks"])
    return {canonicalize_name(r.name): r for r in reqs}


def _lower_bound(req: Requirement) -> str:
    return next(s.version for s in req.specifier if s.operator == ">=")


def _text(nb: dict) -> str:
    return "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                     for c in nb["cells"] for o in c.get("outputs", []))


def _published(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_published_notebooks_are_what_the_command_generates():
    stale = runner.publish(runner.COLAB_DIR, check=True)
    assert not stale, f"stale in colab/: {[p.name for p in stale]}; run `python -m vqvae_lib ipynb`"


def test_published_notebooks_are_never_paired_with_a_script():
    config = jupytext.config.find_jupytext_configuration_file(str(runner.COLAB_DIR))
    assert jupytext.config.load_jupytext_configuration_file(config).formats == ["ipynb"]


@pytest.mark.parametrize("script", runner.notebook_paths(), ids=lambda p: p.stem[:2])
def test_a_published_notebook_opens_in_colab_and_sets_up_first(script):
    nb = _published(runner.COLAB_DIR / f"{script.stem}.ipynb")
    nbformat.validate(nbformat.from_dict(nb))
    assert nb["metadata"]["kernelspec"] == runner.PYTHON3
    url, owner_name = runner.repository()
    assert owner_name == "hipmri-vqvae/hipmri-vqvae"
    badge, *cells = nb["cells"]
    assert "".join(badge["source"]) == (
        f"[![Open In Colab]({runner.BADGE})](https://colab.research.google.com/github/{owner_name}/blob/main/"
        f"colab/{script.stem}.ipynb)")
    sources = ["".join(c["source"]) for c in cells]
    setup = runner.SETUP_CELL.read_text(encoding="utf-8").replace("{repository}", url).rstrip("\n")
    i = sources.index(setup)
    assert f'REPOSITORY = "{url}"' in setup
    assert cells[i + 1]["metadata"] == {"tags": ["parameters"]}
    assert sources[:i] + sources[i + 1:] == [c.source for c in jupytext.read(script).cells]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb["cells"])
    assert len({c["id"] for c in nb["cells"]}) == len(nb["cells"])


def test_the_setup_cell_needs_only_the_standard_library():
    tree = ast.parse(runner.SETUP_CELL.read_text(encoding="utf-8"))
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules and {m.split(".")[0] for m in modules} <= sys.stdlib_module_names


def test_ipynb_check_lists_the_stale_files_and_writes_nothing(tmp_path, capsys):
    assert main(["ipynb", "--out", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [f"{p.stem}.ipynb" for p in runner.notebook_paths()]
    first, orphan = tmp_path / written[0], tmp_path / "99_renamed.ipynb"
    first.write_text(first.read_text(encoding="utf-8").replace("SMOKE = False", "SMOKE = True"), encoding="utf-8")
    orphan.write_text("{}", encoding="utf-8")
    capsys.readouterr()
    assert main(["ipynb", "--out", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert f"{written[0]}, 99_renamed.ipynb" in err and written[1] not in err
    assert "SMOKE = True" in first.read_text(encoding="utf-8") and orphan.exists()
    assert main(["ipynb", "--out", str(tmp_path)]) == 0
    assert f"wrote {first}" in capsys.readouterr().out and not orphan.exists()
    assert first.read_bytes() == (runner.COLAB_DIR / written[0]).read_bytes()
    assert main(["ipynb", "--out", str(tmp_path), "--check"]) == 0


def test_the_repository_url_must_be_on_github(tmp_path):
    bad = tmp_path / "pyproject.toml"
    bad.write_text('[project]\nname = "x"\n[project.urls]\nRepository = "https://gitlab.com/a/b"\n')
    with pytest.raises(ValueError, match=f"{bad}.*'https://gitlab.com/a/b' is not https://github.com/OWNER/NAME"):
        runner.repository(bad)


def test_colab_versions_are_pyprojects_lower_bounds():
    reqs = _requirements()
    for name, version in COLAB.items():
        low = _lower_bound(reqs[name])
        assert version.split(".")[:2] == low.split(".")[:2], f"{name} {version} vs pyproject's >={low}"
    for name, version in OLDER.items():
        assert not reqs[name].specifier.contains(version), name


def _distributions(python) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    found = json.loads(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout)
    return {canonicalize_name(k): v for k, v in found.items()}


def _copy_tree(dest):
    """The working tree as it is (uncommitted changes included), without environments, data and caches."""
    top = {".git", ".venv", "data", "build", "runs", ".pytest_cache"}

    def ignore(folder, names):
        at_top = os.path.samefile(folder, runner.REPO)
        return [n for n in names if (at_top and n in top) or n in ("__pycache__", ".ipynb_checkpoints")
                or n.endswith(".egg-info")]
    shutil.copytree(runner.REPO, dest, ignore=ignore)
    return dest


def test_the_notebooks_run_in_a_colab_like_environment(tmp_path, monkeypatch):
    """A fresh Python with Colab's packages at pyproject's lower bounds and others missing; the published notebook
    01, then 05 (widgets and the committed checkpoints), run from an empty folder as from /content."""
    env = tmp_path / "colab"
    venv.create(env, with_pip=True)
    python = env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    pins = [f"{n}=={v}" for n, v in {**COLAB, **OLDER, **ALSO}.items()]
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", *pins],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    before = _distributions(python)
    missing = set(_requirements()) - SETUP_APPS - set(before)
    assert "nibabel" in missing  # the setup cell's install path runs

    repo = _copy_tree(tmp_path / "repo")
    kernel = tmp_path / "jupyter" / "kernels" / "python3"
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("HIPMRI_VQVAE_REPO", str(repo))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    content = tmp_path / "content"
    content.mkdir()

    def run(stem):
        out = tmp_path / f"{stem}.ipynb"
        papermill.execute_notebook(str(repo / "colab" / f"{stem}.ipynb"), str(out), parameters={"SMOKE": True},
                                   cwd=str(content), progress_bar=False)
        return _text(_published(out))

    text = run("01_data_exploration")
    after = _distributions(python)
    assert {n: after.get(n) for n in before} == before  # nothing installed was replaced
    assert missing <= set(after) and not SETUP_APPS & set(after)
    assert f"installed {', '.join(str(r) for n, r in _requirements().items() if n in missing)}" in text
    assert "warning: tqdm 4.65.0 is older than 4.66, the oldest version tested; keeping it" in text
    assert f"vqvae_lib installed from {repo}" in text and f"working in {repo / 'notebooks'}" in text
    assert (repo / "data" / "phantom" / "PHANTOM.json").is_file() and not any(content.iterdir())
    assert "numpy 2.1.3, torch 2.13.0" in text and f"data: {repo / 'data' / 'phantom'}" in text
    assert "patient-level split check passed" in text

    text = run("05_evaluation")  # a new kernel finds the package installed by the first
    assert f"vqvae_lib is installed from {repo}" in text and "installed nibabel" not in text
    assert "mean-image baseline" in text and (repo / "figures" / "05_explorer.png").is_file()
    assert _distributions(python) == after


def _binder_pins() -> dict[str, str]:
    lines = (BINDER / "requirements.txt").read_text(encoding="utf-8").splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith(("#", "-"))]
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in reqs)
    return {canonicalize_name(r.name): next(iter(r.specifier)).version for r in reqs}


def test_binder_installs_the_pinned_requirements_with_cpu_torch():
    pins = _binder_pins()
    constraints = {canonicalize_name(n): v for n, v in (line.split("==") for line in
                   (runner.REPO / "constraints.txt").read_text(encoding="utf-8").splitlines()
                   if line and not line.startswith("#"))}
    assert set(pins) == set(_requirements())
    for name, version in pins.items():
        assert version.split("+")[0] == constraints[name], f"binder: {name} {version}; constraints.txt: " + \
            constraints[name]
    assert pins["torch"].endswith("+cpu")
    text = (BINDER / "requirements.txt").read_text(encoding="utf-8")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu\n" in text
    python = (BINDER / "runtime.txt").read_text(encoding="utf-8").strip()
    assert python.startswith("python-3.") and SpecifierSet(PROJECT["requires-python"]).contains(python[7:])


def test_binder_postbuild_installs_the_package_and_writes_the_default_phantom(tmp_path):
    script = BINDER / "postBuild"
    assert script.stat().st_mode & stat.S_IXUSR, "binder/postBuild must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    lines = [line for line in script.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "set -euo pipefail"
    commands = [shlex.split(line) for line in lines[1:]]
    assert commands[0] == ["python", "-m", "pip", "install", "--no-deps", "-e", "."]
    assert commands[1][:3] == ["python", "-m", "vqvae_lib"]
    args = build_parser().parse_args(commands[1][3:])
    assert (args.command, args.out, args.size, args.seed) == ("phantom", "data/phantom", "small", 0)
    # the notebooks' default data folder, seen from notebooks/
    assert all('DATA_DIR = "../data/phantom"' in p.read_text(encoding="utf-8") for p in runner.notebook_paths())
    assert commands[2][0] == "jupytext-config" and len(commands) == 3
    (entry,) = metadata.entry_points(group="console_scripts", name="jupytext-config")
    assert entry.module == "jupytext_config.__main__"
    settings = tmp_path / "overrides.json"
    subprocess.run([sys.executable, "-m", "jupytext_config", "--settings-file", str(settings), *commands[2][1:]],
                   check=True, capture_output=True)
    viewers = json.loads(settings.read_text())["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]
    assert viewers == {"python": "Jupytext Notebook"}
