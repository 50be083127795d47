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
# # 03 · The vector quantizer
#
# The quantizer is what makes a VQ-VAE a VQ-VAE: it replaces every encoder output vector by the nearest
# of K learned codebook vectors, so an image becomes a grid of integers. This notebook reads the code of
# `vqvae_lib.quantizer` piece by piece and tests each claim. You will learn
#
# - how the nearest code is found efficiently, and how codebook vectors move among the data (in 2D, where
#   we can draw it, with the Voronoi cells of the codes);
# - why the gradient can pass through a non-differentiable lookup (the straight-through estimator), and a
#   check that it does exactly what the text says;
# - the codebook and commitment losses, the EMA alternative to the codebook loss, and perplexity, the measure
#   of how evenly the codebook is used;
# - **codebook collapse**: why the plain recipe leaves most codes unused, and how data-dependent
#   initialisation, EMA updates and dead-code restarts fix it, on the toy and on MRI slices;
# - which fix does what, taken apart: on a toy whose clusters move, and in eight runs on slices;
# - what the commitment weight beta means next to the scale of the reconstruction loss, and what the codebook
#   size K and the code dimension D change.
#
# **Prerequisites:** notebook 02; k-means helps.
#
# **Expected run time:** about 3 to 4 min on a 2-core CPU (measured by `make figures`; most of it the collapse
# experiment on slices and one training run that checks a committed result). No GPU is needed: the models
# here are small and their runs short.

# %% tags=["parameters"]
SMOKE = False  # fast settings for the tests
DATA_DIR = "../data/phantom"
FIG_DIR = "../figures"
SEED = 0
INTERACTIVE = False
RESULTS_DIR = "../results/sweeps"  # the committed results of `make sweeps`

# %%
from pathlib import Path

DATA = Path(DATA_DIR)
FIGS = Path(FIG_DIR)
RESULTS = Path(RESULTS_DIR)
TOY_STEPS = 40 if SMOKE else 300
SLICE_STEPS = 10 if SMOKE else 300

# %%
import platform

import numpy as np
import torch

import vqvae_lib
from vqvae_lib import data, diagrams, metrics, sweeps, viz, widgets
from vqvae_lib.claims import Claims
from vqvae_lib.model import VQVAE, ModelConfig
from vqvae_lib.quantizer import VectorQuantizer, nearest_code

torch.manual_seed(SEED)
claims = Claims(SMOKE, DATA)  # sentences below that state a measured result are checked in full mode
print(f"python {platform.python_version()}, torch {torch.__version__}, vqvae_lib {vqvae_lib.__version__}")


# %% [markdown]
# ## 1. The nearest code
#
# The encoder gives one $D$-dimensional vector $z$ per latent cell. The quantizer keeps a codebook
# $e_1, \dots, e_K$ and picks for each $z$ the code with the smallest squared distance,
#
# $$k(z) = \arg\min_{k} \|z - e_k\|^2, \qquad z_q = e_{k(z)}.$$
#
# Computing all $N \times K$ distances as differences would build an $N \times K \times D$ tensor; expanding the
# square,
#
# $$\|z - e_k\|^2 = \|z\|^2 - 2\, z^\top e_k + \|e_k\|^2,$$
#
# needs only one $N \times K$ matrix product (the middle term), always computed in full fp32:

# %%
viz.show_source(nearest_code)

# %% [markdown]
# ## 2. Codebook vectors moving among the data, in 2D
#
# To see the codebook learn, we skip the encoder and quantize fixed 2D points: eight clusters around a
# circle away from the origin (encoder outputs need not be centred). Each code owns the region of the plane closer to it than to any other code, its Voronoi cell.
# We train two quantizers of K = 32 codes on the same points:
#
# - **plain**: the paper's recipe, codes initialised uniformly, $e_k \sim \mathcal{U}[-1/K, 1/K]^D$, and moved by
#   gradient descent on the codebook loss $\|\operatorname{sg}[z] - e\|^2$ ($\operatorname{sg}$: stop-gradient, the
#   identity in the forward pass with zero gradient, `.detach()` in code);
# - **full**: codes initialised by k-means on the first batch, updated as exponential moving averages of
#   the points assigned to them, and dead codes restarted on data points.

# %%
rng = np.random.default_rng(SEED)
angles = np.repeat(np.arange(8) * np.pi / 4, 250)
toy = 3.5 + np.stack([2.5 * np.cos(angles), 2.5 * np.sin(angles)], 1) + rng.normal(0, 0.35, (len(angles), 2))
toy = torch.tensor(toy, dtype=torch.float32)
as_grid = toy.T.reshape(1, 2, -1, 1)  # the quantizer takes (B, D, h, w): here one "image" of N x 1 cells


