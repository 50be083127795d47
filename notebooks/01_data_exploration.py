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
# # 01 · Exploring the HipMRI prostate MRI slices
#
# Before we build a VQ-VAE we look hard at the data it will compress. You will learn
#
# - how the HipMRI 2D slices are laid out on disk, and how the splits are made (by patient);
# - what one slice is: a NIfTI file holding a 256 x 128 array of scanner intensities;
# - why a few slices are 256 x 144, and what the loader does with them;
# - how we map scanner intensities to the [0, 1] range the model sees;
# - what the anatomy and its six labels look like, and how rare the small organs are;
# - how the slices reach PyTorch as batches of `(1, H, W)` tensors.
#
# **Prerequisites:** Python and NumPy. No deep learning yet.
#
# **Data:** by default the synthetic phantom in `data/phantom` (made by `make figures`, or by
# `python -m vqvae_lib phantom --out data/phantom`). Point `DATA_DIR` at the real
# `HipMRI_study_keras_slices_data` folder and every cell runs unchanged.
#
# **Expected run time:** about 25 s on a 2-core CPU for the default phantom (measured by `make figures`; the
# first run also decodes the slices and caches them). Nothing here is trained and no GPU is used, so a GPU
# does not change it.
#
# **What the phantom is, and what it is not.** The phantom copies what a loader and a model meet in the
# real slices: the layout and file names, the patient-level splits, 256 x 128 float32 slices in scanner units
# (one scan at 256 x 144, some files with a singleton axis), sagittal reformats of 3D pelvis volumes with body,
# fat, muscles, bones, bladder, prostate and rectum in about the real label shares, weekly changes of bladder
# and rectum, speckled texture, partial-volume blur, a smooth coil bias field and Rician noise. It does not
# have real anatomy's variety and detail (every organ is a smooth parametric shape, there are no tumours,
# implants, fiducial markers or catheters, no zonal anatomy beyond a brighter peripheral zone), nor the
# artefacts of real scans (motion, ghosting, wrap-around, chemical shift, intensity steps between
# acquisitions), nor the real data's numbers: the default phantom has 4 training patients, the real data 31.
# So a model's scores here teach how the method behaves; they do not predict its scores on real scans, which
# can be higher (more patients to learn from) or lower (texture and artefacts that no 4x bottleneck keeps).

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
HIST_SLICES = 24 if SMOKE else 200  # slices per split read for the intensity histograms

# %%
import json
import platform

import matplotlib
import nibabel
import numpy as np
import torch

import vqvae_lib
from vqvae_lib import data, viz, widgets
from vqvae_lib.claims import Claims
from vqvae_lib.phantom import REAL_LABEL_SHARES

rng = np.random.default_rng(SEED)
torch.manual_seed(SEED)
claims = Claims(SMOKE, DATA)  # sentences below that state a measured result are checked in full mode
print(f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
      f"nibabel {nibabel.__version__}, matplotlib {matplotlib.__version__}, vqvae_lib {vqvae_lib.__version__}")
print(f"data: {DATA.resolve()}\nfigures: {FIGS.resolve()}")

# %% [markdown]
# ## 1. The layout on disk
#
# The data set is six folders: images and segmentation masks for a train, a validate and a test split.
# Every file is one 2D slice named `case_XXX_week_Y_slice_Z.nii.gz`: patient `XXX`, scanned in week `Y` of
# their radiotherapy, slice `Z` (0..59) of that scan. Masks have the same name with the prefix `seg_`.
#
# `data.inspect` walks the whole tree once and reports counts, shapes, intensities, label shares and any
# problems it finds (the same report as `python -m vqvae_lib inspect DATA_DIR`).

# %%
for split, (image_dir, seg_dir) in data.find_split_dirs(DATA).items():
    print(f"{split:<9} {image_dir.name:<24} {seg_dir.name if seg_dir else '(no masks)'}")
report = data.inspect(DATA)
print(data.format_inspect(report))

# %% [markdown]
# ## 2. How much data, and how is it split?
#
# Each 3D scan gives 60 slices, each patient has one to eight weekly scans. The split is **by patient**:
# slices of one patient are strongly correlated (same anatomy, week after week), so a patient in both the
# training and the test split would let the model be tested on anatomy it has already seen.

