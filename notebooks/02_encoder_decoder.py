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
# **Expected run time:** a few seconds on a CPU; no GPU needed.

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
from vqvae_lib import data, viz
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
# Our default preset (the recipe we train in notebook 04):

# %%
config = ModelConfig.from_dict(PRESETS["default"]["model"])
model = VQVAE(config).eval()
print(config)
print(model.encoder)
print(model.decoder)

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
# becomes a 64 x 32 grid of codes at 4x, 32 x 16 at 8x and 16 x 8 at 16x. With a codebook of K = 512
# codes, each cell stores log2(512) = 9 bits; the slice itself is 256 x 128 float32 values.

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
# jump is the product of the strides so far. We compute it for the encoder's layers, and check it
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
# 1. Why does the encoder use kernel 4 with stride 2 rather than kernel 3? (Hint: count how often each
#    input pixel is covered.)
# 2. The residual blocks add parameters but not resolution. What would happen to the reconstructions
#    with `n_res=0`?
# 3. For the central cell, the measured field equals the computed one at 4x and 8x, but at 16x (the last line
#    printed above) it is narrower across the slice. Why can it not be as wide there, and what does the
#    encoder see where its field reaches past the image?
# 4. At 16x a 256 x 128 slice is 128 codes of 9 bits. Is that enough to store where the prostate is?