def train_toy(vq: VectorQuantizer, steps: int, snapshots=(0, 5, 40, 300), points=lambda step: as_grid
              ) -> tuple[dict, dict]:
    """Train `vq` on the toy points (points(step): the points of each step); return codebook snapshots and the
    usage/loss history."""
    opt = torch.optim.Adam(vq.parameters(), lr=0.05) if list(vq.parameters()) else None
    shots, history = {}, {"step": [], "active codes": [], "perplexity": [], "codebook": [], "commitment": []}
    for step in range(steps + 1):
        vq.train()
        out = vq(points(step))
        if opt is not None:  # plain VQ: the codebook learns from the codebook loss
            opt.zero_grad()
            out.codebook_loss.backward()
            opt.step()
        used = torch.bincount(out.indices.flatten(), minlength=vq.codebook.shape[0]) > 0
        if step in snapshots or step == steps:
            shots[step] = (vq.codebook.detach().clone().numpy(), used.numpy())
        history["step"].append(step)
        history["active codes"].append(int(used.sum()))
        history["perplexity"].append(float(out.perplexity))
        history["codebook"].append(out.codebook_loss.item())
        history["commitment"].append(out.commitment.item())
    return shots, history


torch.manual_seed(SEED)
plain_shots, plain_hist = train_toy(VectorQuantizer(32, 2, ema=False, init="uniform", restart=False), TOY_STEPS)
torch.manual_seed(SEED)
full_shots, full_hist = train_toy(VectorQuantizer(32, 2), TOY_STEPS)
print(f"after {TOY_STEPS} steps: plain uses {plain_hist['active codes'][-1]} of 32 codes, "
      f"full uses {full_hist['active codes'][-1]} of 32")

# %%
viz.toy_codebooks(toy.numpy(), {"plain VQ": plain_shots, "EMA + k-means init + restarts": full_shots},
                  FIGS / "03_toy_codebooks.png");
codes, used = plain_shots[TOY_STEPS]
dead_radius = float(np.abs(codes[~used]).max()) if (~used).any() else 0.0
print(f"plain: {int((~used).sum())} dead codes, all within {dead_radius:.4f} of the origin (start: within 1/32)")
claims(plain_hist["active codes"][-1] < 16 and full_hist["active codes"][-1] == 32,
       "on the toy most plain codes die while the full variant uses every code",
       f"plain {plain_hist['active codes'][-1]}, full {full_hist['active codes'][-1]} of 32")
claims(dead_radius <= 1 / 32, "the dead plain codes stay where they started", f"within {dead_radius:.4f}")

# %% [markdown]
# The plain codes start in a tiny square at the origin. Only the codes on its edge are nearest to any
# point; they get all the gradient and walk out to the clusters, while the codes inside never win a point,
# never receive a gradient, and stay dead at the origin forever: **codebook collapse**. The full variant
# starts where the data is, and a code that stops winning points is moved onto a data point.
#
# The panel below trains the same toy again (150 steps) with the fixes you switch on. Try each fix alone and
# count the dead codes (black crosses), then change K. Here the encoder outputs (dark points) may move: a stand-in
# for the reconstruction loss holds each to its data point while the commitment loss pulls it towards its code,
# so at beta = 0 they stay on the data, as above, and the larger beta, the closer they sit on their codes.

# %%
toy_panel = widgets.ToyQuantizerPanel(toy.numpy(), seed=SEED)
widgets.show(toy_panel, INTERACTIVE)

# %% [markdown]
# ## 3. The straight-through gradient
#
# The lookup $z_e \mapsto e_{k(z_e)}$ is piecewise constant: its gradient is zero almost everywhere, so the
# encoder could not learn through it. The paper copies the decoder's gradient with respect to the quantized
# vector straight to the encoder output (the **straight-through estimator**):
#
# $$z_q = \operatorname{sg}[e] + z_e - \operatorname{sg}[z_e], \qquad z_q = e \ \text{(forward)}, \qquad
# \frac{\partial \mathcal{L}}{\partial z_e} = \frac{\partial \mathcal{L}}{\partial z_q} \ \text{(backward)}.$$
#
# In code this is one line, `e.detach() + (z_e - z_e.detach())`: its value is exactly the code $e$
# (the bracket is zero), and its gradient with respect to $z_e$ is the identity (the bracket's first term).

# %%
viz.show_source(VectorQuantizer.forward)

# %% [markdown]
# A check that this is exactly what happens: for an upstream gradient $w$ (any tensor), the loss
# $\mathcal{L} = \sum w \odot z_q$ has $\partial \mathcal{L} / \partial z_q = w$, so the gradient that reaches $z$
# must be $w$ itself. The commitment term is a mean over the $N D$ elements,
# $\frac{\beta}{ND} \sum_i \|z_i - \operatorname{sg}[q_i]\|^2$, so adding it must add exactly
# $\frac{2\beta}{ND}(z - q)$.

