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
# # 06 · A learned prior: sampling new slices, judged by real metrics
#
# A VQ-VAE on its own only reconstructs. The paper makes new images by fitting an autoregressive model to the
# discrete code maps of the training images, sampling a new map from it one code at a time and decoding that
# map. You will learn
#
# - how a slice becomes a small grid of code indices, and why a prior over those grids is a classification
#   problem at every position;
# - two priors: the gated PixelCNN (masked convolutions in a vertical and a horizontal stack) and a small
#   causal transformer with cached sampling, both checked by experiment to see only the codes before a position;
# - how to read a prior's likelihood in bits per latent, and how regularisation changes what it generalises;
# - how to judge samples with numbers: a Fréchet and a kernel distance in a feature space trained here,
#   precision and recall, memorisation in code space, diversity, and the samples' own likelihood;
# - how to use the prior as a tool: completing a slice from its top rows, and maps of where a slice surprises
#   the prior, tested on slices with an inserted abnormality.
#
# **Prerequisites:** notebooks 03 to 05.
#
# **Expected run time:** about 4 minutes on a 2-core CPU (measured by `make figures`: a short demonstration run of
# the transformer; the figures and numbers use the committed checkpoints). With a GPU the notebook trains both
# full priors itself.

# %% tags=["parameters"]
SMOKE = False  # fast settings for the tests
DATA_DIR = "../data/phantom"
FIG_DIR = "../figures"
SEED = 0
INTERACTIVE = False  # True: the sampler and completion widget after the static figures
DEVICE = "auto"
TRAIN = "auto"  # auto: the full runs on a GPU, a short run on a CPU; or "full" / "short"
RUN_DIR = "../build/runs/06_prior"
CHECKPOINTS = "../checkpoints"
N_SAMPLES = 120  # per prior and setting: as many as the test split has slices
TEMPERATURE = 1.0
TOP_P = 0.8  # the nucleus setting judged next to plain sampling

# %%
from pathlib import Path

DATA = Path(DATA_DIR)
FIGS = Path(FIG_DIR)
RUN = Path(RUN_DIR)
CKPT = Path(CHECKPOINTS)
VQ_CHECKPOINT = CKPT / "gen_8x.pt"
PRIORS = {"PixelCNN": CKPT / "pixelcnn_gen.pt", "transformer": CKPT / "transformer_gen.pt"}
PLAIN_PIXELCNN = CKPT / "pixelcnn_gen_plain.pt"
n_samples = 6 if SMOKE else N_SAMPLES

# %%
import inspect
import json
import math
import platform
import time

import numpy as np
import torch

import vqvae_lib
from vqvae_lib import (checkpoint, data, diagrams, metrics, phantom, prior, readme, sample_metrics, train, viz,
                       widgets)
from vqvae_lib.claims import Claims
from vqvae_lib.explorer import SamplerPanel, code_intensity, intensity_map

torch.manual_seed(SEED)
claims = Claims(SMOKE, DATA)  # sentences below that state a measured result are checked in full mode
device = train.select_device(DEVICE)
full = TRAIN == "full" or (TRAIN == "auto" and device.type == "cuda" and not SMOKE)
print(f"python {platform.python_version()}, torch {torch.__version__}, vqvae_lib {vqvae_lib.__version__}")
print(f"device: {device}; {'full training runs' if full else 'short demonstration run'}")

# %% [markdown]
# ## 1. Slices as code index maps, from a model sharp enough to be worth sampling
#
# A prior can only be as good as the decoder behind it: a perfect prior over the codes of a blurry model gives
# blurry slices. Notebook 04's 8x model (`default_8x.pt`) trained for 15 epochs; for generation we train the same
# recipe for 40 (`gen_8x.pt`, about 35 minutes on a 2-core CPU). Each 256 x 128 slice becomes a 32 x 16 map of
# indices into a codebook of 512 vectors, 512 positions in all. (The 4x model has four times as many positions:
# the prior would take four times as long to train and to sample, fine on a GPU, too slow for this notebook on a
# CPU.)
#
# Below, each map colours a code by the mean intensity it decodes to (dark purple to yellow), as notebook 05's
# explorer does: the maps show the anatomy the codes stand for.

# %%
vq, vq_payload = checkpoint.load_model(VQ_CHECKPOINT, map_location=device)
amp = train.checkpoint_precision(vq_payload, device)  # as trained, where this device has it
splits = {name: data.load_split(DATA, name, progress=False) for name in ("train", "validate", "test")}
maps = {name: prior.encode_maps(vq, split.images, amp=amp) for name, split in splits.items()}
images = {name: np.asarray(split.images) for name, split in splits.items()}
slice_bins = {name: prior.position_bins(split, 8) for name, split in splits.items()}
K = vq.config.codebook_size
recon_test = train.reconstruct(vq, images["test"], device=device, amp=amp)[0]
recon_ssim = float(metrics.ssim_psnr(recon_test, images["test"])[0].mean())
manifest = json.loads((CKPT / "MANIFEST.json").read_text())["checkpoints"]
short_ssim = manifest["default_8x.pt"]["metrics"]["test"]["ssim_mean"]
print(f"index maps: {', '.join(f'{name} {tuple(m.shape)}' for name, m in maps.items())}; codebook {K}")
print(f"test SSIM of the reconstructions: {recon_ssim:.3f} ({vq_payload['history'][-1]['epoch']} epochs), "
      f"against {short_ssim:.3f} for default_8x.pt (15 epochs)")
claims(recon_ssim > short_ssim + 0.02, "the longer-trained 8x model reconstructs clearly better",
       f"{recon_ssim:.3f} against {short_ssim:.3f}")
