"""Every notebook executed headlessly with papermill in smoke mode, on the tiny phantom."""

import json
import re

import jupytext
import matplotlib.image as mpimg
import pytest

from vqvae_lib import runner
from vqvae_lib.cli import main

FIGURES = {
    "01": ["01_split_counts.png", "01_patient_splits.png", "01_shape_policy.png", "01_intensity_histograms.png",
           "01_scan_montage.png", "01_slices_and_labels.png", "01_label_shares.png"],
    "02": ["02_dataflow.png", "02_receptive_fields.png", "02_latent_grids.png"],
    "03": ["03_toy_codebooks.png", "03_loss_terms.png", "03_codebook_usage.png", "03_moving_toy.png",
           "03_moving_toy_codebooks.png", "03_collapse_ablation.png", "03_beta.png", "03_codebook_size.png",
           "03_code_dimension.png", "03_stop_gradients.png"],
    "04": ["04_training_curves.png", "04_reconstructions.png"],
    "05": ["05_metric_distributions.png", "05_per_scan.png", "05_best_worst.png", "05_code_usage.png",
           "05_explorer.png", "05_explorer_code.png", "05_rate_distortion.png"],
    "06": ["06_index_maps.png", "06_causality.png", "06_prior_curves.png", "06_samples.png", "06_temperature.png",
           "06_sample_metrics.png", "06_nearest_neighbours.png", "06_completion.png", "06_surprise.png",
           "06_pixelcnn_stacks.png"],
    "07": ["07_vae_curves.png", "07_reconstructions.png", "07_sharpness.png", "07_samples.png"],
    "08": ["08_rotation_trick.png", "08_fsq_grid.png", "08_quantizers.png"],
}