# %%
vq = VectorQuantizer(8, 4, ema=False, init="uniform", restart=False).eval()
z = torch.randn(2, 4, 3, 3, requires_grad=True)
out = vq(z)
w = torch.randn_like(out.quantized)
(w * out.quantized).sum().backward()
print("straight-through: max |dL/dz - w| =", float((z.grad - w).abs().max()))
assert torch.allclose(z.grad, w)

z.grad = None
out = vq(z)
((w * out.quantized).sum() + vq.beta * out.commitment).backward()
q = vq.lookup(out.indices)
expected = w + 2 * vq.beta * (z - q).detach() / z.numel()
print("with commitment: max |dL/dz - expected| =", float((z.grad - expected).abs().max()))
assert torch.allclose(z.grad, expected, atol=1e-6)

# %% [markdown]
# ## 4. The loss terms
#
# The VQ-VAE loss is reconstruction + codebook + beta x commitment:
#
# $$\mathcal{L} = -\log p(x \mid z_q) + \|\operatorname{sg}[z_e] - e\|^2 + \beta\, \|z_e - \operatorname{sg}[e]\|^2$$
#
# (the paper writes the first term as $\log p(x|z_q)$; as a loss to minimise it is the negative log-likelihood).
# In the code each squared norm is a mean over the $N$ latent vectors and their $D$ components, and for a
# Gaussian decoder of fixed variance $-\log p(x|z_q)$ is the squared error up to a factor and a constant, so
# the first term is the MSE between the slice and its reconstruction (notebook 04 adds an SSIM term):
#
# - the **reconstruction** loss trains the decoder, and through the straight-through copy the encoder;
# - the **codebook** loss $\|\operatorname{sg}[z_e] - e\|^2$ moves codes towards the encoder outputs assigned to
#   them;
# - the **commitment** loss $\beta\|z_e - \operatorname{sg}[e]\|^2$ keeps the encoder outputs near their codes, so
#   that they do not drift away faster than the codebook can follow ($\beta = 0.25$ in the paper).
#
# The stop-gradient $\operatorname{sg}[\cdot]$ passes its value forward and no gradient back, so the codebook
# loss moves only the code $e$ and the commitment loss only the encoder through $z_e$:

# %%
diagrams.vq_stop_gradients(FIGS / "03_stop_gradients.png");

# %% [markdown]
# With EMA updates, each code is instead set to the running mean of the vectors assigned to it (with
# Laplace-smoothed counts, so a rarely used code does not divide by zero), and the codebook loss is dropped.
# For one training batch, let $n_k$ be the number of vectors whose nearest code is $k$ and $s_k$ their sum (under
# `torchrun` both are summed over all processes). With the decay $\gamma$ (`decay`, 0.99) the quantizer keeps
# moving averages of both (`cluster_size` $N_k$ and `embed_sum` $m_k$),
#
# $$N_k \leftarrow \gamma N_k + (1 - \gamma)\, n_k, \qquad m_k \leftarrow \gamma m_k + (1 - \gamma)\, s_k,$$
#
# smooths the cluster sizes with Laplace smoothing of strength $\epsilon$ (`eps`, $10^{-5}$), which keeps their
# total $N = \sum_k N_k$,
#
# $$\tilde N_k = \frac{N_k + \epsilon}{N + K\epsilon}\, N,$$
#
# and sets every code to the mean of its vectors, $e_k = m_k / \tilde N_k$. A code that no vector chooses keeps
# $e_k$ unchanged as both of its averages decay at the same rate, until $N_k$ is so small that $\epsilon$
# matters and pulls it towards the origin.

# %%
viz.show_source(VectorQuantizer._ema_update)

# %%
viz.curves({"codebook loss": {"plain": (plain_hist["step"], plain_hist["codebook"])},
            "commitment loss (before beta)": {"plain": (plain_hist["step"], plain_hist["commitment"]),
                                              "EMA + init + restarts": (full_hist["step"], full_hist["commitment"])}},
           FIGS / "03_loss_terms.png", xlabel="step", logy=True);

# %% [markdown]
# ## 5. Collapse on MRI slices, and its cure
#
# The same happens inside a real VQ-VAE. We train two small models (8x downsampling, K = 128) for the
# same number of steps on phantom slices, one with the plain quantizer and one with EMA, k-means
# initialisation and restarts, and count the codes used on the whole validation split as training goes.
#
# A code counts as dead when its moving average of usage $u_k$ falls below 1 % of a fair share: each step
# $u_k \leftarrow \lambda u_k + (1 - \lambda)\, n_k / \sum_j n_j$ with $\lambda$ = `usage_decay` = 0.9, and code
# $k$ is restarted when $u_k < 0.01 / K$. That takes about 45 steps without use (from a fair share $1/K$,
# $0.9^n < 0.01$ needs $n > \ln 0.01 / \ln 0.9 \approx 43.7$, so $n = 44$); the codebook itself moves with the
# slower decay $\gamma = 0.99$.

