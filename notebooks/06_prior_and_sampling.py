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
# # 06 · A learned prior: sampling new slices
#
# A VQ-VAE on its own only reconstructs. The paper makes new images by fitting an autoregressive model, a
# PixelCNN, to the discrete code maps of the training images, sampling a new map from it one code at a time
# and decoding that map. You will learn
#
# - how a slice becomes a small grid of code indices, and why a prior over those grids is a classification
#   problem at every position;
# - how the gated PixelCNN keeps every position blind to the codes after it (masked convolutions in a vertical
#   and a horizontal stack), checked by experiment;
# - how to read its likelihood in nats and bits per latent against two baselines;
# - how to judge samples honestly: are they new slices, or copies of training slices, and do they look like
#   real slices by simple measurable statistics?
#
# **Prerequisites:** notebooks 03 to 05.
#
# **Expected run time:** about 2.5 minutes on a 2-core CPU (measured by `make figures`: a short demonstration
# run of 2 epochs; the figures use the committed prior `checkpoints/prior_8x.pt`). With a GPU the notebook trains the full prior itself.

# %% tags=["parameters"]
SMOKE = False  # fast settings for the tests
DATA_DIR = "../data/phantom"
FIG_DIR = "../figures"
SEED = 0
INTERACTIVE = False  # no widgets in this notebook; kept so every notebook takes the same parameters
DEVICE = "auto"
TRAIN = "auto"  # auto: the full run on a GPU, a short run on a CPU; or "full" / "short"
RUN_DIR = "../build/runs/06_prior"
VQ_CHECKPOINT = "../checkpoints/default_8x.pt"
PRIOR_CHECKPOINT = "../checkpoints/prior_8x.pt"
N_SAMPLES = 16
TEMPERATURE = 1.0

# %%
from pathlib import Path

DATA = Path(DATA_DIR)
FIGS = Path(FIG_DIR)
RUN = Path(RUN_DIR)
n_samples = 4 if SMOKE else N_SAMPLES

# %%
import inspect
import math
import platform

import numpy as np
import torch

import vqvae_lib
from vqvae_lib import checkpoint, data, metrics, prior, readme, train, viz
from vqvae_lib.claims import Claims

torch.manual_seed(SEED)
claims = Claims(SMOKE, DATA)  # sentences below that state a measured result are checked in full mode
device = train.select_device(DEVICE)
full = TRAIN == "full" or (TRAIN == "auto" and device.type == "cuda" and not SMOKE)
print(f"python {platform.python_version()}, torch {torch.__version__}, vqvae_lib {vqvae_lib.__version__}")
print(f"device: {device}; {'full training run' if full else 'short demonstration run'}")

# %% [markdown]
# ## 1. Slices as code index maps
#
# We use the VQ-VAE with the 8x grid (`default_8x.pt`, trained with our default recipe): each 256 x 128 slice
# becomes a 32 x 16 map of indices into a codebook of 512 vectors, 512 positions in all. (The 4x model has four
# times as many positions; the prior would take four times as long to train and to sample, which is fine on a
# GPU and too slow for this notebook on a CPU.)

# %%
vq, vq_payload = checkpoint.load_model(VQ_CHECKPOINT, map_location=device)
amp = train.checkpoint_precision(vq_payload, device)  # as trained, where this device has it
splits = {name: data.load_split(DATA, name, progress=False) for name in ("train", "validate", "test")}
maps = {name: prior.encode_maps(vq, split.images, amp=amp) for name, split in splits.items()}
K = vq.config.codebook_size
print(f"index maps: {', '.join(f'{name} {tuple(m.shape)}' for name, m in maps.items())}; codebook {K}")
pick = np.linspace(0, len(splits["validate"]) - 1, 4).astype(int)
viz.image_rows({"slice": [splits["validate"].images[i] for i in pick],
                "index map": [np.kron(maps["validate"][i], np.ones((8, 8))) / (K - 1) for i in pick]},
               [splits["validate"].files[i].name for i in pick], FIGS / "06_index_maps.png");