def _text(notebook):
    nb = json.loads(notebook.read_text())
    out = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            out.append("".join(o.get("text", "")))
            out.append("".join(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def test_every_numbered_notebook_has_a_figure_list():
    assert sorted(p.stem[:2] for p in runner.notebook_paths()) == sorted(FIGURES)


@pytest.mark.parametrize("script", [*runner.notebook_paths(), runner.NOTEBOOK_DIR / "explorer_app.py"],
                         ids=lambda p: p.stem)
def test_sources_declare_the_standard_python3_kernel(script):
    assert jupytext.read(script).metadata["kernelspec"] == runner.PYTHON3


def test_a_folder_without_notebooks_is_an_error(tmp_path, capsys):
    (tmp_path / "notes.py").write_text("")
    with pytest.raises(FileNotFoundError, match=f"no numbered notebooks .* in {tmp_path}; pass --notebook-dir"):
        runner.notebook_paths(source=tmp_path)
    assert main(["notebooks", "--notebook-dir", str(tmp_path)]) == 2
    assert f"error: no numbered notebooks (NN_name.py) in {tmp_path}" in capsys.readouterr().err


def test_notebooks_are_run_from_the_folder_given(tmp_path, capsys):
    folder, figs = tmp_path / "elsewhere", tmp_path / "figs"
    folder.mkdir()
    figs.mkdir()
    (folder / "01_hello.py").write_text('# %% tags=["parameters"]\nSMOKE = False\nFIG_DIR = "."\n\n'
                                        '# %%\nfrom pathlib import Path\n\n'
                                        'Path(FIG_DIR, "hello.txt").write_text(f"{SMOKE} {Path.cwd()}")\n')
    args = ["notebooks", "--notebook-dir", str(folder), "--build", str(tmp_path / "build"), "--fig-dir", str(figs)]
    assert main([*args, "--smoke"]) == 0
    assert (figs / "hello.txt").read_text() == f"True {folder}"
    assert f"executed {tmp_path / 'build' / 'executed' / '01_hello.ipynb'}" in capsys.readouterr().out


@pytest.mark.parametrize("number", sorted(FIGURES))
def test_notebook_writes_its_figures(executed, number):
    _, figs = executed
    for name in FIGURES[number]:
        image = mpimg.imread(figs / name)
        assert image.shape[0] > 100 and image.shape[1] > 100, name
        assert image[..., :3].std() > 0.02, f"{name} is blank"


@pytest.mark.parametrize("number", sorted(FIGURES))
def test_notebook_reaches_its_claims_which_smoke_mode_only_counts(executed, number):
    found = re.search(r"SMOKE mode: (\d+) claims of the text not checked", _text(executed[0][number]))
    assert found and int(found.group(1)) >= 1


def test_01_reports_what_the_data_holds(executed):
    notebooks, _ = executed
    text = _text(notebooks["01"])
    assert "patient-level split check passed; patients per split: {'train': 1, 'validate': 1, 'test': 1}" in text
    # the tiny phantom holds case 019 week 1: its 60 slices of 256 x 144 are cropped, and the notebook says so
    assert "60 slices reshaped ['case_019_week_1_slice_0'" in text
    assert "crop 256x144 -> 256x128" in text
    assert "batch (8, 1, 256, 128) torch.float32" in text


def test_sources_are_left_untouched(executed):
    notebooks, _ = executed
    for path in notebooks.values():
        assert runner.NOTEBOOK_DIR not in path.parents and path.suffix == ".ipynb"


def test_02_shapes_and_receptive_fields(executed):
    text = _text(executed[0]["02"])
    assert "encoder: input (1, 1, 256, 128)" in text and "decoder: input (1, 64, 64, 32)" in text
    assert " 4x: latent grid 64 x 32 =  2048 codes" in text and "16x: latent grid 16 x 8 =   128 codes" in text
    # away from the border the measured field equals the computed one
    assert "4x: computed receptive field 34 px, measured (34, 34)" in text
    assert "8x: computed receptive field 70 px, measured (70, 70)" in text


def test_03_straight_through_check_and_collapse(executed):
    text = _text(executed[0]["03"])
    assert "straight-through: max |dL/dz - w| = 0.0" in text
    assert "with commitment: max |dL/dz - expected| = 0.0" in text
    assert "plain VQ:" in text and "of 128 codes used on the validation split" in text
    # every combination of the three fixes on the moving toy, and the committed slice runs with one rerun
    assert text.count("codes used before the jump") == 8
    assert text.count("of 512 codes on the test split") == 8
    assert "plain, trained again here:" in text and "(committed: " in text


def test_04_trains_resumes_and_reads_the_committed_checkpoint(executed):
    text = _text(executed[0]["04"])
    assert "device: cpu; short demonstration run" in text
    assert "epochs before: 1, after resuming: 2" in text
    assert "checkpoints/default.pt:" in text and "active codes" in text


def test_05_scores_both_models_next_to_the_baseline(executed):
    text = _text(executed[0]["05"])
    for row in ("default", "default recipe, 8x", "seed recipe, 8x", "mean-image baseline"):
        assert row in text
    # the rate of both committed grids, 4x: 64 x 32 positions x 9 bits raw
    assert "default: raw 18,432 bits, frequencies" in text and "prior" in text
    assert "JPEG's lowest rate here:" in text


def test_06_checks_both_priors_and_judges_samples(executed):
    text = _text(executed[0]["06"])
    assert "positions at or after (7, 5) that change its logits: 0 of 39" in text
    assert "the upper right neighbour (6, 6) among them: True" in text
    assert ("positions whose change moves logits at or before them: 0 of 30; earlier positions that move the "
            "last one's logits: 29 of 29; cached greedy sampling equals the full network's argmax: True") in text
    assert "uniform guess: 6.238 nats = 9.00 bits per latent" in text
    assert "pixelcnn_gen.pt: hipmri-vqvae prior --checkpoint build/checkpoints/gen_8x/best.pt --dropout 0.1" in text
    for name in ("PixelCNN, no dropout", "PixelCNN", "transformer"):
        assert f"{name}: best validation NLL" in text
    assert "PixelCNN: 6 samples in" in text and "transformer: 6 samples in" in text
    assert "feature network: validation accuracy of the position bin" in text
    assert "reference, the training split against the test split: Fréchet" in text
    assert re.search(r"transformer targets: fid (met|missed), recall (met|missed), memorisation (met|missed)", text)
    assert "SSIM to the real slice: completions" in text
    assert re.search(r"transformer: AUROC lesion vs normal, summed NLL [01]\.\d{3}", text)


def test_07_compares_the_two_models(executed):
    text = _text(executed[0]["07"])
    assert "device: cpu; short demonstration run" in text
    for name in ("VQ-VAE  test SSIM", "VAE     test SSIM", "VAE recon      high-frequency share",
                 "VQ-VAE + prior  samples with all four statistics in range:"):
        assert name in text


def test_07_puts_both_models_on_one_elbo(executed):
    text = _text(executed[0]["07"])
    assert "KL(one-hot || uniform over 512 codes) = 6.2383 nats; log 512 = 6.2383" in text
    for row in ("VQ-VAE, uniform prior", "VQ-VAE, code frequencies", "VQ-VAE + PixelCNN prior", "Gaussian VAE"):
        assert row in text
    assert "4,608 bits" in text  # 32 x 16 positions x 9 bits: the uniform prior's rate


def test_08_builds_each_quantizer_and_compares_them(executed):
    text = _text(executed[0]["08"])
    assert "straight-through: forward value equals e: True; step lengths 0.500..0.500" in text
    assert "rotation trick: forward value equals e: True" in text
    assert "codes unchanged when the vectors are tripled: cosine 100 %" in text
    assert "40 codes, 40 distinct grid points; index -> code -> index exact: True" in text
    for row in ("default (vq)", "rotation trick", "cosine, 8 dims", "FSQ 8 x 8 x 8", "fsq, trained again here:"):
        assert row in text
