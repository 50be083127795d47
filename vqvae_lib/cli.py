"""Command line: `python -m vqvae_lib COMMAND ...` (run with --help for each command)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

from . import data, distributed, phantom, runs, train
from .checkpoint import CheckpointError, load_checkpoint
from .fileio import save_json


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
        save_json(args.json, report)
        print(f"report written to {args.json}")
    return 0


def _notebooks(args: argparse.Namespace) -> int:
    from . import runner
    params = {"SMOKE": args.smoke, "DATA_DIR": str(Path(args.data_dir).resolve()),
              "FIG_DIR": str(Path(args.fig_dir).resolve()), "SEED": args.seed}
    for out in runner.run_all(params, Path(args.build), only=args.only):
        print(f"executed {out}")
    return 0


def _number(kind: type, check: Callable[[Any], bool], what: str) -> Callable[[str], int | float]:
    """An argparse type: `kind`(text), finite, and passing `check` (else "must be WHAT, got TEXT")."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value) or not check(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


_positive_int = _number(int, lambda v: v > 0, "a whole number > 0")
_positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
_non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
_non_negative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
_seed = _number(int, lambda v: 0 <= v < 2 ** 63, "a whole number in [0, 2^63)")
_odd_kernel = _number(int, lambda v: v >= 3 and v % 2 == 1, "an odd whole number >= 3")


