"""Load the HipMRI 2D prostate MRI slices: find, check, decode, cache and serve them to PyTorch.

Layout (the download, or the synthetic phantom that writes the same)::

    ROOT/keras_slices_{train,validate,test}/      case_XXX_week_Y_slice_Z.nii.gz  (or .nii, or a .nii folder)
    ROOT/keras_slices_seg_{train,validate,test}/  seg_XXX_week_Y_slice_Z.nii.gz   (optional, labels 0..5)

Decisions a reader should know about:

- **Intensities.** Slices hold non-negative scanner intensities (hundreds, with no fixed range between scans).
  Each slice is scaled to [0, 1] on its own (default "percentile": divide by its 99.5th percentile and clip), so
  every slice uses the full range that SSIM (data range 1) expects, a few hot voxels cannot squash
  the rest of the slice to black, and 0 (background) stays 0. The scale is kept (`SplitData.scales`) so an
  image can be mapped back to scanner units. Negative values (z-scored or bias-corrected data) do not fit this:
  "percentile" clips them to 0 and turns an all-negative slice black. So every slice holding them is reported
  (`SplitData.negative`, one warning, and a problem in `inspect`); signed data should use "minmax", which maps
  each slice's min..max to 0..1, while "none" keeps the values as they are.
- **Shapes.** Most slices are 256x128; the 60 slices of case 019 week 1 are 256x144. Every slice whose shape
  differs from the working shape goes through a policy, is reported (one warning, and `SplitData.reshaped`) and
  never silently mixed. The default "crop" takes 8 columns off each side of the 144-long axis: it loses only the
  edge of the field of view and keeps the pixel spacing, whereas "resize" would stretch the anatomy of those
  slices, and "pad" would change the working size of every other slice instead.
- **Cache.** Decoding 11,460 gzipped NIfTI files takes minutes, so a decoded split is written once to one
  ``.npy`` file per kind (images, masks) plus a JSON sidecar, and later opened as a read-only memory map in well
  under a second. The file name carries a hash of every file's path, size and modification time and of all
  options, so changed data or options give a new cache. Old cache files are left in place (delete the cache
  folder to reclaim the space); note that loading with and without masks caches the images twice. The free
  space is checked and the files' blocks reserved before the decode writes to them, so a full disk gives one
  warning and a split decoded into memory, never a crash (SIGBUS) in the middle of a memory-mapped write; temp
  files of killed builds are removed by the next cached load. The first
  decode runs in worker threads (one per core by default): decompression and most of the array work release
  the GIL, and threads, unlike processes, need no `if __name__ == "__main__"` guard in a user's script.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, NamedTuple

import nibabel as nib
import numpy as np
import torch
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from skimage.transform import resize
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .fileio import remove_stale_temps, save_json, temp_name

log = logging.getLogger(__name__)

SPLITS = ("train", "validate", "test")
LABELS = ("background", "body", "bone", "bladder", "rectum", "prostate")
WORK_SHAPE = (256, 128)
SHAPE_POLICIES = ("crop", "pad", "resize", "error")
NORMALIZATIONS = ("percentile", "minmax", "none")
ON_ERROR = ("raise", "skip")
CACHE_VERSION = "hipmri-slices-cache-v2"
MAX_SLICE_SIDE = 4096  # read_nifti refuses larger headers before reading (real slices are 256x128 or 256x144)
PERCENTILE_SAMPLE_STEP = 16  # inspect() estimates percentiles from every 16th voxel of each slice

_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)
_PAST = {"crop": "cropped", "pad": "padded", "resize": "resized"}
_SHOW = 5  # names shown in warnings and problem lists
_NO_FALLOCATE = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)  # file systems without posix_fallocate
_ZERO_CHUNK = 1 << 20  # bytes written at a time where blocks are reserved by writing zeros
_SIDECAR_BYTES_PER_SLICE = 128  # estimate of the JSON sidecar's size
_SIGNED_HINT = "use normalization='minmax' (CLI: --normalization minmax) for signed data"
_NEGATIVE_HANDLING = {
    "percentile": f"normalization='percentile' clips them to 0: {_SIGNED_HINT}",
    "minmax": "normalization='minmax' maps each slice's min..max to 0..1 (the policy for signed data)",
    "none": "normalization='none' keeps them",
}


class DataError(ValueError):
    """A problem with the data on disk; the message names the file, folder or value at fault."""


@dataclass(frozen=True, slots=True)
class SliceFile:
    """One slice file. `path` may be a ``.nii.gz`` or ``.nii`` file or a ``.nii`` folder holding one."""

    path: Path
    case: int
    week: int
    index: int

    @property
    def name(self) -> str:
        """Canonical name without extension, always in the ``case_`` form, e.g. "case_019_week_1_slice_7"."""
        return f"case_{self.case:03d}_week_{self.week}_slice_{self.index}"

    @property
    def scan(self) -> tuple[int, int]:
        """(case, week): the 3D scan this slice comes from."""
        return self.case, self.week


@dataclass
class SplitData:
    """A decoded split.

    images: (N, H, W) float32 in [0, 1] (a read-only np.memmap when cached and memory-mapped; unscaled with
        normalization="none")
    masks: (N, H, W) uint8 labels 0..5, or None
    scales: (N,) float32, per-slice normalisation scale (image * scale gives scanner units for "percentile")
    reshaped: (name, original shape, action such as "crop 256x144 -> 256x128") per slice that was fitted
    skipped: (name, reason) per file left out with on_error="skip"
    negative: (name, number of negative voxels, min value) per slice whose file holds negative intensities
    """

    split: str
    files: list[SliceFile]
    images: np.ndarray
    masks: np.ndarray | None
    scales: np.ndarray
    reshaped: list[tuple[str, tuple[int, int], str]]
    skipped: list[tuple[str, str]]
    negative: list[tuple[str, int, float]]
    from_cache: bool

    def __len__(self) -> int:
        return len(self.files)

    @property
    def cases(self) -> np.ndarray:
        """(N,) int64 case ids."""
        return np.array([f.case for f in self.files], dtype=np.int64)

    @property
    def weeks(self) -> np.ndarray:
        """(N,) int64 weeks."""
        return np.array([f.week for f in self.files], dtype=np.int64)

    @property
    def indices(self) -> np.ndarray:
        """(N,) int64 slice indices within their scan."""
        return np.array([f.index for f in self.files], dtype=np.int64)


# ---------------------------------------------------------------------------------------------- finding files


def split_folders(split: str) -> tuple[str, str]:
    """Names of a split's image and mask folders, e.g. ("keras_slices_train", "keras_slices_seg_train")."""
    return f"keras_slices_{split}", f"keras_slices_seg_{split}"


