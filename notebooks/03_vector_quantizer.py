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
# - the codebook and commitment losses, and the EMA alternative to the codebook loss;
# - **codebook collapse**: why the plain recipe leaves most codes unused, and how data-dependent
#   initialisation, EMA updates and dead-code restarts fix it, on the toy and on MRI slices.
#
# **Prerequisites:** notebook 02; k-means helps.
#
# **Expected run time:** about 75 s on a 2-core CPU (measured by `make figures`; most of it the collapse experiment on
# slices); no GPU needed.

# %% tags=["parameters"]
SMOKE = False  # fast settings for the tests
DATA_DIR = "../data/phantom"
FIG_DIR = "../figures"
SEED = 0
INTERACTIVE = False

# %%
from pathlib import Path

DATA = Path(DATA_DIR)
FIGS = Path(FIG_DIR)
TOY_STEPS = 40 if SMOKE else 300
SLICE_STEPS = 10 if SMOKE else 300

# %%
import inspect
import platform

import numpy as np
import torch
from IPython.display import Code, display

import vqvae_lib
from vqvae_lib import data, metrics, viz
from vqvae_lib.claims import Claims
from vqvae_lib.model import VQVAE, ModelConfig
from vqvae_lib.quantizer import VectorQuantizer, nearest_code

torch.manual_seed(SEED)
claims = Claims(SMOKE, DATA)  # sentences below that state a measured result are checked in full mode
print(f"python {platform.python_version()}, torch {torch.__version__}, vqvae_lib {vqvae_lib.__version__}")


def show_source(obj) -> None:
    """Display the source of a function or class of the library, highlighted."""
    display(Code(inspect.getsource(obj), language="python"))


# %% [markdown]
# ## 1. The nearest code
#
# The encoder gives one D-dimensional vector z per latent cell. The quantizer keeps a codebook
# e_1..e_K and picks for each z the code with the smallest squared distance. Computing all N x K
# distances as differences would build an N x K x D tensor; expanding the square,
# ||z - e||² = ||z||² - 2 z·e + ||e||², needs only one N x K matrix product:

# %%
show_source(nearest_code)

# %% [markdown]
# ## 2. Codebook vectors moving among the data, in 2D
#
# To see the codebook learn, we skip the encoder and quantize fixed 2D points: eight clusters around a
# circle away from the origin (encoder outputs need not be centred). Each code owns the region of the plane closer to it than to any other code, its Voronoi cell.
# We train two quantizers of K = 32 codes on the same points:
#
# - **plain**: the paper's recipe, codes initialised uniformly in [-1/K, 1/K] and moved by gradient
#   descent on the codebook loss ||sg[z] - e||²;
# - **full**: codes initialised by k-means on the first batch, updated as exponential moving averages of
#   the points assigned to them, and dead codes restarted on data points.

# %%
rng = np.random.default_rng(SEED)
angles = np.repeat(np.arange(8) * np.pi / 4, 250)
toy = 3.5 + np.stack([2.5 * np.cos(angles), 2.5 * np.sin(angles)], 1) + rng.normal(0, 0.35, (len(angles), 2))
toy = torch.tensor(toy, dtype=torch.float32)
as_grid = toy.T.reshape(1, 2, -1, 1)  # the quantizer takes (B, D, h, w): here one "image" of N x 1 cells


def train_toy(vq: VectorQuantizer, steps: int, snapshots=(0, 5, 40, 300)) -> tuple[dict, dict]:
    """Train `vq` on the toy points; return codebook snapshots and the usage/loss history."""
    opt = torch.optim.Adam(vq.parameters(), lr=0.05) if list(vq.parameters()) else None
    shots, history = {}, {"step": [], "active codes": [], "perplexity": [], "codebook": [], "commitment": []}
    for step in range(steps + 1):
        vq.train()
        out = vq(as_grid)
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
# ## 3. The straight-through gradient
#
# The lookup z -> e_k(z) has zero gradient almost everywhere, so the encoder could not learn through it.
# The paper copies the decoder's gradient with respect to the quantized vector straight to the encoder
# output. In code this is one line, `e.detach() + (z_e - z_e.detach())`: its value is exactly the code e
# (the bracket is zero), and its gradient with respect to z_e is the identity (the bracket's first term).

# %%
show_source(VectorQuantizer.forward)

# %% [markdown]
# A check that this is exactly what happens: for an upstream gradient w (any tensor), the gradient that
# reaches z must be w itself; adding the commitment term beta ||z - sg[q]||² (a mean over the N D
# elements) must add exactly 2 beta (z - q) / (N D).

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
# - the **reconstruction** loss trains the decoder, and through the straight-through copy the encoder;
# - the **codebook** loss ||sg[z_e] - e||² moves codes towards the encoder outputs assigned to them;
# - the **commitment** loss beta ||z_e - sg[e]||² keeps the encoder outputs near their codes, so that they
#   do not drift away faster than the codebook can follow (beta = 0.25 in the paper).
#
# With EMA updates, each code is instead set to the running mean of the vectors assigned to it (with
# Laplace-smoothed counts, so a rarely used code does not divide by zero), and the codebook loss is dropped.

# %%
show_source(VectorQuantizer._ema_update)

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
# A code counts as dead when its moving average of usage (decay 0.9) falls below 1 % of a fair share,
# which takes about 45 steps without use (from a fair share, 0.9^n < 0.01 needs n = 44); the codebook itself
# moves with the slower decay 0.99.

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
# Perplexity is exp(entropy) of the code histogram: the number of equally used codes that would give the
# same entropy. A collapsed codebook wastes capacity: with 13 codes in use out of 512 (one of the published
# HipMRI runs), the model stores at most log2(13) = 3.7 bits per cell instead of 9.
#
# ## Checked claims
#
# Every sentence above that states a measured result was checked by an assertion next to the cell that
# measures it (in full mode, the mode of `make figures`; the tests' SMOKE runs only count them):

# %%
print(claims)

# %% [markdown]
# ## Questions
#
# 1. In the toy, why do the dead plain codes never move, even after thousands of steps?
# 2. With EMA updates the codebook has no gradient. Which term of the loss still trains the encoder to
#    stay close to the codes?
# 3. What would go wrong if a restarted code were placed at a random point of the space instead of on an
#    encoder output?
# 4. Perplexity can be low although all codes are active. How?
