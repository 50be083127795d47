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
# # Codebook explorer
#
# The trained VQ-VAE stores every slice as a grid of code indices, one per pixel block (4 x 4 with the
# default checkpoint). Slide through the test slices; choose a code to see where the slice uses it
# (highlighted on the image and on the index map) and what the code alone decodes to. The index map colours each
# code by the mean intensity it decodes to, so it shows the anatomy. To **edit** the map, type a cell's row and
# column (of the stored map: on screen rows count from the left, columns from the bottom) and a code, and press
# apply: the slice decoded before and after, and their difference, which stays inside the dashed box the decoder
# lets one cell reach.
#
# Below it, the prior of notebook 06 makes slices of its own: **sample** draws new ones (at a chosen
# slice position, or positions drawn at random), and **complete from this row** keeps the first code rows of the
# explorer's current slice (the left of each picture, up to the red line) and lets the prior draw the rest.
#
# This page is served by Voilà (`make explorer`); the explorer is the one of notebook 05.

# %%
from IPython.display import display

from vqvae_lib import explorer_page

display(explorer_page.app())