def _split_dirs_in(folder: Path) -> dict[str, tuple[Path, Path | None]]:
    dirs = {}
    for split in SPLITS:
        image_dir, seg_dir = (folder / name for name in split_folders(split))
        if image_dir.is_dir():
            dirs[split] = (image_dir, seg_dir if seg_dir.is_dir() else None)
    return dirs


def _listing(folder: Path, limit: int = 20) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not entries:
        return "nothing (the folder is empty)"
    more = f", ... ({len(entries) - limit} more)" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def find_split_dirs(root: str | Path) -> dict[str, tuple[Path, Path | None]]:
    """Map each present split to (image folder, seg folder or None).

    `root` holds the keras_slices_* folders, or holds exactly one folder one level down that does (such as the
    download's ``HipMRI_study_keras_slices_data/``).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data folder {root} is not a folder")
    dirs = _split_dirs_in(root)
    if dirs:
        return dirs
    nested = [d for d in sorted(root.iterdir()) if d.is_dir() and _split_dirs_in(d)]
    if len(nested) == 1:
        return _split_dirs_in(nested[0])
    if nested:
        raise DataError(f"{root} holds several data folders ({', '.join(d.name for d in nested)}); pass one of them")
    hint = " (this looks like a split folder: pass its parent)" if root.name.startswith("keras_slices_") else ""
    raise DataError(
        f"no keras_slices_{{train,validate,test}} folders in {root}{hint}; it holds: {_listing(root)}. "
        "Expected keras_slices_train/ (and _validate/, _test/) with case_XXX_week_Y_slice_Z.nii.gz files, "
        "there or in one folder one level down"
    )


def _data_root(dirs: dict[str, tuple[Path, Path | None]]) -> Path:
    return next(iter(dirs.values()))[0].parent


def _name_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(prefix)}_(\d+)_week_(\d+)_slice_(\d+)\.nii(\.gz)?")


def _scan_folder(folder: Path, prefix: str) -> tuple[list[SliceFile], list[str], list[str]]:
    """Return (slice files sorted by case/week/index, names that do not match, duplicate names left out)."""
    pattern = _name_pattern(prefix)
    found: dict[tuple[int, int, int], list[tuple[int, Path]]] = defaultdict(list)
    unmatched = []
    with os.scandir(folder) as scan:  # DirEntry.is_dir() needs no extra stat: fast on 11,460 files
        entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        is_dir, gz = entry.is_dir(), match is not None and match.group(4) is not None
        if match is None or (is_dir and gz) or not (is_dir or entry.is_file()):
            unmatched.append(entry.name)
            continue
        # Preference when one slice appears twice: the downloaded .nii.gz, then a .nii file, then a .nii folder.
        rank = 0 if gz else (2 if is_dir else 1)
        found[int(match[1]), int(match[2]), int(match[3])].append((rank, Path(entry.path)))
    files, duplicates = [], []
    for (case, week, index), candidates in sorted(found.items()):
        candidates.sort()
        files.append(SliceFile(candidates[0][1], case, week, index))
        duplicates += [path.name for _, path in candidates[1:]]
    return files, unmatched, duplicates


def _names(names: list[str]) -> str:
    more = f", ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def list_slices(folder: str | Path, prefix: str = "case") -> list[SliceFile]:
    """List the ``{prefix}_XXX_week_Y_slice_Z`` files (.nii.gz, .nii or .nii folder), sorted by case/week/slice.

    Other entries are ignored with a warning; a slice present twice keeps one file (also with a warning).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"slice folder {folder} does not exist")
    files, unmatched, duplicates = _scan_folder(folder, prefix)
    if unmatched:
        log.warning("ignored %d entries in %s that are not %s_XXX_week_Y_slice_Z.nii[.gz]: %s",
                    len(unmatched), folder, prefix, _names(unmatched))
    if duplicates:
        log.warning("ignored %d duplicate slice files in %s: %s", len(duplicates), folder, _names(duplicates))
    if not files:
        raise DataError(f"no {prefix}_XXX_week_Y_slice_Z .nii.gz or .nii files in {folder}")
    return files


def _split_overlaps(cases: dict[str, Iterable[int]]) -> list[str]:
    problems = []
    names = list(cases)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for case in sorted(set(cases[a]) & set(cases[b])):
                problems.append(f"case {case:03d} appears in {a} and {b}: splits must be by patient")
    return problems


def check_patient_splits(root: str | Path) -> dict[str, list[int]]:
    """Return split -> sorted case ids; raise DataError if a patient (case) is in two splits."""
    pattern = _name_pattern("case")
    cases = {split: sorted({int(m[1]) for m in map(pattern.fullmatch, os.listdir(image_dir)) if m})
             for split, (image_dir, _) in find_split_dirs(root).items()}
    problems = _split_overlaps(cases)
    if problems:
        raise DataError("; ".join(problems))
    return cases


# ---------------------------------------------------------------------------------------------- one slice


