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
# # 02 · The encoder and the decoder
#
# A VQ-VAE is an autoencoder with a discrete bottleneck. This notebook builds the two continuous halves
# around that bottleneck and follows one slice through them. You will learn
#
# - how kernel-4, stride-2 convolutions halve the image while residual blocks add depth at no cost in size;
# - the shape of the tensor after every layer, for the 256 x 128 slices;
# - how large a region of the slice one latent cell "sees" (its receptive field);
# - what latent grid each downsampling factor (4x, 8x, 16x) gives, and how much it compresses a slice.
#
# **Prerequisites:** notebook 01; convolutions in PyTorch.
#
# **Expected run time:** about 10 s on a 2-core CPU (measured by `make figures`). Nothing is trained, so no GPU
# is needed and one would not change it.

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
FACTORS = (4, 8, 16)

# %%
import platform

import numpy as np
import torch

import vqvae_lib
from vqvae_lib import data, diagrams, viz, widgets
from vqvae_lib.claims import Claims
from vqvae_lib.model import VQVAE, ModelConfig
from vqvae_lib.train import PRESETS

torch.manual_seed(SEED)
claims = Claims(SMOKE, DATA)  # sentences below that state a measured result are checked in full mode
print(f"python {platform.python_version()}, torch {torch.__version__}, vqvae_lib {vqvae_lib.__version__}")

# %% [markdown]
# ## 1. The architecture
#
# We follow the paper's image model. The **encoder** halves the resolution with convolutions of kernel 4
# and stride 2 (one per factor of two), adds a 3 x 3 convolution and a stack of residual blocks (ReLU,
# 3 x 3 conv, ReLU, 1 x 1 conv, added to the input), and ends with a 1 x 1 convolution to the code
# dimension `embed_dim`. The **decoder** mirrors it with transposed convolutions. Between them sits the
# vector quantizer (notebook 03), which replaces every latent vector by its nearest codebook vector.
#
# In formulas: a convolution of kernel $k$, stride $s$ and padding $p$ maps a side of length $H$ to
#
# $$H' = \left\lfloor \frac{H + 2p - k}{s} \right\rfloor + 1,$$
#
# so the encoder's strided layers ($k = 4$, $s = 2$, $p = 1$) give $H' = H/2$ for even $H$, and the 3 x 3
# ($p = 1$) and 1 x 1 ($p = 0$) layers keep the size. The decoder's transposed convolutions with the same $k$,
# $s$ and $p$ map $H$ to $(H - 1)s - 2p + k = 2H$. A residual block adds a correction to its input (biases
# left out):
#
# $$x \mapsto x + W_{1\times1} * \operatorname{ReLU}\big(W_{3\times3} * \operatorname{ReLU}(x)\big).$$
#
# Our default preset (the recipe we train in notebook 04):

# %%
config = ModelConfig.from_dict(PRESETS["default"]["model"])
model = VQVAE(config).eval()
print(config)
print(model.encoder)
print(model.decoder)

# %% [markdown]
# The data flow of this preset: values go forward (blue), and since the $\operatorname{argmin}$ of the nearest-code
# step has no gradient, the decoder's gradient $\nabla_{z_q} L$ is copied straight through to $z_e$ (orange).

# %%
diagrams.vqvae_dataflow(FIGS / "02_dataflow.png", config, data.WORK_SHAPE);

# %% [markdown]
# ## 2. Shapes through every layer
#
# Forward hooks record the output of every layer while one slice goes through the model.

# %%
slice_ = torch.tensor(np.asarray(data.load_split(DATA, "validate", progress=False).images[30]))[None, None]


def layer_shapes(module: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, str, tuple, int]]:
    """Run x through `module`; return (name, layer type, output shape, parameters) for every leaf layer."""
    rows, hooks = [], []
    for name, layer in module.named_modules():
        if not list(layer.children()):
            hooks.append(layer.register_forward_hook(
                lambda m, i, o, name=name: rows.append(
                    (name, type(m).__name__, tuple(o.shape), sum(p.numel() for p in m.parameters())))))
    with torch.no_grad():
        module(x)
    for h in hooks:
        h.remove()
    return rows


