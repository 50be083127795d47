"""Command line: `hipmri-vqvae COMMAND ...` where the package is installed, else `python -m vqvae_lib COMMAND ...`
(run with --help for each command). train, vae and prior also read their options from a TOML file (--config)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

from . import __version__, data, distributed, phantom, prior, runs, sample_metrics, train
from .checkpoint import CheckpointError, load_checkpoint
from .fileio import save_json
from .model import QUANTIZERS
from .quantizer import INITS

CONFIGURABLE = ("train", "vae", "prior", "features")  # the commands that take --config, --log-dir and --resume auto
_VAE_RECIPE = {"preset": "default", "ssim_weight": 0.0}  # the VAE's budget is the default VQ-VAE recipe's
# What the user can fix (a bad option, value, file, folder, checkpoint or data; DataError and CheckpointError are
# ValueErrors): exit code 2. Any other RuntimeError or OSError (out of memory, a full disk): exit code 1.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, runs.RunError)
TENSORBOARD_MISSING = "--log-dir needs TensorBoard, which is not installed: pip install 'hipmri-vqvae[tensorboard]'"


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
    source = Path(args.notebook_dir) if args.notebook_dir else runner.NOTEBOOK_DIR
    for out in runner.run_all(params, Path(args.build), only=args.only, source=source):
        print(f"executed {out}")
    return 0


def _checkpoints(args: argparse.Namespace) -> int:
    from . import readme, retrain, runner, tasks
    data_dir = args.data_dir.resolve() if args.data_dir else tasks.DEFAULT_PHANTOM
    tasks.ensure_phantom(data_dir)
    out = (args.out or runner.in_repo("checkpoints")).resolve()
    manifest = retrain.build(data_dir, (args.runs or runner.in_repo("build/checkpoints")).resolve(), out,
                             device=args.device)
    if out == runner.in_repo("checkpoints").resolve():
        readme.write_block("checkpoints", readme.checkpoints_markdown(manifest))
        print(f"updated the checkpoints' results in {readme.README}")
    return 0


def _sweeps(args: argparse.Namespace) -> int:
    from . import readme, runner, sweeps, tasks
    data_dir = args.data_dir.resolve() if args.data_dir else tasks.DEFAULT_PHANTOM
    tasks.ensure_phantom(data_dir)
    out = (args.out or runner.in_repo(sweeps.RESULTS)).resolve()
    written = sweeps.run_sweeps(data_dir, (args.runs or runner.in_repo("build/sweeps")).resolve(), out,
                                groups=args.only, device=args.device)
    print(f"{len(written)} result files written; every run of {', '.join(args.only or sweeps.GROUPS)} is done")
    if out == runner.in_repo(sweeps.RESULTS).resolve() and all((out / f"{r.name}.json").is_file()
                                                               for r in sweeps.runs_of()):
        readme.write_block("sweeps", readme.expected_block("sweeps"))
        print(f"updated the sweeps' results in {readme.README}")
    return 0


def _task(name: str, *args: Any, **kwargs: Any) -> int:
    """Run vqvae_lib.tasks.NAME (figures, lab, explorer): its exit code, or 0 for one that returns none."""
    from . import tasks
    code = getattr(tasks, name)(*args, **kwargs)
    return code if isinstance(code, int) else 0


def _book(args: argparse.Namespace) -> int:
    from . import book, pageserver
    options = {key: getattr(args, key).resolve() for key in ("executed", "out", "fig_dir") if getattr(args, key)}
    index = book.build(**options)
    print(f"wrote the site {index}")
    if args.screenshot:
        try:
            print(f"wrote {book.screenshot(index.parent, args.screenshot)}")
        except pageserver.BrowserMissing as e:
            logging.getLogger(__name__).warning("%s was not written: %s", args.screenshot, e)
    return 0


def _ipynb(args: argparse.Namespace) -> int:
    from . import runner
    changed = runner.publish(Path(args.out), check=args.check)
    if args.check:
        if changed:
            print(f"stale in {args.out} (rebuild with `python -m vqvae_lib ipynb --out {args.out}`): "
                  + ", ".join(p.name for p in changed), file=sys.stderr)
            return 1
        print(f"{args.out}: up to date")
        return 0
    for path in changed:
        print(f"{'wrote' if path.exists() else 'removed'} {path}")
    print(f"{args.out}: {len(changed)} changed")
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
    parse.kind = kind  # what a --config file must give: a number (`_config_value`)
    return parse


_positive_int = _number(int, lambda v: v > 0, "a whole number > 0")
_positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
_non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
_non_negative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
_seed = _number(int, lambda v: 0 <= v < 2 ** 63, "a whole number in [0, 2^63)")
_odd_kernel = _number(int, lambda v: v >= 3 and v % 2 == 1, "an odd whole number >= 3")
_unit_fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
_top_p = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _levels(text: str) -> list[int]:
    """An argparse type for --fsq-levels: whole numbers >= 2, comma-separated ("8,5,5,5")."""
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be whole numbers >= 2 separated by commas, got {text!r}") from None
    if not all(level >= 2 for level in levels):
        raise argparse.ArgumentTypeError(f"every level must be >= 2, got {text}")
    return levels


def _json_file(text: str) -> Path:
    """An argparse type for a file to write: not a folder, in a folder that exists."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give the name of a file to write")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {path.parent} does not exist")
    return path