# %%
counts = {split: {"patients": len(r["cases"]), "scans": r["scans"], "slices": r["files"]}
          for split, r in report["splits"].items()}
viz.split_counts(counts, FIGS / "01_split_counts.png");

# %% [markdown]
# The check behind that promise: every case id must belong to exactly one split. `check_patient_splits`
# raises an error naming the case if one does not; the figure shows every patient's weeks coloured by
# split, so each row must have a single colour.

# %%
cases = data.check_patient_splits(DATA)
print("patient-level split check passed; patients per split:", {s: len(c) for s, c in cases.items()})
scans = {split: sorted({(f.case, f.week) for f in data.list_slices(image_dir)})
         for split, (image_dir, _) in data.find_split_dirs(DATA).items()}
viz.patient_splits(scans, FIGS / "01_patient_splits.png");

# %% [markdown]
# ## 3. One file up close
#
# A slice is a NIfTI image: a header (shape, voxel size, orientation) and a float32 array of
# non-negative scanner intensities. They are not scaled to [0, 1] or [0, 255]: their range depends on the
# scanner, the patient and the coil.

# %%
first = data.list_slices(data.find_split_dirs(DATA)["train"][0])[30]
img = nibabel.load(first.path)
array = data.read_nifti(first.path)
print(first.path.name)
print("stored shape", img.shape, img.get_data_dtype(), "| voxel size (mm)",
      tuple(round(float(z), 2) for z in img.header.get_zooms()))
print(f"intensities: min {array.min():.1f}, median {np.median(array):.1f}, max {array.max():.1f}")

# %% [markdown]
# ## 4. Shapes: the 256 x 144 slices
#
# Almost every slice is 256 x 128. One scan (case 019, week 1) was acquired with 144 slices along the body
# axis, so its 60 slices are 256 x 144. A model needs one input size, so the loader applies a **shape
# policy** to every slice that differs from the working shape, and reports what it did:
#
# - `crop` (default): cut the centre 256 x 128 out of it. Only the 8 outermost columns on each side of the
#   body axis are lost, and the pixel size is unchanged;
# - `pad`: zero-pad to a larger working shape (use it with `shape=(256, 144)`: then every *other* slice is
#   padded);
# - `resize`: resample to 256 x 128, which squeezes the anatomy by 11 % along one axis (a factor
#   $128/144 \approx 0.89$: each pixel then covers $144/128 = 1.125$ times as much of the body axis);
# - `error`: refuse, for pipelines that must never alter data.

# %%
census = {split: r["shapes"] for split, r in report["splits"].items()}
print("shape census:", census)
odd = [f for split, (image_dir, _) in data.find_split_dirs(DATA).items()
       for f in data.list_slices(image_dir) if (f.case, f.week) == (19, 1)]
if odd:
    wide = data.read_nifti(odd[30].path)
    fitted = {"crop": data.fit_shape(wide, data.WORK_SHAPE, "crop"),
              "resize": data.fit_shape(wide, data.WORK_SHAPE, "resize"),
              "pad to 256x160": data.fit_shape(wide, (256, 160), "pad")}
    viz.shape_policies(wide, fitted, FIGS / "01_shape_policy.png", name=odd[30].name)
else:
    print("no 256 x 144 scan in this data set")

# %% [markdown]
# Loading a split decodes every slice once, applies the shape policy and the normalisation below, and
# caches the result on disk as one memory-mapped array, so the next load only opens that file. The loader
# says which slices it changed:

# %%
train = data.load_split(DATA, "train", masks=True)
print(f"train: {train.images.shape} {train.images.dtype}, masks {train.masks.shape}, "
      f"from cache: {train.from_cache}")
print(f"{len(train.reshaped)} slices reshaped", [r[0] for r in train.reshaped[:3]],
      train.reshaped[0][2] if train.reshaped else "")