for title, module, x in (("encoder", model.encoder, slice_),
                         ("decoder", model.decoder, model.encoder(slice_).detach())):
    print(f"{title}: input {tuple(x.shape)}")
    shapes = layer_shapes(module, x)
    for name, kind, shape, params in shapes:
        print(f"  {name:<22} {kind:<16} {str(shape):<20} {params:>9,}")
    shape_of = {name: shape for name, _, shape, _ in shapes}
    blocks = sorted({name.rsplit(".", 1)[0] for name in shape_of if ".blocks." in name})
    claims(all(shape_of[f"{b}.0"] == shape_of[f"{b}.3"] for b in blocks),  # the ReLU at its input, its last conv
           f"the {title}'s residual blocks keep the shape", f"{len(blocks)} blocks")

# %% [markdown]
# The residual blocks keep the shape: the information flows around them and each block only adds a
# correction. Only the strided layers change the grid.
#
# ## 3. The latent grid for each downsampling factor
#
# Each factor of two costs one strided layer and divides both sides of the grid by two. A 256 x 128 slice
# becomes a 64 x 32 grid of codes at 4x, 32 x 16 at 8x and 16 x 8 at 16x: at factor $f$ an $H \times W$ slice
# becomes an $h \times w = \frac{H}{f} \times \frac{W}{f}$ grid. With a codebook of $K = 512$ codes, each cell stores
# $\log_2 512 = 9$ bits, so a slice costs $h\,w \log_2 K$ bits, against $32\,H W$ bits for the slice itself in
# float32: a compression by $\frac{32\,H W}{h\,w \log_2 K} = \frac{32 f^2}{\log_2 K}$.

# %%
rows = []
for factor in FACTORS:
    m = VQVAE(ModelConfig(**{**config.to_dict(), "downsample": factor}))
    h, w = m.latent_shape(data.WORK_SHAPE)
    bits = h * w * np.log2(m.config.codebook_size)
    rows.append((factor, (h, w), sum(p.numel() for p in m.parameters()), bits))
    print(f"{factor:>2}x: latent grid {h} x {w} = {h * w:>5} codes, {bits / 8 / 1024:5.2f} KiB per slice "
          f"(x{256 * 128 * 32 / bits:,.0f} smaller than float32), {rows[-1][2]:,} parameters")

# %% [markdown]
# ## 4. Receptive field: what one code sees
#
# For stacked convolutions the receptive field grows by (kernel - 1) x jump at each layer, where the
# jump is the product of the strides so far: for layer $\ell$ with kernel $k_\ell$ and stride $s_\ell$,
#
# $$r_\ell = r_{\ell-1} + (k_\ell - 1)\, j_{\ell-1}, \qquad j_\ell = j_{\ell-1}\, s_\ell, \qquad r_0 = j_0 = 1.$$
#
# We compute it for the encoder's layers, and check it
# empirically: the gradient of one latent cell with respect to the input is non-zero exactly on the
# pixels that cell depends on.

# %%
def receptive_field(encoder: torch.nn.Module) -> int:
    """Receptive field (pixels, one side) of the encoder's output cells, from its convolutions in order."""
    size, jump = 1, 1
    for layer in encoder.modules():
        if isinstance(layer, torch.nn.Conv2d):
            size += (layer.kernel_size[0] - 1) * jump
            jump *= layer.stride[0]
    return size


