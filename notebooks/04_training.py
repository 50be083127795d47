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
# - how to train on a GPU, or a short run on a CPU, from this notebook, and how an interrupted run resumes
#   without losing finished epochs;
# - how to read the training curves and the reconstructions of the committed 30-epoch checkpoint;
# - in a closing section, how the same run goes to the command line, a Slurm cluster and several GPUs
#   (`torchrun`), and what bf16 autocast and channels-last memory do.
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
from vqvae_lib import checkpoint, data, train, viz, widgets
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
# - bf16 autocast and channels-last memory for speed (the quantizer stays in fp32; section 5 says what they do).
#
# Per batch of slices $x$ with reconstructions $\hat x$, the default recipe minimises
#
# $$\mathcal{L} = \mathrm{MSE}(x, \hat x) + w\,\big(1 - \mathrm{SSIM}(x, \hat x)\big) + \|\operatorname{sg}[z_e] - e\|^2
# + \beta\,\|z_e - \operatorname{sg}[e]\|^2,$$
#
# with $w$ = `ssim_weight` = 0.5 ($w = 0$ in the `seed` preset), $\beta = 0.25$, and the codebook term exactly 0
# with EMA (notebook 03, section 4). SSIM is the mean over the slice's 7 x 7 windows of
#
# $$\frac{(2\mu_x\mu_{\hat x} + C_1)(2\sigma_{x\hat x} + C_2)}{(\mu_x^2 + \mu_{\hat x}^2 + C_1)(\sigma_x^2 + \sigma_{\hat x}^2 + C_2)},
# \qquad C_1 = 0.01^2,\ C_2 = 0.03^2,$$
#
# local means, variances and covariance compared window by window, and PSNR, the other validation score, is
# $10 \log_{10}(1 / \mathrm{MSE})$ dB for intensities in [0, 1]. The learning rate at optimiser step $t$ of $T$,
# with $W = \operatorname{round}(0.03\,T)$ warm-up steps, is $\eta_t = \eta\, g(t)$ with $\eta = 10^{-3}$ and
#
# $$g(t) = \begin{cases} \dfrac{t + 1}{W}, & t < W, \\
# f + (1 - f)\,\dfrac{1 + \cos(\pi p_t)}{2}, \quad p_t = \dfrac{t - W}{T - W}, & t \ge W, \end{cases}$$
#
# so it climbs linearly to $\eta$ and then falls along half a cosine to $f\eta$ at the end of training, with
# $f$ = `final_lr` = 0.1 (`train.lr_factor`).

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
# run from a shell, in a Slurm job or on several GPUs, is the subject of section 5.

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
ssim_weight = payload["train_config"]["ssim_weight"]  # train.train_epoch: the loss it minimised
total = "total: MSE + VQ loss" + (f" + {ssim_weight:g} (1 - SSIM)" if ssim_weight else "")
viz.curves({
    "training loss": {total: (epochs, [h["train_loss"] for h in curve]),
                      "reconstruction (MSE)": (epochs, [h["train_recon"] for h in curve])},
    "SSIM": {"training batches": (epochs, [h["train_ssim"] for h in curve]),
             "validation": (epochs, [h["val_ssim"] for h in curve])},
    "validation reconstruction (MSE)": {"default": (epochs, [h["val_recon"] for h in curve])},
    "validation PSNR (dB)": {"default": (epochs, [h["val_psnr"] for h in curve])},
    "codebook perplexity (validation)": {"default": (epochs, [h["val_perplexity"] for h in curve])},
    "active codes (validation)": {"default": (epochs, [h["val_active"] for h in curve])},
}, FIGS / "04_training_curves.png", logy=["training loss", "validation reconstruction (MSE)"],
   mark={"best epoch (validation SSIM), kept in best.pt": payload["epoch"]});
print(f"{source}: {len(curve)} epochs; last validation SSIM {curve[-1]['val_ssim']:.3f}, "
      f"PSNR {curve[-1]['val_psnr']:.2f} dB, {curve[-1]['val_active']} active codes")
claims(curve[-1]["val_active"] > 0.9 * payload["model_config"]["codebook_size"],
       "the recipe keeps the whole codebook in use", f"{curve[-1]['val_active']} codes on the validation split")

# %% [markdown]
# The panel below draws any metric that the committed runs of `checkpoints/MANIFEST.json` recorded (the VQ-VAEs
# of this series, the VAE and the priors of later notebooks), each run's best validation epoch starred. Try
# `val_active` for `default` and `seed_8x`: the codebook collapse of the common recipe, epoch by epoch.

