"""Tests of vqvae_lib.data on small HipMRI-layout trees written with nibabel."""

from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from vqvae_lib import data as D
from vqvae_lib import fileio
from vqvae_lib.data import DataError

SHAPE = (32, 16)
ODD_SHAPE = (32, 18)
ODD_SCAN = (1, 1)  # case 001 week 1 is 32x18, like case 019 week 1 of the real data
CASES = {"train": [1, 2], "validate": [3], "test": [4]}


def write_nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def image_path(root: Path, split: str, case: int, week: int, index: int) -> Path:
    return root / f"keras_slices_{split}" / f"case_{case:03d}_week_{week}_slice_{index}.nii.gz"


def mask_path(root: Path, split: str, case: int, week: int, index: int) -> Path:
    return root / f"keras_slices_seg_{split}" / f"seg_{case:03d}_week_{week}_slice_{index}.nii.gz"


def make_tree(root: Path, cases: dict[str, list[int]] = CASES, weeks=(0, 1), slices: int = 3,
              masks: bool = True, seed: int = 0) -> Path:
    """Write a HipMRI-layout tree: random non-negative float32 images and uint8 labels 0..5."""
    rng = np.random.default_rng(seed)
    for split, split_cases in cases.items():
        (root / f"keras_slices_{split}").mkdir(parents=True)
        if masks:
            (root / f"keras_slices_seg_{split}").mkdir()
        for case in split_cases:
            for week in weeks:
                shape = ODD_SHAPE if (case, week) == ODD_SCAN else SHAPE
                for z in range(slices):
                    write_nifti(image_path(root, split, case, week, z),
                                rng.uniform(0, 800, shape).astype(np.float32))
                    if masks:
                        write_nifti(mask_path(root, split, case, week, z),
                                    rng.integers(0, 6, shape).astype(np.uint8))
    return root


def truncate(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data")


def load(root: Path, split: str = "train", **kwargs) -> D.SplitData:
    return D.load_split(root, split, **{"shape": SHAPE, "progress": False, **kwargs})


# ------------------------------------------------------------------------------------------- finding files


def test_slice_file_name_is_canonical_case_form():
    f = D.SliceFile(Path("seg_019_week_1_slice_7.nii.gz"), 19, 1, 7)
    assert f.name == "case_019_week_1_slice_7"
    assert f.scan == (19, 1)


def test_find_split_dirs_in_root_and_one_level_down(tmp_path):
    make_tree(tmp_path / "HipMRI_study_keras_slices_data", masks=False)
    (tmp_path / "HipMRI_study_keras_slices_data" / "keras_slices_seg_train").mkdir()
    for root in (tmp_path, tmp_path / "HipMRI_study_keras_slices_data"):
        dirs = D.find_split_dirs(root)
        assert list(dirs) == list(D.SPLITS)
        assert dirs["train"] == (tmp_path / "HipMRI_study_keras_slices_data" / "keras_slices_train",
                                 tmp_path / "HipMRI_study_keras_slices_data" / "keras_slices_seg_train")
        assert dirs["test"][1] is None


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="data folder .*nowhere does not exist"):
        D.find_split_dirs(tmp_path / "nowhere")
    with pytest.raises(DataError, match="does not exist"):
        D.load_split(tmp_path / "nowhere", progress=False)


def test_no_split_folders_lists_what_is_there(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError) as err:
        D.find_split_dirs(tmp_path)
    message = str(err.value)
    assert "notes.txt" in message and "images/" in message
    assert "keras_slices_train" in message


def test_missing_split_folder_names_it_and_lists_present(tmp_path):
    root = make_tree(tmp_path / "data", cases={"train": [1], "validate": [3]}, masks=False)
    with pytest.raises(DataError) as err:
        load(root, "test")
    assert "keras_slices_test" in str(err.value)
    assert "present splits: train, validate" in str(err.value)
    assert len(load(root, "train")) == 6  # the splits that are present still load


def test_empty_split_folder(tmp_path):
    root = make_tree(tmp_path / "data", masks=False)
    shutil.rmtree(root / "keras_slices_validate")
    (root / "keras_slices_validate").mkdir()
    with pytest.raises(DataError, match=r"no case_XXX_week_Y_slice_Z \.nii\.gz or \.nii files in .*_validate"):
        load(root, "validate")
    assert len(load(root, "train")) == 12


def test_list_slices_sorts_numerically_and_warns_about_other_files(tmp_path, caplog):
    folder = tmp_path / "keras_slices_train"
    folder.mkdir()
    array = np.ones(SHAPE, np.float32)
    for case, week, z in [(100, 0, 2), (20, 1, 10), (20, 1, 2), (20, 0, 59), (7, 3, 0)]:
        write_nifti(folder / f"case_{case:03d}_week_{week}_slice_{z}.nii.gz", array)
    (folder / "readme.txt").write_text("x")
    (folder / "case_001_slice_1.nii.gz").write_text("x")
    with caplog.at_level(logging.WARNING, logger="vqvae_lib.data"):
        files = D.list_slices(folder)
    assert [(f.case, f.week, f.index) for f in files] == [(7, 3, 0), (20, 0, 59), (20, 1, 2), (20, 1, 10),
                                                        (100, 0, 2)]
    assert "ignored 2 entries" in caplog.text and "readme.txt" in caplog.text