# %% [markdown]
# A prior gives every map a probability, p(k) = p(k_1) p(k_2 | k_1) ... p(k_n | k_1 .. k_n-1), reading the
# positions in raster order (row by row, left to right). Each factor is a classification over K codes, so the
# prior is trained with cross-entropy, and its loss is the negative log-likelihood in nats per latent.
# Two baselines frame that number: guessing uniformly costs log K nats, and using only how often each code
# occurs in the training maps (ignoring all context) costs its entropy.

# %%
uniform = math.log(K)
unigram = prior.unigram_nll(maps["train"], maps["validate"], K)
print(f"uniform guess: {uniform:.3f} nats = {uniform / math.log(2):.2f} bits per latent")
print(f"code frequencies only: {unigram:.3f} nats = {unigram / math.log(2):.2f} bits per latent (validation)")

# %% [markdown]
# ## 2. Masked convolutions, checked
#
# The gated PixelCNN (van den Oord et al. 2016) has two stacks of convolutions. The **vertical stack** sees the
# rows above a position and the position's own row (its kernel covers rows up to the current one, to the left
# and the right); the **horizontal stack** sees the positions to its left in the same row, and receives the
# vertical stack's output shifted down by one row, so nothing from the current row leaks in through it. The
# first horizontal layer also excludes the position itself. Every layer is gated, tanh(a) * sigmoid(b), and
# can add an embedding of where the slice lies in its scan (8 bins), so we can ask for a slice near the edge
# of the pelvis or through its middle. Here is one layer:

# %%
print(inspect.getsource(prior.GatedLayer))

# %% [markdown]
# Claims about masks are easy to get wrong, so we measure them: change the code at one position of a random
# map and see which logits move. A position may only depend on positions before it, and a correct gated
# PixelCNN has no blind spot: every earlier position within reach, including those up and to the right,
# influences it.

# %%
torch.manual_seed(SEED)
toy = prior.PixelCNNPrior(prior.PriorConfig(codebook_size=K, channels=16, layers=4, kernel=3)).double().eval()
toy_maps = torch.randint(0, K, (1, 11, 11))
bins = torch.zeros(1, dtype=torch.int64)
target = (7, 5)
base = toy(toy_maps, bins)[0, :, target[0], target[1]]
influence = np.zeros((11, 11))
for r in range(11):
    for c in range(11):
        changed = toy_maps.clone()
        changed[0, r, c] = (changed[0, r, c] + 1) % K
        influence[r, c] = (toy(changed, bins)[0, :, target[0], target[1]] - base).abs().max().item()
later = [(r, c) for r in range(11) for c in range(11) if (r, c) >= target]
earlier = [(r, c) for r in range(11) for c in range(11) if (r, c) < target]
print(f"positions at or after {target} that change its logits: {sum(influence[p] > 0 for p in later)} of {len(later)}")
print(f"positions before it that change them: {sum(influence[p] > 0 for p in earlier)} of {len(earlier)}; "
      f"the upper right neighbour (6, 6) among them: {influence[6, 6] > 0}")
viz.influence_map(influence, target, FIGS / "06_causality.png");

# %% [markdown]
# ## 3. Training the prior
#
# `prior.train_prior` encodes the train and validation splits once (cached in the run folder), then trains
# with Adam, warm-up and cosine decay, and after every epoch writes `last.pt`, `best.pt` (lowest validation
# NLL) and `metrics.json` atomically, exactly like the VQ-VAE runs; `resume=True` continues an interrupted run.
# From a shell:
#
# ```bash
# python -m vqvae_lib prior --checkpoint checkpoints/default_8x.pt --data-dir data/phantom --out runs/prior_8x
# ```

# %%
if full:
    config = prior.make_prior_config(codebook_size=K, seed=SEED, device=str(device))
else:  # a short run of the committed prior's network; the curves and samples below come from the committed prior
    config = prior.make_prior_config(codebook_size=K, seed=SEED, device=str(device), epochs=1 if SMOKE else 2,
                                     limit=16 if SMOKE else None, channels=16 if SMOKE else 64)
