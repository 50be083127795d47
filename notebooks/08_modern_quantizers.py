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
# # 08 · Quantizers beyond the paper
#
# Since 2017 the quantizer has been rethought more than any other part of the VQ-VAE. This notebook builds
# three later ideas from `vqvae_lib`, one piece at a time as notebook 03 did for the paper's, and then compares
# them with our default quantizer on the same model, data and number of steps. You will learn
#
# - **the rotation trick** (Fifty et al. 2024): a gradient through the lookup that keeps the angle between the
#   encoder output and its code, instead of copying the gradient straight through;
# - **cosine codes in a low dimension** (Yu et al. 2022, Improved VQGAN): look codes up by angle, after a
#   projection to a few dimensions;
# - **finite scalar quantization** (FSQ, Mentzer et al. 2023): no codebook at all, just rounding a few bounded
#   numbers, so nothing can collapse and no auxiliary loss is needed;
# - how they compare at our budget: codes used, perplexity, SSIM, PSNR, bits per slice and training speed.
#
# Each is one option of the training command, e.g.
#
# ```bash
# python -m vqvae_lib train --data-dir data/phantom --out runs/fsq --quantizer fsq --fsq-levels 8,8,8
# python -m vqvae_lib train --data-dir data/phantom --out runs/cosine --quantizer cosine --lookup-dim 8
# python -m vqvae_lib train --data-dir data/phantom --out runs/rotation --quantizer rotation
# ```
#
# **Prerequisites:** notebook 03.
#
# **Expected run time:** about 2 min on a 2-core CPU (measured by `make figures`; most of it one training run
# that checks a committed result); no GPU needed.

# %% tags=["parameters"]
SMOKE = False  # fast settings for the tests
DATA_DIR = "../data/phantom"
FIG_DIR = "../figures"
SEED = 0
INTERACTIVE = False  # no widgets in this notebook; kept so every notebook takes the same parameters
RESULTS_DIR = "../results/sweeps"  # the committed results of `make sweeps`

# %%
from pathlib import Path

DATA = Path(DATA_DIR)
FIGS = Path(FIG_DIR)
RESULTS = Path(RESULTS_DIR)

# %%
import platform

import numpy as np
import torch

import vqvae_lib
from vqvae_lib import bench, data, readme, sweeps, train, viz
from vqvae_lib.claims import Claims
from vqvae_lib.quantizer import VectorQuantizer, nearest_code, rotation_trick
from vqvae_lib.quantizers import CosineQuantizer, FiniteScalarQuantizer

torch.manual_seed(SEED)
claims = Claims(SMOKE, DATA)  # sentences below that state a measured result are checked in full mode
print(f"python {platform.python_version()}, torch {torch.__version__}, vqvae_lib {vqvae_lib.__version__}")


# %% [markdown]
# ## 1. The rotation trick
#
# The straight-through estimator of notebook 03, $q = e + z - \operatorname{sg}[z]$, hands every encoder output
# $z$ in a code's cell the same gradient, the one the decoder sends to the code $e$:
# $\partial \mathcal{L} / \partial z = \partial \mathcal{L} / \partial q$, wherever in the cell $z$ sits. The
# rotation trick instead treats the lookup as a rotation and rescaling that turns $z$ onto $e$, and passes the
# gradient back through that same (frozen) rotation:
#
# $$
# q = \operatorname{sg}\left[\frac{\|e\|}{\|z\|}\right] \operatorname{sg}[R]\, z, \qquad
# R z = z - 2 r (r^\top z) + 2 \hat e (u^\top z), \qquad
# u = \frac{z}{\|z\|}, \quad \hat e = \frac{e}{\|e\|}, \quad r = \frac{u + \hat e}{\|u + \hat e\|},
# $$
#
# with $R$ the rotation in the plane of $z$ and $e$ that turns $u$ onto $\hat e$ (written with Householder
# reflections, so it is never formed as a matrix). The forward value is still exactly $e$ (up to rounding), and
# the encoder gets $\partial \mathcal{L} / \partial z = \frac{\|e\|}{\|z\|} R^\top \partial \mathcal{L} / \partial q$:
# the decoder's gradient rotated by the angle between $z$ and $e$ and scaled. In the quantizer, the value passed
# on is $e + q - \operatorname{sg}[q]$, so the codes get no gradient from it (EMA or the codebook loss moves them):

# %%
viz.show_source(rotation_trick)

