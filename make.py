#!/usr/bin/env python3
"""The project's entry points in plain Python, for every system (the Makefile calls this; Windows and a bare
macOS need no `make`). Each sets up .venv first, if it is missing or older than pyproject.toml/constraints.txt.

    python make.py setup       .venv with the pinned set (constraints.txt) and the project's Jupyter kernel
    python make.py figures     the default phantom if absent, every notebook executed, figures/ written
    python make.py test        the test suite (other arguments go to pytest)
    python make.py lab         JupyterLab on the series (other arguments, or those after `--`, go to `jupyter lab`)
    python make.py explorer    the codebook explorer as a web page on 127.0.0.1
    python make.py bench       the benchmarks on the full-size phantom (--device cuda on a GPU)
    python make.py checkpoints retrain every committed checkpoint (resumable; about an hour on a 2-core CPU)
    python make.py sweeps      the short runs behind notebooks 03, 05 and 08 (resumable; about an hour on a CPU)
    python make.py book        the series as a website (build/book/html) of the notebooks `figures` executed
    python make.py ipynb       regenerate the published notebooks in colab/
    python make.py lock        rewrite constraints.txt from .venv (after changing pyproject.toml)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
CONSTRAINTS = ROOT / "constraints.txt"
STAMP = VENV / ".installed"  # holds the hash of what was installed
KERNEL = "hipmri-vqvae"


def run(*command: str | Path) -> None:
    """Run a command from the repository; a failure stops make.py with its exit code."""
    print("+", " ".join(str(c) for c in command), flush=True)
    try:
        code = subprocess.call([str(c) for c in command], cwd=ROOT)
    except KeyboardInterrupt:
        code = 130
    if code:
        sys.exit(code)


def _wanted() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + CONSTRAINTS.read_bytes()).hexdigest()


def setup() -> None:
    """A virtual environment with the exact pinned set, the package (editable) and the runner's kernel."""
    if PYTHON.exists() and STAMP.is_file() and STAMP.read_text() == _wanted():
        return
    if not PYTHON.exists():
        run(sys.executable, "-m", "venv", VENV)
    run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(PYTHON, "-m", "pip", "install", "--quiet", "-c", CONSTRAINTS, "-e", ".[test]")
    run(PYTHON, "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL, "--display-name",
        f"Python ({KERNEL})")
    STAMP.write_text(_wanted())


def lock() -> None:
    """constraints.txt from .venv: every installed distribution at its version (local labels such as +cpu
    dropped, so the file works on every platform)."""
    setup()
    frozen = subprocess.run([str(PYTHON), "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout.split()
    header = CONSTRAINTS.read_text().splitlines()[:2]  # the comment that says what the file is
    CONSTRAINTS.write_text("\n".join(header + [line.split("+")[0] for line in frozen]) + "\n")
    STAMP.write_text(_wanted())
    print(f"wrote {CONSTRAINTS} ({len(frozen)} distributions)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python make.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("target", choices=["setup", "figures", "test", "lab", "explorer", "bench", "checkpoints",
                                           "sweeps", "book", "ipynb", "lock"])
    parser.add_argument("--data-dir", default="data/phantom", help="figures, explorer: the data (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="bench, checkpoints, sweeps: auto, cpu, cuda or mps (default: %(default)s)")
    parser.add_argument("--lab-dir", default=".", help="lab: the folder JupyterLab shows (default: the repository)")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_known_args(argv[:cut])  # the rest goes to pytest (test) or jupyter lab (lab)
    extra += argv[cut + 1:]
    if sys.version_info < (3, 11):
        sys.exit(f"error: the project needs Python 3.11 or newer; this is {sys.version.split()[0]} "
                 f"({sys.executable}): run make.py with a newer python (make: PYTHON=python3.11)")
    cli = (PYTHON, "-m", "vqvae_lib")
    if args.target == "lock":
        return lock()
    setup()
    if args.target == "figures":
        run(*cli, "figures", "--data-dir", args.data_dir)
    elif args.target == "test":
        run(PYTHON, "-m", "pytest", *extra)
    elif args.target == "lab":
        run(*cli, "lab", "--lab-dir", args.lab_dir, "--", *extra)
    elif args.target == "explorer":
        os.environ.setdefault("EXPLORER_DATA_DIR", args.data_dir)
        run(*cli, "explorer")
    elif args.target == "bench":
        if not (ROOT / "data/phantom-full/PHANTOM.json").is_file():
            run(*cli, "phantom", "--out", "data/phantom-full", "--size", "full", "--seed", "0", "--force")
        (ROOT / "build").mkdir(exist_ok=True)
        run(*cli, "bench", "--data-dir", "data/phantom-full", "--device", args.device, "--json", "build/bench.json")
    elif args.target in ("checkpoints", "sweeps"):
        run(*cli, args.target, "--device", args.device)
    elif args.target == "book":
        run(*cli, "book", "--screenshot", "figures/book_page.png")
    elif args.target == "ipynb":
        run(*cli, "ipynb")


if __name__ == "__main__":
    main()