history = prior.train_prior(VQ_CHECKPOINT, DATA, RUN, config, overwrite=True)
for h in history:
    print(f"epoch {h['epoch']}: validation NLL {h['val_nll']:.3f} nats = {h['val_bits']:.2f} bits per latent")
claims(history[-1]["val_nll"] < unigram, f"{'the' if full else 'even the short'} run beats the code-frequency baseline",
       f"{history[-1]['val_bits']:.2f} against {unigram / math.log(2):.2f} bits")

# %% [markdown]
# Even the short run on a CPU (two epochs over every training map) predicts the codes better than their
# frequencies alone: the context of the codes above and to the left carries information. The committed prior
# trained for longer; its curves:

# %%
prior_path = RUN / "best.pt" if full else Path(PRIOR_CHECKPOINT)
pixelcnn, prior_payload = prior.load_prior(prior_path, map_location=device)
curve = prior_payload["history"]
epochs = [h["epoch"] for h in curve]
viz.curves({"negative log-likelihood (bits per latent)": {
    "training": (epochs, [h["train_nll"] / math.log(2) for h in curve]),
    "validation": (epochs, [h["val_bits"] for h in curve]),
    "code frequencies only": (epochs, [unigram / math.log(2)] * len(epochs)),
    "uniform": (epochs, [uniform / math.log(2)] * len(epochs))}}, FIGS / "06_prior_curves.png");
best = min(curve, key=lambda h: h["val_nll"])
print(f"{prior_path}: best validation NLL {best['val_nll']:.3f} nats = {best['val_bits']:.2f} bits per latent "
      f"(epoch {best['epoch']}), against {unigram / math.log(2):.2f} bits from code frequencies alone")
claims(best["val_nll"] < unigram - math.log(2), "the trained prior needs at least a bit per latent less than the "
       "code frequencies", f"{best['val_bits']:.2f} against {unigram / math.log(2):.2f} bits")

# %% [markdown]
# ## 4. Sampling
#
# Sampling draws the 512 codes one after another, each from the prior's distribution given the codes drawn so
# far, then decodes the map. A temperature below 1 sharpens every distribution (safer, less varied samples).
# What the horizontal stack gets from the vertical one depends only on finished rows, so `PixelCNNPrior.sample`
# runs the vertical stack once per row and only the horizontal stack once per position; `row_logits` is tested
# to give exactly the logits of the full network.
# From a shell:
#
# ```bash
# python -m vqvae_lib sample --checkpoint checkpoints/default_8x.pt --prior checkpoints/prior_8x.pt \
#     --n 16 --out samples.png --seed 0 --temperature 1.0
# ```

# %%
samples, sample_maps, sample_bins = prior.sample_slices(VQ_CHECKPOINT, prior_path, n_samples, seed=SEED,
                                                        temperature=TEMPERATURE, device=str(device), progress=True)
real = np.asarray(splits["test"].images)
shown = min(8, n_samples)
real_pick = np.linspace(0, len(real) - 1, shown).astype(int)
viz.image_rows({"samples": list(samples[:shown]), "real (test)": [real[i] for i in real_pick]},
               [f"position bin {b}" for b in sample_bins[:shown]], FIGS / "06_samples.png");

# %% [markdown]
# ## 5. Are the samples new, and do they look real?
#
# **Not copies.** For every sample we find the training slice with the highest SSIM. A prior that memorised
# its training maps would produce near-copies: SSIM close to that of a reconstruction (printed below for this
# model's test reconstructions). As a yardstick we do the same for real test slices, which are certainly not in
# the training set: samples should be about as far from their nearest training slice as a new real slice is.

# %%
train_images = np.asarray(splits["train"].images)
sample_nn, sample_idx = metrics.nearest_by_ssim(samples, train_images)
test_nn, _ = metrics.nearest_by_ssim(real[real_pick], train_images)
recon_ssim = metrics.ssim_psnr(train.reconstruct(vq, real, device=device, amp=amp)[0], real)[0].mean()
print(f"SSIM to the nearest training slice: samples {sample_nn.mean():.3f} (max {sample_nn.max():.3f}), "
      f"real test slices {test_nn.mean():.3f} (max {test_nn.max():.3f}); a reconstruction: {recon_ssim:.3f}")