# %% [markdown]
# Below, twelve encoder outputs share one code, and the decoder asks to move the code to the left. With the
# straight-through copy all twelve move left by the same step; with the rotation trick each step is rotated
# by the angle between $z$ and $e$ and scaled by $\|e\| / \|z\|$ (lengths measured from the origin, the cross), so
# outputs on either side of the code move apart or together.

# %%
code = torch.tensor([2.0, 1.0])
angles = torch.linspace(0, 2 * np.pi, 13)[:-1]
z = (code + 0.6 * torch.stack([angles.cos(), angles.sin()], 1)).requires_grad_(True)
upstream = torch.tensor([1.0, 0.0]).expand(len(z), 2)  # dL/de: the loss falls when e moves left
e = code.expand(len(z), 2)
steps = {}
for name, estimator in (("straight-through", lambda z: e + (z - z.detach())),
                        ("rotation trick", lambda z: e + (rotation_trick(z, e) - rotation_trick(z, e).detach()))):
    z.grad = None
    value = estimator(z)
    (value * upstream).sum().backward()
    steps[name] = -0.5 * z.grad.numpy()  # a gradient step of size 0.5
    print(f"{name}: forward value equals e: {torch.equal(value.detach(), e)}; step lengths "
          f"{np.linalg.norm(steps[name], axis=1).min():.3f}..{np.linalg.norm(steps[name], axis=1).max():.3f}")
viz.gradient_fields(z.detach().numpy(), code.numpy(), steps, FIGS / "08_rotation_trick.png")
scale = (code.norm() / z.detach().norm(dim=1)).numpy()
claims(np.allclose(np.linalg.norm(steps["rotation trick"], axis=1), 0.5 * scale, atol=1e-5)
       and np.allclose(np.linalg.norm(steps["straight-through"], axis=1), 0.5),
       "the rotation keeps the gradient's length up to the factor ||e|| / ||z||; the copy keeps it exactly",
       f"lengths {np.linalg.norm(steps['rotation trick'], axis=1).min():.3f}.."
       f"{np.linalg.norm(steps['rotation trick'], axis=1).max():.3f}")

# %% [markdown]
# ## 2. Cosine codes in a low dimension
#
# Improved VQGAN changes the lookup twice. A learned linear map first takes each 64-dimensional encoder output
# down to a few dimensions (8 here, `lookup_dim`), where codes are cheap to compare and to keep in use. There,
# both the vector and the codes are l2-normalised: the nearest code is the one at the smallest angle, and no code
# can win (or lose) a vector by its length alone. The chosen unit code is projected back to 64 dimensions for
# the decoder. With the learned projections $W_{\text{in}}$ (64 to 8) and $W_{\text{out}}$ (8 to 64):
#
# $$
# k^* = \arg\max_k \frac{(W_{\text{in}} z)^\top e_k}{\|W_{\text{in}} z\| \, \|e_k\|}, \qquad
# \text{decoder input } W_{\text{out}} \frac{e_{k^*}}{\|e_{k^*}\|}
# $$
#
# (each projection also adds a bias). For unit vectors $\|a - b\|^2 = 2 - 2 a^\top b$, so the Euclidean lookup
# of notebook 03 on the normalised vectors is exactly this largest cosine:

# %%
viz.show_source(CosineQuantizer.forward)

# %% [markdown]
# The consequence in one check: scaling an encoder output does not change its code under the cosine lookup,
# while under the Euclidean lookup it usually does.

# %%
torch.manual_seed(SEED)
codebook, vectors = torch.randn(64, 8), torch.randn(1000, 8)
unit = VectorQuantizer(64, 8, normalize=True).eval()
unit.codebook.copy_(codebook)
same_cosine = float((unit.nearest(vectors) == unit.nearest(3 * vectors)).float().mean())
same_euclid = float((nearest_code(vectors, codebook) == nearest_code(3 * vectors, codebook)).float().mean())
print(f"codes unchanged when the vectors are tripled: cosine {100 * same_cosine:.0f} %, Euclidean "
      f"{100 * same_euclid:.0f} %")
claims(same_cosine == 1.0 and same_euclid < 0.5, "tripling a vector never changes its cosine code, and usually "
       "changes its Euclidean one", f"{100 * same_cosine:.0f} % and {100 * same_euclid:.0f} % unchanged")