def _resume_mode(text: str) -> str:
    """An argparse type for the optional value of --resume: "auto"."""
    if text != "auto":
        raise argparse.ArgumentTypeError(f"takes no value or 'auto', got {text!r}")
    return text


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


def _default_text(configs: dict[str, Any], key: str) -> str:
    """"default: V" of setting `key` of configs (preset name -> TrainConfig or PriorTrainConfig, the default
    first), then the other presets' values where they differ."""
    def value(config: Any) -> Any:
        return config.model[key] if key in config.model else getattr(config, key)
    (_, first), *others = configs.items()
    return f"default: {value(first)}" + "".join(f"; {name} preset: {value(config)}" for name, config in others
                                                  if value(config) != value(first))


def _add_run_options(p: argparse.ArgumentParser, configs: dict[str, Any]) -> None:
    """The options of every training command (train, vae, prior); configs: as in `_default_text`."""
    plain = "".join(f"; fp32 for the {name} preset" for name, config in configs.items() if not config.amp)
    p.add_argument("--precision", choices=train.PRECISIONS,
                   help="autocast precision; auto: bf16 where the hardware has it, else fp16 with loss scaling on "
                        f"CUDA, fp32 on MPS{plain} ({_default_text(configs, 'precision')})")
    p.add_argument("--resume", nargs="?", const=True, default=False, type=_resume_mode, metavar="auto",
                   help="continue the run in --out from its last.pt (from scratch if it has no finished epoch), "
                        "keeping its settings but those given; --resume auto: resume if --out holds a run of this "
                        "kind, else start a new one, for jobs that are requeued (default: a new run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run of the same kind in --out, once the new run has finished its first epoch")
    p.add_argument("--allow-other-data", action="store_true",
                   help="with --resume: continue even on other data than the run's earlier epochs")
    p.add_argument("--config", metavar="FILE.toml",
                   help="read options from this flat TOML file, its keys this command's long option names "
                        "(epochs = 5, data_dir = \"DATA\"); options on the command line win (default: none)")
    p.add_argument("--log-dir", metavar="DIR",
                   help="also write each epoch's numbers as TensorBoard scalars (step = epoch) into DIR; needs "
                        "pip install 'hipmri-vqvae[tensorboard]' (default: none)")
    _add_data_options(p)


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options among `names` that are set (the trainer's config fills in the rest)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _run_config(args: argparse.Namespace, kind: str, make: Callable[..., Any], new: dict[str, Any],
                overrides: dict[str, Any]) -> tuple[Any, bool, int]:
    """The config of the run to train in --out, whether it resumes, and how many epochs it has finished.

    Resuming (--resume, or --resume auto where --out holds a run of `kind`) takes the run's own config, changed
    only where an option is given (the trainer refuses what may not change); a new run, or a folder with no
    finished epoch, gets make(**new, **overrides).
    """
    last = Path(args.out) / "last.pt"
    resume = runs.holds_run(args.out, kind) if args.resume == "auto" else args.resume
    if not (resume and last.exists()):
        return make(**{**new, **overrides}), resume, 0
    payload = load_checkpoint(last, kind=kind)
    try:
        return make(**{**payload["train_config"], **overrides}), True, payload["epoch"]
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{last} holds an unusable train config: {e}") from e


