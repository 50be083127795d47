"""The dependency lists agree: pyproject.toml's ranges, the pinned set `make setup` installs (constraints.txt,
checked against this environment), conda's environment.yml, and the entry points (Makefile, make.py, CI)."""

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# conda-forge's names for the PyPI distributions whose package is called otherwise
CONDA_NAMES = {"torch": "pytorch", "matplotlib": "matplotlib-base", "playwright": "playwright-python"}
PIP_ONLY = {"sphinx-mathjax-offline"}  # not on conda-forge: environment.yml's pip section installs it


def _requirements() -> list[Requirement]:
    """The library's requirements and every extra's, without the project's own self-reference."""
    lists = [PROJECT["dependencies"], *PROJECT["optional-dependencies"].values()]
    return [r for r in map(Requirement, sum(lists, [])) if canonicalize_name(r.name) != "hipmri-vqvae"]


def _pins() -> dict[str, Version]:
    lines = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    pins = {}
    for line in lines:
        name, _, version = line.partition("==")
        assert version and "+" not in version, f"constraints.txt: {line!r} is not NAME==VERSION (no local label)"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def test_pyproject_declares_ranges_with_a_lower_bound():
    for r in _requirements():
        assert any(s.operator == ">=" for s in r.specifier), f"{r} has no lower bound"
        assert not any(s.operator == "==" for s in r.specifier), f"{r} is pinned: pins go in constraints.txt"
    assert PROJECT["scripts"]["hipmri-vqvae"] == "vqvae_lib.cli:main"


def test_constraints_pin_every_requirement_inside_its_range():
    pins = _pins()
    for r in _requirements():
        name = canonicalize_name(r.name)
        assert name in pins, f"{r.name} is not pinned in constraints.txt"
        assert r.specifier.contains(pins[name]), f"constraints.txt pins {r.name} {pins[name]}, outside {r}"
    assert pins["torch"] == Version("2.13.0")  # the local CPU wheel; other versions pull CUDA builds
    assert "torchvision" not in pins


def test_this_environment_is_the_pinned_set():
    """What `make setup` installed is exactly constraints.txt (a stale .venv or an unpinned install fails)."""
    wrong = []
    for name, version in _pins().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} missing")
            continue
        if Version(installed.public) != version:
            wrong.append(f"{name} {installed} (pinned {version})")
    assert not wrong, "run `python make.py setup`: " + ", ".join(wrong)


def _conda_spec(text: str) -> tuple[str, SpecifierSet]:
    name, spec = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", text).groups()
    return name, SpecifierSet(spec)


def test_environment_yml_is_a_conda_forge_environment_with_pyprojects_ranges():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "hipmri-vqvae"
    assert env["channels"] == ["conda-forge", "nodefaults"]
    conda = dict(_conda_spec(d) for d in env["dependencies"] if isinstance(d, str))
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    pip_only = sorted(str(r) for r in _requirements() if r.name in PIP_ONLY)
    assert pip == [[*pip_only, "-e ."]], "pip installs only what conda-forge lacks, then the project from this folder"
    assert conda.pop("pip") == SpecifierSet()
    assert conda.pop("python") == SpecifierSet(PROJECT["requires-python"])
    wanted = {CONDA_NAMES.get(r.name, r.name): r.specifier for r in _requirements() if r.name not in PIP_ONLY}
    assert conda == wanted  # the same packages, each with pyproject's range
    pins = _pins()
    for r in (r for r in _requirements() if r.name not in PIP_ONLY):  # the pinned set is one conda could give too
        assert conda[CONDA_NAMES.get(r.name, r.name)].contains(pins[canonicalize_name(r.name)])


def test_every_make_target_is_a_make_py_target():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split()) - {"clean"}
    help_text = subprocess.run([sys.executable, str(ROOT / "make.py"), "--help"], capture_output=True, text=True,
                               check=True).stdout
    listed = set(re.search(r"\{([a-z,]+)\}", help_text).group(1).split(","))
    assert targets == listed
    recipes = re.findall(r"^\t(.*)$", makefile, re.M)
    assert all(line.startswith("$(PYTHON) make.py ") for line in recipes if "make.py" in line or "rm " not in line)


def test_setup_is_a_no_op_when_the_environment_is_current():
    out = subprocess.run([sys.executable, str(ROOT / "make.py"), "setup"], capture_output=True, text=True,
                         check=True).stdout
    assert out == "", f"make.py setup reinstalled an up-to-date .venv:\n{out}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make figures" in readme and "python make.py test" in readme
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ci[-1] == "make test" and "export HIPMRI_REQUIRE_BROWSER=1" in ci