# %% [markdown]
# ## 3. Finite scalar quantization
#
# FSQ drops the codebook. A projection takes each encoder output to $d$ = `len(levels)` numbers; a tanh squashes
# number $i$ into an interval that holds $L_i$ = `levels[i]` integers, and rounding (with the straight-through copy)
# picks one. With $h_i = (L_i - 1)(1 + \varepsilon)/2$, an offset $o_i = \frac{1}{2}$ for even $L_i$ (0 for odd) and
# the shift $s_i = \operatorname{atanh}(o_i / h_i)$ that keeps $z_i = 0$ at 0,
#
# $$
# b_i(z) = h_i \tanh(z_i + s_i) - o_i, \qquad
# \hat z_i = \frac{b_i + \operatorname{sg}[\operatorname{round}(b_i) - b_i]}{\lfloor L_i / 2 \rfloor},
# $$
#
# whose value is $\operatorname{round}(b_i) / \lfloor L_i / 2 \rfloor$, in $[-1, 1]$, and whose gradient is that of
# $b_i$ (the straight-through copy). $\varepsilon = 10^{-3}$ widens the interval just enough that rounding reaches
# exactly $L_i$ integers (a tanh never reaches its ends). The codes are simply all the points of that grid, $\prod_i
# L_i$ of them, numbered as mixed-radix numbers of their digits $a_i = \operatorname{round}(b_i) + \lfloor L_i / 2
# \rfloor \in \{0, \dots, L_i - 1\}$: the index is $\sum_i a_i \prod_{j < i} L_j$. Nothing is learned in the grid,
# so no code can die, and there is no codebook or commitment loss to weigh:

# %%
viz.show_source(FiniteScalarQuantizer.bound)
viz.show_source(FiniteScalarQuantizer.quantize)

# %% [markdown]
# Two channels of 8 and 5 levels: the bound of each channel and the rounding (left), and the 40 codes it makes
# (right). An even number of levels cannot sit symmetrically about 0 and still include 0, so its interval is
# shifted by half a level: 8 levels round to the integers -4..3, scaled to -1..0.75.

# %%
fsq = FiniteScalarQuantizer([8, 5], dim=2)
inputs = torch.linspace(-4, 4, 400)
bounded = fsq.bound(inputs[:, None].expand(-1, 2)).T.numpy()
viz.fsq_grid([8, 5], bounded, inputs.numpy(), FIGS / "08_fsq_grid.png")
every = torch.arange(fsq.num_codes)
round_trip = torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(every)), every)
distinct = len({tuple(np.round(v, 6)) for v in fsq.indices_to_codes(every).tolist()})
print(f"{fsq.num_codes} codes, {distinct} distinct grid points; index -> code -> index exact: {round_trip}")
claims(round_trip and distinct == 40 == fsq.num_codes, "8 x 5 levels give 40 distinct codes, numbered one to one",
       f"{distinct} distinct, round trip {round_trip}")

# %% [markdown]
# ## 4. On slices, at the same budget
#
# All four in the default VQ-VAE: notebook 04's demo budget (6 epochs over the first 480 training slices),
# everything else as the default recipe, 512 codes each (FSQ: 8 x 8 x 8 levels). The results are committed runs
# of `make sweeps` (`results/sweeps/`); the cell after them trains the FSQ run again in full mode. Bits per slice
# are the test maps' cost under the code frequencies of the training split (notebook 05, section 6).

# %%
names = {"default (vq)": "default", "rotation trick": "rotation", "cosine, 8 dims": "cosine",
         "FSQ 8 x 8 x 8": "fsq"}
found = {**sweeps.load_results(RESULTS, "collapse"), **sweeps.load_results(RESULTS, "quantizers")}
missing = [run for run in names.values() if run not in found]
if missing:
    raise FileNotFoundError(f"{RESULTS} lacks the results of {', '.join(missing)}: run `make sweeps`")
table = {label: found[run]["test"] for label, run in names.items()}

# Training speed, side by side in this process (the sweep's own timings depend on what else the machine ran):
# images/s of the training loop for each quantizer's recipe, the median of interleaved rounds.
slices = data.load_split(DATA, "train", progress=False).images
batch = train.resident_images(np.asarray(slices[:3 * bench.BATCH]), torch.device("cpu"))
configs = {label: train.TrainConfig.from_dict({**found[run]["train_config"], "device": "cpu"})
           for label, run in names.items()}
rounds = {label: [] for label in names}
for _ in range(1 if SMOKE else 3):
    for label, config in configs.items():
        rounds[label].append(bench.bench_pipeline(config, batch, torch.device("cpu"), warmup=1, steps=2))
speed = {label: float(np.median(r)) for label, r in rounds.items()}