# %%
train = data.load_split(DATA, "train", progress=False)
val = torch.tensor(np.asarray(data.load_split(DATA, "validate", progress=False).images))[:, None]
images = torch.tensor(np.asarray(train.images))[:, None]


def usage_run(plain: bool, steps: int, every: int) -> dict:
    """Train a small VQ-VAE; every `every` steps count the codes used on the validation split."""
    torch.manual_seed(SEED)
    variant = {"ema": False, "init": "uniform", "restart": False} if plain else {}
    model = VQVAE(ModelConfig(hidden=32, res_hidden=16, downsample=8, codebook_size=128, embed_dim=16, **variant))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(SEED)
    history = {"step": [], "active codes": [], "perplexity": []}
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            model.eval()
            usage = metrics.CodeUsage(128)
            for i in range(0, len(val), 64):
                usage.update(model.encode(val[i:i + 64]))
            history["step"].append(step)
            history["active codes"].append(usage.active)
            history["perplexity"].append(usage.perplexity)
        model.train()
        batch = images[torch.randint(len(images), (16,), generator=gen)]
        out = model(batch)
        loss = torch.nn.functional.mse_loss(out.recon, batch) + out.vq.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return history


runs = {"plain VQ": usage_run(True, SLICE_STEPS, max(1, SLICE_STEPS // 10)),
        "EMA + k-means init + restarts": usage_run(False, SLICE_STEPS, max(1, SLICE_STEPS // 10))}
for name, h in runs.items():
    print(f"{name}: {h['active codes'][-1]} of 128 codes used on the validation split, "
          f"perplexity {h['perplexity'][-1]:.1f}")
plain_codes, full_codes = (h["active codes"][-1] for h in runs.values())
claims(plain_codes < 128 / 4 and full_codes > 0.9 * 128,
       "on slices the plain codebook collapses and the full one is used", f"{plain_codes} and {full_codes} of 128")


# %%
viz.curves({"codes used (toy, 32 codes)": {"plain VQ": (plain_hist["step"], plain_hist["active codes"]),
                                           "EMA + k-means init + restarts": (full_hist["step"], full_hist["active codes"])},
            "codes used on validation slices (128 codes)": {k: (h["step"], h["active codes"]) for k, h in runs.items()},
            "perplexity on validation slices": {k: (h["step"], h["perplexity"]) for k, h in runs.items()}},
           FIGS / "03_codebook_usage.png", xlabel="training step");

# %% [markdown]
# **Perplexity** is the exponential of the entropy of the code histogram: with $p_k$ the share of the latent
# vectors that chose code $k$,
#
# $$\mathrm{PPL} = \exp\Big(-\sum_{k=1}^{K} p_k \ln p_k\Big), \qquad 1 \le \mathrm{PPL} \le K,$$
#
# the number of equally used codes that would give the same entropy ($K$ when all are used equally, 1 when one
# code takes everything). The quantizer computes it per batch, `metrics.CodeUsage` over a whole split (later
# notebooks use the same definition). A collapsed codebook wastes capacity: with 13 codes in use out of 512
# (one of the published HipMRI runs), the model stores at most $\log_2 13 \approx 3.7$ bits per cell instead of
# $\log_2 512 = 9$.
#
# ## 6. Which fix does what: the three taken apart
#
# So far the three fixes came as one package. Taken apart on the toy of section 2, k-means initialisation
# alone already puts every code on the data at step 0, so EMA and restarts have nothing left to do. But an
# encoder's outputs do not sit still while it learns: they move, and they move most early in training. The
# toy below makes that happen at once: a third of the way through, the ring of clusters jumps right and
# doubles in size (the grey points show the ring before and after). We train every combination of the three
# fixes on the same points for the same steps.

# %%
MOVE_AT = TOY_STEPS // 3
moved = toy * 2.0 + torch.tensor([6.0, 0.0])  # the ring after the jump: twice as large, moved right
moving_grid = moved.T.reshape(1, 2, -1, 1)
FIXES = {"plain": {}, "k-means": {"init": "kmeans"}, "EMA": {"ema": True}, "restarts": {"restart": True},
         "k-means + EMA": {"init": "kmeans", "ema": True}, "k-means + restarts": {"init": "kmeans", "restart": True},
         "EMA + restarts": {"ema": True, "restart": True},
         "all three": {"init": "kmeans", "ema": True, "restart": True}}
moving = {}
for name, fix in FIXES.items():
    torch.manual_seed(SEED)
    vq = VectorQuantizer(32, 2, **{"ema": False, "init": "uniform", "restart": False, **fix})
    shots, hist = train_toy(vq, TOY_STEPS, snapshots=(0, MOVE_AT - 1, MOVE_AT + 5),
                            points=lambda step: moving_grid if step >= MOVE_AT else as_grid)
    vq.eval()
    error = float(vq(moving_grid).commitment)  # mean squared distance of a moved point to its code
    moving[name] = {"shots": shots, "codes": hist["active codes"][-1], "before": hist["active codes"][MOVE_AT - 1],
                    "error": error, "restarts": vq.restarts_total}
    print(f"{name:>18}: {moving[name]['before']:2d} codes used before the jump, {moving[name]['codes']:2d} at the "
          f"end; squared error {error:.3f}; {vq.restarts_total} restarts")

# %%
viz.ablation(list(FIXES), {"codes used at the end (of 32)": [m["codes"] for m in moving.values()],
                           "codes used before the jump": [m["before"] for m in moving.values()],
                           "squared error at the end": [m["error"] for m in moving.values()]},
             FIGS / "03_moving_toy.png", highlight="all three", formats={"squared error at the end": ".2f"})
viz.toy_codebooks(torch.cat([toy, moved]).numpy(), {name: moving[name]["shots"] for name in
                                                    ("k-means", "k-means + EMA", "all three")},
                  FIGS / "03_moving_toy_codebooks.png");
with_restarts = {name: m["codes"] for name, m in moving.items() if "restarts" in name or name == "all three"}
without = {name: m["codes"] for name, m in moving.items() if name not in with_restarts}
claims(moving["k-means"]["before"] == 32 and moving["k-means"]["codes"] < 32,
       "k-means alone uses every code until the data moves, then loses codes",
       f"{moving['k-means']['before']} before, {moving['k-means']['codes']} after")
claims(min(with_restarts.values()) == 32 and max(without.values()) < 32,
       "on the moving toy exactly the variants with restarts keep every code",
       ", ".join(f"{name} {m['codes']}" for name, m in moving.items()))
claims(moving["k-means + EMA"]["codes"] <= moving["k-means"]["codes"],
       "EMA does not keep codes alive when the data moves",
       f"k-means + EMA {moving['k-means + EMA']['codes']}, k-means {moving['k-means']['codes']}")
restart_error = max(m["error"] for name, m in moving.items() if name in with_restarts)
claims(restart_error < 0.2 * moving["k-means"]["error"],
       "with restarts the squared error ends at least five times smaller than with k-means alone",
       f"at most {restart_error:.3f} against {moving['k-means']['error']:.3f}")

# %% [markdown]
# K-means alone uses all 32 codes until the jump and then keeps only the few nearest the moved ring: like the
# codebook loss it is paired with, it only ever moves codes that win points, and after the jump most win none.
# EMA does no better: it too only averages the points a code wins, and it follows them more slowly than the
# codebook loss does under Adam here. Restarts are what repairs it: every variant with restarts ends with all 32
# codes in use and a squared error at least five times smaller than k-means alone. On the toy, then, k-means
# is a good start and restarts are the repair; what EMA adds shows on slices.
#
# ### On slices
#
# The same eight variants, now inside the default VQ-VAE on phantom slices: notebook 04's demo budget (6
# epochs over the first 480 training slices, 90 optimiser steps), everything else as the default recipe. These
# are committed runs of `make sweeps` (`results/sweeps/`, each file with its command and code revision); the
# cell after them trains one of them again, in full mode, to show the committed numbers are what the code gives.

# %%
collapse = sweeps.load_results(RESULTS, "collapse")
if len(collapse) < len(sweeps.GROUPS["collapse"]):
    raise FileNotFoundError(f"{RESULTS} lacks results of the collapse sweep: run `make sweeps`")
ablation = {name: collapse[run]["test"] for name, run in zip(FIXES, (r.name for r in sweeps.GROUPS["collapse"]))}
for name, t in ablation.items():
    print(f"{name:>18}: {t['active_codes']:3d} of 512 codes on the test split (perplexity {t['perplexity']:5.1f}), "
          f"{t['restarts']:4d} restarts, test SSIM {t['ssim_mean']:.3f}, PSNR {t['psnr_mean']:.2f} dB")
viz.ablation(list(ablation), {"codes used (of 512)": [t["active_codes"] for t in ablation.values()],
                              "perplexity": [t["perplexity"] for t in ablation.values()],
                              "restarts": [t["restarts"] for t in ablation.values()],
                              "test SSIM": [t["ssim_mean"] for t in ablation.values()]},
             FIGS / "03_collapse_ablation.png", highlight="all three", formats={"perplexity": ".0f"}, ncols=4);

# %%
same, evidence = sweeps.reproduce("plain", DATA, collapse["plain"], smoke=SMOKE)
print(evidence)
claims(same, "the committed plain run is what the code gives", evidence)

# %% [markdown]
# On slices the moving toy repeats itself. Without restarts no variant keeps more than a handful of its 512
# codes, k-means initialisation included: it puts the codes on the untrained encoder's outputs at step 0, and
# those move away as the encoder learns. Every variant with restarts keeps hundreds. But codes in use are not
# a good model: restarts alone, with the codebook learned by the codebook loss, keep hundreds of codes and
# reconstruct worst of all eight. With EMA, which sets each code to the running mean of the vectors it wins,
# the same restarts score far higher. All three together give the best test SSIM and PSNR of the eight.

# %%
kept = {name: t["active_codes"] for name, t in ablation.items()}
ssim_of = {name: t["ssim_mean"] for name, t in ablation.items()}
revived = [name for name in ablation if "restarts" in name or name == "all three"]
claims(max(kept[n] for n in ablation if n not in revived) <= 10 and min(kept[n] for n in revived) >= 100,
       "without restarts no variant keeps more than a handful of codes, with restarts every one keeps hundreds",
       ", ".join(f"{n} {kept[n]}" for n in ablation))
claims(min(ssim_of, key=ssim_of.get) == "restarts" and ssim_of["EMA + restarts"] > ssim_of["restarts"] + 0.1,
       "restarts alone reconstruct worst of all eight, and far better with EMA",
       f"restarts {ssim_of['restarts']:.3f}, EMA + restarts {ssim_of['EMA + restarts']:.3f}")
claims(max(ssim_of, key=ssim_of.get) == "all three"
       and max(ablation, key=lambda n: ablation[n]["psnr_mean"]) == "all three",
       "all three together give the best test SSIM and PSNR", f"SSIM {ssim_of['all three']:.3f}, PSNR "
       f"{ablation['all three']['psnr_mean']:.2f} dB")

# %% [markdown]
# ## 7. The commitment weight, and the scale it is weighed against
#
# The loss adds beta x commitment to the reconstruction error, so beta only means something next to the size
# of that error. Our MSE is measured on intensities in [0, 1]; DeepMind's sonnet example divides it by the
# variance $\sigma^2$ of the training data first, which multiplies the reconstruction term by $1/\sigma^2$ and so
# makes the same beta weigh the commitment loss that many times less. Multiplying the whole loss by $\sigma^2$
# (which does not move its minimum) shows it:
#
# $$\frac{\mathrm{MSE}}{\sigma^2} + \beta\,\mathrm{commitment} \;\propto\; \mathrm{MSE} + \beta\sigma^2\,\mathrm{commitment}.$$
#
# Both scales, three betas each:

# %%
beta_runs = sweeps.load_results(RESULTS, "beta")
variance = float(np.asarray(train.images[:sweeps.LIMIT]).var())
print(f"variance of the training slices: {variance:.4f}, so dividing by it multiplies the MSE by {1 / variance:.1f}: "
      f"beta = 1 on that scale weighs the commitment loss like beta = {variance:.3f} on ours")
betas = (0.05, 0.25, 1.0)
by_scale = {scale: [beta_runs[f"beta{b:g}{suffix}"]["test"] for b in betas]
            for scale, suffix in (("MSE", ""), ("MSE / variance", "_normalized"))}
for scale, results in by_scale.items():
    print(scale + ": " + ", ".join(f"beta {b:g}: SSIM {t['ssim_mean']:.3f}, commitment {t['train_commitment']:.2g}"
                                    for b, t in zip(betas, results)))
viz.curves({"test SSIM": {s: (betas, [t["ssim_mean"] for t in r]) for s, r in by_scale.items()},
            "commitment loss (last epoch)": {s: (betas, [t["train_commitment"] for t in r])
                                             for s, r in by_scale.items()},
            "codes used": {s: (betas, [t["active_codes"] for t in r]) for s, r in by_scale.items()}},
           FIGS / "03_beta.png", xlabel="beta", logx=True, logy=["commitment loss (last epoch)"]);

# %% [markdown]
# Divided by the variance, the MSE counts $1/\sigma^2$ times more, so $\beta = 1$ there weighs the
# commitment loss against it as $\beta = \sigma^2$ (printed above) would on our scale. In our loss that is not
# the only balance that moves: the SSIM term is not divided, so it counts that many times less too. At every
# beta the normalised run scores the lower SSIM, and on both scales the largest beta, 1, scores best at this
# budget (on the normalised scale by a hair): the paper's 0.25 is not a constant of nature but a choice that
# belongs to a loss scale. Short runs like these are noisy; what the curves show with more certainty is the
# direction, not the second decimal.

# %%
ssim_at = {scale: [t["ssim_mean"] for t in r] for scale, r in by_scale.items()}
claims(all(n < m for n, m in zip(ssim_at["MSE / variance"], ssim_at["MSE"])),
       "at every beta the normalised run scores the lower SSIM",
       ", ".join(f"beta {b:g}: {m:.3f} against {n:.3f}" for b, m, n in zip(betas, ssim_at["MSE"],
                                                                          ssim_at["MSE / variance"])))
claims(all(max(range(len(betas)), key=values.__getitem__) == len(betas) - 1 for values in ssim_at.values()),
       "on both scales the largest beta scores best",
       "; ".join(f"{scale}: " + ", ".join(f"{v:.3f}" for v in values) for scale, values in ssim_at.items()))

# %% [markdown]
# ## 8. How many codes, and how long
#
# The codebook size K and the code dimension D, again at the same budget (the default is K = 512, D = 64):

# %%
size_runs = sweeps.load_results(RESULTS, "size")
ks = [int(n[1:]) for n in size_runs if n.startswith("K")]
ds = [int(n[1:]) for n in size_runs if n.startswith("D")]
by_k = [size_runs[f"K{k}"]["test"] for k in ks]
by_d = [size_runs[f"D{d}"]["test"] for d in ds]
for label, values, results in (("K", ks, by_k), ("D", ds, by_d)):
    print(", ".join(f"{label} = {v}: {t['active_codes']} codes used, perplexity {t['perplexity']:.0f}, SSIM "
                    f"{t['ssim_mean']:.3f}" for v, t in zip(values, results)))
viz.curves({"codes used": {"used": (ks, [t["active_codes"] for t in by_k]), "available (K)": (ks, ks)},
            "perplexity": {"perplexity": (ks, [t["perplexity"] for t in by_k])},
            "test SSIM": {"SSIM": (ks, [t["ssim_mean"] for t in by_k])}},
           FIGS / "03_codebook_size.png", xlabel="codebook size K", logx=True, logy=["codes used"]);
viz.curves({"codes used (of 512)": {"used": (ds, [t["active_codes"] for t in by_d])},
            "test SSIM": {"SSIM": (ds, [t["ssim_mean"] for t in by_d])}},
           FIGS / "03_code_dimension.png", xlabel="code dimension D", logx=True);

# %% [markdown]
# A larger codebook is used more, in absolute numbers: the codes in use and the perplexity grow with K at every
# step, and so do the bits a map costs (notebook 05, section 6). The smallest codebook, K = 64, scores the
# lowest SSIM; above it SSIM goes up and down within a few hundredths with no trend, while the bits keep
# growing: at this budget more codes buy bits rather than quality. The code dimension goes the other way: the
# shorter the codes, the more of them are used, and D = 8 scores the best SSIM of the three. A short lookup
# vector is also the idea behind the cosine codes of notebook 08.

# %%
used_k = [t["active_codes"] for t in by_k]
claims(all(a < b for a, b in zip(used_k, used_k[1:]))
       and all(a < b for a, b in zip([t["perplexity"] for t in by_k], [t["perplexity"] for t in by_k][1:]))
       and all(a < b for a, b in zip([t["bits_frequencies"] for t in by_k], [t["bits_frequencies"] for t in by_k][1:])),
       "codes used, perplexity and bits per slice grow with K", f"codes {used_k}")
above = [t["ssim_mean"] for t in by_k[1:]]
claims(min(range(len(ks)), key=lambda i: by_k[i]["ssim_mean"]) == 0 and max(above) - min(above) < 0.06
       and sorted(above) != above, "K = 64 scores the lowest SSIM; above it SSIM varies within a few hundredths, "
       "with no trend", ", ".join(f"K {k}: {t['ssim_mean']:.3f}" for k, t in zip(ks, by_k)))
used_d = [t["active_codes"] for t in by_d]
claims(all(a > b for a, b in zip(used_d, used_d[1:])) and max(range(len(ds)), key=lambda i: by_d[i]["ssim_mean"]) == 0,
       "the shorter the codes, the more are used, and D = 8 scores the best SSIM",
       ", ".join(f"D {d}: {t['active_codes']} codes, SSIM {t['ssim_mean']:.3f}" for d, t in zip(ds, by_d)))

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
# **Question 1.** In the toy, why do the dead plain codes never move, even after thousands of steps?
#
# <details><summary>Answer</summary>
#
# A plain code learns only from the codebook loss, and its gradient with respect to code $k$ is a sum over the
# points whose nearest code is $k$:
#
# $$\frac{\partial}{\partial e_k}\, \frac{1}{ND} \sum_{i=1}^{N} \|\operatorname{sg}[z_i] - e_{k(z_i)}\|^2
# = \frac{2}{ND} \sum_{i:\, k(z_i) = k} (e_k - z_i).$$
#
# The codes inside the starting square are never nearest to any point: every point lies far outside the
# square, and the codes on its edge (later, the codes out at the clusters) are always nearer to it. So the sum is
# empty and the gradient exactly zero. Adam's step is built from moving averages of past gradients, and for a
# code that never had one they are zero too, so the step is zero. Nothing in the toy ever changes that: the points
# stay where they are and the live codes only move closer to them, so a dead code stays dead for any number of
# steps. The hidden cell loads the plain codebook at the end of training into a fresh quantizer, runs one step
# and prints the largest gradient on a code that wins no point (exactly 0) and the smallest on a code that does.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
probe = VectorQuantizer(32, 2, ema=False, init="uniform", restart=False)
with torch.no_grad():
    probe.codebook.copy_(torch.tensor(plain_shots[TOY_STEPS][0]))
probe_out = probe(as_grid)
probe_out.codebook_loss.backward()
wins = torch.bincount(probe_out.indices.flatten(), minlength=32) > 0
grad = probe.codebook.grad.norm(dim=1)
print(f"{int((~wins).sum())} codes win no point: largest gradient on them "
      f"{float(grad[~wins].max()) if (~wins).any() else float('nan'):.1e}; "
      f"smallest gradient on a code that wins points {float(grad[wins].min()):.1e}")

# %% [markdown]
# **Question 2.** With EMA updates the codebook has no gradient. Which term of the loss still trains the encoder
# to stay close to the codes?
#
# <details><summary>Answer</summary>
#
# The commitment loss $\beta\|z_e - \operatorname{sg}[e]\|^2$. With EMA the codebook is a buffer, not a parameter,
# and the codebook loss is exactly 0; the EMA update moves the codes towards the encoder outputs, and the
# commitment loss moves the encoder outputs towards the codes, with the gradient
# $\frac{2\beta}{ND}(z_e - e)$ (section 3). Without it nothing would stop the encoder's outputs from growing
# or drifting away from the codebook: the reconstruction loss sees only the codes, and the straight-through
# gradient does not care how far $z_e$ is from them. The hidden cell makes the default quantizer (EMA, k-means
# initialisation, restarts), trains it one step on the toy and checks all three: it has no parameters, its
# codebook loss is 0, and the commitment loss's gradient on $z$ is $2(z - q)/(ND)$.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
ema_vq = VectorQuantizer(32, 2)
ema_vq(as_grid)  # one training step: k-means initialisation and one EMA update
ema_vq.eval()  # no more updates, so the codes below are the ones the forward pass used
z_toy = as_grid.clone().requires_grad_(True)
ema_out = ema_vq(z_toy)
ema_out.commitment.backward()
expected_grad = 2 * (z_toy - ema_vq.lookup(ema_out.indices)).detach() / z_toy.numel()
print(f"EMA quantizer: {len(list(ema_vq.parameters()))} parameters, codebook loss {float(ema_out.codebook_loss)}, "
      f"commitment gradient equals 2 (z - q) / (N D): {torch.allclose(z_toy.grad, expected_grad)}")

# %% [markdown]
# **Question 3.** What would go wrong if a restarted code were placed at a random point of the space instead of
# on an encoder output?
#
# <details><summary>Answer</summary>
#
# A code learns, by the codebook loss or by EMA, only from the vectors it wins, and it wins a vector only if it
# is nearer to it than every other code. The encoder's outputs fill a small part of the space (in $D = 64$
# dimensions a random point is far from all of them), and the other codes already sit among them, so a code at
# a random point would most likely win nothing: it would stay dead, its usage would stay below the threshold, and
# it would be restarted again about 45 steps later, over and over, without ever being used. Restarts would cost
# steps and repair nothing. A code placed on an encoder output wins at least that vector (distance 0), starts
# where the data is, and with EMA its statistics restart as if it had been chosen once by exactly that vector.
#
# The hidden cell draws 32 codes both ways on the toy, at random points of the plane (a standard normal, knowing
# nothing of where the data is) and on randomly chosen toy points, and counts how many of them win at least one
# point when they are the whole codebook.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
gen = torch.Generator().manual_seed(SEED)
candidates = {"random points of the plane": torch.randn(32, 2, generator=gen),
              "toy points": toy[torch.randperm(len(toy), generator=gen)[:32]]}
for name, book in candidates.items():
    print(f"32 codes at {name}: {nearest_code(toy, book).unique().numel()} win at least one point")

# %% [markdown]
# **Question 4.** Perplexity can be low although all codes are active. How?
#
# <details><summary>Answer</summary>
#
# A code is active if it is chosen at least once; perplexity weights every code by how often it is chosen.
# With $K_a$ active codes, $\mathrm{PPL} = \exp(-\sum_k p_k \ln p_k) \le K_a$, with equality only when the
# active codes are used equally. If one code takes almost every vector and each of the others a few, all $K$
# are active but the entropy is close to 0 and the perplexity close to 1. Restarts can do this:
# a restarted code wins a few vectors and counts as active while the model still leans on a few codes. So
# report both, as the training loop does. The hidden cell builds such a histogram for $K = 512$: one code
# chosen by all vectors of 100,000 but 511, and every other code once.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
lopsided = metrics.CodeUsage(512)
lopsided.update(torch.cat([torch.zeros(100_000 - 511, dtype=torch.long), torch.arange(1, 512)]))
print(f"{lopsided.active} of 512 codes active, perplexity {lopsided.perplexity:.2f}")