claims(sample_nn.max() < recon_ssim and sample_nn.mean() <= test_nn.mean() + 0.02,
       "the samples are not copies: about as far from the training slices as new real slices",
       f"samples {sample_nn.mean():.3f} (max {sample_nn.max():.3f}), real {test_nn.mean():.3f}, "
       f"reconstruction {recon_ssim:.3f}")
viz.image_rows({"sample": list(samples[:shown]), "nearest training slice": [train_images[i] for i in sample_idx[:shown]]},
               None, FIGS / "06_nearest_neighbours.png",
               captions={"nearest training slice": [f"SSIM {s:.2f}" for s in sample_nn[:shown]]});

# %% [markdown]
# **In the range of real slices.** We measure four simple statistics of every slice: mean intensity, body
# fraction (pixels above 0.1), high-frequency share (the spectral power above 0.25 cycles per pixel: texture and
# edges) and edge strength (mean gradient magnitude inside the body). A sample counts as *in range* for a
# statistic when it lies between the 1st and 99th percentile of that statistic over a reference set of
# slices, and as
# plausible when all four are in range. This cannot prove a sample is anatomically right; it does catch
# samples that are too dark, too empty, too blurred or too noisy.
#
# The reference is the training split (every patient the prior learned from; the test split holds only two
# scans, too few to span the variation between patients), in two versions, because a sample can fail for two
# reasons. Against the **real training slices**, even a perfect prior fails wherever the decoder cannot produce
# what real slices have (their noise and fine texture). Against the VQ-VAE's **reconstructions of the training
# slices**, a perfect prior would pass, so what fails there is the prior's fault.

# %%
recon_train, _ = train.reconstruct(vq, train_images, device=device, amp=amp)
references = {"real training slices": metrics.slice_stats(train_images),
              "their VQ-VAE reconstructions": metrics.slice_stats(recon_train)}
sample_stats = metrics.slice_stats(samples)
in_range = {}
for reference, ref_stats in references.items():
    inside = metrics.in_real_range(sample_stats, ref_stats)
    in_range[reference] = inside.all(1).mean()
    print(f"samples in the range of {reference}: all four {100 * inside.all(1).mean():.0f} %; "
          + ", ".join(f"{name} {100 * share:.0f} %" for name, share in zip(metrics.SLICE_STATS, inside.mean(0))))
decoder_limit = metrics.in_real_range(references["their VQ-VAE reconstructions"], references["real training slices"])
print(f"for comparison, the reconstructions in the range of the real slices: all four "
      f"{100 * decoder_limit.all(1).mean():.0f} %")
readme.save_results(FIGS / "06_results.json", {
    "n_samples": n_samples, "uniform_bits": uniform / math.log(2), "unigram_bits": unigram / math.log(2),
    "prior_bits": best["val_bits"], "prior_epoch": best["epoch"], "sample_nn_mean": sample_nn.mean(),
    "sample_nn_max": sample_nn.max(), "test_nn_mean": test_nn.mean(), "test_nn_max": test_nn.max(),
    "recon_ssim": recon_ssim, "in_range_recon": in_range["their VQ-VAE reconstructions"],
    "in_range_real": in_range["real training slices"], "recon_in_range_real": decoder_limit.all(1).mean()})
viz.distributions({name: {"real (train)": references["real training slices"][:, i],
                          "reconstructed": references["their VQ-VAE reconstructions"][:, i],
                          "samples": sample_stats[:, i]}
                   for i, name in enumerate(metrics.SLICE_STATS)}, FIGS / "06_sample_stats.png");

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
# 1. The validation NLL is in bits per latent. How many bits does the prior need for a whole slice, and how
#    does that compare with storing the 32 x 16 indices plainly (9 bits each)?
# 2. Draw samples at temperature 0.7 and 1.3. Which statistics move, and in which direction?
# 3. The influence map shows the reach of 4 layers with 3-wide kernels. How many rows above a position can the
#    committed prior (8 layers, kernel 5) see? What part of a slice is that?
# 4. Why must the nearest-neighbour check use the training split and not the test split?