# %%
curves_panel = widgets.CurvesPanel(Path(CHECKPOINT).parent / "MANIFEST.json")
widgets.show(curves_panel, INTERACTIVE)

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
# ## 5. Beyond this notebook: clusters, bf16 and channels-last
#
# Everything above ran inside this notebook. This section is for when the training moves elsewhere; nothing in
# it runs here.
#
# **From a shell, in a Slurm job.** `python -m vqvae_lib train` (or the console script `hipmri-vqvae train`) runs
# the same `train.train` as section 2, with the same run folder, lock and atomic writes:
#
# ```bash
# python -m vqvae_lib train --data-dir data/phantom --out runs/default --preset default --device cuda
# python -m vqvae_lib train --data-dir data/phantom --out runs/default --resume   # after an interruption
# ```
#
# A Slurm job is just that command. With `--resume auto` it resumes when the folder holds a run and starts one
# otherwise, so a job submitted with `--requeue` picks up where it was stopped, whenever that was:
#
# ```bash
# #!/bin/bash
# #SBATCH --gres=gpu:1 --time=01:00:00 --requeue
# python -m vqvae_lib train --data-dir data/phantom --out runs/default --device cuda --resume auto
# ```
#
# **Several GPUs: `torchrun`.** The same command runs data-parallel:
#
# ```bash
# torchrun --standalone --nproc_per_node=4 -m vqvae_lib train --data-dir data/phantom --out runs/default --device cuda
# ```
#
# Each process takes its share of every global batch of 32 slices and DistributedDataParallel averages the
# gradients. The EMA codebook needs one more step: each process $r$ sums its code counts $n_k^{(r)}$ and code
# vector sums $s_k^{(r)}$ with those of the others (an all-reduce) before the moving averages move,
#
# $$n_k = \sum_r n_k^{(r)}, \qquad s_k = \sum_r s_k^{(r)},$$
#
# so every replica makes the update of notebook 03 that one process would make on the whole batch, and all of
# them keep the same codebook. Code usage, which decides restarts, is counted over the global batch too. Add
# `--compile` on a GPU to compile the encoder and decoder with `torch.compile`.
#
# **bf16 autocast.** With `amp` on (the default preset), convolutions and matrix products run in bfloat16, a
# 16-bit float with fp32's 8 exponent bits and 7 mantissa bits: the same range as fp32, so nothing overflows
# and no loss scaling is needed, at a precision of only 2 to 3 significant decimal digits. The weights, the optimiser and the
# losses stay fp32. `--precision auto` picks bf16 on the CPU and on GPUs with native bf16 (compute capability
# 8.0 and later), fp16 with a gradient scaler on older GPUs (fp16 has a smaller range, so the loss is scaled
# up to keep small gradients representable), and fp32 on Apple MPS. The quantizer always computes in full fp32: the
# nearest code is an argmin over distances that can differ in their last digits, and bf16's rounding of
# $z^\top e_k$ would change which code wins for some vectors.
#
# **Channels-last.** A batch of feature maps $(B, C, H, W)$ is normally stored channel by channel (NCHW);
# channels-last keeps the same tensor with the $C$ values of each pixel next to each other in memory (NHWC),
# the layout the fast convolution kernels of GPUs (tensor cores) and of CPUs (oneDNN) prefer, so fewer layout
# conversions happen between layers. It changes only the memory layout, never a value or a shape, and is off on MPS.

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
# Each question has a worked answer: open it when you have tried. Where the answer can be computed, the
# hidden cell after it computes it (in JupyterLab click the collapsed cell to show it).

# %% [markdown]
# **Question 1.** Train with `ssim_weight=0` (MSE alone, as in the paper) for the same epochs and compare
# validation SSIM and PSNR with the default. Why can a model improve SSIM while its PSNR gets worse?
#
# <details><summary>Answer</summary>
#
# The run is section 2's cell with `ssim_weight=0` added to `train.make_config` and another run folder, e.g.
# `train.train(DATA, RUN.with_name("mse_only"), train.make_config("default", seed=SEED, device=str(device),
# epochs=6, limit=480, ssim_weight=0), overwrite=True)`.
#
# PSNR is a function of the MSE alone, $10\log_{10}(1/\mathrm{MSE})$, so the MSE-only model minimises almost exactly
# what PSNR measures (almost: PSNR is averaged per slice). Adding the SSIM term moves the optimum away from the
# lowest MSE towards what SSIM rewards and MSE does not, and SSIM rewards something different: it compares each
# 7 x 7 window's mean, contrast and correlation relative to the window's own level, every window counting the same.
#
# Texture shows the difference. Where the fine texture (fat, noise) cannot be predicted exactly, the lowest
# squared error comes from predicting its local average, a flat patch. For a truth $x = m + n$ with texture $n$ of
# variance $\sigma^2$, the flat guess $\hat x = m$ has MSE $\sigma^2$ but scores only
# $\frac{C_2}{\sigma^2 + C_2}$ in SSIM's contrast-and-structure factor, since $\sigma_{\hat x} = \sigma_{x \hat x} = 0$.
# A guess with texture of the same variance that is correlated $\rho$ with the truth has MSE $2\sigma^2(1 - \rho)$
# and the factor $\frac{2\rho\sigma^2 + C_2}{2\sigma^2 + C_2}$. For $0 < \rho < \frac12$ both are higher: SSIM goes up
# and PSNR goes down. The hidden cell shows it on a synthetic flat patch with $\sigma = 0.05$ and $\rho = 0.3$.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
from vqvae_lib import metrics