def _json_file(text: str) -> Path:
    """An argparse type for a file to write: not a folder, in a folder that exists."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give the name of a file to write")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {path.parent} does not exist")
    return path


def _png_out(text: str) -> Path:
    """An argparse type for `sample --out`: a .png file (its folder is made), or a folder for samples.png."""
    path = Path(text).expanduser()
    if path.is_dir():
        return path / "samples.png"
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text} is neither a .png file name nor an existing folder")
    if path.parent.exists() and not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.parent} is a file, not a folder")
    return path


def _data_options(args: argparse.Namespace) -> dict[str, Any]:
    """The load_split options given by --shape-policy, --normalization and --no-cache."""
    return {"shape_policy": args.shape_policy, "normalization": args.normalization, "cache": not args.no_cache}


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape-policy", choices=data.SHAPE_POLICIES, default=runs.DATA_OPTIONS["shape_policy"],
                   help="what to do with slices that are not 256x128 (default: crop the centre)")
    p.add_argument("--normalization", choices=data.NORMALIZATIONS, default=runs.DATA_OPTIONS["normalization"],
                   help="per-slice intensity scaling (default: percentile; minmax for signed data)")
    p.add_argument("--no-cache", action="store_true", help="decode the slices every time; write no data cache")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last.pt (from scratch if it has no finished epoch)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run of the same kind in --out, once the new run has finished its first epoch")
    p.add_argument("--allow-other-data", action="store_true",
                   help="with --resume: continue even on other data than the run's earlier epochs")
    _add_data_options(p)


def _print_epoch(record: dict[str, Any], epochs: int, codebook_size: int) -> None:
    print(f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f} (MSE {record['train_recon']:.4f}, "
          f"SSIM {record['train_ssim']:.4f}), "
          f"val SSIM {record['val_ssim']:.4f}, PSNR {record['val_psnr']:.2f} dB, "
          f"codes {record['val_active']}/{codebook_size} (perplexity {record['val_perplexity']:.1f}), "
          f"{record['images_per_s']:.0f} img/s, {record['seconds']:.0f} s", flush=True)


def _train(args: argparse.Namespace) -> int:
    given = {"epochs": args.epochs, "seed": args.seed, "batch_size": args.batch_size, "lr": args.lr,
             "limit": args.limit, "downsample": args.downsample, "device": args.device, "ssim_weight": args.ssim_weight}
    overrides = {key: value for key, value in given.items() if value is not None}
    out = Path(args.out)
    if args.resume:
        preset = {"preset": args.preset} if args.preset else {}
        config = _resumable_config(out, "vqvae", train.make_config, {"preset": args.preset or "default"},
                                   {**preset, **overrides})
    else:
        config = train.make_config(args.preset or "default", **overrides)
    trained = []

    def report(record: dict[str, Any]) -> None:
        trained.append(record)
        _print_epoch(record, config.epochs, config.model["codebook_size"])

    history = train.train(args.data_dir, out, config, resume=args.resume, overwrite=args.overwrite,
                          compile=args.compile, data_options=_data_options(args),
                          allow_other_data=args.allow_other_data, callback=report)
    if not distributed.is_main():  # rank 0 reports for a data-parallel run
        return 0
    if not trained:
        done = history[-1]["epoch"]
        print(f"{out} had already finished {done} epoch{'s' * (done != 1)}: nothing to do")
    best = max(history, key=lambda h: h["val_ssim"])
    print(f"best validation SSIM {best['val_ssim']:.4f} (epoch {best['epoch']}): {out / 'best.pt'}")
    print(f"last epoch {history[-1]['epoch']}: {out / 'last.pt'}; history: {out / 'metrics.json'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import bench
    if not Path(args.data_dir).exists():
        raise FileNotFoundError(f"{args.data_dir} does not exist; write the full-size phantom there with "
                                f"`python -m vqvae_lib phantom --out {args.data_dir} --size full` (about 4 min)")
    checkpoint = args.checkpoint if args.checkpoint != "none" else None
    result = bench.run(args.data_dir, device=args.device, warmup=args.warmup, steps=args.steps,
                       checkpoint=checkpoint, compile=args.compile, workers=args.workers,
                       full_epoch=args.full_epoch, report=lambda line: print(line, flush=True))
    if args.json:
        save_json(args.json, result)
        print(f"results written to {args.json}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    result = train.evaluate(args.checkpoint, args.data_dir, args.split, batch_size=args.batch_size,
                            device=args.device, data_options=_data_options(args))
    s = result["summary"]
    print(f"{args.checkpoint} (epoch {s['epoch']}) on {args.split}, {s['n_slices']} slices:")
    print(f"  SSIM  mean {s['ssim_mean']:.4f}  min {s['ssim_min']:.4f}  max {s['ssim_max']:.4f}")
    print(f"  PSNR  mean {s['psnr_mean']:.2f}  min {s['psnr_min']:.2f}  max {s['psnr_max']:.2f} dB")
    print(f"  codes {s['active_codes']}/{s['codebook_size']} active, perplexity {s['perplexity']:.1f}")
    if args.json:
        slices = [{"name": name, "case": int(case), "week": int(week), "slice": int(index), "ssim": float(ssim),
                   "psnr": float(psnr)} for name, case, week, index, ssim, psnr in
                  zip(result["names"], result["cases"], result["weeks"], result["slices"], result["ssim"],
                      result["psnr"])]
        save_json(args.json, {"checkpoint": result["checkpoint"], "split": args.split, "summary": s,
                              "slices": slices})
        print(f"results written to {args.json}")
    return 0


def _resumable_config(out: Path, kind: str, make: Callable[..., Any], new: dict[str, Any],
                      overrides: dict[str, Any]) -> Any:
    """With --resume: the run's own config, changed only where a flag is given (the trainer refuses what may not
    change); a run with no finished epoch starts from scratch with make(**new, **overrides)."""
    if not (out / "last.pt").exists():
        return make(**{**new, **overrides})
    saved = load_checkpoint(out / "last.pt", kind=kind)["train_config"]
    try:
        return make(**{**saved, **overrides})
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{out / 'last.pt'} holds an unusable train config: {e}") from e


def _vae(args: argparse.Namespace) -> int:
    from . import vae
    given = {"epochs": args.epochs, "seed": args.seed, "downsample": args.downsample, "device": args.device,
             "limit": args.limit}
    overrides = {key: value for key, value in given.items() if value is not None}
    out = Path(args.out)
    new = {"preset": "default", "ssim_weight": 0.0}
    config = (_resumable_config(out, "vae", train.make_config, new, overrides) if args.resume
              else train.make_config(**new, **overrides))

    def report(record: dict[str, Any]) -> None:
        print(f"epoch {record['epoch']}/{config.epochs}: loss {record['train_loss']:.4f} nats/pixel "
              f"(MSE {record['train_recon']:.4f}, KL {record['train_kl']:.4f}), val SSIM {record['val_ssim']:.4f}, "
              f"PSNR {record['val_psnr']:.2f} dB, {record['val_active']}/{config.model['embed_dim']} latent channels "
              f"used, {record['images_per_s']:.0f} img/s, {record['seconds']:.0f} s", flush=True)

    history = vae.train_vae(args.data_dir, out, config, resume=args.resume, overwrite=args.overwrite,
                            data_options=_data_options(args), allow_other_data=args.allow_other_data, callback=report)
    best = max(history, key=lambda h: h["val_ssim"])
    print(f"best validation SSIM {best['val_ssim']:.4f} (epoch {best['epoch']}): {out / 'best.pt'}")
    return 0


def _prior(args: argparse.Namespace) -> int:
    from . import prior
    given = {"epochs": args.epochs, "seed": args.seed, "batch_size": args.batch_size, "lr": args.lr,
             "limit": args.limit, "device": args.device, "channels": args.channels, "layers": args.layers,
             "kernel": args.kernel, "positions": args.positions}
    overrides = {key: value for key, value in given.items() if value is not None}
    out = Path(args.out)
    from .checkpoint import load_model
    new = {"codebook_size": load_model(args.checkpoint)[0].config.codebook_size}
    config = (_resumable_config(out, "prior", prior.make_prior_config, new, overrides) if args.resume
              else prior.make_prior_config(**new, **overrides))

    def report(record: dict[str, Any]) -> None:
        print(f"epoch {record['epoch']}/{config.epochs}: train NLL {record['train_nll']:.4f}, validation NLL "
              f"{record['val_nll']:.4f} nats = {record['val_bits']:.3f} bits per latent, "
              f"{record['maps_per_s']:.0f} maps/s, {record['seconds']:.0f} s", flush=True)

    history = prior.train_prior(args.checkpoint, args.data_dir, out, config, resume=args.resume,
                                overwrite=args.overwrite, data_options=_data_options(args),
                                allow_other_data=args.allow_other_data, callback=report)
    best = min(history, key=lambda h: h["val_nll"])
    print(f"best validation NLL {best['val_nll']:.4f} nats per latent (epoch {best['epoch']}): {out / 'best.pt'}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from . import prior, viz
    start = time.perf_counter()
    images, _, bins = prior.sample_slices(args.checkpoint, args.prior, args.n, seed=args.seed,
                                          temperature=args.temperature, position=args.position, device=args.device,
                                          progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viz.montage(list(images), [f"position bin {b}" for b in bins], args.out, ncols=min(8, args.n))
    print(f"{args.n} samples (seed {args.seed}, temperature {args.temperature}) written to {args.out} "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line (exit code 2) instead of the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m vqvae_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write the synthetic pelvic MRI phantom in the HipMRI layout")
    p.add_argument("--out", required=True, help="folder to create (it must not exist unless --force)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--size", choices=sorted(phantom.SIZES), default="small",
                   help="small (default): 1,680 slices, ~1/8 of the real data; full: the real 12,660; "
                        "tiny: 300 slices, for tests")
    p.add_argument("--workers", type=_positive_int, default=None, help="processes (default: up to 2)")
    p.add_argument("--force", action="store_true", help="replace an existing phantom folder (and nothing else)")
    p.set_defaults(func=_phantom)

    p = sub.add_parser("inspect", help="summarise a HipMRI-layout dataset and list its problems")
    p.add_argument("data_dir")
    p.add_argument("--json", type=_json_file, help="also write the report to this JSON file")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("notebooks", help="execute the notebooks headlessly with papermill")
    p.add_argument("--data-dir", default="data/phantom")
    p.add_argument("--fig-dir", default="figures")
    p.add_argument("--build", default="build", help="where generated and executed notebooks go")
    p.add_argument("--smoke", action="store_true", help="fast settings, as in the tests")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 01 03")
    p.set_defaults(func=_notebooks)

    p = sub.add_parser("train", help="train a VQ-VAE; writes best.pt, last.pt and metrics.json to --out "
                                     "(data-parallel under torchrun --nproc_per_node=N)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True, help="run folder (refused if it holds a run, unless --resume/--overwrite)")
    p.add_argument("--preset", choices=sorted(train.PRESETS), default=None,
                   help="recipe (default: 'default'; with --resume: the run's own)")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    _add_run_options(p)
    p.add_argument("--seed", type=_seed)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--limit", type=_positive_int, help="train on the first N training slices only")
    p.add_argument("--downsample", type=int, choices=(4, 8, 16))
    p.add_argument("--ssim-weight", type=_non_negative_float, help="loss = MSE + W (1 - SSIM) (default: the preset's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder and decoder (GPU runs)")
    p.set_defaults(func=_train)

    p = sub.add_parser("vae", help="train the Gaussian VAE (default recipe, same budget as the VQ-VAE) for comparison")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True, help="run folder (refused if it holds a run, unless --resume/--overwrite)")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--downsample", type=int, choices=(4, 8, 16))
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=_seed)
    p.add_argument("--limit", type=_positive_int, help="train on the first N training slices only")
    _add_run_options(p)
    p.set_defaults(func=_vae)

    p = sub.add_parser("prior", help="fit a PixelCNN prior to the code index maps a VQ-VAE gives the train split")
    p.add_argument("--checkpoint", required=True, help="the VQ-VAE checkpoint")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True, help="run folder (refused if it holds a run, unless --resume/--overwrite)")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=_seed)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--limit", type=_positive_int, help="train on the maps of the first N training slices only")
    p.add_argument("--channels", type=_positive_int)
    p.add_argument("--layers", type=_positive_int)
    p.add_argument("--kernel", type=_odd_kernel, help="odd kernel size of the gated layers")
    p.add_argument("--positions", type=_non_negative_int, help="slice-position bins to condition on (0: unconditional)")
    _add_run_options(p)
    p.set_defaults(func=_prior)

    p = sub.add_parser("sample", help="draw new slices: index maps from a prior, decoded by its VQ-VAE")
    p.add_argument("--checkpoint", required=True, help="the VQ-VAE checkpoint the prior was trained for")
    p.add_argument("--prior", required=True, help="the prior checkpoint")
    p.add_argument("--n", type=_positive_int, default=16)
    p.add_argument("--out", required=True, type=_png_out,
                   help="PNG file for the grid of samples (a folder: FOLDER/samples.png)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--temperature", type=_positive_float, default=1.0)
    p.add_argument("--position", type=_non_negative_int, help="slice-position bin of every sample (default: drawn at random)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_sample)

    p = sub.add_parser("bench", help="benchmark the data path, training and evaluation against the common recipe")
    p.add_argument("--data-dir", default="data/phantom-full",
                   help="a HipMRI-layout folder (default: the full-size phantom, `phantom --size full`)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--steps", type=_positive_int, default=20, help="timed training steps of 32 slices each")
    p.add_argument("--warmup", type=_non_negative_int, default=2, help="untimed training steps first")
    p.add_argument("--checkpoint", default="checkpoints/default.pt",
                   help="VQ-VAE for the evaluation benchmark ('none': a fresh default model)")
    p.add_argument("--workers", type=_positive_int, help="decoding threads (default: one per core, at most 8)")
    p.add_argument("--compile", action="store_true", help="torch.compile our pipeline's encoder and decoder")
    p.add_argument("--full-epoch", action=argparse.BooleanOptionalAction, default=None,
                   help="also time one whole epoch of the default preset (default: on CUDA only)")
    p.add_argument("--json", type=_json_file, help="also write every figure to this JSON file")
    p.set_defaults(func=_bench)

    p = sub.add_parser("evaluate", help="score a checkpoint on every slice of a split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--split", choices=data.SPLITS, default="test")
    p.add_argument("--json", type=_json_file, help="also write the summary and per-slice scores to this JSON file")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    _add_data_options(p)
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error (bad data, checkpoint, folder or value) is one line on stderr and exit code 2,
    and Ctrl-C exits with 130 (the run folder keeps its finished epochs)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if distributed.is_main() else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if distributed.launched() and args.command != "train":
            raise RuntimeError(f"only `train` runs data-parallel; run `{args.command}` without torchrun")
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as e:  # DataError, CheckpointError, RunError and the OS's errors
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