# %% [markdown]
# ## 5. Intensities and normalisation
#
# The network wants inputs on a fixed scale. We divide each slice by its own 99.5th percentile and clip to
# [0, 1] (`normalization="percentile"`): for a slice $x$ of scanner intensities,
#
# $$\tilde x = \operatorname{clip}_{[0,1]}\!\left(\frac{x}{s}\right), \qquad s = P_{99.5}(x),$$
#
# where $P_{99.5}(x)$ is the 99.5th percentile of the slice's pixel values (a slice with $s \le 0$ becomes all
# zeros). Per slice, because the overall brightness changes from scan to
# scan with the coil and the patient; by a high percentile rather than the maximum, because a few very
# bright voxels (urine, fat near the coil) would otherwise squash the rest of the slice into a narrow dark
# range. Intensities are non-negative, so the black background stays at 0. The factor $s$ is kept
# (`SplitData.scales`) to map back to scanner units: $x = s\,\tilde x$ wherever $x \le s$.
#
# Histograms of a random sample of slices per split, before and after (log scale: most voxels are
# background):

# %%
raw, normalised = {}, {}
for split, (image_dir, _) in data.find_split_dirs(DATA).items():
    files = data.list_slices(image_dir)
    pick = rng.choice(len(files), size=min(HIST_SLICES, len(files)), replace=False)
    slices = [data.read_nifti(files[i].path) for i in sorted(pick)]
    raw[split] = np.concatenate([s.ravel() for s in slices])
    normalised[split] = np.concatenate([data.normalize(s)[0].ravel() for s in slices])
viz.intensity_histograms(raw, normalised, FIGS / "01_intensity_histograms.png");
print(f"train scale factors (scanner units per 1.0): median {np.median(train.scales):.0f}, "
      f"range {train.scales.min():.0f}..{train.scales.max():.0f}")

# %% [markdown]
# ## 6. Through one scan
#
# The 60 slices of a scan are parallel sagittal planes through the pelvis, right to left. We show them
# superior up and anterior left (the arrays are stored with the anterior-posterior axis first and the body
# axis second; `viz.oriented` only turns the picture). Watch the bladder, the prostate below it, the rectum
# behind, and the pelvic bones at the edges.

