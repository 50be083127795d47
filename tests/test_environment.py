"""The project's entry points and dependency lists agree with each other."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    return {re.split("==", d)[0].lower(): d for d in (x.strip() for x in lines) if "==" in d}


def test_environment_yml_lists_the_same_pinned_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _pins(project["dependencies"] + project["optional-dependencies"]["test"])
    pip_section = (ROOT / "environment.yml").read_text().split("- pip:")[1]
    conda = _pins(m.group(1) for m in re.finditer(r"^\s+- (\S+)\s*$", pip_section, re.M))
    assert conda == declared
    assert declared["torch"] == "torch==2.13.0"  # the local CPU wheel; other specs pull CUDA
    assert "torchvision" not in declared


def test_every_dependency_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", d) for d in project["dependencies"])


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make figures" in readme
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert "make test" in ci