print(f"{'':<16}{'codes':>7}{'perplexity':>12}{'SSIM':>7}{'PSNR':>7}{'bits':>8}{'img/s':>7}")
for label, t in table.items():
    print(f"{label:<16}{t['active_codes']:>7}{t['perplexity']:12.0f}{t['ssim_mean']:7.3f}{t['psnr_mean']:7.2f}"
          f"{t['bits_frequencies']:8,.0f}{speed[label]:7.1f}")
viz.ablation(list(table), {"codes used (of 512)": [t["active_codes"] for t in table.values()],
                           "perplexity": [t["perplexity"] for t in table.values()],
                           "test SSIM": [t["ssim_mean"] for t in table.values()],
                           "bits per slice": [t["bits_frequencies"] for t in table.values()],
                           "training images / s": list(speed.values())},
             FIGS / "08_quantizers.png", highlight="default (vq)",
             formats={"perplexity": ".0f", "bits per slice": ",.0f", "training images / s": ".1f"});
readme.save_results(FIGS / "08_results.json", {f"speed_{names[label]}": v for label, v in speed.items()})

# %%
same, evidence = sweeps.reproduce("fsq", DATA, found["fsq"], smoke=SMOKE)
print(evidence)
claims(same, "the committed FSQ run is what the code gives", evidence)

# %% [markdown]
# At this budget FSQ wins outright: the best test SSIM and PSNR of the four and the cheapest maps in bits,
# with no codebook, no auxiliary loss and no restarts. It does so with the fewest codes in use: its grid
# cannot die, but it can go unused, and the learned projection puts the encoder's outputs on a small part of
# it (question 4). The rotation trick beats the straight-through copy on SSIM with the same quantizer
# otherwise, and uses a few more codes. The cosine lookup keeps the most codes in use, as Improved VQGAN
# reports, yet scores the lowest SSIM here: more codes in use is not the same as a better model (notebook 03
# found the same for restarts without EMA). FSQ is also the fastest to train of the four in the side-by-side
# timing (it computes no distances to a codebook). These are single short runs with one seed each: a ranking
# at this budget, not a verdict on the methods.

# %%
ssim, codes_used = ({label: t[key] for label, t in table.items()} for key in ("ssim_mean", "active_codes"))
fsq_label = "FSQ 8 x 8 x 8"
claims(max(ssim, key=ssim.get) == fsq_label == max(table, key=lambda n: table[n]["psnr_mean"])
       == min(table, key=lambda n: table[n]["bits_frequencies"]) == min(codes_used, key=codes_used.get),
       "FSQ scores the best SSIM and PSNR with the cheapest maps and the fewest codes in use",
       f"SSIM {ssim[fsq_label]:.3f}, {table[fsq_label]['bits_frequencies']:,.0f} bits, {codes_used[fsq_label]} codes")
claims(ssim["rotation trick"] > ssim["default (vq)"] and codes_used["rotation trick"] > codes_used["default (vq)"],
       "the rotation trick beats the straight-through copy on SSIM and uses more codes",
       f"SSIM {ssim['rotation trick']:.3f} against {ssim['default (vq)']:.3f}")
claims(max(codes_used, key=codes_used.get) == "cosine, 8 dims" == min(ssim, key=ssim.get),
       "the cosine lookup keeps the most codes in use and scores the lowest SSIM",
       f"{codes_used['cosine, 8 dims']} codes, SSIM {ssim['cosine, 8 dims']:.3f}")
claims(max(speed, key=speed.get) == fsq_label, "FSQ trains fastest of the four, side by side",
       ", ".join(f"{label} {v:.1f}" for label, v in speed.items()))

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
# **Question 1.** With the rotation trick, two encoder outputs on opposite sides of their code get gradients that
# point different ways. Why could that help the codebook, compared with the copy that moves them in step?
#
# <details><summary>Answer</summary>
#
# With the copy, every output in a code's cell takes the same step: the whole cell's cloud of outputs translates
# as one, keeping its shape. The spread of the outputs around their mean, which is where EMA moves the code, so
# the quantization error $\|z - e\|$ the code settles at, never changes from the decoder's gradient; only the
# commitment loss pulls the outputs in. With the
# rotation trick the step is $\frac{\|e\|}{\|z\|} R^\top \partial \mathcal{L} / \partial q$, different for each
# output: outputs on opposite sides of the code move apart or together. Pulled together, they cluster closer to
# their code (a smaller quantization error, so the code says more exactly what the encoder meant); pushed apart,
# some cross into a neighbouring cell and start using another code, which is how the trick raises codebook usage
# (Fifty et al. 2024). The hidden cell measures it on section 1's toy: for each pair of opposite outputs, the
# cosine between their two steps (1 for the copy) and how much one step changes their distance (0 for the copy).
# On slices, section 4 found the rotation trick using more codes than the copy, and scoring a higher SSIM, in one
# short run each.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
points = z.detach().numpy()
half = len(points) // 2  # output i and output i + half lie on opposite sides of the code
for name, step in steps.items():
    unit_steps = step / np.linalg.norm(step, axis=1, keepdims=True)
    cosine = (unit_steps[:half] * unit_steps[half:]).sum(1)
    before = np.linalg.norm(points[:half] - points[half:], axis=1)
    after = np.linalg.norm(points[:half] + step[:half] - points[half:] - step[half:], axis=1)
    print(f"{name}: cosine between the steps of opposite outputs {cosine.min():.3f}..{cosine.max():.3f}; their "
          f"distance changes by {(after - before).min():+.3f}..{(after - before).max():+.3f}")