# %%
scan_rows = np.flatnonzero((train.cases == train.cases[0]) & (train.weeks == train.weeks[0]))
step = max(1, len(scan_rows) // 12)
shown = scan_rows[::step][:12]
viz.montage([train.images[i] for i in shown], [f"slice {train.indices[i]}" for i in shown],
            FIGS / "01_scan_montage.png",
            suptitle=f"case {train.cases[0]:03d}, week {train.weeks[0]}: every {step}th slice");

# %% [markdown]
# ## 7. The labels
#
# Each slice has a mask with six labels: 0 background, 1 body, 2 bone, 3 bladder, 4 rectum, 5 prostate. The
# VQ-VAE never sees them, but they help us read the images and later tell us *where* reconstructions fail.

# %%
middle = scan_rows[len(scan_rows) // 2 - 12 : len(scan_rows) // 2 + 13 : 6]
viz.slices_and_labels([train.images[i] for i in middle], [train.masks[i] for i in middle],
                      [train.files[i].name.replace("_week", "\nweek") for i in middle],
                      FIGS / "01_slices_and_labels.png");

# %% [markdown]
# The browser below holds every slice of every training scan. Choose a scan and slide through it, switch the
# labels off to see how much of each organ you can make out without them, and follow one patient's bladder from
# week to week.

# %%
browser = widgets.ScanBrowser(train)
widgets.show(browser, INTERACTIVE)

# %% [markdown]
# The organs we care about most are tiny: the prostate fills about a thousandth of a scan. Below, the
# share of pixels per label in the 2D slices of each split, next to the shares in the real 3D scans
# (from the dataset's documentation; the 2D slices cover the central part of the pelvis, so they hold more
# body and less background than the whole volume).

# %%
shares = {f"{split} slices": r["label_shares"] for split, r in report["splits"].items() if r["label_shares"]}
manifest = DATA / "PHANTOM.json"
if manifest.exists():
    shares["phantom 3D volumes"] = json.loads(manifest.read_text())["label_shares_3d"]
shares["real 3D scans"] = REAL_LABEL_SHARES
viz.label_shares(shares, FIGS / "01_label_shares.png");
for name in data.LABELS:
    print(f"{name:<10}" + "".join(f"{s[name]:>10.3%}" for s in shares.values()))
if "train slices" in shares:
    slices, volumes = shares["train slices"], shares.get("phantom 3D volumes", REAL_LABEL_SHARES)
    claims(0.0005 < volumes["prostate"] < 0.002, "the prostate fills about a thousandth of a scan",
           f"{volumes['prostate']:.3%} of the 3D volumes")
    claims(slices["background"] < volumes["background"] and slices["body"] > volumes["body"],
           "the 2D slices hold more body and less background than the whole volume",
           f"background {slices['background']:.1%} against {volumes['background']:.1%}")
    claims(0.40 < slices["background"] < 0.46, "the slices are about 43 % background (question 2)",
           f"{slices['background']:.1%}")

# %% [markdown]
# ## 8. Batches for PyTorch
#
# `SliceDataset` serves `(1, H, W)` float tensors (and masks if asked); `make_loader` shuffles with a seeded
# generator, so a run is reproducible.

# %%
loader = data.make_loader(train, batch_size=8, seed=SEED)
batch = next(iter(loader))
print("batch", tuple(batch.shape), batch.dtype, f"min {batch.min():.2f} max {batch.max():.2f}")
assert batch.shape[1:] == (1, *data.WORK_SHAPE) and 0 <= batch.min() and batch.max() <= 1

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
# **Question 1.** Why would a random slice-level split overestimate test performance? How many test patients
# does the real data set have, and what does that mean for the uncertainty of a test score?
#
# <details><summary>Answer</summary>
#
# The slices of one patient are close relatives: neighbouring slices of a scan are adjacent parallel planes
# through the same organs, and the weekly scans repeat the same anatomy. With a random split by slice almost every
# test slice would have a neighbour or a twin from another week in the training split, so the test score
# would measure how well the model reproduces anatomy it has already seen, not how it does on a new patient,
# which is the only situation that matters in use.
#
# The real data set has 3 test patients (cases 040 to 042); the hidden cell prints the patients per split of
# the real data and of this data set. The test split's 540 real slices are not 540 independent samples: the
# unit of independent evidence is closer to the patient. If patient means of a score scatter with standard
# deviation $s_p$, the mean over $n$ patients has a standard error of about $s_p/\sqrt{n}$, and with $n = 3$
# that is more than half of $s_p$. Two models whose test SSIM differ by less than that cannot be told apart;
# report scores per patient or per scan with their spread (notebook 05 shows them per scan).
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
from vqvae_lib.phantom import MISSING_CASE, SPLIT_CASES

print("real data set, patients per split:",
      {split: len([c for c in ids if c != MISSING_CASE]) for split, ids in SPLIT_CASES.items()})
print("this data set, patients per split:", {split: len(c) for split, c in cases.items()})

# %% [markdown]
# **Question 2.** Mean SSIM on these slices counts the black background. What SSIM would a model that outputs
# pure black get on a slice that is about 43 % background, the slices' share in the table above (60 % is the
# share of the 3D volumes)? (Try it with `skimage.metrics.structural_similarity`.)
#
# <details><summary>Answer</summary>
#
# SSIM compares every 7 x 7 window of the slice $x$ with the same window of the output $y$ and averages the
# map:
#
# $$\mathrm{SSIM}(x, y) = \frac{(2\mu_x\mu_y + C_1)(2\sigma_{xy} + C_2)}{(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)},
# \qquad C_1 = (0.01 L)^2,\ C_2 = (0.03 L)^2,$$
#
# with local means $\mu$, variances $\sigma^2$ and covariance $\sigma_{xy}$, and the data range $L = 1$. For a
# black output $\mu_y = \sigma_y = \sigma_{xy} = 0$, so each window scores
# $\frac{C_1}{\mu_x^2 + C_1}\cdot\frac{C_2}{\sigma_x^2 + C_2}$: exactly 1 where the slice's window is exactly 0, and
# almost 0 on the body, where $\mu_x \gg 0.01$. The naive answer is therefore the share of windows that lie
# wholly in the background, a little below the 43 % pixel share, because windows that touch the body count
# as body.
#
# But the background is not exactly 0: like a real MRI, the phantom has a noise floor, and a background mean
# $\mu_x$ above $0.01$ already makes $\mu_x^2$ larger than $C_1 = 10^{-4}$, and the window's score drops below
# one half. The hidden cell prints the
# background share, the mean background intensity, and the SSIM of a black output against a few training
# slices, once with their background set to exactly 0 (the naive case) and once as they are. The lesson for
# later notebooks: an SSIM averaged over the whole slice is partly a score of the background, so we also
# measure it inside the body (notebook 05).
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
from skimage.metrics import structural_similarity

sample = np.linspace(0, len(train.images) - 1, 8).astype(int)
images, backgrounds = np.asarray(train.images)[sample], np.asarray(train.masks)[sample] == 0
zeroed = np.where(backgrounds, 0.0, images).astype(np.float32)
black = np.zeros_like(images[0])
print(f"{len(sample)} training slices: background share {backgrounds.mean():.1%}, "
      f"mean background intensity {images[backgrounds].mean():.4f}")
print(f"SSIM of a black output, background set to 0: "
      f"{np.mean([structural_similarity(x, black, data_range=1.0) for x in zeroed]):.3f}")
print(f"SSIM of a black output, slices as they are: "
      f"{np.mean([structural_similarity(x, black, data_range=1.0) for x in images]):.3f}")

# %% [markdown]
# **Question 3.** Cropping, padding or resizing the 256 x 144 slices: which one changes what a pixel means, and
# which one changes what the model sees at the edges?
#
# <details><summary>Answer</summary>
#
# Resizing changes what a pixel means: it resamples 144 columns into 128, so in those 60 slices a pixel spans
# $144/128 = 1.125$ times as much of the body axis as in every other slice, and the anatomy is squeezed by
# 11 %. The model would see organs of a size that no other scan has, and no crop or pad can tell it so.
#
# Cropping and padding keep the pixel size and change the edges instead. Cropping cuts the 8 outermost
# columns from each side of those 60 slices: that anatomy is lost, but every pixel the model sees is a real
# one. Padding to a larger working shape adds columns of zeros, and with `shape=(256, 144)` it does so to
# every *other* slice: the model sees an artificial black band at both edges of almost all of its inputs,
# and must spend capacity to reproduce it. The figure of section 4 shows crop, resize and pad side by side.
#
# </details>

# %% [markdown]
# **Question 4.** Percentile normalisation is per slice. What information does it throw away, and when could
# that matter for a generative model?
#
# <details><summary>Answer</summary>
#
# It throws away the factor $s = P_{99.5}(x)$ of each slice: how bright the slice is relative to its
# neighbours in the same scan, to the same patient's other weeks and to other patients. Inside a slice the
# contrast survives (all pixels are divided by one number), except above the percentile: the brightest
# pixels are clipped to 1 and lose their differences. The hidden cell prints how much $s$ varies within one
# scan and over the training split, and the share of pixels clipped to 1.
#
# A model of single slices never needs $s$. It matters as soon as the model should say something across
# slices: stacking generated slices into a volume gives brightness jumps between neighbours that a real scan
# does not have; the same tissue takes different values in two slices when one of them holds bright urine,
# which raises $s$ and so darkens everything else in it; a real change in overall signal (a failing coil) is
# normalised away and can be neither detected nor generated; and mapping a generated slice back
# to scanner units needs an $s$ the model never produced. Keeping $s$ as an extra input or output, or
# normalising per scan instead of per slice, keeps that information.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
scan_scales = train.scales[scan_rows]
print(f"scale s within case {train.cases[0]:03d} week {train.weeks[0]}: {scan_scales.min():.0f}..{scan_scales.max():.0f} "
      f"(x{scan_scales.max() / scan_scales.min():.2f}); over the training split: "
      f"{train.scales.min():.0f}..{train.scales.max():.0f} (x{train.scales.max() / train.scales.min():.2f})")
print(f"pixels clipped to 1: {np.mean([(np.asarray(train.images[i]) >= 1).mean() for i in scan_rows]):.2%} per slice")
