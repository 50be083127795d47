# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Training the VQ-VAE
#
# We put the pieces together and train. You will learn
#
# - our default recipe and how it differs from the common published one (the `seed` preset);
# - what the training loop measures every epoch: losses, validation SSIM and PSNR, and codebook usage
#   (perplexity and active codes) over the **whole** validation split;
# - how to train on a GPU, or on a CPU, from this notebook or from the command line on a cluster, and how
#   an interrupted run resumes without losing finished epochs.
#
# **Prerequisites:** notebooks 02 and 03.
#
# **Expected run time:** about 2 minutes on a 2-core CPU (measured by `make figures`): a short demonstration
# run (6 epochs of 480 slices) and the curves of the committed checkpoint `checkpoints/default.pt`, made by
# `make checkpoints` (30 epochs, about 24 minutes on 2 CPU cores; `checkpoints/MANIFEST.json` records the
# time). With a GPU it runs those 30 epochs itself (GPU timings are not measured yet).

# %% tags=["parameters"]
SMOKE = False  # fast settings for the tests
DATA_DIR = "../data/phantom"
FIG_DIR = "../figures"
SEED = 0
INTERACTIVE = False
DEVICE = "auto"  # auto: cuda, then mps, then cpu
TRAIN = "auto"  # auto: the full run on a GPU, a short run on a CPU; or "full" / "short"
RUN_DIR = "../build/runs/04_training"
CHECKPOINT = "../checkpoints/default.pt"

# %%
from pathlib import Path

DATA = Path(DATA_DIR)
FIGS = Path(FIG_DIR)
RUN = Path(RUN_DIR)

# %%
import json
import platform

import numpy as np
import torch

import vqvae_lib
from vqvae_lib import checkpoint, data, train, viz
from vqvae_lib.claims import Claims

torch.manual_seed(SEED)
claims = Claims(SMOKE, DATA)  # sentences below that state a measured result are checked in full mode
device = train.select_device(DEVICE)
full = TRAIN == "full" or (TRAIN == "auto" and device.type == "cuda" and not SMOKE)
print(f"python {platform.python_version()}, torch {torch.__version__}, vqvae_lib {vqvae_lib.__version__}")
print(f"device: {device}; {'full training run' if full else 'short demonstration run'}")

# %% [markdown]
# ## 1. Two recipes
#
# The `seed` preset reproduces what most published HipMRI VQ-VAEs do: 8x downsampling, 128 hidden
# channels, a 512 x 128 codebook with the plain VQ loss and the paper's uniform initialisation, Adam at
# 1e-3, batch 32, MSE, fp32. Our `default` preset changes what notebooks 02 and 03 argued for:
#
# - a 4x latent grid (64 x 32 codes) so that each code describes a small patch;
# - EMA codebook updates, k-means initialisation from the first batch's encoder outputs and restarts of
#   dead codes, so the whole codebook is used;
# - a reconstruction loss of MSE + 0.5 (1 - SSIM). MSE alone rewards a blurred average of the noisy fat
#   texture; the SSIM term (the same 7 x 7 window as the metric, written in torch so it has gradients:
#   `metrics.ssim_torch`) rewards local contrast and structure, which is what we judge reconstructions by;
# - a learning rate with warm-up and cosine decay;
# - bf16 autocast and channels-last memory for speed (the quantizer stays in fp32).

# %%
for name in ("default", "seed"):
    print(name, json.dumps(train.make_config(name).to_dict(), indent=None))

# %% [markdown]
# ## 2. Train
#
# `train.train` keeps the training split in (GPU) memory, shuffles with a seeded generator, and after every
# epoch evaluates the whole validation split and writes `last.pt`, `best.pt` (best validation SSIM) and
# `metrics.json` atomically into the run folder, in that order, so a run killed at any moment can be resumed.
# While it trains it holds the folder's lock (a second run there is refused), and `overwrite=True` deletes
# the old run only once the new one has finished its first epoch (README, "Running on a cluster"). The same
# run from a shell, e.g. in a Slurm job:
#
# ```bash
# python -m vqvae_lib train --data-dir data/phantom --out runs/default --preset default --device cuda
# python -m vqvae_lib train --data-dir data/phantom --out runs/default --resume   # after an interruption
# ```
#
# On several GPUs the same command runs data-parallel under `torchrun`:
#
# ```bash
# torchrun --nproc_per_node=4 -m vqvae_lib train --data-dir data/phantom --out runs/default --device cuda
# ```
#
# Each process takes its share of every global batch of 32 slices and DistributedDataParallel averages the
# gradients. The EMA codebook needs one more step: each process sums its code counts and code vector sums with
# those of the others (an all-reduce) before the moving averages move, so every replica makes the update one
# process would make on the whole batch and all of them keep the same codebook. Add `--compile` on a GPU to
# compile the encoder and decoder with `torch.compile`.

# %%
if full:
    config = train.make_config("default", seed=SEED, device=str(device))