def test_list_slices_seg_prefix_and_empty(tmp_path):
    folder = tmp_path / "seg"
    folder.mkdir()
    with pytest.raises(DataError, match="no seg_XXX_week_Y_slice_Z .nii.gz or .nii files in .*seg"):
        D.list_slices(folder, prefix="seg")
    write_nifti(folder / "seg_004_week_0_slice_3.nii.gz", np.zeros(SHAPE, np.uint8))
    (f,) = D.list_slices(folder, prefix="seg")
    assert (f.case, f.week, f.index, f.name) == (4, 0, 3, "case_004_week_0_slice_3")


# ------------------------------------------------------------------------------------------- reading files


def test_read_nii_nii_folder_and_singleton_axis(tmp_path):
    a = np.arange(32 * 16, dtype=np.float32).reshape(SHAPE)
    write_nifti(tmp_path / "case_001_week_0_slice_0.nii", a)
    (tmp_path / "case_001_week_0_slice_1.nii").mkdir()
    write_nifti(tmp_path / "case_001_week_0_slice_1.nii" / "inner_name.nii", a + 1)
    write_nifti(tmp_path / "case_001_week_0_slice_2.nii.gz", (a + 2)[..., None])
    np.testing.assert_array_equal(D.read_nifti(tmp_path / "case_001_week_0_slice_0.nii"), a)
    np.testing.assert_array_equal(D.read_nifti(tmp_path / "case_001_week_0_slice_1.nii"), a + 1)
    third = D.read_nifti(tmp_path / "case_001_week_0_slice_2.nii.gz")
    assert third.shape == SHAPE and third.dtype == np.float32
    np.testing.assert_array_equal(third, a + 2)
    files = D.list_slices(tmp_path)
    assert [f.index for f in files] == [0, 1, 2]


def test_read_mask_dtype_and_bad_values(tmp_path):
    labels = np.arange(6, dtype=np.float32).repeat(2)[None].repeat(4, 0)  # labels stored as float
    mask = D.read_nifti(write_nifti(tmp_path / "ok.nii.gz", labels), "mask")
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, labels)
    bad = labels.copy()
    bad[0, 0], bad[1, 1] = 7, 1.5
    with pytest.raises(DataError, match=r"mask .*bad\.nii\.gz has values other than the labels 0\.\.5: \[1\.5, 7\.0\]"):
        D.read_nifti(write_nifti(tmp_path / "bad.nii.gz", bad), "mask")


@pytest.mark.parametrize("kind", ["truncated", "garbage", "truncated_nii"])
def test_read_corrupt_files(tmp_path, kind):
    a = np.random.default_rng(0).uniform(0, 500, SHAPE).astype(np.float32)
    if kind == "garbage":
        path = tmp_path / "case_001_week_0_slice_0.nii.gz"
        path.write_bytes(np.random.default_rng(1).bytes(3000))
    else:
        path = write_nifti(tmp_path / ("x.nii" if kind == "truncated_nii" else "x.nii.gz"), a)
        truncate(path)
    with pytest.raises(DataError, match=f"cannot read NIfTI file {path}: "):
        D.read_nifti(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_read_nan_inf(tmp_path, bad):
    a = np.ones(SHAPE, np.float32)
    a[3, 4] = a[5, 6] = a[7, 8] = bad
    path = write_nifti(tmp_path / "x.nii.gz", a)
    with pytest.raises(DataError, match=f"{path} has 3 NaN/inf values"):
        D.read_nifti(path)


def test_read_3d_not_singleton(tmp_path):
    path = write_nifti(tmp_path / "x.nii.gz", np.ones((32, 16, 3), np.float32))
    with pytest.raises(DataError, match="shape 32x16x3"):
        D.read_nifti(path)


def test_nii_folder_without_single_file(tmp_path):
    (tmp_path / "case_001_week_0_slice_0.nii").mkdir()
    with pytest.raises(DataError, match="exactly one .nii file, found 0"):
        D.read_nifti(tmp_path / "case_001_week_0_slice_0.nii")


def write_header_only(path: Path, shape: tuple[int, ...], dtype, payload: bytes = bytes(64)) -> Path:
    """A NIfTI file whose header declares `shape` and `dtype` but that holds only `payload` after the header."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_data_offset(352)
    content = header.binaryblock + bytes(4) + payload  # 348 header bytes, 4 bytes of "no extensions"
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)
    return path


HEADER_BOMB_SCRIPT = r"""
import json, resource, sys
from vqvae_lib import data as D

# Allow this process 1 GB more address space than it has now: a read that allocates the 8.6 GB the header
# declares fails with MemoryError instead of a DataError.
with open("/proc/self/status") as status:
    vm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm_kb * 1024 + 2**30, resource.RLIM_INFINITY))
results = []
for path in sys.argv[1:]:
    try:
        D.read_nifti(path)
        results.append(["read", ""])
    except Exception as e:
        results.append([type(e).__name__, str(e)])
