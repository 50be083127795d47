"""The README's generated blocks: numbers a command measured, written between markers so that they cannot drift.

`make checkpoints` writes the "checkpoints" block from checkpoints/MANIFEST.json; `make sweeps` the "sweeps" block
from results/sweeps/; `make figures` the "science" and "generation" blocks from the results notebooks 05 to 08
save (figures/NN_results.json).
`tests/test_readme.py` checks that the README holds exactly what those files give.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from . import REPO
from .fileio import atomic_write, save_json

README = REPO / "README.md"
SOURCES = {"checkpoints": "`make checkpoints` from checkpoints/MANIFEST.json",
           "sweeps": "`make sweeps` from results/sweeps/",
           "science": "`make figures` from figures/05_results.json, 07_results.json and 08_results.json",
           "generation": "`make figures` from figures/06_results.json and figures/07_results.json"}


def markers(block: str) -> tuple[str, str]:
    """The comment lines that open and close `block` in the README."""
    return f"<!-- {block}: written by {SOURCES[block]}; do not edit by hand -->", f"<!-- end of {block} -->"


def read_block(block: str, readme: Path = README) -> str:
    """The text between the markers of `block` (ValueError naming the README when they are not there once)."""
    begin, end = markers(block)
    text = readme.read_text(encoding="utf-8")
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{readme} must hold the markers of its {block} block once each: {begin!r} ... {end!r}")
    return text.split(begin)[1].split(end)[0].removeprefix("\n")


def write_block(block: str, body: str, readme: Path = README) -> None:
    """Replace the text between the markers of `block` with `body`."""
    old = read_block(block, readme)
    begin, _ = markers(block)
    text = readme.read_text(encoding="utf-8").replace(f"{begin}\n{old}", f"{begin}\n{body}", 1)
    atomic_write(readme, lambda f: f.write(text.encode("utf-8")))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (str, bool, np.bool_)):
        return value if isinstance(value, str) else bool(value)
    return int(value) if isinstance(value, (int, np.integer)) else float(value)


def save_results(path: str | Path, values: dict[str, Any]) -> None:
    """Write a notebook's headline numbers (numbers, flags and names, in nested dicts) for the README's blocks."""
    save_json(path, _plain(values))


def checkpoints_markdown(manifest: dict[str, Any]) -> str:
    """The `checkpoints` block: the committed checkpoints' headline metrics, from their manifest."""
    entries, base = manifest["checkpoints"], manifest["baselines"]["mean_image"]
    rows = ["| checkpoint | grid | epochs (best) | test SSIM, mean of slices (min..max) | mean of scans [95 % interval] "
            "| Gaussian SSIM | PSNR (dB) | codes used (perplexity) | validation SSIM (best epoch) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in entries.items():
        m = entry["metrics"]
        if "downsample" not in m:
            continue
        t, v, d = m["test"], m["best_validation_epoch"], m["downsample"]
        low, high = t["scan_ssim_ci95"]
        rows.append(f"| `{name}` | {d}x | {entry['epochs']} ({v['epoch']}) | {t['ssim_mean']:.3f} ({t['ssim_min']:.3f}..{t['ssim_max']:.3f}) "
                    f"| {t['scan_ssim_mean']:.3f} [{low:.3f}, {high:.3f}] | {t['ssim_gaussian_mean']:.3f} "
                    f"| {t['psnr_mean']:.2f} | {t['active_codes']} / {t['codebook_size']} ({t['perplexity']:.1f}) "
                    f"| {v['val_ssim']:.3f} |")
    rows.append(f"| mean training image (baseline) | | | {base['ssim_mean']:.3f} ({base['ssim_min']:.3f}.."
                f"{base['ssim_max']:.3f}) | | {base['ssim_gaussian_mean']:.3f} | {base['psnr_mean']:.2f} | | |")
    first = next(iter(entries.values()))["metrics"].get("test", {})
    lines = ["Test split: " + (f"{first['n_slices']} slices, {first['n_scans']} scans of {first['n_patients']} "
                               "patient" + "s" * (first["n_patients"] != 1) + "." if "n_scans" in first else ""),
             "", *rows, ""]
    for name, entry in entries.items():
        m = entry["metrics"]
        v = m["best_validation_epoch"]
        if "val_nll" in v:
            arch = "transformer" if m.get("arch") == "transformer" else "PixelCNN"
            lines.append(f"- `{name}` ({arch} prior): validation NLL {v['val_bits']:.2f} bits per latent "
                         f"({v['val_nll']:.3f} nats), best at epoch {v['epoch']} of {entry['epochs']}.")
        elif "val_loss" in v:
            organs = v.get("val_organ_accuracy")
            lines.append(f"- `{name}` (the feature network of `sample_metrics`): validation accuracy of the slice "
                         f"position bin {v['val_position_accuracy']:.3f}"
                         + (f", of organ presence {organs:.3f}" if organs is not None else "")
                         + f"; {entry['epochs']} epochs (best: {v['epoch']}).")
        elif "downsample" not in m:
            t = m["test"]
            lines.append(f"- `{name}` (Gaussian VAE): test SSIM {t['ssim_mean']:.3f} ({t['ssim_min']:.3f}.."
                         f"{t['ssim_max']:.3f}), Gaussian SSIM {t['ssim_gaussian_mean']:.3f}, PSNR "
                         f"{t['psnr_mean']:.2f} dB; {entry['epochs']} epochs (best: {m['best_validation_epoch']['epoch']}).")
    if "default.pt" in entries:
        t = entries["default.pt"]["metrics"]["test"]
        used = t["active_codes"] / t["codebook_size"]
        met = t["ssim_mean"] >= 0.90 and used >= 0.90
        lines.append(f"- `default.pt` against the project's targets (mean test SSIM at least 0.90, at least 90 % of "
                     f"the codebook used on the test split): {t['ssim_mean']:.3f} and {100 * used:.1f} %, "
                     + ("met." if met else "not met."))
    speeds = {name[:-3]: e["metrics"]["images_per_s_median"] for name, e in entries.items()
              if "images_per_s_median" in e["metrics"]}
    if speeds:
        lines.append("- Training speed (median images/s over the epochs): "
                     + ", ".join(f"{name} {v:.0f}" for name, v in speeds.items()) + ".")
    machine = manifest["machine"]
    minutes = sum(e["train_seconds"] for e in entries.values()) / 60
    lines.append(f"- Trained by `{manifest['command']}` at code revision `{manifest['code_revision'][:12]}` on "
                 f"{machine['cpus']} CPUs ({machine['device']}, torch {machine['torch']}): "
                 + ", ".join(f"{name[:-3]} {e['train_seconds'] / 60:.1f}" for name, e in entries.items())
                 + f" min of training, {minutes:.0f} min in all.")
    return "\n".join(lines) + "\n"


def generation_markdown(gen: dict[str, Any], vae: dict[str, Any]) -> str:
    """The `generation` block: the numbers of notebooks 06 (`gen`) and 07 (`vae`), as they saved them."""
    reports, fits, seps = gen["reports"], gen["fits"], gen["separation"]
    names = list(reports)
    ref = reports[names[0]]

    def row(label: str, values: list[str], reference: str = "") -> str:
        return f"| {label} | " + " | ".join(values) + f" | {reference} |"

    def each(key: str, spec: str) -> list[str]:
        return [format(reports[n][key], spec) for n in names]

    def mark(n: str, target: str) -> str:
        return "met" if reports[n]["targets"][target] else "**missed**"

    fit = {n: fits[gen["made_by"][n]] for n in names}
    rows = [
        "| | " + " | ".join(names) + " | reference |", "|---|" + "---|" * len(names) + "---|",
        row("validation NLL of the prior, bits per latent (best epoch)", [f"{fit[n]['bits']:.2f} ({fit[n]['epoch']} of "
            f"{fit[n]['epochs']})" for n in names], f"code frequencies alone {gen['unigram_bits']:.2f}; PixelCNN "
            f"without dropout {fits['PixelCNN, no dropout']['bits']:.2f}"),
        row("sampling speed, maps per second (this CPU, side by side)", each("samples_per_s", ".1f")),
        row("Fréchet distance to the test split; target at most 2x the reference", [
            f"{reports[n]['fid_samples_test']:.1f} ({mark(n, 'fid')})" for n in names],
            f"training split {ref['fid_train_test']:.1f}"),
        row("kernel distance (KID) to the test split", each("kid_samples_test", ".1f"),
            f"training split {ref['kid_train_test']:.1f}"),
        row("precision / recall; target recall above 0.5", [
            f"{reports[n]['precision']:.2f} / {reports[n]['recall']:.2f} ({mark(n, 'recall')})" for n in names]),
        row("nearest training map: least fraction of codes that differ; target at least the test maps'", [
            f"{reports[n]['hamming_samples_min']:.3f} ({mark(n, 'memorisation')})" for n in names],
            f"test maps {ref['hamming_test_min']:.3f}"),
        row("diversity: mean pairwise SSIM", each("diversity_samples", ".3f"), f"test slices {ref['diversity_test']:.3f}"),
        row("own NLL of the samples / of the test maps, bits per latent", [
            f"{reports[n]['sample_nll_mean']:.2f} / {reports[n]['test_nll_mean']:.2f}" for n in names]),
    ]
    priors = list(seps)
    rows_lesion = ["| inserted lesion vs normal slice | " + " | ".join(priors) + " |", "|---|" + "---|" * len(priors),
                   "| AUROC of the summed NLL | " + " | ".join(f"{seps[n]['auroc_sum']:.3f}" for n in priors) + " |",
                   "| AUROC of the largest position NLL | " + " | ".join(f"{seps[n]['auroc_max']:.3f}" for n in priors)
                   + " |",
                   "| lesioned version scores higher than its own normal slice | "
                   + " | ".join(f"{100 * seps[n]['paired']:.0f} %" for n in priors) + " |"]
    lines = [f"{gen['n_samples']} samples per prior and setting, seed 0, temperature 1, from `gen_8x.pt` (test SSIM "
             f"{gen['recon_ssim']:.3f}; `default_8x.pt`: {gen['short_recon_ssim']:.3f}).", "", *rows, "",
             *rows_lesion, "",
             f"Completion from the first half of a test map's rows: SSIM to the real slice {gen['completion_ssim']:.3f}, "
             f"free samples of the same position bin {gen['free_ssim']:.3f}.", "",
             "Notebook 07, VQ-VAE (`default_8x.pt`) against VAE (`vae_8x.pt`), 15 epochs each:", "",
             "| | VQ-VAE | VAE |", "|---|---|---|",
             f"| test SSIM / PSNR | {vae['vq_ssim']:.3f} / {vae['vq_psnr']:.2f} dB | {vae['vae_ssim']:.3f} / "
             f"{vae['vae_psnr']:.2f} dB |",
             f"| high-frequency share of reconstructions (real test slices {vae['hf_real']:.4f}) | "
             f"{vae['hf_vq_recon']:.4f} | {vae['hf_vae_recon']:.4f} |",
             f"| same for samples | {vae['hf_vq_samples']:.4f} | {vae['hf_vae_samples']:.4f} |",
             f"| samples with all four statistics in range, of real slices / of the model's own reconstructions | "
             f"{100 * vae['vq_in_range_real']:.0f} % / {100 * vae['vq_in_range_own']:.0f} % | "
             f"{100 * vae['vae_in_range_real']:.0f} % / {100 * vae['vae_in_range_own']:.0f} % |"]
    return "\n".join(lines) + "\n"


def sweeps_markdown(results: dict[str, dict[str, Any]]) -> str:
    """The `sweeps` block: the test scores of every run of `make sweeps` (results: run name -> result file)."""
    from .sweeps import GROUPS, _SAME

    def row(label: str, name: str, *cells: str) -> str:
        t = results[_SAME.get(name, name)]["test"]
        return (f"| {label} | " + "".join(f"{c} | " for c in cells) + f"{t['active_codes']} ({t['perplexity']:.0f}) "
                f"| {t['ssim_mean']:.3f} | {t['psnr_mean']:.2f} | {t['bits_frequencies']:,.0f} |")

    head = "codes used (perplexity) | test SSIM | PSNR (dB) | bits per slice |"
    lines = ["What cures codebook collapse (notebook 03): each fix alone and combined.", "",
             f"| fixes | restarts | {head}", "|---|---|---|---|---|---|"]
    for run in GROUPS["collapse"]:
        label = "all three (the default)" if run.name == "default" else \
            run.name.replace("kmeans", "k-means").replace("ema", "EMA").replace("+", " + ")
        lines.append(row(label, run.name,
                         str(results[_SAME.get(run.name, run.name)]["test"]["restarts"])))
    lines += ["", "The commitment weight beta against the MSE as it is and divided by the training slices' variance "
              "(notebook 03).", "", f"| beta | MSE | {head}", "|---|---|---|---|---|---|"]
    for run in GROUPS["beta"]:
        normalized = run.name.endswith("_normalized")
        lines.append(row(run.name.removeprefix("beta").removesuffix("_normalized"), run.name,
                         "/ variance" if normalized else "as it is"))
    lines += ["", "Grid, codebook size K and code dimension D (notebooks 03 and 05; bits per slice under the "
              "training split's code frequencies).", "", f"| run | grid | K | D | {head}",
              "|---|---|---|---|---|---|---|---|"]
    for run in GROUPS["size"] + GROUPS["rd"]:
        model = results[_SAME.get(run.name, run.name)]["train_config"]["model"]
        lines.append(row(run.name, run.name, f"{model['downsample']}x", str(model["codebook_size"]),
                         str(model["embed_dim"])))
    lines += ["", "Quantizers beyond the paper (notebook 08), 512 codes each.", "", f"| quantizer | {head}",
              "|---|---|---|---|---|"]
    for name in ("default", *(run.name for run in GROUPS["quantizers"])):
        lines.append(row("vq (default)" if name == "default" else results[name]["train_config"]["model"]["quantizer"],
                         name))
    revisions = sorted({r["code_revision"][:12] for r in results.values()})
    machine = next(iter(results.values()))["machine"]
    minutes = sum(r["test"]["train_seconds"] for r in results.values()) / 60
    lines += ["", f"{len(results)} runs of {results['default']['train_config']['epochs']} epochs over "
              f"{results['default']['train_config']['limit']} training slices each, at code revision"
              f"{'s' * (len(revisions) > 1)} {', '.join(f'`{r}`' for r in revisions)}, on {machine['cpus']} CPUs "
              f"({machine['device']}): {minutes:.0f} min of training in all."]
    return "\n".join(lines) + "\n"


def science_markdown(evaluation: dict[str, Any], vae: dict[str, Any], quantizers: dict[str, Any]) -> str:
    """The `science` block: bits per slice next to the codecs (notebook 05), both models' ELBO (notebook 07) and
    the quantizers' training speed (notebook 08)."""
    def codec(key: str, name: str) -> str:
        value = evaluation[f"{key}_{name}_ssim"]
        return "below its lowest rate" if value < 0 else f"{value:.3f}"

    rows = ["| model, rate counted as | bits per slice (raw) | test SSIM | JPEG | WebP | JPEG 2000 |",
            "|---|---|---|---|---|---|"]
    for key, label in (("default", "`default.pt` (4x), code frequencies"),
                       ("8x", "`default_8x.pt`, code frequencies"), ("8x_prior", "`default_8x.pt`, PixelCNN prior")):
        rows.append(f"| {label} | {evaluation[f'{key}_bits']:,.0f} ({evaluation[f'{key}_raw_bits']:,.0f}) "
                    f"| {evaluation[f'{key}_ssim']:.3f} | " + " | ".join(codec(key, c) for c in
                                                                         ("jpeg", "webp", "jpeg2000")) + " |")
    rows += ["", f"The codecs' columns give their test SSIM at the same rate (JPEG's smallest file here: "
             f"{evaluation['jpeg_min_bits']:,.0f} bits per slice, at quality 1).", "",
             "| negative ELBO, nats per pixel (notebook 07) | distortion | rate | total |", "|---|---|---|---|"]
    for key, label in (("uniform", "VQ-VAE (`default_8x.pt`), uniform prior"),
                       ("frequencies", "VQ-VAE, code frequencies"),
                       ("prior", "VQ-VAE + PixelCNN prior (`prior_8x.pt`)"),
                       ("vae", "Gaussian VAE (`vae_8x.pt`)")):
        rows.append(f"| {label} | {vae[f'elbo_{key}_distortion']:.3f} | {vae[f'elbo_{key}_rate']:.4f} "
                    f"| {vae[f'elbo_{key}_total']:.3f} |")
    rows += ["", "Training speed of the quantizers, measured side by side on the CPU (notebook 08; images/s of the "
             "training loop): " + ", ".join(f"{name.removeprefix('speed_')} {value:.1f}" for name, value
                                            in quantizers.items() if name.startswith("speed_")) + "."]
    return "\n".join(rows) + "\n"


def expected_block(block: str, repo: Path = REPO) -> str:
    """What `block` must hold, from the files its command wrote."""
    if block == "checkpoints":
        return checkpoints_markdown(json.loads((repo / "checkpoints" / "MANIFEST.json").read_text()))
    if block == "sweeps":
        results = sorted((repo / "results" / "sweeps").glob("*.json"))
        return sweeps_markdown({p.stem: json.loads(p.read_text()) for p in results})
    figures = repo / "figures"
    if block == "science":
        return science_markdown(*(json.loads((figures / f"{n}_results.json").read_text()) for n in ("05", "07", "08")))
    return generation_markdown(json.loads((figures / "06_results.json").read_text()),
                               json.loads((figures / "07_results.json").read_text()))
