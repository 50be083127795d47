# Setup (Colab, or any Jupyter without the project). Where vqvae_lib is installed from its repository it only
# says so. Elsewhere it gets the repository (HIPMRI_VQVAE_REPO: a folder or a git URL; default: a clone of
# REPOSITORY), installs the package, then only the requirements that are missing: whatever is installed (Colab's
# torch, numpy, ipywidgets) is never replaced. Then it writes the synthetic data set if absent and works from
# the repository's notebooks/ folder, so the paths in the next cell (../data/phantom, ...) point into it.
import importlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPOSITORY = "{repository}"
JUPYTER_APPS = {"jupyterlab", "papermill", "jupytext"}  # run Jupyter itself; the notebooks never import them


def run(*command, cwd=None):
    """Run a command and return its output; on failure raise with the end of what it printed."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def version(text):
    """'2.1.3+cpu' -> (2, 1, 3)"""
    return tuple(int(n) for n in re.match(r"\d+(\.\d+)*", text).group().split("."))


def installed_repository():
    """The repository vqvae_lib is importable from, or None."""
    spec = importlib.util.find_spec("vqvae_lib")
    repo = Path(spec.origin).parents[1] if spec and spec.origin else None
    return repo if repo and (repo / "checkpoints").is_dir() and (repo / "notebooks").is_dir() else None


def install(repo):
    """The package from `repo`, then its missing requirements with every installed distribution pinned."""
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    run(*pip, "--no-deps", "-e", str(repo))
    project = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    missing = []
    for requirement in project["dependencies"] + project["optional-dependencies"]["notebooks"]:
        name, low = re.match(r"([\w.-]+)\s*(?:>=\s*([\w.]+))?", requirement).groups()
        if name in JUPYTER_APPS:
            continue
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if low and version(have) < version(low):
            print(f"warning: {name} {have} is older than {low}, the oldest version tested; keeping it")
    if missing:
        pins = {}
        for dist in importlib.metadata.distributions():
            if dist.metadata["Name"] and dist.version:  # the first of a name on sys.path is the one imported
                pins.setdefault(re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower(),
                                f"{dist.metadata['Name']}=={dist.version}")
        with tempfile.TemporaryDirectory() as tmp:
            constraints = Path(tmp, "installed.txt")
            constraints.write_text("\n".join(pins.values()) + "\n", encoding="utf-8")
            run(*pip, "-c", str(constraints), *missing)
        print("installed", ", ".join(missing))
    sys.path.insert(0, str(repo))  # importable in this running kernel, without a restart
    importlib.invalidate_caches()


REPO = installed_repository()
if REPO:
    print(f"vqvae_lib is installed from {REPO}")
else:
    source = os.environ.get("HIPMRI_VQVAE_REPO", REPOSITORY)
    REPO = Path(source).expanduser()
    if not REPO.is_dir():
        REPO = Path("hipmri-vqvae")
        if not REPO.is_dir():
            print(f"cloning {source}")
            run("git", "clone", "--depth", "1", source, str(REPO))
    REPO = REPO.resolve()
    install(REPO)
    print(f"vqvae_lib installed from {REPO}")
if not (REPO / "data" / "phantom" / "PHANTOM.json").is_file():
    print("writing the synthetic data set (the default phantom) to data/phantom: about a minute")
    print(run(sys.executable, "-m", "vqvae_lib", "phantom", "--out", str(REPO / "data" / "phantom"),
              "--size", "small", "--seed", "0", "--force", cwd=REPO), end="")
os.chdir(REPO / "notebooks")
print(f"working in {Path.cwd()}")