gen = np.random.default_rng(SEED)
sigma, rho = 0.05, 0.3
texture, other = gen.normal(0, sigma, (2, 1, 64, 64))
patch = (0.5 + texture).astype(np.float32)
guesses = {"flat (the lowest MSE)": np.full_like(patch, 0.5),
           f"texture correlated {rho} with the truth": (0.5 + rho * texture + np.sqrt(1 - rho ** 2) * other)}
for name, guess in guesses.items():
    ssim, psnr = metrics.ssim_psnr(guess.astype(np.float32), patch)
    print(f"{name}: SSIM {ssim[0]:.3f}, PSNR {psnr[0]:.2f} dB")

# %% [markdown]
# **Question 2.** What would the active-codes curve of the `seed` preset look like? (Notebook 05 compares them.)
#
# <details><summary>Answer</summary>
#
# Flat, and near the bottom. The `seed` preset uses the plain quantizer of notebook 03: codes initialised in a
# tiny cube at the origin, learned only by the codebook loss, never restarted. As on the toy and on the slices
# there, the few codes that win vectors early get all the gradient and the others none, so the count of codes in
# use starts at a handful of the 512 and can only creep up as the encoder's outputs spread over codes at the edge
# of the cube; nothing in the recipe revives the codes deep inside it. The hidden cell prints the validation active codes of each epoch
# of the committed `checkpoints/seed_8x.pt`, the `seed` preset trained by `make checkpoints`, next to those of
# this notebook's default checkpoint.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
for name in ("seed_8x.pt", Path(CHECKPOINT).name):
    run = checkpoint.load_checkpoint(Path(CHECKPOINT).with_name(name))
    print(f"{name}: codes used on the validation split per epoch (of {run['model_config']['codebook_size']}):",
          [h["val_active"] for h in run["history"]])

# %% [markdown]
# **Question 3.** Why must `best.pt` be chosen on the validation split and never on the test split?
#
# <details><summary>Answer</summary>
#
# Because choosing is fitting. Every epoch's score is the model's true quality plus noise (which slices, which
# patients happen to be in the split), and the best of many noisy scores is, on average, higher than the true
# quality of the epoch it picks. If the choice is made on the test split, the reported test score is that
# maximum: biased upwards, and no longer a measurement on data the training process has not seen. The validation
# split exists to absorb such choices (the epoch, the recipe, the hyperparameters); the test split is scored once,
# at the end, by a model it had no part in choosing. With only 3 test patients in the real data the noise, and so
# the bias, is large. The hidden cell simulates it: if each epoch's test score were the same true value plus
# independent noise of standard deviation $s$, how far above the truth would the best of this run's epochs lie on
# average?
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
noise = np.random.default_rng(SEED).normal(size=(10_000, len(curve)))
print(f"the best of {len(curve)} equally good epochs scores on average {noise.max(1).mean():.2f} s above the truth")

# %% [markdown]
# **Question 4.** Resuming restores the optimizer and the random number generator as well as the weights. What
# would differ if it restored only the weights?
#
# <details><summary>Answer</summary>
#
# The weights include every buffer of the model, so the EMA codebook statistics and the code usage would come
# back with them. Three things would not:
#
# - **Adam's state.** Its running averages of the gradient and of its square, $m$ and $v$, would restart at 0 with
#   the step count. The bias correction then makes the first steps about $\eta\,\operatorname{sign}(g)$ for every
#   parameter, as large as an Adam step gets, where a settled run's steps are smaller: a jolt that can undo part
#   of what was learned.
# - **The learning-rate schedule.** Its step counter would restart: a second warm-up, and the cosine back up to
#   the full learning rate $\eta$ instead of continuing down from where it was.
# - **The random number generator.** Restarts of dead codes draw random encoder outputs from torch's global
#   generator, so different codes would be restarted onto different vectors. (The order of the slices would not
#   change: each epoch's shuffle is seeded by the run's seed and the epoch number.)
#
# The run would go on, but it would no longer be the run that was interrupted: the README's promise that a resumed
# CPU run gives the same weights and history as one never interrupted would break. The hidden cell lists what
# `last.pt` of section 2's run holds besides the weights, and where its optimiser and schedule stand.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
last = checkpoint.load_checkpoint(RUN / "last.pt")
steps = {int(s["step"]) for s in last["optimizer_state"]["state"].values()}
print("last.pt holds:", ", ".join(k for k in last if k != "model_state"))
print(f"Adam's step count {steps}, the schedule's step {last['scheduler_state']['last_epoch']}, learning rate "
      f"{last['optimizer_state']['param_groups'][0]['lr']:.2e}; RNG states of: {', '.join(last['rng'])}")