pick = np.linspace(0, len(images["validate"]) - 1, 4).astype(int)
intensity = code_intensity(vq)  # the mean intensity each code decodes to, as notebook 05's explorer colours codes
viz.image_rows({"slice": [images["validate"][i] for i in pick],
                "codes by intensity": [intensity_map(maps["validate"][i], intensity) for i in pick]},
               [splits["validate"].files[i].name for i in pick], FIGS / "06_index_maps.png");

# %% [markdown]
# A prior gives every map $c = (c_1, \dots, c_n)$ of $n = hw$ codes a probability, reading the positions in raster
# order (row by row, left to right):
#
# $$
# p(c) = \prod_{i=1}^{n} p(c_i \mid c_{<i}) = p(c_1)\, p(c_2 \mid c_1) \cdots p(c_n \mid c_1, \dots, c_{n-1}).
# $$
#
# Each factor is a classification over $K$ codes, so the prior is trained with cross-entropy, and its loss is the
# negative log-likelihood in nats per latent,
#
# $$
# \mathrm{NLL} = -\frac{1}{n} \sum_{i=1}^{n} \log p(c_i \mid c_{<i}),
# $$
#
# averaged over the maps; divided by $\log 2$ it is in **bits per latent**, and $n \cdot \mathrm{NLL} / \log 2$
# bits is what a whole map costs an arithmetic coder driven by the prior. Two baselines frame that number:
# guessing uniformly costs $\log K$ nats, and using only how often each code occurs in the training maps
# (ignoring all context) costs $-\frac{1}{n} \sum_i \log \hat p(c_i)$ on the validation maps, with $\hat p$ the
# add-one smoothed training frequencies of notebook 05 (section 6): about the entropy of the code histogram.

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
# first horizontal layer also excludes the position itself. Every layer is gated: its convolution gives twice the
# channels, split into halves $a$ and $b$, and the output is $\tanh(a) \odot \sigma(b)$, with $\sigma$ the logistic
# sigmoid as a gate between 0 and 1 on each channel. Each layer can add an embedding of where the slice lies in its scan (8 bins), so we can ask for a slice near the edge
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
# The same check by gradients, stack by stack and layer by layer (as in the UvA deep-learning tutorial 12): with
# kernel $k$ and $r = \lfloor k/2 \rfloor$, after $n$ layers a position sees the $nr + 1$ rows above it within $nr$
# columns either side and the $nr + 1$ positions to its left, never itself or anything later.

# %%
diagrams.pixelcnn_stacks(FIGS / "06_pixelcnn_stacks.png", shape=(11, 11), target=target, kernel=3,
                         layers=(1, 2, 4), seed=SEED);

# %% [markdown]
# ## 3. A transformer prior with cached sampling
#
# The PixelCNN sees a fixed neighbourhood above and to the left of a position (its receptive field grows with
# every layer). A transformer sees every earlier position from the first layer on, and learns which ones matter.
# Ours is a small decoder as in MONAI's VQ-VAE + transformer tutorial: the map is read as a sequence, a start
# token followed by the first n - 1 codes; every token gets a learned embedding of the row and the column it
# predicts and of the slice's position bin; causal self-attention keeps step i blind to the codes from i on.
# One block:

# %%
print(inspect.getsource(prior.Block))

# %% [markdown]
# Sampling a sequence naively reruns the whole network for each of the 512 codes. `TransformerPrior.sample`
# keeps every layer's keys and values in a cache instead (incremental decoding): each new code is one token's
# attention over the cached ones. Both claims are measured on a small random model: changing any earlier code
# moves the last position's logits, changing a later one moves none, and greedy sampling with the cache picks
# exactly the argmax of the full network's logits at every position.

