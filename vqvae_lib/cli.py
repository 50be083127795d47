"""Command line: `python -m vqvae_lib COMMAND ...` (run with --help for each command)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from . import data, phantom


def _phantom(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    manifest = phantom.generate(args.out, seed=args.seed, size=args.size, workers=args.workers,
                                force=args.force)
    slices = manifest["slices"]
    print(f"wrote {sum(slices.values()):,} slices to {args.out} in {time.perf_counter() - start:.0f} s: "
          + ", ".join(f"{k} {v:,}" for k, v in slices.items()))
    print("label shares of the 3D volumes (phantom vs real):")
    for name, share in manifest["label_shares_3d"].items():
        print(f"  {name:<10} {100 * share:6.2f} %   {100 * phantom.REAL_LABEL_SHARES[name]:6.2f} %")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    report = data.inspect(args.data_dir)
    print(data.format_inspect(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json}")
    return 0


def _notebooks(args: argparse.Namespace) -> int:
    from . import runner
    params = {"SMOKE": args.smoke, "DATA_DIR": str(Path(args.data_dir).resolve()),
              "FIG_DIR": str(Path(args.fig_dir).resolve()), "SEED": args.seed}
    for out in runner.run_all(params, Path(args.build), only=args.only):
        print(f"executed {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vqvae_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write the synthetic pelvic MRI phantom in the HipMRI layout")
    p.add_argument("--out", required=True, help="folder to create (it must not exist unless --force)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=sorted(phantom.SIZES), default="small",
                   help="small (default): 1,680 slices, ~1/8 of the real data; full: the real 12,660; "
                        "tiny: 300 slices, for tests")
    p.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.set_defaults(func=_phantom)

    p = sub.add_parser("inspect", help="summarise a HipMRI-layout dataset and list its problems")
    p.add_argument("data_dir")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("notebooks", help="execute the notebooks headlessly with papermill")
    p.add_argument("--data-dir", default="data/phantom")
    p.add_argument("--fig-dir", default="figures")
    p.add_argument("--build", default="build", help="where generated and executed notebooks go")
    p.add_argument("--smoke", action="store_true", help="fast settings, as in the tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 01 03")
    p.set_defaults(func=_notebooks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (data.DataError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