print(json.dumps(results))
"""


def test_header_declaring_a_huge_slice_is_refused_before_reading(tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status to set an address-space limit")
    files = [write_header_only(tmp_path / name, (32767, 32767), np.float64) for name in ("bomb.nii.gz", "bomb.nii")]
    done = subprocess.run([sys.executable, "-c", HEADER_BOMB_SCRIPT, *map(str, files)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(D.__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    for path, (kind, message) in zip(files, json.loads(done.stdout)):
        assert kind == "DataError", message
        assert str(path) in message and "declares a 32767x32767 float64 array" in message


@pytest.mark.parametrize("name, shape, dtype, message", [
    ("wide.nii.gz", (32, D.MAX_SLICE_SIDE + 1), np.float32, "declares a 32x4097 float32 array, not a slice of 1..4096"),
    ("complex.nii.gz", SHAPE, np.complex64, "declares a 32x16 complex64 array, expected real numbers"),
    ("rgb.nii.gz", SHAPE, "RGB", r"declares a 32x16 \[\('R', 'u1'\).* array, expected real numbers"),
    ("volume.nii.gz", (32, 16, 3, 1), np.float32, "holds an array of shape 32x16x3, expected a 2D slice"),
    ("short.nii", SHAPE, np.float32, r"cannot read NIfTI file .*short\.nii: it holds 416 bytes but its header "
                                     r"declares a 32x16 float32 array that needs 2400 bytes"),
])
def test_header_checks(tmp_path, name, shape, dtype, message):
    path = write_header_only(tmp_path / name, shape, dtype)
    with pytest.raises(DataError, match=message) as err:
        D.read_nifti(path)
    assert str(path) in str(err.value)
    assert D.read_nifti(write_nifti(tmp_path / "ok.nii", np.ones((*SHAPE, 1), np.int16))).shape == SHAPE


# ------------------------------------------------------------------------------------------- shape and scale


def test_fit_shape_policies():
    a = np.arange(4 * 6, dtype=np.float32).reshape(4, 6) + 1
    assert D.fit_shape(a, (4, 6), "error") is a
    np.testing.assert_array_equal(D.fit_shape(a, (2, 4), "crop"), a[1:3, 1:5])
    padded = D.fit_shape(a, (7, 8), "pad")
    assert padded.shape == (7, 8) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[1:5, 1:7], a)
    assert padded.sum() == a.sum()  # only zeros added
    assert padded[0].sum() == padded[:, 0].sum() == padded[:, 7].sum() == 0
    assert padded[5:].sum() == 0  # odd padding: 1 row before, 2 after
    resized = D.fit_shape(a, (8, 12), "resize")
    assert resized.shape == (8, 12) and resized.dtype == np.float32
    assert a.min() <= resized.min() and resized.max() <= a.max()
    with pytest.raises(DataError, match="4x6 differs from the working shape 8x12.*CLI: --shape-policy crop"):
        D.fit_shape(a, (8, 12), "error")
    with pytest.raises(DataError, match=r"cannot crop 4x6 to 8x4.*\(CLI: --shape-policy pad\)"):
        D.fit_shape(a, (8, 4), "crop")
    with pytest.raises(DataError, match=r"cannot pad 4x6 to 2x8.*\(CLI: --shape-policy crop\)"):
        D.fit_shape(a, (2, 8), "pad")
    with pytest.raises(ValueError, match="shape policy"):
        D.fit_shape(a, (8, 4), "stretch")


def test_fit_shape_masks_keep_labels():
    mask = np.random.default_rng(0).integers(0, 6, (32, 18)).astype(np.uint8)
    for policy in ("crop", "resize"):
        out = D.fit_shape(mask, SHAPE, policy, is_mask=True)
        assert out.shape == SHAPE and out.dtype == np.uint8
        assert set(np.unique(out)) <= set(range(6))
    resized = D.fit_shape(mask, (64, 36), "resize", is_mask=True)
    np.testing.assert_array_equal(resized[::2, ::2], mask)  # nearest neighbour: no new values


def test_normalize():
    x = np.full((20, 20), 100.0, np.float32)
    x[0, 0] = 10_000  # one hot voxel
    x[1, :] = 0
    out, scale = D.normalize(x)
    assert out.dtype == np.float32 and scale == pytest.approx(100.0)
    assert out.min() == 0 and out.max() == 1 and out[5, 5] == pytest.approx(1.0) and out[1, 3] == 0
    out, scale = D.normalize(x, "minmax")
    assert scale == 10_000 and out[5, 5] == pytest.approx(0.01) and out[0, 0] == 1 and out[1, 0] == 0
    out, scale = D.normalize(x, "none")
    assert scale == 1.0 and np.array_equal(out, x)
    for method, constant in [("percentile", 0.0), ("minmax", 0.0), ("minmax", 5.0)]:
        out, scale = D.normalize(np.full((4, 4), constant, np.float32), method)
        assert scale == 1.0 and out.dtype == np.float32 and not out.any()
    out, scale = D.normalize(np.full((4, 4), 5.0, np.float32))
    assert scale == 5.0 and (out == 1).all()
    out, scale = D.normalize(np.zeros((0, 4), np.float32))
    assert scale == 1.0 and out.shape == (0, 4)
    with pytest.raises(ValueError):
        D.normalize(x, "zscore")


def test_normalize_signed_slices():
    signed = np.array([[-2.0, 0.0], [2.0, 6.0]], np.float32)
    out, scale = D.normalize(signed, "minmax")
    assert scale == 8.0 and out.tolist() == [[0.0, 0.25], [0.5, 1.0]]
    out, scale = D.normalize(-np.array([[1.0, 3.0], [5.0, 9.0]], np.float32), "minmax")  # all negative
    assert scale == 8.0 and out.tolist() == [[1.0, 0.75], [0.5, 0.0]]
    out, scale = D.normalize(np.full((2, 2), -4.0, np.float32), "minmax")  # constant: no range to map
    assert scale == 1.0 and not out.any()
    out, scale = D.normalize(-np.ones((2, 2), np.float32))  # percentile: an all-negative slice turns black
    assert scale == 1.0 and not out.any()
    out, _ = D.normalize(signed, "none")
    assert np.array_equal(out, signed)


# ------------------------------------------------------------------------------------------- loading


def expected_image(root: Path, case: int, week: int, z: int) -> np.ndarray:
    raw = nib.load(str(image_path(root, "train", case, week, z))).get_fdata().astype(np.float32)
    return D.normalize(D.fit_shape(raw, SHAPE, "crop"))[0]


def test_load_split_values_and_reshape_report(tree, caplog):
    with caplog.at_level(logging.WARNING, logger="vqvae_lib.data"):
        data = load(tree, cache=False)
    assert data.images.shape == (12, *SHAPE) and data.images.dtype == np.float32
    assert data.masks is None and not data.from_cache and data.skipped == []
    assert 0 <= data.images.min() and data.images.max() <= 1
    assert data.cases.tolist() == [1] * 6 + [2] * 6
    assert data.weeks.tolist() == [0, 0, 0, 1, 1, 1] * 2
    assert data.indices.tolist() == [0, 1, 2] * 4
    odd = [f"case_001_week_1_slice_{z}" for z in range(3)]
    assert data.reshaped == [(name, ODD_SHAPE, "crop 32x18 -> 32x16") for name in odd]
    assert "3 slices were 32x18; cropped to 32x16: case_001_week_1_slice_0" in caplog.text
    for case, week, z in [(1, 1, 2), (2, 0, 1)]:
        row = data.files.index(next(f for f in data.files if (f.case, f.week, f.index) == (case, week, z)))
        np.testing.assert_allclose(data.images[row], expected_image(tree, case, week, z), rtol=1e-6)
        raw = nib.load(str(image_path(tree, "train", case, week, z))).get_fdata()
        assert data.scales[row] == pytest.approx(np.percentile(D.fit_shape(raw, SHAPE, "crop"), 99.5), rel=1e-5)


def test_load_split_other_policies(tree):
    padded = load(tree, shape=(32, 18), shape_policy="pad", cache=False)
    assert padded.images.shape == (12, 32, 18)
    assert [r[0] for r in padded.reshaped] == [f"case_00{c}_week_{w}_slice_{z}" for c, w in [(1, 0), (2, 0), (2, 1)]
                                               for z in range(3)]
    assert not padded.images[0][:, 0].any() and not padded.images[0][:, -1].any()
    with pytest.raises(DataError, match="case_001_week_1_slice_0.nii.gz: slice shape 32x18 differs"):
        load(tree, shape_policy="error", cache=False)


def test_load_masks(tree):
    data = load(tree, masks=True, cache=False)
    assert data.masks.shape == (12, *SHAPE) and data.masks.dtype == np.uint8
    raw = nib.load(str(mask_path(tree, "train", 1, 1, 2))).get_fdata()
    np.testing.assert_array_equal(data.masks[5], D.fit_shape(raw, SHAPE, "crop"))


def test_image_without_mask(tree):
    missing = mask_path(tree, "train", 2, 0, 1)
    missing.unlink()
    with pytest.raises(DataError, match=f"case_002_week_0_slice_1.nii.gz has no mask: expected {missing}"):
        load(tree, masks=True, cache=False)
    data = load(tree, masks=True, on_error="skip", cache=False)
    assert [name for name, _ in data.skipped] == ["case_002_week_0_slice_1"]
    assert len(data) == 11 and data.masks.shape[0] == 11
    assert load(tree, cache=False).images.shape[0] == 12  # images alone do not need masks


def test_missing_seg_folder(tree):
    shutil.rmtree(tree / "keras_slices_seg_train")
    with pytest.raises(DataError, match="masks=True but the mask folder .*keras_slices_seg_train does not exist"):
        load(tree, masks=True, cache=False)


def test_mask_shape_must_match_image(tree):
    write_nifti(mask_path(tree, "train", 2, 1, 0), np.zeros((30, 16), np.uint8))
    with pytest.raises(DataError, match="is 30x16 but its image .*case_002_week_1_slice_0.nii.gz is 32x16"):
        load(tree, masks=True, cache=False)


def test_bad_file_raise_and_skip(tree, caplog):
    bad = image_path(tree, "train", 2, 1, 1)
    truncate(bad)
    with pytest.raises(DataError, match=f"cannot read NIfTI file {bad}"):
        load(tree, cache=False)
    with caplog.at_level(logging.WARNING, logger="vqvae_lib.data"):
        data = load(tree, on_error="skip")
    assert [name for name, _ in data.skipped] == ["case_002_week_1_slice_1"]
    assert str(bad) in data.skipped[0][1]
    assert len(data) == 11 and data.images.shape[0] == 11 and data.scales.shape == (11,)
    assert "case_002_week_1_slice_1" not in [f.name for f in data.files]
    assert "skipped 1 bad files: case_002_week_1_slice_1" in caplog.text
    np.testing.assert_allclose(data.images[-1], expected_image(tree, 2, 1, 2), rtol=1e-6)
    again = load(tree, on_error="skip")
    assert again.from_cache and again.skipped == data.skipped and [f.name for f in again.files] == [
        f.name for f in data.files]


def test_worker_threads_decode_the_same_bytes_and_report_bad_files(tree):
    serial = load(tree, cache=False, masks=True, workers=1)
    parallel = load(tree, cache=False, masks=True, workers=2)
    assert serial.images.tobytes() == parallel.images.tobytes()
    assert serial.masks.tobytes() == parallel.masks.tobytes()
    assert serial.scales.tobytes() == parallel.scales.tobytes() and serial.reshaped == parallel.reshaped
    bad = image_path(tree, "train", 2, 0, 1)
    truncate(bad)
    with pytest.raises(DataError, match=f"cannot read NIfTI file {bad}"):
        load(tree, cache=False, workers=2)
    skipped = load(tree, cache=False, workers=2, on_error="skip")
    assert [name for name, _ in skipped.skipped] == ["case_002_week_0_slice_1"] and len(skipped) == 11
    mask_path(tree, "train", 1, 0, 0).unlink()
    with pytest.raises(DataError, match="case_001_week_0_slice_0.nii.gz has no mask: expected .*seg_001_week_0"):
        load(tree, cache=False, masks=True, workers=2)


def test_cache_read_whole_or_memory_mapped(tree):
    built = load(tree, memory_map=False)  # a fresh build, then read back whole
    mapped, whole = load(tree, masks=False), load(tree, memory_map=False)
    assert isinstance(mapped.images, np.memmap) and not mapped.images.flags.writeable
    assert not isinstance(whole.images, np.memmap) and whole.images.flags.writeable and whole.from_cache
    assert not isinstance(built.images, np.memmap) and not built.from_cache
    assert whole.images.tobytes() == mapped.images.tobytes() == built.images.tobytes()


def test_nan_and_3d_files_in_split(tree):
    a = np.ones(SHAPE, np.float32)
    a[0, 0] = np.nan
    write_nifti(image_path(tree, "train", 1, 0, 0), a)
    write_nifti(image_path(tree, "train", 2, 0, 0), np.ones((*SHAPE, 2), np.float32))
    data = load(tree, on_error="skip", cache=False)
    reasons = dict(data.skipped)
    assert "1 NaN/inf values" in reasons["case_001_week_0_slice_0"]
    assert "shape 32x16x2" in reasons["case_002_week_0_slice_0"]
    assert len(data) == 10


def test_patient_in_two_splits(tmp_path):
    root = make_tree(tmp_path / "data", cases={"train": [1, 19], "validate": [3], "test": [19]}, masks=False)
    with pytest.raises(DataError, match="case 019 appears in train and test: splits must be by patient"):
        D.check_patient_splits(root)
    with pytest.raises(DataError, match="case 019 appears in train and test"):
        load(root, "validate", cache=False)


def test_check_patient_splits_ok(tree):
    assert D.check_patient_splits(tree) == {"train": [1, 2], "validate": [3], "test": [4]}


ZSCORED, ALL_NEGATIVE = (2, 0, 1), (2, 1, 0)  # (case, week, slice) of the signed slices of make_signed_tree


def make_signed_tree(root: Path) -> Path:
    """make_tree without masks, with one z-scored train slice and one whose voxels are all negative."""
    make_tree(root, masks=False)
    rng = np.random.default_rng(5)
    write_nifti(image_path(root, "train", *ZSCORED), rng.normal(0, 1, SHAPE).astype(np.float32))
    write_nifti(image_path(root, "train", *ALL_NEGATIVE), -rng.uniform(1, 50, SHAPE).astype(np.float32))
    return root


def raw_image(root: Path, key: tuple[int, int, int]) -> np.ndarray:
    return nib.load(str(image_path(root, "train", *key))).get_fdata().astype(np.float32)


def expected_negative(root: Path) -> list[tuple[str, int, float]]:
    return [(f"case_{c:03d}_week_{w}_slice_{z}", int((raw_image(root, (c, w, z)) < 0).sum()),
             float(raw_image(root, (c, w, z)).min())) for c, w, z in (ZSCORED, ALL_NEGATIVE)]


def test_negative_intensities_are_reported_and_survive_the_cache(tmp_path, caplog):
    root = make_signed_tree(tmp_path / "data")
    expected = expected_negative(root)
    assert 0 < expected[0][1] < 512 and expected[1][1] == 512
    names = ", ".join(name for name, _, _ in expected)
    warning = (f"train: 2 slices hold negative intensities (min {min(e[2] for e in expected):.4g}): {names}; "
               "normalization='percentile' clips them to 0: use normalization='minmax' (CLI: --normalization "
               "minmax) for signed data")
    for from_cache in (False, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vqvae_lib.data"):
            data = load(root)
        assert data.from_cache == from_cache
        assert data.negative == expected  # float32 minima survive the JSON sidecar exactly
        assert caplog.text.count("negative intensities") == 1 and warning in caplog.text
        assert not data.images[[f.name for f in data.files].index(expected[1][0])].any()  # clipped: all black
    assert load(tree := make_tree(tmp_path / "plain", masks=False)).negative == []
    assert load(tree).negative == []


def test_minmax_and_none_keep_signed_slices(tmp_path, caplog):
    root = make_signed_tree(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="vqvae_lib.data"):
        data = load(root, normalization="minmax")
    assert "normalization='minmax' maps each slice's min..max to 0..1" in caplog.text
    names = [f.name for f in data.files]
    for key, (name, _, _) in zip((ZSCORED, ALL_NEGATIVE), expected_negative(root)):
        raw, row = raw_image(root, key), names.index(name)
        np.testing.assert_allclose(data.images[row], (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)
        assert data.images[row].min() == 0 and data.images[row].max() == 1
        assert data.scales[row] == pytest.approx(raw.max() - raw.min())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vqvae_lib.data"):
        kept = load(root, normalization="none", cache=False)
    assert "normalization='none' keeps them" in caplog.text
    row = names.index(expected_negative(root)[1][0])
    np.testing.assert_array_equal(kept.images[row], raw_image(root, ALL_NEGATIVE))


# ------------------------------------------------------------------------------------------- cache


def test_cache_roundtrip_without_decoding(tree, monkeypatch):
    first = load(tree, masks=True)
    assert not first.from_cache and isinstance(first.images, np.memmap)
    cache = tree / ".cache"
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".npy", ".npy"]  # no temp files left

    def boom(*args, **kwargs):
        raise AssertionError("read_nifti called on a cached load")

    monkeypatch.setattr(D, "read_nifti", boom)
    second = load(tree, masks=True)
    assert second.from_cache and isinstance(second.images, np.memmap)
    assert not second.images.flags.writeable
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.masks, first.masks)
    np.testing.assert_array_equal(second.scales, first.scales)
    assert second.files == first.files and second.reshaped == first.reshaped
    with pytest.raises(AssertionError, match="read_nifti called"):
        load(tree, masks=True, normalization="minmax")  # other options: another cache


def test_cache_invalidated_by_changed_file(tree):
    gz = image_path(tree, "train", 2, 0, 2)
    path = gz.with_suffix("")  # an uncompressed .nii keeps its size when rewritten: only the mtime tells
    write_nifti(path, nib.load(str(gz)).get_fdata().astype(np.float32))
    gz.unlink()
    first = load(tree)
    assert len(first) == 12 and load(tree).from_cache
    size = path.stat().st_size
    write_nifti(path, np.full(SHAPE, 3.0, np.float32) + np.eye(*SHAPE, dtype=np.float32))
    st = path.stat()
    assert st.st_size == size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    second = load(tree)
    assert not second.from_cache
    row = [f.name for f in second.files].index("case_002_week_0_slice_2")
    np.testing.assert_allclose(second.images[row], np.clip((3 + np.eye(*SHAPE)) / 4, 0, 1), rtol=1e-6)
    assert not np.allclose(first.images[row], second.images[row])
    np.testing.assert_array_equal(np.delete(second.images, row, 0), np.delete(first.images, row, 0))
    path.unlink()  # removed file: new key again
    third = load(tree)
    assert not third.from_cache and len(third) == 11


def test_interrupted_build_leaves_no_valid_cache(tree, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(D, "save_json", fail)
    with pytest.raises(KeyboardInterrupt):
        load(tree)
    assert not list((tree / ".cache").glob("*.json")) and not list((tree / ".cache").glob(".*.tmp"))
    monkeypatch.undo()
    assert not load(tree).from_cache
    assert load(tree).from_cache


def test_cache_dir_and_no_cache(tree, tmp_path):
    data = load(tree, cache_dir=tmp_path / "elsewhere")
    assert len(list((tmp_path / "elsewhere").glob("train-*-images.npy"))) == 1
    meta = json.loads(next((tmp_path / "elsewhere").glob("train-*.json")).read_text())
    assert meta["names"] == [f.name for f in data.files]
    plain = load(tree, cache=False)
    assert not isinstance(plain.images, np.memmap) and not (tree / ".cache").exists()
    np.testing.assert_array_equal(plain.images, data.images)


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def stale_temp(folder: Path, pid: int) -> Path:
    """Name of a cache temp file of process pid on this host, as fileio.temp_name writes them."""
    return folder / f".train-0123456789abcdef.{fileio.HOST}.{pid}.{uuid.uuid4().hex}.tmp"


def test_next_load_removes_stale_temps_of_dead_processes_only(tree):
    cache = tree / ".cache"
    cache.mkdir()
    stale, live = stale_temp(cache, dead_pid()), stale_temp(cache, os.getpid())
    for path in (stale, live):
        path.write_bytes(bytes(1000))
    assert not load(tree).from_cache
    assert not stale.exists() and live.exists()
    stale.write_bytes(bytes(1000))
    assert load(tree).from_cache and not stale.exists() and live.exists()  # a cache hit cleans up too


def test_unusable_cache_folder_names_the_cli_flag(tree):
    (tree / "file").write_text("x")
    with pytest.raises(DataError, match=r"no writable cache folder among .*file/cache; pass cache=False "
                                        r"\(CLI: --no-cache\)"):
        load(tree, cache_dir=tree / "file" / "cache")


# A child process mounts two tmpfs (SMALL_FS and BIG_FS) in a private mount namespace and loads the split of
# make_tree with its cache on them in each scenario; the result of every load is checked here.
SMALL_FS, BIG_FS = "16k", "512k"  # the cache of the train split needs about 45 kB
DISK_FULL_SCENARIOS = {
    "too_small": "the cache folder is too small for the cache from the start (free-space check)",
    "fallocate": "the disk fills up right after the free-space check (posix_fallocate fails)",
    "zeros": "as fallocate, on a system without posix_fallocate (writing zeros fails)",
    "sidecar": "the disk fills up after the arrays are written, while the JSON sidecar is written",
    "stale_temp": "a stale temp file of a killed build fills the disk (removed, then the cache is built)",
}
DISK_FULL_SCRIPT = r"""
import errno, json, logging, os, shutil, sys
from pathlib import Path
import numpy as np
from vqvae_lib import data as D