# %%
torch.manual_seed(SEED)
tiny = prior.make_prior(prior.PriorConfig(codebook_size=K, arch="transformer", channels=32, layers=2, heads=4)).eval()
tiny_maps, tiny_bins = torch.randint(0, K, (2, 6, 5)), torch.tensor([0, 3])
base = tiny(tiny_maps, tiny_bins)
moved = []
for pos in range(30):
    changed = tiny_maps.clone()
    changed[:, pos // 5, pos % 5] = (changed[:, pos // 5, pos % 5] + 1) % K
    moved.append((tiny(changed, tiny_bins) - base).abs().amax(dim=(0, 1)).flatten())
moved = torch.stack(moved)  # [changed position, logits position]
future = sum(bool(moved[p, :p + 1].max() > 0) for p in range(30))
seen = sum(bool(moved[p, -1] > 0) for p in range(29))
greedy = tiny.sample(2, (6, 5), tiny_bins, temperature=1e-6, seed=SEED)
exact = bool(torch.equal(greedy, tiny(greedy, tiny_bins).argmax(1)))
print(f"positions whose change moves logits at or before them: {future} of 30; earlier positions that move the "
      f"last one's logits: {seen} of 29; cached greedy sampling equals the full network's argmax: {exact}")
claims(future == 0 and seen == 29 and exact, "the transformer is causal, sees all earlier positions, and its "
       "cached sampler computes what the full network computes", f"{future}, {seen}/29, {exact}")

# %% [markdown]
# ## 4. Training the priors
#
# `prior.train_prior` trains either prior (`arch`): it encodes the train and validation splits once (cached in
# the run folder), trains with Adam, warm-up and cosine decay, and after every epoch writes `last.pt`, `best.pt`
# (lowest validation NLL) and `metrics.json` atomically, exactly like the VQ-VAE runs; `resume=True` continues
# an interrupted run. The committed priors were made by `make checkpoints` with these commands (the MANIFEST
# records them):

# %%
for name in ("pixelcnn_gen_plain.pt", "pixelcnn_gen.pt", "transformer_gen.pt"):
    print(f"{name}: {manifest[name]['command']} ({manifest[name]['train_seconds'] / 60:.1f} min)")

# %% [markdown]
# On a GPU this notebook retrains both with the committed recipe (read from the checkpoint); on a CPU it runs
# a short demonstration of the transformer (two epochs) and the figures use the committed priors.

# %%
committed = {name: prior.load_prior(path)[1] for name, path in PRIORS.items()}
if full:
    runs_made = {}
    for name, payload in committed.items():
        config = prior.PriorTrainConfig(**{**payload["train_config"], "device": str(device)})
        prior.train_prior(VQ_CHECKPOINT, DATA, RUN / name, config, overwrite=True)
        runs_made[name] = RUN / name / "best.pt"
    PRIORS = runs_made
else:
    config = prior.make_prior_config(codebook_size=K, seed=SEED, device=str(device), arch="transformer",
                                     channels=16 if SMOKE else 64, layers=1 if SMOKE else 4,
                                     epochs=1 if SMOKE else 2, limit=16 if SMOKE else None, precision="fp32")
    history = prior.train_prior(VQ_CHECKPOINT, DATA, RUN / "transformer", config, overwrite=True)
    for h in history:
        print(f"epoch {h['epoch']}: validation NLL {h['val_bits']:.2f} bits per latent, {h['maps_per_s']:.0f} maps/s")
    claims(history[-1]["val_nll"] < unigram, "even the short run beats the code-frequency baseline",
           f"{history[-1]['val_bits']:.2f} against {unigram / math.log(2):.2f} bits")

# %% [markdown]
# The curves of the committed priors, with the PixelCNN's default recipe (the same network without dropout,
# 8 epochs: the recipe of `prior_8x.pt`, which notebooks 05 and 07 use) for comparison. That recipe is still
# improving when its learning rate has decayed. Trained for 20 epochs with dropout 0.1 on every layer's
# residual branch, the same PixelCNN gets lower; but after its best epoch its validation NLL rises again while
# its training NLL keeps falling: it starts to learn the 1,440 training maps rather than maps in general, and
# `best.pt` keeps the best epoch. The transformer, with the same dropout, gets lowest of the three, early, and
# then overfits the same way. With this few maps, stronger regularisation or more data (the real HipMRI
# training split has eight times as many slices) is what both need next.

# %%
runs_of = {"PixelCNN, no dropout": PLAIN_PIXELCNN, **PRIORS}  # a best.pt's history stops at its best epoch:
histories = {name: checkpoint.load_checkpoint(path.with_name("last.pt"))["history"] if path.name == "best.pt"
             else manifest[path.name]["history"] for name, path in runs_of.items()}  # the whole run
viz.curves({f"{name}: NLL (bits per latent)": {
    "training": ([h["epoch"] for h in hist], [h["train_nll"] / math.log(2) for h in hist]),
    "validation": ([h["epoch"] for h in hist], [h["val_bits"] for h in hist]),
    "code frequencies only": ([hist[0]["epoch"], hist[-1]["epoch"]], [unigram / math.log(2)] * 2)}
    for name, hist in histories.items()}, FIGS / "06_prior_curves.png");
fits = {}
for name, hist in histories.items():
    best = min(hist, key=lambda h: h["val_nll"])
    fits[name] = {"bits": best["val_bits"], "epoch": best["epoch"], "epochs": hist[-1]["epoch"],
                  "last_bits": hist[-1]["val_bits"], "train_bits": hist[-1]["train_nll"] / math.log(2)}
    print(f"{name}: best validation NLL {best['val_bits']:.3f} bits per latent (epoch {best['epoch']} of "
          f"{hist[-1]['epoch']}); at the last epoch validation {hist[-1]['val_bits']:.3f}, training "
          f"{fits[name]['train_bits']:.3f}")
plain, drop, attn = (fits[n] for n in ("PixelCNN, no dropout", "PixelCNN", "transformer"))
claims(drop["bits"] < plain["bits"], "20 epochs with dropout take the PixelCNN lower",
       f"{drop['bits']:.3f} against {plain['bits']:.3f} bits per latent")
claims(all(f["last_bits"] > f["bits"] + 0.02 for f in (drop, attn)),
       "both longer runs overfit after their best epoch",
       ", ".join(f"{f['bits']:.3f} -> {f['last_bits']:.3f}" for f in (drop, attn)))
claims(attn["bits"] < drop["bits"], "the transformer gets lowest",
       f"{attn['bits']:.3f} against {drop['bits']:.3f} bits per latent")

# %% [markdown]
# ## 5. Sampling
#
# Sampling draws the 512 codes one after another, each from the prior's distribution given the codes drawn so
# far, then decodes the map. With the prior's logits $\ell_k$ at a position, a temperature $T$ draws code $k$ with
# probability
#
# $$
# p_T(k) = \frac{\exp(\ell_k / T)}{\sum_{j=1}^{K} \exp(\ell_j / T)}:
# $$
#
# $T < 1$ sharpens every distribution (safer, less varied samples), $T > 1$ flattens it. Top-k and top-p
# (nucleus) sampling cut the unlikely tail of each distribution instead: top-k keeps the $k$ likeliest codes,
# top-p the smallest set of likeliest codes whose probabilities sum to at least $p$, and the draw is renormalised
# over what is kept. Both priors sample
# exactly and without recomputing everything: the PixelCNN runs its vertical stack once per row, the
# transformer uses its cache. From a shell:
#
# ```bash
# python -m vqvae_lib sample --checkpoint checkpoints/gen_8x.pt --prior checkpoints/transformer_gen.pt \
#     --n 16 --out samples.png --seed 0 --temperature 1.0 [--top-k K] [--top-p P]
# ```
#
# We draw as many samples from each prior as the test split has slices, once from the prior's own
# distribution and once with nucleus sampling (top-p 0.8), side by side on this machine, and time them:

# %%
generators = {name: prior.load_generator(VQ_CHECKPOINT, path, device=str(device)) for name, path in PRIORS.items()}
settings = {"": {}, f", top-p {TOP_P}": {"top_p": TOP_P}}
samples, speed, made_by = {}, {}, {}
for name, generator in generators.items():
    for suffix, options in settings.items():
        started = time.perf_counter()
        samples[name + suffix] = generator.sample(n_samples, seed=SEED, temperature=TEMPERATURE, progress=True,
                                                  **options)
        speed[name + suffix] = n_samples / (time.perf_counter() - started)
        made_by[name + suffix] = name
        print(f"{name + suffix}: {n_samples} samples in {n_samples / speed[name + suffix]:.1f} s, "
              f"{speed[name + suffix]:.1f} maps per second")
real_pick = np.linspace(0, len(images["test"]) - 1, 6).astype(int)
shown = min(6, n_samples)
viz.image_rows({**{name: list(s[0][:shown]) for name, s in samples.items()},
                "real (test)": [images["test"][i] for i in real_pick]}, None, FIGS / "06_samples.png",
               captions={**{name: [f"drawn for position bin {b}" for b in s[2][:shown]] for name, s in samples.items()},
                         "real (test)": [f"{splits['test'].files[i].name} (bin {slice_bins['test'][i]})"
                                         for i in real_pick]});

# %% [markdown]
# Temperature and nucleus sampling, with the same seed (the transformer, position bin 4): lower temperatures
# and smaller nuclei give smoother, more typical slices, higher temperatures more varied and noisier ones.

# %%
variations = {"temperature 0.8": dict(temperature=0.8), "temperature 1.0": dict(temperature=1.0),
              "temperature 1.2": dict(temperature=1.2), "top-p 0.8": dict(top_p=0.8)}
viz.image_rows({label: list(generators["transformer"].sample(min(4, n_samples), position=4, seed=SEED, **options)[0])
                for label, options in variations.items()}, None, FIGS / "06_temperature.png");

# %% [markdown]
# ## 6. Judging the samples
#
# Looking is not measuring. Image-generation papers compare the distribution of samples with that of real
# images in the feature space of a network (FID uses an ImageNet classifier). We have no downloaded weights,
# so `vqvae_lib.sample_metrics` trains its own: a small CNN (`checkpoints/features.pt`) that predicts from a
# slice where in its scan it lies and which organs (bone, bladder, rectum, prostate) it shows. To do that it
# must represent exactly what makes a slice look like a slice of a pelvis, and it trains in minutes. In its
# 64-dimensional feature space we measure, with the test split as the real set:
#
# - the **Fréchet distance** (FID's formula) and the **kernel distance** (KID, unbiased): how far the two
#   distributions are apart. The reference is the training split against the test split: two sets of real
#   slices, from different patients. With the means $\mu_a, \mu_b$ and covariances $\Sigma_a, \Sigma_b$ of two
#   feature sets, the Fréchet distance is
#   $\|\mu_a - \mu_b\|^2 + \operatorname{tr}\left(\Sigma_a + \Sigma_b - 2 (\Sigma_a \Sigma_b)^{1/2}\right)$;
#   KID is the unbiased estimate of $\mathrm{MMD}^2 = \mathbb{E}[k(a, a')] + \mathbb{E}[k(b, b')] - 2\,\mathbb{E}[k(a, b)]$
#   with the kernel $k(x, y) = (x^\top y / F + 1)^3$ on $F = 64$ features, averaged over random subsets.
# - **precision and recall** (Kynkäänniemi et al. 2019): the share of samples that fall inside the real
#   slices' manifold (the union of balls around each real feature vector reaching its 3rd nearest real neighbour),
#   and the share of real slices inside the samples' manifold. **Coverage** (Naeem et al. 2020): the share of
#   real balls (5th neighbour) that hold at least one sample.
# - **memorisation in code space**: for every sample the fraction of its 512 codes that differ from its nearest
#   training map, $\min_j \frac{1}{n} \sum_{i=1}^{n} [c_i \ne c^{(j)}_i]$ over the training maps $c^{(j)}$, next to
#   the same for test maps; a copied map would be at or near 0.
# - **diversity**: the mean SSIM between pairs of samples, next to that between pairs of test slices.
# - the samples' **own NLL** under the prior that drew them, next to that of the real test maps.

# %%
features, features_payload = sample_metrics.load_features(CKPT / "features.pt", map_location=device)
last = features_payload["history"][-1]
print(f"feature network: validation accuracy of the position bin {last['val_position_accuracy']:.3f}, of organ "
      f"presence {last['val_organ_accuracy']:.3f}")
test_bits = {name: generator.surprise(maps["test"], slice_bins["test"]).mean() for name, generator in generators.items()}
reports = {}
for name, (sample_images, sample_maps, sample_bins) in samples.items():
    sample_bits = generators[made_by[name]].surprise(sample_maps, sample_bins).mean()
    reports[name] = sample_metrics.judge(features, sample_images, sample_maps, images["train"], maps["train"],
                                         images["test"], maps["test"], sample_nll=sample_bits,
                                         test_nll=test_bits[made_by[name]])
    reports[name]["samples_per_s"] = speed[name]
    reports[name]["targets"] = sample_metrics.targets(reports[name])
rows = [("Fréchet distance to the test split", "fid_samples_test", ".1f"), ("kernel distance (KID)", "kid_samples_test", ".4f"),
        ("precision", "precision", ".2f"), ("recall", "recall", ".2f"), ("coverage", "coverage", ".2f"),
        ("nearest training map: fraction of codes that differ, min", "hamming_samples_min", ".3f"),
        ("mean pairwise SSIM (diversity)", "diversity_samples", ".3f"), ("own NLL, bits per latent", "sample_nll_mean", ".2f")]
reference = reports["transformer"]
print(f"reference, the training split against the test split: Fréchet {reference['fid_train_test']:.1f}, "
      f"KID {reference['kid_train_test']:.4f}; test maps' nearest training map differs in at least "
      f"{reference['hamming_test_min']:.3f} of their codes; test slices' mean pairwise SSIM "
      f"{reference['diversity_test']:.3f}; test maps' NLL " + ", ".join(f"{n} {b:.2f}" for n, b in test_bits.items()))
for label, key, spec in rows:
    print(f"{label:58s} " + "   ".join(f"{name} {format(r[key], spec)}" for name, r in reports.items()))
for name, r in reports.items():
    print(f"{name} targets: " + ", ".join(f"{t} {'met' if ok else 'missed'}" for t, ok in r["targets"].items()))
viz.ablation(["real slices (reference)", *reports], {
    "Fréchet distance to test\n(reference: the training split)":
        [reference["fid_train_test"], *(r["fid_samples_test"] for r in reports.values())],
    "kernel distance to test\n(reference: the training split)":
        [reference["kid_train_test"], *(r["kid_samples_test"] for r in reports.values())],
    "least code distance to a training map\n(reference: test maps)":
        [reference["hamming_test_min"], *(r["hamming_samples_min"] for r in reports.values())],
    "mean pairwise SSIM\n(reference: test slices)":
        [reference["diversity_test"], *(r["diversity_samples"] for r in reports.values())]},
    FIGS / "06_sample_metrics.png", highlight="real slices (reference)", ncols=2);

# %% [markdown]
# What the numbers say. **Likelihood and sample quality disagree:** the transformer has the lower validation
# NLL, but its samples are further from real slices by every measure printed above (Fréchet and kernel
# distance, precision, recall, coverage), and their own NLL under the transformer is higher than that of real
# maps: small errors compound as it samples, and it has no convolution's bias towards smooth neighbourhoods to
# pull it back. **Neither prior meets the Fréchet target** (at most twice the training split's distance), with
# or without nucleus sampling; cutting the unlikely tail (top-p 0.8) brings both closer. **Recall is above 0.5
# for every sampler:** the samples spread over most of the test slices' manifold. **Memorisation:** none of
# the transformer's samples (at temperature 1) is nearer to a training map than the test maps are; the
# PixelCNN's nearest sample is, though it still differs from that map in about three quarters of its codes.
# The samples are new slices, not copies, but not yet slices a radiologist would take for real ones.

# %%
pixel, attn_r = reports["PixelCNN"], reports["transformer"]
claims(attn["bits"] < drop["bits"] and all(pixel[k] < attn_r[k] for k in ("fid_samples_test", "kid_samples_test"))
       and all(pixel[k] > attn_r[k] for k in ("precision", "recall", "coverage")),
       "the PixelCNN's samples are closer to the test split although the transformer has the lower NLL",
       f"Fréchet {pixel['fid_samples_test']:.1f} against {attn_r['fid_samples_test']:.1f}")
claims(attn_r["sample_nll_mean"] > attn_r["test_nll_mean"], "the transformer finds its own samples less likely than "
       "real maps", f"{attn_r['sample_nll_mean']:.2f} against {attn_r['test_nll_mean']:.2f} bits per latent")
claims(not any(r["targets"]["fid"] for r in reports.values()), "neither prior meets the Fréchet target",
       ", ".join(f"{n} {r['fid_samples_test']:.1f}" for n, r in reports.items())
       + f" against 2 x {pixel['fid_train_test']:.1f}")
claims(all(reports[n + f", top-p {TOP_P}"]["fid_samples_test"] < reports[n]["fid_samples_test"] for n in PRIORS),
       "top-p 0.8 brings both closer", ", ".join(f"{n} {r['fid_samples_test']:.1f}" for n, r in reports.items()))
claims(all(r["recall"] > 0.5 for r in reports.values()), "recall is above 0.5 for every sampler",
       ", ".join(f"{n} {r['recall']:.2f}" for n, r in reports.items()))
claims(attn_r["targets"]["memorisation"] and not pixel["targets"]["memorisation"]
       and 0.7 <= pixel["hamming_samples_min"] <= 0.8,
       "no transformer sample is nearer a training map than the test maps; the PixelCNN's nearest is, but differs in "
       "most codes", f"{attn_r['hamming_samples_min']:.3f} and {pixel['hamming_samples_min']:.3f} against "
       f"{pixel['hamming_test_min']:.3f}")
best_name = min(reports, key=lambda n: reports[n]["fid_samples_test"])
best_prior = made_by[best_name]
print(f"closest to the test split: {best_name}; sections 7 and 8 use the {best_prior} prior")

# %% [markdown]
# **Not copies, in pixels too.** For the first samples we also find the training slice with the highest SSIM;
# new real slices (test) give the yardstick, and a reconstruction's SSIM the level a copy would reach.

# %%
train_images = images["train"]
nn_count = min(16, n_samples)
best_images = samples[best_name][0][:nn_count]
sample_nn, sample_idx = metrics.nearest_by_ssim(best_images, train_images)
test_nn, _ = metrics.nearest_by_ssim(images["test"][real_pick], train_images)
print(f"SSIM to the nearest training slice: {best_name} samples {sample_nn.mean():.3f} (max {sample_nn.max():.3f}), "
      f"real test slices {test_nn.mean():.3f} (max {test_nn.max():.3f}); a reconstruction: {recon_ssim:.3f}")
claims(sample_nn.max() < recon_ssim, "no sample is as close to a training slice as a reconstruction is to its slice",
       f"max {sample_nn.max():.3f} against {recon_ssim:.3f}")
viz.image_rows({"sample": list(best_images[:shown]), "nearest training slice": [train_images[i] for i in sample_idx[:shown]]},
               None, FIGS / "06_nearest_neighbours.png",
               captions={"nearest training slice": [f"SSIM {s:.2f}" for s in sample_nn[:shown]]});

# %% [markdown]
# ## 7. Completion: the prior as a tool
#
# An autoregressive prior can continue any beginning. We keep the first half of a test slice's code map (16
# of its 32 rows; as the slices are shown here, rotated, that is the left half) and let the prior draw the rest,
# three times with different seeds, as UvA's PixelCNN tutorial does for pixels. The kept part is the same in
# every completion; what the prior adds must fit it.

# %%
generator = generators[best_prior]
keep = maps["test"].shape[1] // 2
chosen = [i for i, f in enumerate(splits["test"].files) if f.index in (20, 30, 40)][:1 if SMOKE else 3] or [0]
rows, captions, agreement = {}, {}, []
for i in chosen:
    completed, _ = generator.complete(maps["test"][i], keep, 3, position=int(slice_bins["test"][i]), seed=SEED)
    unconditional = generator.sample(3, position=int(slice_bins["test"][i]), seed=SEED + 1)[0]
    target = np.repeat(images["test"][i][None], 3, 0)
    agreement.append((metrics.ssim_psnr(completed, target)[0].mean(), metrics.ssim_psnr(unconditional, target)[0].mean()))
    kept = generator.decode(maps["test"][i][None])[0].copy()
    kept[keep * vq.config.downsample:] = 0
    name = f"slice {splits['test'].files[i].index}"
    rows[name] = [images["test"][i], kept, *completed]
    captions[name] = [f"real: {splits['test'].files[i].name}", f"kept: first {keep} rows (rest blank)",
                      *(f"completion {j + 1}" for j in range(3))]
viz.image_rows(rows, None, FIGS / "06_completion.png", captions=captions);
agreement = np.array(agreement)
print(f"SSIM to the real slice: completions {agreement[:, 0].mean():.3f}, unconditional samples of the same "
      f"position bin {agreement[:, 1].mean():.3f}")
claims(agreement[:, 0].mean() > agreement[:, 1].mean(), "completions agree with the real slice more than free samples",
       f"{agreement[:, 0].mean():.3f} against {agreement[:, 1].mean():.3f}")

# %% [markdown]
# ## 8. Where is the prior surprised?
#
# The prior scores every position $i$ with its surprise, $-\log_2 p(c_i \mid c_{<i})$ bits. Drawn as a heat map over the slice it shows where
# the codes are hard to predict. To see whether that is useful, `phantom.insert_lesion` draws an abnormality
# the prior never saw (a small bright disc inside the body) into every test slice; we encode both versions and
# compare. The summed NLL of the whole map, $-\sum_i \log_2 p(c_i \mid c_{<i})$, is a likelihood test of the slice;
# the largest NLL of any position, $\max_i \left(-\log_2 p(c_i \mid c_{<i})\right)$, is a local one. Either score
# separates lesioned from normal slices as well as its AUROC says: the probability that a random lesioned slice
# scores higher than a random normal one (ties counting half), 0.5 for a score that cannot tell them apart and 1
# for a perfect one.

# %%
rng = np.random.default_rng(SEED)
masks = splits["test"].masks
lesioned, outlines = zip(*(phantom.insert_lesion(image, masks[i] if masks is not None else None, rng)
                           for i, image in enumerate(images["test"])))
lesioned = np.asarray(lesioned)
lesion_maps = prior.encode_maps(vq, lesioned, amp=amp)
d = vq.config.downsample
cells = np.array([o.reshape(o.shape[0] // d, d, o.shape[1] // d, d).any((1, 3)) for o in outlines])  # (N, h, w)
separation = {}
for name, gen in generators.items():
    normal_bits = gen.surprise(maps["test"], slice_bins["test"])
    lesion_bits = gen.surprise(lesion_maps, slice_bins["test"])
    separation[name] = {
        "auroc_sum": sample_metrics.auroc(lesion_bits.sum((1, 2)), normal_bits.sum((1, 2))),
        "auroc_max": sample_metrics.auroc(lesion_bits.max((1, 2)), normal_bits.max((1, 2))),
        "paired": float((lesion_bits.sum((1, 2)) > normal_bits.sum((1, 2))).mean()),
        "lesion_cells": float(lesion_bits[cells].mean()), "same_cells_normal": float(normal_bits[cells].mean()),
        "any_cell": float(normal_bits.mean())}
    print(f"{name}: AUROC lesion vs normal, summed NLL {separation[name]['auroc_sum']:.3f}, largest position NLL "
          f"{separation[name]['auroc_max']:.3f}; the lesioned slice scores higher than its own normal version in "
          f"{100 * separation[name]['paired']:.0f} % of the {len(lesioned)} pairs; the lesion's cells cost "
          f"{separation[name]['lesion_cells']:.1f} bits, the same cells of the normal slice "
          f"{separation[name]['same_cells_normal']:.1f}, an average cell {separation[name]['any_cell']:.1f}")
    if name == best_prior:
        shown_bits = (normal_bits, lesion_bits)
i = int(np.argmax(slice_bins["test"] == 4)) if (slice_bins["test"] == 4).any() else 0
viz.likelihood_maps([images["test"][i], lesioned[i]], [shown_bits[0][i], shown_bits[1][i]],
                    ["normal", "with an inserted lesion"], FIGS / "06_surprise.png", outlines=[None, outlines[i]]);

# %% [markdown]
# The heat map finds the lesion: its cells cost the prior more bits than the same cells of the normal slice,
# and well above an average cell. As a test over slices,
# though, the NLL barely separates lesioned from normal ones (AUROC near 0.5 for the summed and for the
# largest position NLL): slices differ in how predictable their codes are far more than a small lesion adds.
# Compared with its own normal version, the lesioned slice scores higher in most pairs. A detector would have
# to compare a slice with what is normal for it, not with other slices.

# %%
sep = separation[best_prior]
claims(sep["lesion_cells"] > sep["same_cells_normal"] + 1 and sep["lesion_cells"] > 1.5 * sep["any_cell"],
       "the lesion's cells cost more bits than the same normal cells, and well above an average cell",
       f"{sep['lesion_cells']:.1f} against {sep['same_cells_normal']:.1f} and {sep['any_cell']:.1f}")
claims(sep["auroc_sum"] < 0.7 and sep["auroc_max"] < 0.7, "the NLL barely separates lesioned from normal slices",
       f"AUROC {sep['auroc_sum']:.3f} and {sep['auroc_max']:.3f}")
claims(sep["paired"] > 0.75, "the lesioned slice scores higher than its own normal version in most pairs",
       f"{100 * sep['paired']:.0f} %")

# %% [markdown]
# ## 9. Try it
#
# With `INTERACTIVE = True` (or in the explorer page, `make explorer`) the sampler below draws new slices at a
# temperature, position bin and seed you choose, and completes the current test slice from a row you choose.

# %%
widgets.show(SamplerPanel(generator, images["test"], [f.name for f in splits["test"].files], slice_bins["test"]),
             INTERACTIVE)

# %%
readme.save_results(FIGS / "06_results.json", {
    "n_samples": n_samples, "uniform_bits": uniform / math.log(2), "unigram_bits": unigram / math.log(2),
    "recon_ssim": recon_ssim, "short_recon_ssim": short_ssim, "best": best_name, "top_p": TOP_P,
    "fits": fits, "reports": reports, "made_by": made_by, "separation": separation,
    "completion_ssim": agreement[:, 0].mean(), "free_ssim": agreement[:, 1].mean(),
    "sample_nn_mean": sample_nn.mean(), "sample_nn_max": sample_nn.max(), "test_nn_mean": test_nn.mean()})

# %% [markdown]
# ## Checked claims
#
# Every sentence above that states a measured result was checked by an assertion next to the cell that
# measures it (in full mode, the mode of `make figures`; the tests' SMOKE runs only count them):

# %%
print(claims)

# %% [markdown]
# ## Questions

# %% [markdown]
# **Question 1.** The validation NLL is in bits per latent. How many bits does the transformer need for a whole
# slice, and how does that compare with storing the 32 x 16 indices plainly (9 bits each)?
#
# <details><summary>Answer</summary>
#
# A map has $n = 32 \cdot 16 = 512$ positions, so a prior with an NLL of $b$ bits per latent needs about $512\,b$
# bits per slice with an arithmetic coder, against $512 \log_2 512 = 4{,}608$ bits stored plainly. The hidden cell
# multiplies each prior's best validation NLL (section 4) by the positions: the transformer needs a little under
# three quarters of the plain cost, and even the code frequencies alone (section 1's baseline) save a little. A
# prior is a compressor, and its NLL is its rate (notebook 05, section 6).
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
positions = maps["test"].shape[1] * maps["test"].shape[2]
for name, f in fits.items():
    print(f"{name}: {f['bits']:.3f} bits per latent x {positions} = {f['bits'] * positions:,.0f} bits per slice")
print(f"code frequencies only: {unigram / math.log(2) * positions:,.0f} bits; plain indices: {positions} x "
      f"log2 {K} = {positions * math.log2(K):,.0f} bits")

# %% [markdown]
# **Question 2.** Draw samples at temperature 0.7 and 1.3 and judge them with `sample_metrics.judge`. Which
# numbers move, and in which direction? Which target does a low temperature put at risk?
#
# <details><summary>Answer</summary>
#
# Dividing the logits by $T < 1$ moves probability onto the likeliest codes at every position: the hidden cell shows
# it on the transformer's predictions for real test maps, where the entropy of the next-code distribution falls and
# the likeliest code's probability rises as $T$ falls (for any logits: both move monotonically with $T$). So expect
# samples at $T = 0.7$ to be smoother and more typical: their own NLL drops (below that of real maps), diversity
# falls (mean pairwise SSIM rises) and the nearest-training-map distance falls; precision tends to rise and recall
# and coverage to fall, as the samples crowd the densest part of the real manifold. Expect the reverse at $T = 1.3$,
# with noisier, less plausible slices and growing Fréchet and kernel distances. Nucleus sampling is a milder cut of
# the tail, and the top-p rows of section 6's table already show the same moves of the own NLL, the diversity and
# the nearest-map distance, which the cell prints side by side. The target at risk is **memorisation** (no sample
# nearer a training map than the test maps are): the likeliest maps are those the prior has fitted best, the
# training maps; with less variety the recall target comes under pressure too. To check, run
# `generators["transformer"].sample(n_samples, seed=SEED, temperature=0.7)` and pass its images and maps to
# `sample_metrics.judge` as in section 6.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
attn_prior, where = generators["transformer"].prior, generators["transformer"].device
with torch.no_grad():  # logits (16, K, h, w) of the first test maps
    logits = attn_prior(torch.as_tensor(maps["test"][:16], dtype=torch.int64, device=where),
                        torch.as_tensor(slice_bins["test"][:16], dtype=torch.int64, device=where)).float()
for t in (0.7, 1.0, 1.3):
    p = (logits / t).softmax(1)
    entropy = float(-torch.special.xlogy(p, p).sum(1).mean() / math.log(2))
    print(f"temperature {t}: next-code entropy {entropy:.2f} bits, likeliest code's probability "
          f"{float(p.amax(1).mean()):.2f} (mean over the positions of real test maps)")
for name in PRIORS:
    plain_r, nucleus_r = reports[name], reports[f"{name}, top-p {TOP_P}"]
    print(f"{name}: own NLL {plain_r['sample_nll_mean']:.2f} -> {nucleus_r['sample_nll_mean']:.2f} bits with top-p "
          f"{TOP_P} (test maps {plain_r['test_nll_mean']:.2f}); mean pairwise SSIM {plain_r['diversity_samples']:.3f} "
          f"-> {nucleus_r['diversity_samples']:.3f}; nearest training map {plain_r['hamming_samples_min']:.3f} -> "
          f"{nucleus_r['hamming_samples_min']:.3f} (test maps {plain_r['hamming_test_min']:.3f})")

# %% [markdown]
# **Question 3.** The influence map shows the reach of 4 layers with 3-wide kernels. How many rows above a position
# can the committed PixelCNN (8 layers, kernel 5) see? What can the transformer see?
#
# <details><summary>Answer</summary>
#
# Each layer's vertical kernel covers its own row and $\lfloor k/2 \rfloor$ rows above, so $L$ layers reach
# $L \lfloor k/2 \rfloor$ rows up in the vertical stack, and its shift by one row into the horizontal stack adds
# one more: $1 + L \lfloor k/2 \rfloor$ rows (`PixelCNNPrior.rows_seen`). The toy of section 2 reaches
# $1 + 4 \cdot 1 = 5$ rows; the committed PixelCNN $1 + 8 \cdot 2 = 17$ of the map's 32 rows, so the bottom half
# of a map cannot see its top rows. The hidden cell checks this by experiment, as section 2 did: on a small random
# network with the committed prior's layers and kernel, it changes the code directly above a position at every
# distance and prints the farthest row that moves its logits. The transformer attends to every earlier position
# from its first layer: position $i$ sees all $i - 1$ codes before it, up to 511 for the last one.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
committed_config = generators["PixelCNN"].prior.config
torch.manual_seed(SEED)
reach_toy = prior.PixelCNNPrior(prior.PriorConfig(codebook_size=K, channels=8, layers=committed_config.layers,
                                                  kernel=committed_config.kernel, positions=0)).double().eval()
rows, column = reach_toy.rows_seen + 4, 4
reach_maps = torch.randint(0, K, (1, rows, 9))
with torch.no_grad():
    base = reach_toy(reach_maps)[0, :, -1, column]
    moves = []
    for r in range(rows - 1):
        changed = reach_maps.clone()
        changed[0, r, column] = (changed[0, r, column] + 1) % K
        moves.append(bool((reach_toy(changed)[0, :, -1, column] - base).abs().max() > 0))
farthest = max(rows - 1 - r for r, moved in enumerate(moves) if moved)
print(f"{committed_config.layers} layers, kernel {committed_config.kernel}: the farthest row above that moves a "
      f"position's logits is {farthest} rows up (rows_seen: {reach_toy.rows_seen}); the map has "
      f"{maps['test'].shape[1]} rows")

# %% [markdown]
# **Question 4.** Why must the memorisation check compare the samples with the training maps, and not with the test
# maps?
#
# <details><summary>Answer</summary>
#
# A prior can only copy what it was trained on: memorising means reproducing training maps. The test maps were
# never seen, so a sample close to one is not a copy but a good new slice, which is what we want. The test maps
# play a different part: their distance to the nearest training map is the yardstick of how far a genuinely new
# slice of a new patient lies from the training set. A sample nearer to a training map than any test map is, is
# suspicious; one at the test maps' distance is as new as real new data.
#
# </details>

# %% [markdown]
# **Question 5.** The lesion covers a few of the 512 positions. Why does it move the summed NLL so little against
# the spread of the summed NLL over slices? Design a score that compares a slice only with itself (hint: the NLL of
# the same map with and without the region, or completions of the region from its surroundings).
#
# <details><summary>Answer</summary>
#
# The summed NLL $-\sum_i \log_2 p(c_i \mid c_{<i})$ adds up 512 terms. The lesion changes a handful of them (and a
# few positions after it) by a few bits each, while slices differ by many more bits in total, because some show
# more anatomy and texture than others, and their codes are harder to predict everywhere. The hidden cell prints,
# for the prior of sections 7 and 8, the mean extra bits the lesion adds to a slice, next to the standard deviation
# of the summed NLL over the normal slices. A score that compares a slice with itself removes that spread: for a
# region $R$, take the NLL of the map as it is minus the NLL of the same map with $R$ replaced by completions the
# prior draws for it from its surroundings (averaged over a few draws; the positions after $R$ count too, as they
# are predicted from it). For a normal slice that difference is near zero; for a region the prior cannot explain
# it is large. Section 8's paired comparison is the oracle form of this score, with the true normal slice in
# place of the completions, and the hidden cell prints how often it ranks the lesioned version higher.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
normal_sum, lesion_sum = (b.sum((1, 2)) for b in shown_bits)
print(f"{best_prior}: the lesion adds {np.mean(lesion_sum - normal_sum):.1f} bits to a slice's summed NLL on "
      f"average; over the normal slices the summed NLL has a standard deviation of {normal_sum.std():.1f} bits")
print(f"paired: the lesioned version scores higher in {100 * np.mean(lesion_sum > normal_sum):.0f} % of the "
      f"{len(normal_sum)} slices")
