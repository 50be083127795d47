"""Execute the notebook series headlessly: jupytext script -> .ipynb -> papermill.

Sources (`notebooks/NN_slug.py`) are never modified: the generated notebook goes to
`BUILD/ipynb/` and the executed copy, with its outputs, to `BUILD/executed/`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jupytext
import papermill

KERNEL = "hipmri-vqvae"
REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
log = logging.getLogger(__name__)


def notebook_paths(only: list[str] | None = None, source: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered notebooks in order; `only` keeps those whose name starts with one of the prefixes."""
    paths = sorted(source.glob("[0-9][0-9]_*.py"))
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


def execute(script: Path, build: Path, parameters: dict, kernel: str = KERNEL, progress: bool = True) -> Path:
    """Run one notebook with papermill, passing the `parameters` its parameters cell declares; returns the
    executed copy's path."""
    nb = to_ipynb(script, build / "ipynb", kernel)
    out = build / "executed" / nb.name
    out.parent.mkdir(parents=True, exist_ok=True)
    declared = papermill.inspect_notebook(str(nb))
    log.info("executing %s", script.name)
    papermill.execute_notebook(str(nb), str(out), parameters={k: v for k, v in parameters.items() if k in declared},
                               kernel_name=kernel,
                               cwd=str(script.parent), progress_bar=progress)
    return out


def run_all(parameters: dict, build: Path, only: list[str] | None = None, kernel: str = KERNEL,
            progress: bool = True) -> list[Path]:
    """Execute every notebook (or those in `only`) in order with the same parameters."""
    check_kernel(kernel)
    return [execute(p, build, parameters, kernel, progress) for p in notebook_paths(only)]