root, out, small, big = map(Path, sys.argv[1:5])
stale_name = sys.argv[5]
messages = []
handler = logging.Handler()
handler.emit = lambda record: messages.append(record.getMessage())
logging.getLogger("vqvae_lib.data").addHandler(handler)
logging.getLogger("vqvae_lib.data").setLevel(logging.WARNING)


def fill(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


def load(cache_dir):
    return D.load_split(root, "train", shape=(32, 16), masks=True, cache_dir=cache_dir, progress=False)


real_disk_usage, real_save_json, real_fallocate = shutil.disk_usage, D.save_json, os.posix_fallocate


def fill_after_check(path):
    usage = real_disk_usage(path)
    fill(big / "filler")
    return usage


def fill_then_save_json(path, content):
    fill(big / "filler")
    real_save_json(path, content)


results = {}
for scenario in ("too_small", "fallocate", "zeros", "sidecar", "stale_temp"):
    cache_dir = small if scenario == "too_small" else big / scenario
    cache_dir.mkdir(exist_ok=True)
    if scenario in ("fallocate", "zeros"):
        shutil.disk_usage = fill_after_check
    if scenario == "zeros":
        del os.posix_fallocate
    if scenario == "sidecar":
        D.save_json = fill_then_save_json
    if scenario == "stale_temp":
        fill(cache_dir / stale_name)
    messages.clear()
    first = load(cache_dir)
    np.savez(out / f"{scenario}.npz", images=first.images, masks=first.masks, scales=first.scales)
    result = {"warnings": [m for m in messages if "cache" in m], "from_cache": first.from_cache,
              "left": sorted(p.name for p in cache_dir.iterdir())}
    shutil.disk_usage, D.save_json, os.posix_fallocate = real_disk_usage, real_save_json, real_fallocate
    (big / "filler").unlink(missing_ok=True)
    second, third = load(cache_dir), load(cache_dir)
    result["later"] = [[data.from_cache, data.images.tobytes() == first.images.tobytes(),
                        data.masks.tobytes() == first.masks.tobytes()] for data in (second, third)]
    results[scenario] = result
print(json.dumps(results))
"""


def tmpfs_prefix(probe: Path) -> list[str]:
    """A command prefix that runs its command in a private mount namespace where it may mount a tmpfs."""
    prefixes = [["unshare", "--mount", "--map-root-user"]]
    if getattr(os, "geteuid", lambda: -1)() == 0:
        prefixes.append(["unshare", "--mount"])
    probe.mkdir()
    for prefix in prefixes:
        if shutil.which(prefix[0]) is None:
            break
        done = subprocess.run([*prefix, "sh", "-c", 'mount -t tmpfs -o size=16k tmpfs "$0"', str(probe)],
                              capture_output=True)
        if done.returncode == 0:
            return prefix
    pytest.skip("cannot mount a tmpfs in a private mount namespace (unshare --mount [--map-root-user] is missing "
                "or not allowed here), and the full-disk tests need a really full file system")


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory) -> dict:
    """Run DISK_FULL_SCRIPT once; return its tree, mount points, process and per-scenario results."""
    base = tmp_path_factory.mktemp("disk_full")
    root, out, small, big = make_tree(base / "data"), base / "out", base / "small", base / "big"
    for folder in (out, small, big):
        folder.mkdir()
    stale_name = stale_temp(Path(), dead_pid()).name
    mounts = f'mount -t tmpfs -o size={SMALL_FS} tmpfs "$0" && mount -t tmpfs -o size={BIG_FS} tmpfs "$1"'
    command = [*tmpfs_prefix(base / "probe"), "sh", "-c", mounts + ' && shift && exec "$@"', str(small), str(big),
               sys.executable, "-c", DISK_FULL_SCRIPT, str(root), str(out), str(small), str(big), stale_name]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(D.__file__).parents[1])})
    results = json.loads(done.stdout) if done.returncode == 0 else None
    return {"root": root, "out": out, "small": small, "big": big, "done": done, "results": results}


@pytest.mark.parametrize("scenario", list(DISK_FULL_SCENARIOS))
def test_full_disk_falls_back_to_memory(disk_full, scenario):
    done = disk_full["done"]
    assert done.returncode != -7, "the load was killed by SIGBUS"
    assert done.returncode == 0, done.stderr[-3000:]
    result = disk_full["results"][scenario]
    reference = load(disk_full["root"], masks=True, cache=False)
    arrays = np.load(disk_full["out"] / f"{scenario}.npz")
    for name in ("images", "masks", "scales"):
        assert arrays[name].tobytes() == getattr(reference, name).tobytes()
    assert not result["from_cache"]
    if scenario == "stale_temp":
        assert result["warnings"] == [] and len(result["left"]) == 3 and not any(
            name.endswith(".tmp") for name in result["left"])
        assert result["later"] == [[True, True, True]] * 2
        return
    folder = disk_full["small"] if scenario == "too_small" else disk_full["big"] / scenario
    (warning,) = result["warnings"]
    if scenario == "too_small":
        problem = rf"not enough space in {re.escape(str(folder))} for the cache of train \(needs [\d.]+ kB, 16.4 kB "
    else:
        problem = (rf"cannot write the cache of train in {re.escape(str(folder))}: \[Errno 28\] No space left on "
                   rf"device \(needs [\d.]+ kB, [\d.]+ (kB|bytes) ")
    assert re.fullmatch(problem + r"free\): decoding without a cache \(pass cache_dir=\.\.\. or free space; "
                                  r"--no-cache skips the cache\)", warning), warning
    assert result["left"] == []  # no temp files, no arrays without a sidecar
    # Later loads on the same folder: still into memory where it is too small, else they build and use the cache.
    assert result["later"] == ([[False, True, True]] * 2 if scenario == "too_small" else
                               [[False, True, True], [True, True, True]])


# ------------------------------------------------------------------------------------------- PyTorch


def test_slice_dataset_items(tree):
    data = load(tree, masks=True)
    image = D.SliceDataset(data)[4]
    assert image.shape == (1, *SHAPE) and image.dtype == torch.float32
    np.testing.assert_array_equal(image[0].numpy(), data.images[4])
    image, mask = D.SliceDataset(data, with_masks=True)[4]
    assert mask.shape == SHAPE and mask.dtype == torch.int64
    np.testing.assert_array_equal(mask.numpy(), data.masks[4])
    with pytest.raises(ValueError, match="masks=True"):
        D.SliceDataset(load(tree), with_masks=True)


def test_slice_dataset_pickles_memmap_as_path(tree):
    dataset = D.SliceDataset(load(tree, masks=True), with_masks=True)
    blob = pickle.dumps(dataset)
    assert len(blob) < dataset.images.nbytes  # the arrays are not copied into the pickle
    clone = pickle.loads(blob)
    assert isinstance(clone.images, np.memmap)
    torch.testing.assert_close(clone[7], dataset[7])


def test_make_loader_is_reproducible(tree):
    data = load(tree, masks=True)

    def order(seed: int) -> list[float]:
        loader = D.make_loader(data, batch_size=5, seed=seed, with_masks=True)
        batches = list(loader)
        assert batches[0][0].shape == (5, 1, *SHAPE) and batches[0][1].shape == (5, *SHAPE)
        return [float(x) for images, _ in batches for x in images[:, 0, 0, 0]]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(data.images[:, 0, 0].tolist())
    unshuffled = next(iter(D.make_loader(data, batch_size=12, shuffle=False)))
    np.testing.assert_array_equal(unshuffled[:, 0].numpy(), data.images)


# ------------------------------------------------------------------------------------------- inspect


def test_inspect_report(tree):
    bad = image_path(tree, "train", 2, 1, 2)
    bad.write_bytes(np.random.default_rng(3).bytes(2000))
    mask_path(tree, "validate", 3, 0, 0).unlink()
    report = D.inspect(tree, progress=False)
    json.dumps(report)
    train = report["splits"]["train"]
    assert train["files"] == 12 and train["cases"] == [1, 2] and train["scans"] == 4
    assert train["weeks_per_case"] == {"001": [0, 1], "002": [0, 1]}
    assert train["shapes"] == {"32x16": 8, "32x18": 3}  # the garbage file has no shape
    assert len(train["problems"]) == 1 and f"cannot read NIfTI file {bad}" in train["problems"][0]
    assert sum(train["label_shares"].values()) == pytest.approx(1.0)
    assert set(train["label_shares"]) == set(D.LABELS)
    labels = np.concatenate([nib.load(str(p)).get_fdata().ravel()
                             for p in (tree / "keras_slices_seg_train").iterdir()]).astype(int)
    expected = np.bincount(labels, minlength=6) / labels.size
    assert list(train["label_shares"].values()) == pytest.approx(expected.tolist())
    images = [nib.load(str(p)).get_fdata() for p in sorted((tree / "keras_slices_train").iterdir()) if p != bad]
    voxels = np.concatenate([x.ravel() for x in images])
    intensity = train["intensity"]
    assert intensity["min"] == pytest.approx(voxels.min()) and intensity["max"] == pytest.approx(voxels.max())
    assert intensity["mean"] == pytest.approx(voxels.mean()) and intensity["std"] == pytest.approx(voxels.std())
    assert intensity["p50_sampled"] == pytest.approx(np.median(voxels), rel=0.1)
    validate = report["splits"]["validate"]
    assert validate["problems"] == [
        "1 images without a mask in keras_slices_seg_validate: case_003_week_0_slice_0"]
    assert report["problems"] == [] and report["root"] == str(tree)
    text = D.format_inspect(report)
    assert "train: 12 slices, 2 cases (001..002), 4 scans" in text and "32x18 x3" in text
    assert "2 problems found" in text


def test_inspect_problems_across_splits(tmp_path):
    root = make_tree(tmp_path / "data", cases={"train": [1, 4], "test": [4]}, masks=False)
    (root / "keras_slices_train" / "notes.txt").write_text("x")
    write_nifti(root / "keras_slices_test" / "case_005_week_0_slice_0.nii.gz", np.ones((4, 4, 4), np.float32))
    report = D.inspect(root, progress=False)
    assert report["problems"] == ["case 004 appears in train and test: splits must be by patient",
                                  "split folder keras_slices_validate is missing"]
    assert report["splits"]["train"]["label_shares"] is None
    assert any("1 entries in keras_slices_train do not match" in p for p in report["splits"]["train"]["problems"])
    assert any("shape 4x4x4" in p for p in report["splits"]["test"]["problems"])
    assert "no mask folder" in D.format_inspect(report)
    with pytest.raises(DataError, match="does not exist"):
        D.inspect(tmp_path / "nowhere")


def test_inspect_reports_negative_intensities(tmp_path):
    root = make_signed_tree(tmp_path / "data")
    report = D.inspect(root, progress=False)
    expected = expected_negative(root)
    (problem,) = report["splits"]["train"]["problems"]
    assert problem == (f"2 slices hold negative intensities (min {min(e[2] for e in expected):.4g}): "
                       f"{expected[0][0]}, {expected[1][0]}; the default normalization='percentile' clips them to "
                       "0: use normalization='minmax' (CLI: --normalization minmax) for signed data")
    text = D.format_inspect(report)
    assert "no problems found" not in text and "1 problem found" in text