class _Scalars:
    """TensorBoard scalars in log_dir of the numbers of each epoch record (step = epoch), each epoch once.

    A resumed run that had finished `done` epochs carries on after the last step log_dir holds, first writing the
    epochs a killed run finished but had not logged yet; a new run (done = 0) starts at step 1 and supersedes in
    TensorBoard the steps log_dir held (purge_step).
    """

    def __init__(self, log_dir: Path, done: int) -> None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        if log_dir.exists() and not log_dir.is_dir():
            raise NotADirectoryError(f"--log-dir {log_dir} is a file, not a folder")
        logged = 0
        if log_dir.is_dir():
            events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every step
            events.Reload()
            logged = max((e.step for tag in events.Tags()["scalars"] for e in events.Scalars(tag)), default=0)
        self.log_dir, self.writer, self.next = log_dir, None, min(logged, done) + 1
        self.purge = self.next if logged >= self.next else None

    def write(self, history: list[dict[str, Any]]) -> None:
        """Write the records of history from the next step on (made the first time there is one)."""
        from torch.utils.tensorboard import SummaryWriter
        for record in history:
            if record["epoch"] < self.next:
                continue
            if self.writer is None:
                self.writer = SummaryWriter(str(self.log_dir), purge_step=self.purge)
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["epoch"])
            self.next = record["epoch"] + 1
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fit(args: argparse.Namespace, kind: str, make: Callable[..., Any], new: dict[str, Any],
         overrides: dict[str, Any], fit: Callable[[Any, bool, Callable[[dict[str, Any]], None]], list[dict[str, Any]]],
         line: Callable[[Any, dict[str, Any]], str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train the run of a training command: its config (`_run_config`), then fit(config, resume, callback), which
    calls callback(record) after each epoch; that prints line(config, record) and writes the --log-dir scalars.
    The run's config.json records the command line and its options. Returns (history, the records trained now).
    """
    config, resume, done = _run_config(args, kind, make, new, overrides)
    out, trained = Path(args.out), []
    scalars = _Scalars(Path(args.log_dir), done) if args.log_dir is not None and distributed.is_main() else None

    def callback(record: dict[str, Any]) -> None:
        trained.append(record)
        print(line(config, record), flush=True)
        if scalars is not None:  # from metrics.json where epochs of a killed run are still to be logged
            scalars.write(json.loads((out / "metrics.json").read_text()) if record["epoch"] > scalars.next
                          else [record])

    options = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
               if key not in ("func", "command_line")}
    try:
        with runs.invoked_as(args.command_line, options):
            history = fit(config, resume, callback)
        if scalars is not None:
            scalars.write(history)
    finally:
        if scalars is not None:
            scalars.close()
    return history, trained


def _train(args: argparse.Namespace) -> int:
    overrides = _given(args, "epochs", "seed", "batch_size", "lr", "limit", "downsample", "device", "ssim_weight",
                       "precision", "normalize_mse", "quantizer", "codebook_size", "embed_dim", "beta", "ema", "init",
                       "restart", "lookup_dim", "fsq_levels")
    if args.quantizer == "fsq" and args.codebook_size is None:  # FSQ's codes are its grid of levels
        overrides["codebook_size"] = math.prod(args.fsq_levels or train.make_config().model["fsq_levels"])
    out = Path(args.out)

    def line(config: train.TrainConfig, r: dict[str, Any]) -> str:
        return (f"epoch {r['epoch']}/{config.epochs}: loss {r['train_loss']:.4f} (MSE {r['train_recon']:.4f}, "
                f"SSIM {r['train_ssim']:.4f}), val SSIM {r['val_ssim']:.4f}, PSNR {r['val_psnr']:.2f} dB, "
                f"codes {r['val_active']}/{config.model['codebook_size']} (perplexity {r['val_perplexity']:.1f}), "
                f"{r['images_per_s']:.0f} img/s, {r['seconds']:.0f} s")

    history, trained = _fit(
        args, "vqvae", train.make_config, {"preset": args.preset or "default"},
        {**({"preset": args.preset} if args.preset else {}), **overrides},
        lambda config, resume, callback: train.train(
            args.data_dir, out, config, resume=resume, overwrite=args.overwrite, compile=args.compile,
            data_options=_data_options(args), allow_other_data=args.allow_other_data, callback=callback), line)
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


def _per_scan(s: dict[str, Any]) -> str:
    """An evaluation summary's per-scan means, with their bootstrap intervals over scans, in one line."""
    n, patients = s["n_scans"], s["n_patients"]
    parts = []
    for label, name, digits, unit in (("SSIM", "ssim", 4, ""), ("Gaussian SSIM", "ssim_gaussian", 4, ""),
                                      ("PSNR", "psnr", 2, " dB")):
        parts.append(f"{label} {s[f'scan_{name}_mean']:.{digits}f}{unit}")
        if n > 1:
            low, high = s[f"scan_{name}_ci95"]
            what = "95 % bootstrap interval over scans " if name == "ssim" else ""
            parts[-1] += f" ({what}{low:.{digits}f}..{high:.{digits}f})"
    note = "" if n > 1 else " (a single scan: no interval over scans can be given)"
    return f"{n} scan{'s' * (n != 1)} of {patients} patient{'s' * (patients != 1)}; {', '.join(parts)}{note}"


def _evaluate(args: argparse.Namespace) -> int:
    result = train.evaluate(args.checkpoint, args.data_dir, args.split, batch_size=args.batch_size,
                            device=args.device, data_options=_data_options(args))
    s = result["summary"]
    print(f"{args.checkpoint} (epoch {s['epoch']}) on {args.split}, {s['n_slices']} slices:")
    print(f"  SSIM  mean {s['ssim_mean']:.4f}  min {s['ssim_min']:.4f}  max {s['ssim_max']:.4f}   "
          f"(scikit-image default: 7x7 uniform window)")
    print(f"  SSIM  mean {s['ssim_gaussian_mean']:.4f}  min {s['ssim_gaussian_min']:.4f}  "
          f"max {s['ssim_gaussian_max']:.4f}   (Wang et al. 2004: 11x11 Gaussian, sigma 1.5; MONAI, most papers)")
    print(f"  PSNR  mean {s['psnr_mean']:.2f}  min {s['psnr_min']:.2f}  max {s['psnr_max']:.2f} dB")
    print(f"  per scan: {_per_scan(s)}")
    print(f"  codes {s['active_codes']}/{s['codebook_size']} active, perplexity {s['perplexity']:.1f}")
    if args.json:
        slices = [{"name": name, "case": int(case), "week": int(week), "slice": int(index), "ssim": float(ssim),
                   "ssim_gaussian": float(ssim_g), "psnr": float(psnr)}
                  for name, case, week, index, ssim, ssim_g, psnr in
                  zip(result["names"], result["cases"], result["weeks"], result["slices"], result["ssim"],
                      result["ssim_gaussian"], result["psnr"])]
        save_json(args.json, {"checkpoint": result["checkpoint"], "split": args.split, "summary": s,
                              "scans": result["scans"], "slices": slices})
        print(f"results written to {args.json}")
    return 0


def _vae(args: argparse.Namespace) -> int:
    from . import vae
    out = Path(args.out)

    def line(config: train.TrainConfig, r: dict[str, Any]) -> str:
        return (f"epoch {r['epoch']}/{config.epochs}: loss {r['train_loss']:.4f} nats/pixel "
                f"(MSE {r['train_recon']:.4f}, KL {r['train_kl']:.4f}), val SSIM {r['val_ssim']:.4f}, "
                f"PSNR {r['val_psnr']:.2f} dB, {r['val_active']}/{config.model['embed_dim']} latent channels "
                f"used, {r['images_per_s']:.0f} img/s, {r['seconds']:.0f} s")

    history, _ = _fit(
        args, "vae", train.make_config, _VAE_RECIPE,
        _given(args, "epochs", "seed", "downsample", "device", "limit", "precision"),
        lambda config, resume, callback: vae.train_vae(
            args.data_dir, out, config, resume=resume, overwrite=args.overwrite, data_options=_data_options(args),
            allow_other_data=args.allow_other_data, callback=callback), line)
    best = max(history, key=lambda h: h["val_ssim"])
    print(f"best validation SSIM {best['val_ssim']:.4f} (epoch {best['epoch']}): {out / 'best.pt'}")
    return 0


def _prior(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    out = Path(args.out)

    def line(config: prior.PriorTrainConfig, r: dict[str, Any]) -> str:
        return (f"epoch {r['epoch']}/{config.epochs}: train NLL {r['train_nll']:.4f}, validation NLL "
                f"{r['val_nll']:.4f} nats = {r['val_bits']:.3f} bits per latent, "
                f"{r['maps_per_s']:.0f} maps/s, {r['seconds']:.0f} s")

    history, _ = _fit(
        args, "prior", prior.make_prior_config, {"codebook_size": load_model(args.checkpoint)[0].config.codebook_size},
        _given(args, "epochs", "seed", "batch_size", "lr", "limit", "device", "channels", "layers", "kernel",
               "positions", "precision", "arch", "dropout", "heads"),
        lambda config, resume, callback: prior.train_prior(
            args.checkpoint, args.data_dir, out, config, resume=resume, overwrite=args.overwrite,
            data_options=_data_options(args), allow_other_data=args.allow_other_data, callback=callback), line)
    best = min(history, key=lambda h: h["val_nll"])
    print(f"best validation NLL {best['val_nll']:.4f} nats per latent (epoch {best['epoch']}): {out / 'best.pt'}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from . import viz
    start = time.perf_counter()
    images, _, bins = prior.sample_slices(args.checkpoint, args.prior, args.n, seed=args.seed,
                                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                          position=args.position, device=args.device, progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viz.montage(list(images), [f"position bin {b}" for b in bins], args.out, ncols=min(8, args.n))
    print(f"{args.n} samples (seed {args.seed}, temperature {args.temperature}) written to {args.out} "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


def _features(args: argparse.Namespace) -> int:
    out = Path(args.out)

    def line(config: sample_metrics.FeatureTrainConfig, r: dict[str, Any]) -> str:
        organs = f", organs {r['val_organ_accuracy']:.3f}" if "val_organ_accuracy" in r else ""
        return (f"epoch {r['epoch']}/{config.epochs}: train loss {r['train_loss']:.4f}, validation loss "
                f"{r['val_loss']:.4f}, accuracy: position {r['val_position_accuracy']:.3f}{organs}, "
                f"{r['seconds']:.0f} s")

    history, _ = _fit(
        args, "features", sample_metrics.make_feature_config, {},
        _given(args, "epochs", "seed", "batch_size", "lr", "limit", "device", "precision"),
        lambda config, resume, callback: sample_metrics.train_features(
            args.data_dir, out, config, resume=resume, overwrite=args.overwrite, data_options=_data_options(args),
            allow_other_data=args.allow_other_data, callback=callback), line)
    best = min(history, key=lambda h: h["val_loss"])
    print(f"best validation loss {best['val_loss']:.4f} (epoch {best['epoch']}, position accuracy "
          f"{best['val_position_accuracy']:.3f}): {out / 'best.pt'}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line (exit code 2) instead of the usage text, and the default
    of every option that takes a value in its help (unless the help states it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        stated = action.help is not None and ("(default" in action.help or "default:" in action.help)
        if action.option_strings and action.nargs != 0 and not action.required and action.default is not None \
                and not stated:
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"
        return action


def _config_value(action: argparse.Action, value: Any) -> Any:
    """A --config file's TOML value for an option, checked as the option's own type and choices would check its
    text; ArgumentTypeError when it has the wrong type or is a bad value."""
    flag = action.nargs == 0
    if isinstance(value, bool) and (flag or action.const is True):  # a flag, or --resume
        return value
    if flag:
        raise argparse.ArgumentTypeError(f"must be true or false, got {value!r}")
    number = getattr(action.type, "kind", action.type) in (int, float)
    if isinstance(value, bool) or not isinstance(value, (int, float) if number else str):
        raise argparse.ArgumentTypeError(f"must be {'a number' if number else 'a string'}, got {value!r}")
    try:
        value = action.type(str(value)) if action.type is not None else value
    except ValueError:  # a plain int or float type
        raise argparse.ArgumentTypeError(f"must be a {action.type.__name__}, got {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def _load_config(parser: argparse.ArgumentParser, path: str) -> None:
    """Make the settings of the flat TOML file `path` the defaults of a command's parser (so that options on the
    command line win over them); an unreadable file, unknown key or bad value ends in parser.error."""
    import tomllib
    try:
        with open(path, "rb") as f:
            settings = tomllib.load(f)
    except OSError as e:
        parser.error(f"cannot read the config file {path}: {e.strerror}")
    except tomllib.TOMLDecodeError as e:
        parser.error(f"config file {path} is not valid TOML: {e}")
    options = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    for key, value in settings.items():
        action = options.get(key.replace("-", "_"))
        if action is None:
            parser.error(f"config file {path}: unknown key {key!r}; known: {', '.join(sorted(options))}")
        try:
            parser.set_defaults(**{action.dest: _config_value(action, value)})
        except argparse.ArgumentTypeError as e:
            parser.error(f"config file {path}: {key}: {e}")
        action.required = False


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser of each command of `build_parser`'s parser, by name."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argv parsed by `build_parser`'s parser, a --config file's settings first (for train, vae and prior), with
    the checks that take more than one option: parser.error (exit code 2) where they fail."""
    command = commands(parser)[argv[0]] if argv and argv[0] in CONFIGURABLE else None
    if command is not None:
        probe = _Parser(prog=command.prog, add_help=False)
        probe.add_argument("--config")
        path = probe.parse_known_args(argv[1:])[0].config
        if path is not None:
            _load_config(command, path)
    args = parser.parse_args(argv)
    args.command_line = [*parser.prog.split(), *argv]
    if command is not None:
        if args.resume and args.overwrite:
            command.error("--resume and --overwrite exclude each other")
        if args.log_dir is not None:
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError:
                command.error(TENSORBOARD_MISSING)
    return args


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; named (prog) as the user typed it: the console script, or the module."""
    prog = "hipmri-vqvae" if Path(sys.argv[0]).stem == "hipmri-vqvae" else "python -m vqvae_lib"
    parser = _Parser(prog=prog, description=__doc__)
    parser.add_argument("--version", action="version", version=f"hipmri-vqvae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    presets = {name: train.make_config(name) for name in sorted(train.PRESETS, key=lambda n: n != "default")}
    vae_recipe = {"default": train.make_config(**_VAE_RECIPE)}
    prior_recipe = {"default": prior.make_prior_config()}

    p = sub.add_parser("phantom", help="write the synthetic pelvic MRI phantom in the HipMRI layout")
    p.add_argument("--out", required=True, help="folder to create (it must not exist unless --force)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed of the anatomy and scans")
    p.add_argument("--size", choices=sorted(phantom.SIZES), default="small",
                   help="small (default): 1,680 slices, ~1/8 of the real data; full: the real 12,660; "
                        "tiny: 300 slices, for tests")
    p.add_argument("--workers", type=_positive_int, default=None, help="processes (default: up to 2)")
    p.add_argument("--force", action="store_true", help="replace an existing phantom folder (and nothing else)")
    p.set_defaults(func=_phantom)

    p = sub.add_parser("inspect", help="summarise a HipMRI-layout dataset and list its problems")
    p.add_argument("data_dir")
    p.add_argument("--json", type=_json_file, help="also write the report to this JSON file (default: none)")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("notebooks", help="execute the notebooks headlessly with papermill")
    p.add_argument("--data-dir", default="data/phantom")
    p.add_argument("--fig-dir", default="figures")
    p.add_argument("--build", default="build", help="where generated and executed notebooks go")
    p.add_argument("--smoke", action="store_true", help="fast settings, as in the tests")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 01 03")
    p.add_argument("--notebook-dir", help="folder of the NN_name.py notebooks (default: the repository's notebooks/)")
    p.set_defaults(func=_notebooks)

    p = sub.add_parser("ipynb", help="publish the notebooks for Colab: OUT/NN_name.ipynb with a setup cell, no outputs")
    p.add_argument("--out", default="colab", help="folder of the published notebooks (default: colab)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 listing the files that are stale")
    p.set_defaults(func=_ipynb)

    p = sub.add_parser("figures", help="every figure: the default phantom if absent, every notebook executed, "
                                      "the explorer page's screenshot (skipped, with a warning, without a Chromium)")
    p.add_argument("--data-dir", type=Path, help="the data (default: data/phantom in the repository, written if "
                                                 "absent)")
    p.add_argument("--fig-dir", type=Path, help="where the figures go (default: figures/ in the repository)")
    p.add_argument("--build", type=Path, help="where generated and executed notebooks go (default: build/ in the "
                                              "repository)")
    p.set_defaults(func=lambda args: _task("figures", **{key: getattr(args, key).resolve() for key in
                                                         ("data_dir", "fig_dir", "build") if getattr(args, key)}))

    p = sub.add_parser("book", help="the series as a static website of the notebooks as `figures` executed them, "
                                   "with the README as its front page (OUT/html/index.html)")
    p.add_argument("--executed", type=Path, help="the executed notebooks (default: build/executed/ in the repository)")
    p.add_argument("--out", type=Path, help="the site's folder, replaced if it holds an earlier site (default: "
                                            "build/book/ in the repository)")
    p.add_argument("--fig-dir", type=Path, help="the README's figures (default: figures/ in the repository)")
    p.add_argument("--screenshot", type=Path, help="also write a PNG screenshot of one chapter's page to this "
                                                   "file (default: none; needs a Chromium: skipped with a warning "
                                                   "without one)")
    p.set_defaults(func=_book)

    p = sub.add_parser("lab", help="JupyterLab on 127.0.0.1 with the series; the .py notebooks open as notebooks")
    p.add_argument("--lab-dir", type=Path, help="the folder it shows (default: the repository)")
    p.add_argument("lab_args", nargs=argparse.REMAINDER,
                   help="after --: more options for `jupyter lab` (a token goes in $JUPYTER_TOKEN, not here)")
    p.set_defaults(func=lambda args: _task("lab", args=args.lab_args[args.lab_args[:1] == ["--"]:],
                                           **({"lab_dir": args.lab_dir.resolve()} if args.lab_dir else {})))

    p = sub.add_parser("explorer", help="serve the codebook explorer as a web page (Voila) on 127.0.0.1")
    p.add_argument("--port", type=_positive_int, help="the port (default: a free one)")
    p.set_defaults(func=lambda args: _task("explorer", port=args.port))

    p = sub.add_parser("checkpoints", help="retrain every committed checkpoint from the current code, resumably, "
                                          "then write them and MANIFEST.json (about an hour on a 2-core CPU)")
    p.add_argument("--data-dir", type=Path, help="the data (default: data/phantom in the repository, written if "
                                                 "absent)")
    p.add_argument("--runs", type=Path, help="the run folders, resumed when rerun (default: build/checkpoints/ in "
                                             "the repository)")
    p.add_argument("--out", type=Path, help="where the checkpoints and MANIFEST.json go (default: checkpoints/ in "
                                            "the repository)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=_checkpoints)

    p = sub.add_parser("sweeps", help="the short runs behind notebooks 03, 05 and 08, resumably; one result JSON "
                                     "per run (about an hour on a 2-core CPU)")
    p.add_argument("--data-dir", type=Path, help="the data (default: data/phantom in the repository, written if "
                                                 "absent)")
    p.add_argument("--runs", type=Path, help="the run folders, resumed when rerun (default: build/sweeps/ in the "
                                             "repository)")
    p.add_argument("--out", type=Path, help="where the result files go (default: results/sweeps/ in the repository)")
    p.add_argument("--only", nargs="+", metavar="GROUP", help="groups to run (default: all): collapse, beta, size, "
                                                              "rd, quantizers")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=_sweeps)

    run_folder = "run folder (refused if it holds a run, unless --resume or --overwrite)"
    p = sub.add_parser("train", help="train a VQ-VAE; writes config.json, best.pt, last.pt, metrics.json and "
                                     "metrics.csv to --out (data-parallel under torchrun --nproc_per_node=N)")
    p.add_argument("--data-dir", required=True, help="the HipMRI-layout data folder")
    p.add_argument("--out", required=True, help=run_folder)
    p.add_argument("--preset", choices=sorted(train.PRESETS), default=None,
                   help="recipe (default: default; with --resume: the run's own); it sets the defaults below")
    p.add_argument("--epochs", type=_positive_int, help=f"epochs to train ({_default_text(presets, 'epochs')})")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    _add_run_options(p, presets)
    p.add_argument("--seed", type=_seed, help=f"random seed ({_default_text(presets, 'seed')})")
    p.add_argument("--batch-size", type=_positive_int,
                   help=f"slices per optimiser step ({_default_text(presets, 'batch_size')})")
    p.add_argument("--lr", type=_positive_float, help=f"peak learning rate ({_default_text(presets, 'lr')})")
    p.add_argument("--limit", type=_positive_int, help="train on the first N training slices only (default: all)")
    p.add_argument("--downsample", type=int, choices=(4, 8, 16),
                   help=f"latent grid = slice size / this ({_default_text(presets, 'downsample')})")
    p.add_argument("--ssim-weight", type=_non_negative_float,
                   help=f"loss = MSE + W (1 - SSIM) ({_default_text(presets, 'ssim_weight')})")
    p.add_argument("--normalize-mse", action="store_const", const=True, default=None,
                   help="divide the MSE by the training slices' variance, as DeepMind's sonnet example does "
                        f"({_default_text(presets, 'normalize_mse')})")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder and decoder (GPU runs)")
    q = p.add_argument_group("the quantizer (notebooks 03 and 08)")
    q.add_argument("--quantizer", choices=QUANTIZERS,
                   help="vq: the paper's nearest code with the straight-through copy; rotation: the rotation trick; "
                        "cosine: l2-normalised codes in --lookup-dim dimensions; fsq: finite scalar quantization "
                        f"({_default_text(presets, 'quantizer')})")
    q.add_argument("--codebook-size", type=_positive_int,
                   help=f"K, the number of codes ({_default_text(presets, 'codebook_size')}; fsq: the product of "
                        "--fsq-levels, set for you)")
    q.add_argument("--embed-dim", type=_positive_int,
                   help=f"D, the length of the encoder's output vectors ({_default_text(presets, 'embed_dim')})")
    q.add_argument("--beta", type=_non_negative_float,
                   help=f"weight of the commitment loss ({_default_text(presets, 'beta')})")
    q.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="learn the codebook by moving averages, not the codebook loss "
                        f"({_default_text(presets, 'ema')})")
    q.add_argument("--init", choices=INITS, help=f"codebook initialisation ({_default_text(presets, 'init')})")
    q.add_argument("--restart", action=argparse.BooleanOptionalAction, default=None,
                   help=f"re-set dead codes to encoder outputs ({_default_text(presets, 'restart')})")
    q.add_argument("--lookup-dim", type=_positive_int,
                   help=f"cosine: dimensions of the code lookup ({_default_text(presets, 'lookup_dim')})")
    q.add_argument("--fsq-levels", type=_levels,
                   help="fsq: levels per dimension, comma-separated "
                        f"(default: {','.join(map(str, presets['default'].model['fsq_levels']))})")
    p.set_defaults(func=_train)

    p = sub.add_parser("vae", help="train the Gaussian VAE (default recipe, same budget as the VQ-VAE) for comparison")
    p.add_argument("--data-dir", required=True, help="the HipMRI-layout data folder")
    p.add_argument("--out", required=True, help=run_folder)
    p.add_argument("--epochs", type=_positive_int, help=f"epochs to train ({_default_text(vae_recipe, 'epochs')})")
    p.add_argument("--downsample", type=int, choices=(4, 8, 16),
                   help=f"latent grid = slice size / this ({_default_text(vae_recipe, 'downsample')})")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=_seed, help=f"random seed ({_default_text(vae_recipe, 'seed')})")
    p.add_argument("--limit", type=_positive_int, help="train on the first N training slices only (default: all)")
    _add_run_options(p, vae_recipe)
    p.set_defaults(func=_vae)

    p = sub.add_parser("prior", help="fit a prior (gated PixelCNN or transformer) to the code index maps a VQ-VAE "
                                     "gives the train split")
    p.add_argument("--checkpoint", required=True, help="the VQ-VAE checkpoint")
    p.add_argument("--data-dir", required=True, help="the HipMRI-layout data folder")
    p.add_argument("--out", required=True, help=run_folder)
    p.add_argument("--epochs", type=_positive_int, help=f"epochs to train ({_default_text(prior_recipe, 'epochs')})")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=_seed, help=f"random seed ({_default_text(prior_recipe, 'seed')})")
    p.add_argument("--batch-size", type=_positive_int,
                   help=f"maps per optimiser step ({_default_text(prior_recipe, 'batch_size')})")
    p.add_argument("--lr", type=_positive_float, help=f"peak learning rate ({_default_text(prior_recipe, 'lr')})")
    p.add_argument("--limit", type=_positive_int,
                   help="train on the maps of the first N training slices only (default: all)")
    p.add_argument("--arch", choices=prior.ARCHS,
                   help=f"the prior network ({_default_text(prior_recipe, 'arch')})")
    p.add_argument("--channels", type=_positive_int,
                   help=f"channels of the gated layers, or the transformer's width "
                        f"({_default_text(prior_recipe, 'channels')})")
    p.add_argument("--layers", type=_positive_int,
                   help=f"gated layers or transformer blocks ({_default_text(prior_recipe, 'layers')})")
    p.add_argument("--heads", type=_positive_int,
                   help=f"attention heads of the transformer ({_default_text(prior_recipe, 'heads')})")
    p.add_argument("--dropout", type=_unit_fraction,
                   help=f"dropout on every layer's residual branch ({_default_text(prior_recipe, 'dropout')})")
    p.add_argument("--kernel", type=_odd_kernel,
                   help=f"odd kernel size of the gated layers ({_default_text(prior_recipe, 'kernel')})")
    p.add_argument("--positions", type=_non_negative_int,
                   help="slice-position bins to condition on, 0: unconditional "
                        f"({_default_text(prior_recipe, 'positions')})")
    _add_run_options(p, prior_recipe)
    p.set_defaults(func=_prior)

    p = sub.add_parser("sample", help="draw new slices: index maps from a prior, decoded by its VQ-VAE")
    p.add_argument("--checkpoint", required=True, help="the VQ-VAE checkpoint the prior was trained for")
    p.add_argument("--prior", required=True, help="the prior checkpoint")
    p.add_argument("--n", type=_positive_int, default=16, help="number of samples")
    p.add_argument("--out", required=True, type=_png_out,
                   help="PNG file for the grid of samples (a folder: FOLDER/samples.png)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed of the samples")
    p.add_argument("--temperature", type=_positive_float, default=1.0,
                   help="divides the prior's logits: below 1, likelier and less varied samples")
    p.add_argument("--top-k", type=_positive_int, help="draw each code from the k likeliest only (default: all)")
    p.add_argument("--top-p", type=_top_p,
                   help="draw each code from the likeliest codes that together reach this probability (default: 1)")
    p.add_argument("--position", type=_non_negative_int, help="slice-position bin of every sample (default: drawn at random)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
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
    p.add_argument("--json", type=_json_file, help="also write every figure to this JSON file (default: none)")
    p.set_defaults(func=_bench)

    p = sub.add_parser("evaluate", help="score a checkpoint on every slice of a split")
    p.add_argument("--checkpoint", required=True, help="the VQ-VAE checkpoint")
    p.add_argument("--data-dir", required=True, help="the HipMRI-layout data folder")
    p.add_argument("--split", choices=data.SPLITS, default="test", help="the split to score")
    p.add_argument("--json", type=_json_file,
                   help="also write the summary and per-slice scores to this JSON file (default: none)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="slices per forward pass")
    _add_data_options(p)
    p.set_defaults(func=_evaluate)

    features_recipe = {"default": sample_metrics.make_feature_config()}
    p = sub.add_parser("features", help="train the feature network that judges generated slices (its position "
                                        "and organ classifier, `sample_metrics`) on the train split")
    p.add_argument("--data-dir", required=True, help="the HipMRI-layout data folder")
    p.add_argument("--out", required=True, help=run_folder)
    p.add_argument("--epochs", type=_positive_int,
                   help=f"epochs to train ({_default_text(features_recipe, 'epochs')})")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=_seed, help=f"random seed ({_default_text(features_recipe, 'seed')})")
    p.add_argument("--batch-size", type=_positive_int,
                   help=f"slices per optimiser step ({_default_text(features_recipe, 'batch_size')})")
    p.add_argument("--lr", type=_positive_float, help=f"peak learning rate ({_default_text(features_recipe, 'lr')})")
    p.add_argument("--limit", type=_positive_int, help="train on the first N training slices only (default: all)")
    _add_run_options(p, features_recipe)
    p.set_defaults(func=_features)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command line (default: sys.argv[1:]) and return its exit code.

    0: done. 2: a user error, one line on stderr: a bad option or --config file (argparse's "PROG: error: ..."),
    or bad data, checkpoint, file, folder or value ("error: ..."; `USER_ERRORS`). 1: a failure while running,
    any other RuntimeError or OSError (out of memory, a full disk, a diverged training), also one line
    "error: ...". 130: Ctrl-C. A run folder keeps its finished epochs in every case.
    """
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO if distributed.is_main() else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if distributed.launched() and args.command != "train":
            raise ValueError(f"only `train` runs data-parallel; run `{args.command}` without torchrun")
        return args.func(args)
    except USER_ERRORS as e:
        return _fail(e, 2)
    except (RuntimeError, OSError) as e:
        return _fail(e, 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _fail(error: BaseException, code: int) -> int:
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return code