fields, maps = {}, []
for factor in FACTORS:
    m = VQVAE(ModelConfig(**{**config.to_dict(), "downsample": factor})).eval()
    x = slice_.clone().requires_grad_(True)
    z = m.encoder(x)
    z[0, :, z.shape[2] // 2, z.shape[3] // 2].sum().backward()
    seen = (x.grad[0, 0].abs() > 0).numpy()
    rows_, cols_ = np.flatnonzero(seen.any(1)), np.flatnonzero(seen.any(0))
    fields[factor] = (receptive_field(m.encoder), (int(rows_[-1] - rows_[0] + 1), int(cols_[-1] - cols_[0] + 1)))
    maps.append(seen)
    print(f"{factor:>2}x: computed receptive field {fields[factor][0]} px, measured {fields[factor][1]}")
for factor in (4, 8):
    claims(fields[factor][1] == (fields[factor][0],) * 2, f"the measured field equals the computed one at {factor}x",
           f"{fields[factor]}")
claims(fields[16][1][0] == fields[16][0] > fields[16][1][1] == slice_.shape[3] - 1,
       "at 16x the measured field is narrower across the slice than the computed one (question 3)",
       f"{fields[16]}")

# %%
viz.receptive_fields(slice_[0, 0].numpy(), maps, [f"{f}x: one code sees {fields[f][1][0]} x {fields[f][1][1]} px"
                                                  for f in FACTORS], FIGS / "02_receptive_fields.png");

# %% [markdown]
# The panel below measures the same gradient for any cell: choose a factor and move the cell (blue) with the row
# and col sliders. Try a cell at the edge of the slice, where the field reaches past the image (question 3), and
# compare how far one step of a slider moves the field at 4x and at 16x.

# %%
field_panel = widgets.ReceptiveFieldPanel(slice_[0, 0].numpy(), config, FACTORS, seed=SEED)
widgets.show(field_panel, INTERACTIVE)

# %%
claims(2 < fields[4][0] * 0.17 < 9, "at 4x each code sees a patch of a few centimetres",
       f"{fields[4][0]} px of about 1.7 mm = {fields[4][0] * 0.17:.1f} cm")

# %% [markdown]
# At 4x each code sees a patch of a few centimetres (pixels are about 1.7 mm), so the codes can describe
# local texture and edges; at 16x each code sees most of the pelvis but must summarise a 16 x 16 block
# with one of 512 vectors, which blurs fine detail. The grid lines below show the cells each factor gives
# on one slice.

# %%
viz.latent_grids(slice_[0, 0].numpy(), FACTORS, FIGS / "02_latent_grids.png");

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
# **Question 1.** Why does the encoder use kernel 4 with stride 2 rather than kernel 3? (Hint: count how often
# each input pixel is covered.)
#
# <details><summary>Answer</summary>
#
# Windows of width $k$ placed every $s$ pixels cover each pixel $k/s$ times on average. With $k = 4$, $s = 2$
# that is exactly 2 for every pixel away from the border: each pixel takes part in the same number of outputs,
# and the layer treats all positions alike. With $k = 3$, $s = 2$ the windows overlap by one pixel, so every
# other pixel is covered twice and the ones between once: a fixed pattern of period 2 that the layer imprints
# on everything it sees. In the decoder the same unevenness is worse: a transposed convolution with $k$ not
# divisible by $s$ gives alternate output pixels one and two contributions, the source of the well-known
# checkerboard artefacts (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts"). The hidden cell
# counts the windows covering each pixel for both kernels: a transposed convolution of ones with ones adds up,
# for each input pixel, the windows that contain it.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
for k in (3, 4):
    cover = torch.nn.functional.conv_transpose1d(torch.ones(1, 1, 16), torch.ones(1, 1, k), stride=2, padding=1)
    print(f"kernel {k}, stride 2: windows covering pixels 4..15:", cover[0, 0, 4:16].int().tolist())

# %% [markdown]
# **Question 2.** The residual blocks add parameters but not resolution. What would happen to the
# reconstructions with `n_res=0`?
#
# <details><summary>Answer</summary>
#
# The shapes would not change: the blocks keep the shape (section 2), so the grid and the codes are the same
# size. What goes is the computation at the latent resolution. The encoder would reach the codes from its
# last strided layer through one 3 x 3 convolution, a ReLU and the 1 x 1 projection, and the decoder would
# start upsampling right after one 3 x 3 convolution of the codes and a ReLU: one learned layer at the grid's
# resolution instead of five (the 3 x 3 and two per block) to turn a 64-long code vector into the texture and
# edges of its patch and to mix it with its neighbours. The
# receptive field shrinks too: each block's 3 x 3 convolution adds $2f$ pixels at factor $f$ (the jump there is
# $f$), and the hidden cell prints the field and the parameter count with and without the blocks. Expect
# blurrier reconstructions and a lower SSIM at the same training budget; this notebook does not measure it, but
# notebook 04's short run trains it with `train.make_config("default", n_res=0, ...)`.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
for n_res in (0, config.n_res):
    m = VQVAE(ModelConfig(**{**config.to_dict(), "n_res": n_res}))
    print(f"n_res={n_res}: receptive field {receptive_field(m.encoder)} px at {config.downsample}x, "
          f"{sum(p.numel() for p in m.parameters()):,} parameters")

# %% [markdown]
# **Question 3.** For the central cell, the measured field equals the computed one at 4x and 8x, but at 16x
# (the last line printed above) it is narrower across the slice. Why can it not be as wide there, and what does
# the encoder see where its field reaches past the image?
#
# <details><summary>Answer</summary>
#
# At 16x the computed field is wider than the slice: the recursion of section 4 gives more pixels than the 128
# columns there are. The gradient can only be non-zero on real pixels, so the measured field is cut at the
# image's edges. Where exactly follows from the padding: the field of output cell $c$ starts at pixel
# $c f - o$, where $o = \sum_\ell p_\ell\, j_{\ell-1}$ adds up each layer's padding in input pixels. The hidden
# cell computes $o$ and the span of the central cell (column $c = 4$ of 8) and prints it next to the first and
# last columns where the measured gradient is non-zero: the computed span starts just inside the left edge and
# runs far past the right one, so the measured field is the image minus its first column.
#
# Past the edge the convolutions see zero padding. At the first layer that is the same as black pixels; deeper
# in, a zero feature vector is not what any real pixel produces (the biases and ReLUs make real features
# non-zero), so the network can tell where the image ends, which is how a convolutional encoder knows where it
# is in the slice.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
m = VQVAE(ModelConfig(**{**config.to_dict(), "downsample": 16}))
offset, jump = 0, 1
for layer in m.encoder.modules():
    if isinstance(layer, torch.nn.Conv2d):
        offset += layer.padding[0] * jump
        jump *= layer.stride[0]
col = slice_.shape[3] // 16 // 2  # the central cell's column, as in section 4
start = col * 16 - offset
seen_cols = np.flatnonzero(maps[-1].any(0))
print(f"16x: offset o = {offset}; the central cell (column {col}) computes from columns {start}.."
      f"{start + fields[16][0] - 1}, the slice has 0..{slice_.shape[3] - 1}; "
      f"measured: columns {seen_cols[0]}..{seen_cols[-1]}")

# %% [markdown]
# **Question 4.** At 16x a 256 x 128 slice is 128 codes of 9 bits. Is that enough to store where the prostate
# is?
#
# <details><summary>Answer</summary>
#
# Where, roughly, yes: naming the cell that holds it takes $\log_2 128 = 7$ bits of the $128 \times 9 = 1152$.
# Its shape, no. Each cell stands for a 16 x 16 pixel block, about 2.7 cm a side at 1.7 mm pixels, and its one
# code out of 512 must describe everything in that block at once: the prostate's edge, the bladder wall above
# it, the fat and muscle around it. 512 codes shared by all blocks of all slices cannot also say where within
# its cells the outline runs. The hidden cell counts the prostate's pixels on this notebook's slice and the
# cells that touch them at 16x and at 4x: at 16x the whole organ lies in a handful of codes, so a 16x model can
# place a blurred blob at about the right spot but must guess its outline. At 4x the same organ spans many
# cells, each of which can describe its piece of the edge.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
masks = data.load_split(DATA, "validate", masks=True, progress=False).masks
prostate = np.asarray(masks[30]) == data.LABELS.index("prostate")
h, w = prostate.shape
for factor in (16, 4):
    cells = prostate.reshape(h // factor, factor, w // factor, factor).any((1, 3))
    print(f"{factor:>2}x: the prostate's {prostate.sum()} pixels touch {cells.sum()} of {cells.size} cells")