else:  # a short run: 480 slices, 6 epochs of 15 steps; the curves below come from the committed checkpoint
    config = train.make_config("default", seed=SEED, device=str(device), epochs=1 if SMOKE else 6,
                               limit=32 if SMOKE else 480)
history = train.train(DATA, RUN, config, overwrite=True)
K = config.model["codebook_size"]
for h in history:
    print(f"epoch {h['epoch']}: loss {h['train_loss']:.4f}, {h['restarts']:>3} codes restarted, validation: "
          f"{h['val_active']:>3} of {K} codes used (perplexity {h['val_perplexity']:5.1f}), SSIM {h['val_ssim']:.3f}, "
          f"PSNR {h['val_psnr']:.2f} dB, {h['seconds']:.0f} s")

# %% [markdown]
# What to look for in these lines: the k-means codes fit the encoder's first outputs, but the encoder changes
# fast while it learns, so after the first steps nearly all its outputs fall nearest to a handful of codes
# (the first epochs use very few). The others are dead; once a dead code's usage has decayed below the
# threshold (about 45 steps, notebook 03), it is restarted on an encoder output, and the number of codes in use
# jumps, with SSIM and PSNR after it. A short run stops long before the model is good; the committed checkpoint
# below trained 30 epochs.

# %%
first_active, last_active = history[0]["val_active"], history[-1]["val_active"]
claims(sum(h["restarts"] for h in history) > 0 and last_active > 2 * first_active and
       history[-1]["val_ssim"] > history[0]["val_ssim"],
       "dead codes are restarted and the number of codes in use jumps, with SSIM after it",
       f"{sum(h['restarts'] for h in history)} restarts, codes used {first_active} to {last_active}, "
       f"SSIM {history[0]['val_ssim']:.3f} to {history[-1]['val_ssim']:.3f}")

# %% [markdown]
# Resuming continues from `last.pt`: asking for one more epoch trains exactly one.

# %%
longer = train.make_config(**{**config.to_dict(), "epochs": config.epochs + 1})
resumed = train.train(DATA, RUN, longer, resume=True)
print(f"epochs before: {len(history)}, after resuming: {len(resumed)}")
assert resumed[: len(history)] == history and len(resumed) == len(history) + 1

# %% [markdown]
# ## 3. Training curves
#
# From the full run if we just made one, else from the committed checkpoint (its history is stored in it).

# %%
source = RUN / "best.pt" if full else Path(CHECKPOINT)
payload = checkpoint.load_checkpoint(source)
curve = payload["history"]
epochs = [h["epoch"] for h in curve]
viz.curves({
    "training loss": {"total": (epochs, [h["train_loss"] for h in curve]),
                      "reconstruction (MSE)": (epochs, [h["train_recon"] for h in curve])},
    "SSIM": {"training batches": (epochs, [h["train_ssim"] for h in curve]),
             "validation": (epochs, [h["val_ssim"] for h in curve])},
    "validation reconstruction (MSE)": {"default": (epochs, [h["val_recon"] for h in curve])},
    "validation PSNR (dB)": {"default": (epochs, [h["val_psnr"] for h in curve])},
    "codebook perplexity (validation)": {"default": (epochs, [h["val_perplexity"] for h in curve])},
    "active codes (validation)": {"default": (epochs, [h["val_active"] for h in curve])},
}, FIGS / "04_training_curves.png", logy=["training loss", "validation reconstruction (MSE)"]);
print(f"{source}: {len(curve)} epochs; last validation SSIM {curve[-1]['val_ssim']:.3f}, "
      f"PSNR {curve[-1]['val_psnr']:.2f} dB, {curve[-1]['val_active']} active codes")
claims(curve[-1]["val_active"] > 0.9 * payload["model_config"]["codebook_size"],
       "the recipe keeps the whole codebook in use", f"{curve[-1]['val_active']} codes on the validation split")

# %% [markdown]
# ## 4. Reconstructions
#
# The best model on a few validation slices: original, reconstruction, and the absolute error (x4).

# %%
model, _ = checkpoint.load_model(source)
val = data.load_split(DATA, "validate", progress=False)
pick = np.linspace(0, len(val) - 1, 4).astype(int)
originals = np.asarray(val.images)[pick]
recon, _ = train.reconstruct(model, originals, batch_size=16, device=device)
viz.reconstructions(originals, recon, [val.files[i].name for i in pick], FIGS / "04_reconstructions.png");

# %% [markdown]
# ## Checked claims
#
# Every sentence above that states a measured result was checked by an assertion next to the cell that
# measures it (in full mode, the mode of `make figures`; the tests' SMOKE runs only count them):

# %%
print(claims)

# %% [markdown]
# ## Questions
#
# 1. Train with `ssim_weight=0` (MSE alone, as in the paper) for the same epochs and compare validation SSIM
#    and PSNR with the default. Why can a model improve SSIM while its PSNR gets worse?
# 2. What would the active-codes curve of the `seed` preset look like? (Notebook 05 compares them.)
# 3. Why must `best.pt` be chosen on the validation split and never on the test split?
# 4. Resuming restores the optimizer and the random number generator as well as the weights. What would
#    differ if it restored only the weights?
