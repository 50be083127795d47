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
# Before we build a VQ-VAE we look hard at the data it will compress. By the end of this notebook you will
# know
#
# - how the HipMRI 2D slices are laid out on disk, and how the splits are made (by patient);
# - what one slice is: a NIfTI file holding a 256 x 128 array of scanner intensities;
# - why a few slices are 256 x 144, and what the loader does with them;
# - how we map scanner intensities to the [0, 1] range the model sees;
# - what the anatomy and its six labels look like, and how rare the small organs are.
#
# **Prerequisites:** Python and NumPy. No deep learning yet.
#
# **Data:** by default the synthetic phantom in `data/phantom` (made by `make figures`, or by
# `python -m vqvae_lib phantom --out data/phantom`). Point `DATA_DIR` at the real
# `HipMRI_study_keras_slices_data` folder and every cell runs unchanged.
#
# **Expected run time:** about 30 s on a 2-core CPU for the default phantom (the first run decodes the
# slices and caches them); no GPU is used.
#
# **What the phantom is, and what it is not.** The phantom copies what a loader and a model meet in the
# real slices: the layout and file names, the patient-level splits, 256 x 128 float32 slices in scanner units
# (one scan at 256 x 144, some files with a singleton axis), sagittal reformats of 3D pelvis volumes with body,
# fat, muscles, bones, bladder, prostate and rectum in about the real label shares, weekly changes of bladder
# and rectum, speckled texture, partial-volume blur, a smooth coil bias field and Rician noise. It does not
# have real anatomy's variety and detail (every organ is a smooth parametric shape, there are no tumours,
# implants, fiducial markers or catheters, no zonal anatomy beyond a brighter peripheral zone), nor the
# artefacts of real scans (motion, ghosting, wrap-around, chemical shift, intensity steps between
# acquisitions), nor the real data's numbers: the default phantom has 4 training patients, the real data 32.
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
from vqvae_lib import data, viz
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
# - `resize`: resample to 256 x 128, which squeezes the anatomy by 11 % along one axis;
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
# [0, 1] (`normalization="percentile"`). Per slice, because the overall brightness changes from scan to
# scan with the coil and the patient; by a high percentile rather than the maximum, because a few very
# bright voxels (urine, fat near the coil) would otherwise squash the rest of the slice into a narrow dark
# range. Intensities are non-negative, so the black background stays at 0. The factor is kept
# (`SplitData.scales`) to map back to scanner units.
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
# 1. Why would a random slice-level split overestimate test performance? How many test patients does the
#    real data set have, and what does that mean for the uncertainty of a test score?
# 2. Mean SSIM on these slices counts the black background. What SSIM would a model that outputs pure
#    black get on a slice that is about 43 % background, the slices' share in the table above (60 % is the
#    share of the 3D volumes)? (Try it with `skimage.metrics.structural_similarity`.)
# 3. Cropping, padding or resizing the 256 x 144 slices: which one changes what a pixel means, and which
#    one changes what the model sees at the edges?
# 4. Percentile normalisation is per slice. What information does it throw away, and when could that
#    matter for a generative model?