# %% [markdown]
# **Question 2.** The cosine lookup ignores the length of an encoder output. What information does the decoder
# then never see, and does that matter for MRI intensities?
#
# <details><summary>Answer</summary>
#
# Any quantizer's decoder sees only the chosen code, never $z$ itself. What the cosine lookup adds is that the
# length $\|W_{\text{in}} z\|$ of the projected output cannot even choose the code: two outputs that differ only in
# scale get the same code (section 2's tripling check), and every code the decoder can receive is a unit vector
# projected back, so no code can stand for "the same pattern, but stronger". Euclidean codes can differ in length as
# well as in direction; cosine codes must spread everything over directions on the unit sphere of the 8-dimensional
# lookup space. For MRI that matters: intensity is much of what tells tissues apart here (the bright bladder against
# grey soft tissue and dark bone outlines), and a brighter version of a patch tends to give a larger encoder output.
# The encoder must learn to put brightness into the direction of its output, or lose it. Section 4's lowest SSIM for
# the cosine lookup fits this, though one short run cannot say it is the cause.
#
# </details>

# %% [markdown]
# **Question 3.** FSQ with levels 8 x 8 x 8 has 512 codes, like our codebook. How many would 8 x 5 x 5 x 5 give, and
# how many bits per latent position is that?
#
# <details><summary>Answer</summary>
#
# The codes are all the grid points, $\prod_i L_i = 8 \cdot 5 \cdot 5 \cdot 5 = 1{,}000$ (the library's default
# `fsq_levels`), so a position stored plainly costs $\log_2 1000 \approx 9.97$ bits, against $\log_2 512 = 9$ for
# 8 x 8 x 8: about twice the codes for one more bit, with four channels to round instead of three. The hidden cell
# builds both quantizers and prints their code counts and bits.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
for levels in ([8, 8, 8], [8, 5, 5, 5]):
    grid = FiniteScalarQuantizer(levels, dim=len(levels))
    print(f"levels {' x '.join(map(str, levels))}: {grid.num_codes} codes, {np.log2(grid.num_codes):.2f} bits per "
          f"latent position")

# %% [markdown]
# **Question 4.** FSQ needs no restarts. Can an FSQ code still go unused, and what would cause it?
#
# <details><summary>Answer</summary>
#
# Yes. A code is used only if some encoder output rounds to it, and the learned projection decides where the
# outputs land. If the projected channels are correlated, the outputs vary along fewer directions than the grid
# has, and they fill only a slice of it; if they stay small, the tanh keeps them near the middle levels and the
# outer ones go unused; and at a short budget the model may simply not need many distinct codes yet. Nothing can
# be restarted, as there is no code vector to move: only training the projection changes it. The hidden cell
# prints how many of its 512 codes section 4's FSQ run uses on the test split, the fewest of the four quantizers,
# and a toy: outputs that vary in two directions only (a plane through the $8 \times 8 \times 8$ grid) reach only
# part of its codes, however many of them there are.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
print(f"{fsq_label} on slices: {table[fsq_label]['active_codes']} of 512 codes used on the test split "
      f"(perplexity {table[fsq_label]['perplexity']:.0f})")
torch.manual_seed(SEED)
cube = FiniteScalarQuantizer([8, 8, 8], dim=3)
plane = torch.randn(100_000, 2) @ torch.randn(2, 3)  # outputs that vary in two directions only
reached = cube.codes_to_indices(cube.quantize(plane)).unique().numel()
print(f"toy: 100,000 outputs on a plane through the 8 x 8 x 8 grid reach {reached} of its {cube.num_codes} codes")
