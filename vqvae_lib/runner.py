"""Execute the notebook series headlessly (jupytext script -> .ipynb -> papermill), and publish it for Colab.

Sources (`notebooks/NN_slug.py`) are never modified: the generated notebook goes to
`BUILD/ipynb/` and the executed copy, with its outputs, to `BUILD/executed/`. The published copies,
`colab/NN_slug.ipynb`, are committed: no outputs, an "Open in Colab" badge and the setup cell of
`colab/setup_cell.py` before the parameters cell.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import tomllib
from pathlib import Path

import jupytext
import nbformat
import papermill

from . import REPO

KERNEL = "hipmri-vqvae"
NOTEBOOK_DIR = REPO / "notebooks"
COLAB_DIR = REPO / "colab"
SETUP_CELL = COLAB_DIR / "setup_cell.py"
PYPROJECT = REPO / "pyproject.toml"
# The kernelspec of the sources and published notebooks: the one every Jupyter, VS Code and Colab has.
PYTHON3 = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
log = logging.getLogger(__name__)


def in_repo(path: str | Path) -> Path:
    """`path`, with a relative one taken from the repository (not from where a command is run)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO / path


def notebook_paths(only: list[str] | None = None, source: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered notebooks (NN_name.py) in `source`, in order; `only` keeps those whose name starts with one of
    the prefixes. Raises FileNotFoundError if there are none."""
    paths = sorted(source.glob("[0-9][0-9]_*.py"))
    if not paths:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.py) in {source}; pass --notebook-dir FOLDER")
    if only:
        paths = [p for p in paths if any(p.stem.startswith(o) for o in only)]
        if not paths:
            raise FileNotFoundError(f"no notebook in {source} matches {only}")
    return paths


def check_kernel(kernel: str = KERNEL) -> None:
    """Raise a clear error if the Jupyter kernel is not registered."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel:
        raise RuntimeError(f"Jupyter kernel {kernel!r} is not registered; run `make setup` "
                           f"(it runs `python -m ipykernel install --sys-prefix --name {kernel}`)") from None


def to_ipynb(script: Path, out_dir: Path, kernel: str = KERNEL) -> Path:
    """Convert a py:percent script to `out_dir/NAME.ipynb` with the project's kernel set."""
    nb = jupytext.read(script)
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": f"Python ({kernel})", "language": "python"}
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{script.stem}.ipynb"
    jupytext.write(nb, out, fmt="ipynb")
    return out


class NotebookFailed(RuntimeError):
    """A cell of a notebook raised while it was executed."""


def execute(script: Path, build: Path, parameters: dict, kernel: str = KERNEL, progress: bool = True) -> Path:
    """Run one notebook with papermill, passing the `parameters` its parameters cell declares; returns the
    executed copy's path."""
    nb = to_ipynb(script, build / "ipynb", kernel)
    out = build / "executed" / nb.name
    out.parent.mkdir(parents=True, exist_ok=True)
    declared = papermill.inspect_notebook(str(nb))
    log.info("executing %s", script.name)
    try:
        papermill.execute_notebook(str(nb), str(out), kernel_name=kernel, cwd=str(script.parent),
                                   parameters={k: v for k, v in parameters.items() if k in declared},
                                   progress_bar=progress and sys.stderr.isatty())  # none in logs
    except papermill.PapermillExecutionError as e:  # one line for the CLI; the traceback is in the copy
        raise NotebookFailed(f"{script.name} failed: {e.ename}: {e.evalue} (traceback in cell {e.exec_count} of "
                             f"{out})") from e
    return out


def run_all(parameters: dict, build: Path, only: list[str] | None = None, kernel: str = KERNEL,
            progress: bool = True, source: Path = NOTEBOOK_DIR) -> list[Path]:
    """Execute every notebook in `source` (or those in `only`) in order with the same parameters."""
    paths = notebook_paths(only, source)
    check_kernel(kernel)
    return [execute(p, build, parameters, kernel, progress) for p in paths]


def repository(pyproject: Path = PYPROJECT) -> tuple[str, str]:
    """The project's GitHub URL ([project.urls] Repository) and its OWNER/NAME."""
    url = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"].get("urls", {}).get("Repository", "")
    match = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?", url)
    if not match:
        raise ValueError(f"{pyproject}: [project.urls] Repository {url!r} is not https://github.com/OWNER/NAME")
    return url, match.group(1)


def colab_notebook(script: Path, setup: str, url: str, owner_name: str) -> str:
    """The published notebook of a py:percent script, as .ipynb text: an "Open in Colab" badge, the script's cells
    with `setup` (its {repository} replaced by `url`) before the parameters cell, no outputs, the python3 kernel,
    and cell ids from the cells' text, so the same script always gives the same file."""
    cells = jupytext.read(script).cells
    params = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    if not params:
        raise ValueError(f"{script} has no cell tagged parameters")
    link = f"https://colab.research.google.com/github/{owner_name}/blob/main/colab/{script.stem}.ipynb"
    cells = [nbformat.v4.new_markdown_cell(f"[![Open In Colab]({BADGE})]({link})"), *cells[:params[0]],
             nbformat.v4.new_code_cell(setup.replace("{repository}", url).rstrip("\n")), *cells[params[0]:]]
    seen: set[str] = set()
    for cell in cells:
        cell.metadata = {"tags": cell.metadata["tags"]} if cell.metadata.get("tags") else {}
        digest = hashlib.sha1(cell.source.encode()).hexdigest()
        cell.id = next(digest[:n] for n in range(8, 41) if digest[:n] not in seen)  # twin cells: a longer id
        seen.add(cell.id)
    nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": PYTHON3, "language_info": {"name": "python"}})
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def publish(out: Path = COLAB_DIR, check: bool = False) -> list[Path]:
    """Write `out`/NN_slug.ipynb for every numbered notebook and remove published ones whose source is gone; with
    `check` write nothing. Returns the files changed (with `check`: those that would be)."""
    url, owner_name = repository()
    setup = SETUP_CELL.read_text(encoding="utf-8")
    wanted = {out / f"{p.stem}.ipynb": colab_notebook(p, setup, url, owner_name) for p in notebook_paths()}
    stale = [p for p, text in wanted.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    orphans = sorted(set(out.glob("[0-9][0-9]_*.ipynb")) - set(wanted))
    if not check:
        out.mkdir(parents=True, exist_ok=True)
        for path in stale:
            path.write_text(wanted[path], encoding="utf-8", newline="\n")
        for path in orphans:
            path.unlink()
    return sorted(stale + orphans)