def _nifti_file(path: Path) -> Path:
    """Resolve a ``.nii`` folder (an unpacked ``.nii.gz``) to the single ``.nii`` file inside it."""
    if not path.is_dir():
        return path
    inner = sorted(p for p in path.glob("*.nii") if p.is_file())
    if len(inner) != 1:
        raise DataError(f"folder {path} should hold exactly one .nii file, found {len(inner)}")
    return inner[0]


def _shape_str(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _without_trailing_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _check_header(path: Path, image: nib.spatialimages.SpatialImage) -> None:
    """Refuse, before any data is read, a header that declares something other than a 2D slice of real numbers
    of 1..MAX_SLICE_SIDE voxels a side, or (uncompressed .nii) more data than the file holds."""
    shape, dtype = tuple(int(s) for s in image.shape), np.dtype(image.get_data_dtype())
    squeezed = _without_trailing_ones(shape)
    if len(squeezed) != 2:
        raise DataError(f"{path} holds an array of shape {_shape_str(squeezed)}, expected a 2D slice")
    declared = f"{_shape_str(shape)} {dtype}"
    if not 1 <= min(squeezed) <= max(squeezed) <= MAX_SLICE_SIDE:
        raise DataError(f"{path}: its header declares a {declared} array, not a slice of 1..{MAX_SLICE_SIDE} "
                        "voxels a side (a damaged or foreign file)")
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise DataError(f"{path}: its header declares a {declared} array, expected real numbers (not complex "
                        "or RGB values)")
    if path.suffix == ".nii":
        need = int(image.dataobj.offset) + math.prod(shape) * dtype.itemsize  # img.header has the offset reset
        size = path.stat().st_size
        if size < need:
            raise DataError(f"cannot read NIfTI file {path}: it holds {size} bytes but its header declares a "
                            f"{declared} array that needs {need} bytes")


def read_nifti(path: str | Path, kind: str = "image") -> np.ndarray:
    """Read one 2D slice: kind "image" -> (H, W) float32, kind "mask" -> (H, W) uint8 labels 0..5.

    Trailing singleton axes are dropped (256x128x1 -> 256x128). Unreadable files, other shapes, NaN/inf images
    and masks with values other than the integers 0..5 raise DataError naming the file. The header is checked
    before any data is read (see `_check_header`), so a damaged header cannot make this allocate gigabytes.
    """
    if kind not in ("image", "mask"):
        raise ValueError(f"kind must be 'image' or 'mask', not {kind!r}")
    path = _nifti_file(Path(path))
    try:
        image = nib.load(path, mmap=False)  # reads the header only: nibabel loads the data lazily
    except _READ_ERRORS as e:
        raise DataError(f"cannot read NIfTI file {path}: {e}") from e
    _check_header(path, image)
    try:
        data = np.asanyarray(image.dataobj)  # the full read (mmap=False: no map of the file left open)
    except _READ_ERRORS as e:
        raise DataError(f"cannot read NIfTI file {path}: {e}") from e
    data = data.reshape(data.shape[:2])  # _check_header made sure the other axes are 1
    if kind == "image":
        bad = np.count_nonzero(~np.isfinite(data))
        if bad:
            raise DataError(f"image {path} has {bad} NaN/inf values")
        return np.ascontiguousarray(data, dtype=np.float32)
    valid = np.isin(data, np.arange(len(LABELS)))
    if not valid.all():
        values = np.unique(data[~valid])
        raise DataError(f"mask {path} has values other than the labels 0..{len(LABELS) - 1}: "
                        f"{values[:10].tolist()}")
    return np.ascontiguousarray(data, dtype=np.uint8)


def fit_shape(array: np.ndarray, target: tuple[int, int], policy: str, *, is_mask: bool = False) -> np.ndarray:
    """Bring array (H, W) to `target` (H', W') by `policy`; arrays already at `target` are returned unchanged.

    crop: centre crop (each axis must be >= target); pad: symmetric zero pad (each axis <= target);
    resize: bilinear with anti-aliasing for images, nearest neighbour for masks (labels stay labels), dtype kept;
    error: raise DataError.
    """
    if policy not in SHAPE_POLICIES:
        raise ValueError(f"shape policy must be one of {SHAPE_POLICIES}, not {policy!r}")
    target = (int(target[0]), int(target[1]))
    if array.shape == target:
        return array
    have, want = _shape_str(array.shape), _shape_str(target)
    if array.ndim != 2:
        raise DataError(f"cannot fit an array of shape {have} to {want}: it is not 2D")
    if policy == "error":
        raise DataError(f"slice shape {have} differs from the working shape {want} (shape_policy='error'); "
                        "use shape_policy='crop', 'pad' or 'resize' (CLI: --shape-policy crop)")
    if policy == "crop":
        if any(s < t for s, t in zip(array.shape, target)):
            raise DataError(f"cannot crop {have} to {want}: the slice is smaller; use shape_policy='pad' or "
                            "'resize' (CLI: --shape-policy pad)")
        top, left = ((s - t) // 2 for s, t in zip(array.shape, target))
        return array[top:top + target[0], left:left + target[1]]
    if policy == "pad":
        if any(s > t for s, t in zip(array.shape, target)):
            raise DataError(f"cannot pad {have} to {want}: the slice is larger; use shape_policy='crop' or "
                            "'resize' (CLI: --shape-policy crop)")
        return np.pad(array, [((t - s) // 2, t - s - (t - s) // 2) for s, t in zip(array.shape, target)])
    if is_mask:
        out = resize(array, target, order=0, anti_aliasing=False, preserve_range=True)
    else:
        out = resize(array, target, order=1, anti_aliasing=True, preserve_range=True)
    return out.astype(array.dtype)


def normalize(image: np.ndarray, method: str = "percentile") -> tuple[np.ndarray, float]:
    """Scale one slice (H, W) of scanner intensities to [0, 1]; return (float32 image, scale).

    percentile: image / p99.5, clipped to [0, 1] (negative values become 0, an all-negative slice all 0);
    minmax: (image - min) / (max - min), scale = max - min, the policy for signed data; none: unchanged, scale 1.
    A slice without a positive scale (all zero or all negative for percentile, constant for minmax, empty)
    gives zeros and scale 1.
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, not {method!r}")
    image = np.asarray(image, dtype=np.float32)
    if method == "none":
        return image, 1.0
    if image.size == 0:
        return np.zeros_like(image), 1.0
    if method == "percentile":
        scale = float(np.percentile(image, 99.5))
        offset = 0.0
    else:
        offset = float(image.min())
        scale = float(image.max()) - offset
    if not scale > 0:
        return np.zeros_like(image), 1.0
    out = (image - np.float32(offset)) / np.float32(scale)
    return np.clip(out, 0.0, 1.0, out=out), scale


# ---------------------------------------------------------------------------------------------- whole split


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, not {value!r}")


def _mask_path(f: SliceFile, seg: dict[tuple[int, int, int], SliceFile] | None, seg_dir: Path | None) -> Path | None:
    """The mask file of image f: its entry in seg, else the path it should have (decoding then reports it
    missing); None when masks are not loaded (seg is None)."""
    if seg is None:
        return None
    found = seg.get((f.case, f.week, f.index))
    return found.path if found is not None else seg_dir / f"seg_{f.case:03d}_week_{f.week}_slice_{f.index}.nii.gz"


class _Decoded(NamedTuple):
    """One decoded slice; negative is (negative voxels, min) when the file holds negative intensities."""

    image: np.ndarray  # (H, W) float32
    mask: np.ndarray | None  # (H, W) uint8
    scale: float
    original: tuple[int, int]  # the file's (H, W)
    negative: tuple[int, float] | None


def _negative(image: np.ndarray) -> tuple[int, float] | None:
    """(number of negative voxels, min) of image (H, W), or None when it has none."""
    low = float(image.min())
    return (int(np.count_nonzero(image < 0)), low) if low < 0 else None


def _decode_one(f: SliceFile, mask_path: Path | None, shape: tuple[int, int], policy: str,
                normalization: str) -> _Decoded:
    """Decode image f and, when given, its mask at mask_path (DataError if that file does not exist)."""
    image = read_nifti(f.path, "image")
    negative = _negative(image)
    mask = None
    if mask_path is not None:
        if not mask_path.exists():
            raise DataError(f"image {f.path} has no mask: expected {mask_path}")
        mask = read_nifti(mask_path, "mask")
        if mask.shape != image.shape:
            raise DataError(f"mask {mask_path} is {_shape_str(mask.shape)} but its image {f.path} is "
                            f"{_shape_str(image.shape)}")
    original = image.shape
    if original != shape:
        try:
            image = fit_shape(image, shape, policy)
            if mask is not None:
                mask = fit_shape(mask, shape, policy, is_mask=True)
        except DataError as e:
            raise DataError(f"{f.path}: {e}") from e
    image, scale = normalize(image, normalization)
    return _Decoded(image, mask, scale, original, negative)


def _decode_or_error(job: tuple[SliceFile, Path | None], shape: tuple[int, int], policy: str, normalization: str
                     ) -> _Decoded | str:
    """`_decode_one` of job = (image file, mask path or None), a DataError returned as its message."""
    try:
        return _decode_one(*job, shape, policy, normalization)
    except DataError as e:
        return str(e)


def decode_workers() -> int:
    """The default number of decoding threads: one per core, at most 8."""
    return min(os.cpu_count() or 1, 8)


def _decode_all(jobs: list[tuple[SliceFile, Path | None]], workers: int, shape: tuple[int, int], policy: str,
                normalization: str) -> Iterator[_Decoded | str]:
    """`_decode_or_error` of every job, in order, in `workers` threads (1: in this one)."""
    decode = partial(_decode_or_error, shape=shape, policy=policy, normalization=normalization)
    if workers <= 1:
        yield from map(decode, jobs)
        return
    pool = ThreadPoolExecutor(workers)
    try:
        yield from pool.map(decode, jobs)
    finally:  # also when the caller stops early (a bad file): drop the files not yet decoded
        pool.shutdown(cancel_futures=True)


def _negative_text(negative: list[tuple[str, int, float]]) -> str:
    """E.g. "2 slices hold negative intensities (min -3.1): case_001_week_0_slice_0, ..."."""
    low = min(value for _, _, value in negative)
    return (f"{_plural(len(negative), 'slice')} {'holds' if len(negative) == 1 else 'hold'} negative intensities "
            f"(min {low:.4g}): {_names([name for name, _, _ in negative])}")


def _log_summary(data: SplitData, normalization: str) -> None:
    if data.reshaped:
        groups: dict[tuple[tuple[int, int], str], list[str]] = defaultdict(list)
        for name, original, action in data.reshaped:
            groups[original, action.split()[0]].append(name)
        log.warning("%s: %s", data.split, "; ".join(
            f"{len(names)} slices were {_shape_str(original)}; {_PAST[policy]} to "
            f"{_shape_str(data.images.shape[1:])}: {_names(names)}"
            for (original, policy), names in groups.items()))
    if data.skipped:
        log.warning("%s: skipped %d bad files: %s", data.split, len(data.skipped),
                    _names([name for name, _ in data.skipped]))
    if data.negative:
        log.warning("%s: %s; %s", data.split, _negative_text(data.negative), _NEGATIVE_HANDLING[normalization])


def file_stats(path: str | Path, rel: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of a slice file, or of every file in a .nii folder."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return [(rel, st.st_size, st.st_mtime_ns)]
    return [fp for name in sorted(os.listdir(path)) for fp in file_stats(os.path.join(path, name), f"{rel}/{name}")]


def _cache_key(split: str, files: list[SliceFile], seg_files: Iterable[SliceFile], options: dict[str, Any]) -> str:
    def fingerprints(slices: Iterable[SliceFile]) -> list[tuple[str, int, int]]:
        return [fp for f in slices for fp in file_stats(f.path, f"{f.path.parent.name}/{f.path.name}")]

    payload = {"version": CACHE_VERSION, "split": split, "options": options,
               "images": fingerprints(files), "masks": fingerprints(seg_files)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _cache_folder(data_root: Path, cache_dir: str | Path | None) -> Path:
    candidates = [Path(cache_dir).expanduser()] if cache_dir is not None else [
        data_root / ".cache", Path.home() / ".cache" / "hipmri-vqvae"]
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise DataError(f"no writable cache folder among {', '.join(map(str, candidates))}; "
                    "pass cache=False (CLI: --no-cache)")


def _cache_paths(stem: Path) -> tuple[Path, Path, Path]:
    return (stem.with_name(stem.name + "-images.npy"), stem.with_name(stem.name + "-masks.npy"),
            stem.with_name(stem.name + ".json"))


def _load_cache(stem: Path, key: str, split: str, files: list[SliceFile], masks: bool,
                mmap_mode: str | None) -> SplitData | None:
    images_path, masks_path, meta_path = _cache_paths(stem)
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta["key"] != key:
            return None
        by_name = {f.name: f for f in files}
        kept = [by_name[name] for name in meta["names"]]
        images = np.load(images_path, mmap_mode=mmap_mode)
        mask_array = np.load(masks_path, mmap_mode=mmap_mode) if masks else None
        if images.shape[0] != len(kept) or (mask_array is not None and mask_array.shape != images.shape):
            raise ValueError("array and file list sizes differ")
        return SplitData(split, kept, images, mask_array, np.asarray(meta["scales"], dtype=np.float32),
                         [(name, tuple(original), action) for name, original, action in meta["reshaped"]],
                         [tuple(item) for item in meta["skipped"]],
                         [(name, int(count), float(low)) for name, count, low in meta["negative"]], from_cache=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unusable cache %s (%s); rebuilding", meta_path, e)
        return None


def _shrink(array: np.ndarray, n: int, allocate: Callable[..., np.ndarray]) -> np.ndarray:
    """First n rows of a (rows, H, W) array, copied chunk-wise into a new `allocate`d array."""
    if n == len(array):
        return array
    out = allocate((n, *array.shape[1:]), array.dtype)
    for start in range(0, n, 1024):
        out[start:start + 1024] = array[start:min(start + 1024, n)]
    return out


@dataclass(frozen=True)
class _Options:
    """What a decoded split depends on besides its files; all of it goes into the cache key."""

    shape: tuple[int, int]
    shape_policy: str
    normalization: str
    masks: bool
    on_error: str


class _CacheTarget(NamedTuple):
    """Where a build writes its cache: the files' common stem, the key stored in the sidecar, and how the
    finished arrays are reopened (np.load's mmap_mode)."""

    stem: Path
    key: str
    mmap_mode: str | None


class _CacheWriteError(Exception):
    """A cache file could not be created, filled, moved or written; the OSError is the __cause__."""


def _size(n: int) -> str:
    """A byte count for people: "236 MB", "12.3 kB", "0 bytes"."""
    for unit, factor in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{round(n / factor, 1):g} {unit}"
    return f"{n} bytes"


def _free_bytes(folder: Path) -> int | None:
    """Bytes free in the file system of folder, or None when that cannot be told."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _cache_bytes(n: int, shape: tuple[int, int], masks: bool) -> int:
    """Disk space a cache of n slices needs: float32 images, uint8 masks, .npy headers and the JSON sidecar."""
    return n * (shape[0] * shape[1] * (4 + masks) + _SIDECAR_BYTES_PER_SLICE) + 3 * 4096


def _warn_no_cache(problem: str, needed: int, free: int | None) -> None:
    space = f"needs {_size(needed)}" + (f", {_size(free)} free" if free is not None else "")
    log.warning("%s (%s): decoding without a cache (pass cache_dir=... or free space; --no-cache skips the cache)",
                problem, space)


def _remove(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _reserve(f: BinaryIO, start: int, length: int) -> None:
    """Allocate bytes start..start + length of the open file f on disk, as zeros.

    Writes through a memory map that find the disk full kill the process (SIGBUS); with the blocks reserved
    first, a full disk raises OSError (ENOSPC) here instead.
    """
    if length <= 0:
        return
    f.flush()
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(f.fileno(), start, length)
            return
        except OSError as e:
            if e.errno not in _NO_FALLOCATE:
                raise
    f.seek(start)
    zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
    for done in range(0, length, len(zeros)):
        f.write(zeros[:length - done])
    f.flush()


def _new_npy(path: Path, shape: tuple[int, ...], dtype: type) -> np.memmap:
    """Create the .npy file `path` for an array of `shape` and `dtype`, its blocks reserved (see `_reserve`), and
    return it memory-mapped for writing."""
    dtype = np.dtype(dtype)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
        _reserve(f, f.tell(), math.prod(shape) * dtype.itemsize)
    return np.lib.format.open_memmap(path, mode="r+")


def _flushed(*arrays: np.memmap | None) -> list[Path]:
    """Flush the memory-mapped .npy arrays given (None: left out); return their files."""
    for array in arrays:
        if array is not None:
            array.flush()
    return [Path(array.filename) for array in arrays if array is not None]


def _publish(sources: list[Path], stem: Path, meta: dict[str, Any]) -> None:
    """Move the filled temp arrays (images[, masks]) to the cache paths of stem, then write the sidecar.

    The sidecar goes last: arrays without it are never used, so an interrupted build cannot look valid. On
    OSError the arrays already moved are removed (they would only take space) and the error is raised.
    """
    images_path, masks_path, meta_path = _cache_paths(stem)
    targets = [images_path, masks_path][:len(sources)]
    try:
        for source, target in zip(sources, targets):
            os.replace(source, target)
        save_json(meta_path, meta)
    except OSError:
        _remove(targets)
        raise


def _decode_into(images: np.ndarray, mask_array: np.ndarray | None, jobs: list[tuple[SliceFile, Path | None]],
                 options: _Options, workers: int, progress: bool, split: str
                 ) -> tuple[list[SliceFile], list[float], list[tuple[str, tuple[int, int], str]],
                            list[tuple[str, str]], list[tuple[str, int, float]]]:
    """Decode jobs (image file, mask path or None) into the first rows of images (N, H, W) [and mask_array
    (N, H, W)], in order; bad files raise DataError, or with on_error="skip" are left out.

    Returns (kept files, scales, reshaped, skipped, negative) as in SplitData.
    """
    kept, scales, reshaped, skipped, negative = [], [], [], [], []
    files = [f for f, _ in jobs]
    with contextlib.closing(_decode_all(jobs, workers, options.shape, options.shape_policy,
                                        options.normalization)) as decoded:
        for f, result in zip(tqdm(files, desc=f"decoding {split}", unit="slice", disable=not progress or None),
                             decoded):
            if isinstance(result, str):
                if options.on_error == "raise":
                    raise DataError(result)
                skipped.append((f.name, result))
                continue
            images[len(kept)] = result.image
            if mask_array is not None:
                mask_array[len(kept)] = result.mask
            if result.original != options.shape:
                reshaped.append((f.name, result.original, f"{options.shape_policy} {_shape_str(result.original)} "
                                                          f"-> {_shape_str(options.shape)}"))
            if result.negative is not None:
                negative.append((f.name, *result.negative))
            scales.append(result.scale)
            kept.append(f)
    if not kept:
        raise DataError(f"all {len(files)} files in {files[0].path.parent} are bad; the first: {skipped[0][1]}")
    return kept, scales, reshaped, skipped, negative


def _build(split: str, jobs: list[tuple[SliceFile, Path | None]], options: _Options, workers: int, progress: bool,
           target: _CacheTarget | None) -> SplitData:
    """Decode jobs into a SplitData: into memory, or with a target into temp .npy files in the cache folder that
    then become the cache (so the split is never in RAM twice).

    Raises _CacheWriteError, leaving no cache file behind, when a cache file cannot be written.
    """
    temps: list[Path] = []

    def allocate(rows_shape: tuple[int, ...], dtype: type) -> np.ndarray:
        if target is None:
            return np.empty(rows_shape, dtype)
        temps.append(temp_name(target.stem))
        try:
            return _new_npy(temps[-1], rows_shape, dtype)
        except OSError as e:
            raise _CacheWriteError(e) from e

    try:
        rows = (len(jobs), *options.shape)
        images = allocate(rows, np.float32)
        mask_array = allocate(rows, np.uint8) if options.masks else None
        kept, scales, reshaped, skipped, negative = _decode_into(images, mask_array, jobs, options, workers,
                                                                 progress, split)
        images = _shrink(images, len(kept), allocate)
        mask_array = _shrink(mask_array, len(kept), allocate) if mask_array is not None else None
        scales = np.asarray(scales, dtype=np.float32)
        if target is not None:
            meta = {"key": target.key, "split": split, "names": [f.name for f in kept], "scales": scales.tolist(),
                    "reshaped": reshaped, "skipped": skipped, "negative": negative}
            try:
                sources = _flushed(images, mask_array)
                images = mask_array = None  # unmap before moving the files (Windows cannot move mapped files)
                _publish(sources, target.stem, meta)
            except OSError as e:
                raise _CacheWriteError(e) from e
            images_path, masks_path, _ = _cache_paths(target.stem)
            images = np.load(images_path, mmap_mode=target.mmap_mode)
            mask_array = np.load(masks_path, mmap_mode=target.mmap_mode) if options.masks else None
    finally:
        _remove(temps)
    return SplitData(split, kept, images, mask_array, scales, reshaped, skipped, negative, from_cache=False)


def _build_cached(split: str, jobs: list[tuple[SliceFile, Path | None]], options: _Options, workers: int,
                  progress: bool, target: _CacheTarget) -> SplitData:
    """`_build` into the cache `target`; into memory, after one warning, when the cache folder has too little
    free space or a cache file cannot be written (such as a disk that fills up during the build)."""
    folder = target.stem.parent
    needed = _cache_bytes(len(jobs), options.shape, options.masks)
    free = _free_bytes(folder)
    if free is not None and free < needed:
        _warn_no_cache(f"not enough space in {folder} for the cache of {split}", needed, free)
    else:
        try:
            return _build(split, jobs, options, workers, progress, target)
        except _CacheWriteError as e:
            _warn_no_cache(f"cannot write the cache of {split} in {folder}: {e.__cause__}", needed,
                           _free_bytes(folder))
    return _build(split, jobs, options, workers, progress, None)


def load_split(root: str | Path, split: str = "train", *, shape: tuple[int, int] = WORK_SHAPE,
               shape_policy: str = "crop", normalization: str = "percentile", masks: bool = False,
               on_error: str = "raise", cache: bool = True, cache_dir: str | Path | None = None,
               progress: bool = True, workers: int | None = None, memory_map: bool = True) -> SplitData:
    """Decode one split into images (N, H, W) float32 [0, 1] (and masks (N, H, W) uint8), using a disk cache.

    shape: working (H, W); slices of another shape go through `shape_policy` (see `fit_shape`) and are reported.
    normalization: see `normalize`. on_error: "raise" on the first bad file, or "skip" it (listed in `skipped`).
    masks: also load the seg masks; every image then needs one. cache_dir: default ROOT/.cache when writable,
    else ~/.cache/hipmri-vqvae. workers: threads that decode the files when there is no cache (default: one
    per core, at most 8; 1: this thread alone). memory_map: open the cache as a read-only memory map (opens at
    once, reads pages as they are used), or with False read it whole into writable arrays (about 10x faster than
    touching every page of the map: use it to load a split that will be read whole, e.g. for training). Also
    checks that no patient is in two splits.
    """
    _check_choice("split", split, SPLITS)
    _check_choice("shape_policy", shape_policy, SHAPE_POLICIES)
    _check_choice("normalization", normalization, NORMALIZATIONS)
    _check_choice("on_error", on_error, ON_ERROR)
    options = _Options((int(shape[0]), int(shape[1])), shape_policy, normalization, masks, on_error)
    dirs = find_split_dirs(root)
    data_root = _data_root(dirs)
    image_name, seg_name = split_folders(split)
    if split not in dirs:
        raise DataError(f"split {split!r}: expected folder {data_root / image_name} does not exist; "
                        f"present splits: {', '.join(dirs)}")
    check_patient_splits(data_root)
    image_dir, seg_dir = dirs[split]
    files = list_slices(image_dir, "case")
    seg = None
    if masks:
        if seg_dir is None:
            raise DataError(f"masks=True but the mask folder {data_root / seg_name} "
                            "does not exist")
        seg = {(f.case, f.week, f.index): f for f in list_slices(seg_dir, "seg")}
    jobs = [(f, _mask_path(f, seg, seg_dir)) for f in files]
    workers = decode_workers() if workers is None else workers

    if not cache:
        data = _build(split, jobs, options, workers, progress, None)
    else:
        folder = _cache_folder(data_root, cache_dir)
        remove_stale_temps(folder)
        key = _cache_key(split, files, seg.values() if seg else [], asdict(options))
        target = _CacheTarget(folder / f"{split}-{key[:16]}", key, "r" if memory_map else None)
        data = _load_cache(target.stem, key, split, files, masks, target.mmap_mode)
        if data is not None:
            log.info("loaded %s (%d slices) from cache %s", split, len(data), folder)
        else:
            data = _build_cached(split, jobs, options, workers, progress, target)
    _log_summary(data, normalization)
    return data


# ---------------------------------------------------------------------------------------------- PyTorch


class SliceDataset(Dataset):
    """Items of a SplitData: image (1, H, W) float32, or (image, mask (H, W) int64) with `with_masks=True`.

    Each item is copied out of the (memory-mapped) arrays. When pickled for spawned DataLoader workers, cached
    arrays travel as their file path and are re-opened as memory maps, not copied.
    """

    def __init__(self, data: SplitData, *, with_masks: bool = False) -> None:
        if with_masks and data.masks is None:
            raise ValueError(f"split {data.split!r} was loaded without masks: use load_split(..., masks=True)")
        self.images = data.images
        self.masks = data.masks if with_masks else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.array(self.images[i], dtype=np.float32))[None]
        if self.masks is None:
            return image
        return image, torch.from_numpy(np.array(self.masks[i], dtype=np.int64))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key, array in state.items():
            # Only a C-contiguous view of the whole file's shape is the whole file (not a slice of it).
            if (isinstance(array, np.memmap) and array.filename and array.flags.c_contiguous
                    and np.load(array.filename, mmap_mode="r").shape == array.shape):
                state[key] = Path(array.filename)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({key: np.load(value, mmap_mode="r") if isinstance(value, Path) else value
                              for key, value in state.items()})


def make_loader(data: SplitData, batch_size: int = 32, *, shuffle: bool = True, seed: int = 0,
                with_masks: bool = False, num_workers: int = 0) -> DataLoader:
    """DataLoader over `SliceDataset(data)`; batches (B, 1, H, W) [and (B, H, W)], shuffled reproducibly by seed."""
    return DataLoader(SliceDataset(data, with_masks=with_masks), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed), num_workers=num_workers)


# ---------------------------------------------------------------------------------------------- inspection


def _inspect_split(image_dir: Path, seg_dir: Path | None, split: str, progress: bool) -> dict[str, Any]:
    images, unmatched, duplicates = _scan_folder(image_dir, "case")
    problems = []
    if not images:
        problems.append(f"no case_XXX_week_Y_slice_Z .nii.gz or .nii files in {image_dir}")
    if unmatched:
        problems.append(f"{len(unmatched)} entries in {image_dir.name} do not match "
                        f"case_XXX_week_Y_slice_Z.nii[.gz]: {_names(unmatched)}")
    if duplicates:
        problems.append(f"{len(duplicates)} duplicate slice files in {image_dir.name}: {_names(duplicates)}")
    seg: dict[tuple[int, int, int], SliceFile] = {}
    if seg_dir is not None:
        seg_files, unmatched, duplicates = _scan_folder(seg_dir, "seg")
        seg = {(f.case, f.week, f.index): f for f in seg_files}
        if unmatched:
            problems.append(f"{len(unmatched)} entries in {seg_dir.name} do not match "
                            f"seg_XXX_week_Y_slice_Z.nii[.gz]: {_names(unmatched)}")
        if duplicates:
            problems.append(f"{len(duplicates)} duplicate mask files in {seg_dir.name}: {_names(duplicates)}")
        image_keys = {(f.case, f.week, f.index) for f in images}
        no_mask = [f.name for f in images if (f.case, f.week, f.index) not in seg]
        no_image = [f.path.name for key, f in seg.items() if key not in image_keys]
        if no_mask:
            problems.append(f"{len(no_mask)} images without a mask in {seg_dir.name}: {_names(no_mask)}")
        if no_image:
            problems.append(f"{len(no_image)} masks without an image in {image_dir.name}: {_names(no_image)}")

    shapes: Counter[str] = Counter()
    count, mean, m2, low, high = 0, 0.0, 0.0, np.inf, -np.inf
    samples = []
    image_shapes = {}
    negative = []
    for f in tqdm(images, desc=f"inspecting {split} images", unit="slice", disable=not progress or None):
        try:
            x = read_nifti(f.path, "image")
        except DataError as e:
            problems.append(str(e))
            continue
        image_shapes[f.case, f.week, f.index] = x.shape
        shapes[_shape_str(x.shape)] += 1
        # Chan et al.'s pairwise update keeps mean and variance exact and stable over millions of voxels.
        n, x_mean = x.size, float(x.mean(dtype=np.float64))
        x_m2 = float(((x - x_mean) ** 2).sum(dtype=np.float64))
        delta, total = x_mean - mean, count + n
        mean, m2, count = mean + delta * n / total, m2 + x_m2 + delta ** 2 * count * n / total, total
        low, high = min(low, float(x.min())), max(high, float(x.max()))
        samples.append(x.ravel()[::PERCENTILE_SAMPLE_STEP])
        found = _negative(x)
        if found is not None:
            negative.append((f.name, *found))
    if negative:
        problems.append(f"{_negative_text(negative)}; the default {_NEGATIVE_HANDLING['percentile']}")
    intensity = None
    if count:
        p1, p50, p99 = np.percentile(np.concatenate(samples), [1, 50, 99]).tolist()
        intensity = {"min": low, "max": high, "mean": mean, "std": (m2 / count) ** 0.5,
                     "p1_sampled": p1, "p50_sampled": p50, "p99_sampled": p99}

    label_shares = None
    if seg_dir is not None:
        counts = np.zeros(len(LABELS), dtype=np.int64)
        for key, f in tqdm(seg.items(), desc=f"inspecting {split} masks", unit="slice", disable=not progress or None):
            try:
                mask = read_nifti(f.path, "mask")
            except DataError as e:
                problems.append(str(e))
                continue
            if key in image_shapes and mask.shape != image_shapes[key]:
                problems.append(f"mask {f.path} is {_shape_str(mask.shape)} but its image is "
                                f"{_shape_str(image_shapes[key])}")
            counts += np.bincount(mask.ravel(), minlength=len(LABELS))
        if counts.sum():
            label_shares = dict(zip(LABELS, (counts / counts.sum()).tolist()))

    weeks: dict[int, set[int]] = defaultdict(set)
    for f in images:
        weeks[f.case].add(f.week)
    return {
        "image_dir": str(image_dir),
        "seg_dir": str(seg_dir) if seg_dir is not None else None,
        "files": len(images),
        "cases": sorted(weeks),
        "scans": sum(len(w) for w in weeks.values()),
        "weeks_per_case": {f"{case:03d}": sorted(w) for case, w in sorted(weeks.items())},
        "shapes": dict(shapes.most_common()),
        "intensity": intensity,
        "label_shares": label_shares,
        "problems": problems,
    }


def inspect(root: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Census of the data set as a JSON-serialisable dict; data problems are collected, not raised.

    Returns {"root", "splits": {split: {"files", "cases", "scans", "weeks_per_case", "shapes", "intensity",
    "label_shares", "problems", ...}}, "problems"}. Intensity min/max/mean/std are exact; the percentiles
    (keys "p*_sampled") come from every 16th voxel of each slice. label_shares is None without a seg folder.
    Only a missing root or one without split folders raises DataError.
    """
    dirs = find_split_dirs(root)
    splits = {split: _inspect_split(image_dir, seg_dir, split, progress)
              for split, (image_dir, seg_dir) in dirs.items()}
    problems = _split_overlaps({split: report["cases"] for split, report in splits.items()})
    problems += [f"split folder keras_slices_{split} is missing" for split in SPLITS if split not in dirs]
    return {"root": str(_data_root(dirs)), "splits": splits, "problems": problems}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def format_inspect(report: dict[str, Any], max_problems: int = 10) -> str:
    """Readable multi-line summary of an `inspect` report."""
    lines = [f"HipMRI slices in {report['root']}"]
    for split, r in report["splits"].items():
        cases = r["cases"]
        span = f" ({cases[0]:03d}..{cases[-1]:03d})" if cases else ""
        lines.append(f"{split}: {_plural(r['files'], 'slice')}, {_plural(len(cases), 'case')}{span}, "
                     f"{_plural(r['scans'], 'scan')}")
        lines.append("  shapes: " + (", ".join(f"{s} x{n}" for s, n in r["shapes"].items()) or "none readable"))
        if r["intensity"]:
            i = r["intensity"]
            lines.append(f"  intensity: min {i['min']:.4g}, max {i['max']:.4g}, mean {i['mean']:.4g}, "
                         f"std {i['std']:.4g}; p1/p50/p99 ~ {i['p1_sampled']:.4g}/{i['p50_sampled']:.4g}/"
                         f"{i['p99_sampled']:.4g} (sampled)")
        if r["label_shares"]:
            lines.append("  labels: " + ", ".join(f"{k} {v:.2%}" for k, v in r["label_shares"].items()))
        elif r["seg_dir"] is None:
            lines.append("  labels: no mask folder")
        lines += [f"  problem: {p}" for p in r["problems"][:max_problems]]
        if len(r["problems"]) > max_problems:
            lines.append(f"  ... and {len(r['problems']) - max_problems} more problems")
    lines += [f"problem: {p}" for p in report["problems"]]
    problems = sum(len(r["problems"]) for r in report["splits"].values()) + len(report["problems"])
    lines.append(f"{_plural(problems, 'problem')} found" if problems else "no problems found")
    return "\n".join(lines)
