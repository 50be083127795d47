import hashlib
import json
import math
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

from vqvae_lib import phantom
from vqvae_lib.cli import main
from vqvae_lib.data import SPLITS, split_folders

NAME = re.compile(r"case_(\d{3})_week_(\d)_slice_(\d+)\.nii\.gz")


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.nii.gz"))}


def test_full_schedule_mirrors_the_real_counts():
    plan = phantom.schedule(0, "full")
    slices = {split: len(scans) * 60 for split, scans in plan.items()}
    assert slices == {"train": 11460, "validate": 660, "test": 540}
    cases = {split: {c for c, _ in scans} for split, scans in plan.items()}
    assert [len(c) for c in cases.values()] == [31, 4, 3]  # 38 patients
    assert cases["train"] <= set(range(4, 36)) and cases["validate"] == set(range(36, 40))
    assert cases["test"] == set(range(40, 43))
    assert not (cases["train"] & cases["validate"]) and not (cases["train"] & cases["test"])
    per_case = {}
    for scans in plan.values():
        for c, w in scans:
            per_case.setdefault(c, []).append(w)
    assert all(1 <= len(w) <= 8 and len(set(w)) == len(w) and max(w) <= 7 for w in per_case.values())
    assert (19, 1) in plan["train"]


@pytest.mark.parametrize("size", ["small", "tiny"])
def test_smaller_sizes_are_subsets_that_keep_the_wide_scan(size):
    full, plan = phantom.schedule(0, "full"), phantom.schedule(0, size)
    assert {k: len(v) for k, v in plan.items()} == phantom.SIZES[size]
    for split in plan:
        assert set(plan[split]) <= set(full[split])
    assert (19, 1) in plan["train"]


def test_unknown_size_is_rejected():
    with pytest.raises(ValueError, match="huge"):
        phantom.schedule(0, "huge")


def test_layout_names_and_manifest(tiny_phantom):
    manifest = json.loads((tiny_phantom / "PHANTOM.json").read_text())
    plan = phantom.schedule(0, "tiny")
    for split in SPLITS:
        image_dir, seg_dir = split_folders(split)
        images = sorted(p.name for p in (tiny_phantom / image_dir).iterdir())
        masks = sorted(p.name for p in (tiny_phantom / seg_dir).iterdir())
        assert len(images) == 60 * len(plan[split]) == manifest["slices"][split]
        assert all(NAME.fullmatch(n) for n in images)
        assert masks == ["seg_" + n[len("case_"):] for n in images]
        scans = sorted({(int(m[1]), int(m[2])) for m in map(NAME.fullmatch, images)})
        assert scans == plan[split]
    assert not (tiny_phantom.parent / "hipmri.partial").exists()


def test_arrays_look_like_the_real_files(tiny_phantom):
    train = tiny_phantom / "keras_slices_train"
    img = nib.load(train / "case_019_week_1_slice_30.nii.gz")
    assert img.get_data_dtype() == np.float32 and img.shape == (256, 144)
    regular = [nib.load(p) for p in sorted(train.glob("case_*_slice_3*.nii.gz"))]
    assert {i.shape for i in regular} >= {(256, 128)}
    # some scans carry a singleton third axis, like some real files
    singleton = [p for p in tiny_phantom.rglob("case_*_slice_0.nii.gz") if nib.load(p).shape == (256, 128, 1)]
    assert singleton
    x = np.asarray(img.dataobj)
    assert x.min() >= 0 and 300 < np.percentile(x, 99) < 5000  # scanner-like scale, not 0..1
    labels = np.stack([np.asarray(nib.load(p).dataobj).reshape(256, -1)[:, :128]
                       for p in sorted((tiny_phantom / "keras_slices_seg_train").glob("seg_019_week_1_*"))])
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == set(range(6))


def test_same_seed_same_bytes_whatever_the_workers(tiny_phantom, tmp_path):
    # the session phantom was written by 2 worker processes; write one scan again in this process
    for name in split_folders("test"):
        (tmp_path / name).mkdir()
    phantom.write_scan(tmp_path, "test", 0, *phantom.schedule(0, "tiny")["test"][0])
    again = _digest(tmp_path)
    reference = {k: v for k, v in _digest(tiny_phantom).items() if k.split("/")[0].endswith("_test")}
    assert len(again) == 120 and again == reference


def test_other_seed_other_anatomy():
    a, b = phantom.make_scan(0, 4, 0), phantom.make_scan(1, 4, 0)
    assert a.body["ax"] != b.body["ax"] and a.bladder_volume != b.bladder_volume


def test_weeks_vary_within_a_patient_and_patients_vary_more():
    weeks = [phantom.make_scan(0, 7, w) for w in range(4)]
    bladders = [s.bladder_volume for s in weeks]
    assert max(bladders) / min(bladders) > 1.2  # filling changes week to week
    assert len({round(s.rectum["gas"], 6) for s in weeks}) == 4
    # the patient's own anatomy stays: body size and prostate are the same every week
    assert len({s.body["ax"] for s in weeks}) == 1
    assert np.allclose([s.prostate["centre"] for s in weeks], weeks[0].prostate["centre"])
    other = phantom.make_scan(0, 8, 0)
    assert other.body["ax"] != weeks[0].body["ax"]


def test_label_shares_of_3d_volumes_are_close_to_the_real_ones():
    scans = phantom.schedule(0, "full")["train"][::16]
    shares = [phantom.label_shares(phantom.label_volume(phantom.make_scan(0, c, w), stride=2)) for c, w in scans]
    mean = {k: np.mean([s[k] for s in shares]) for k in phantom.LABELS}
    real = phantom.REAL_LABEL_SHARES
    for name in ("background", "body"):
        assert abs(mean[name] - real[name]) < 0.03, (name, mean[name])
    for name in ("bone", "bladder", "rectum", "prostate"):
        assert abs(mean[name] / real[name] - 1) < 0.25, (name, mean[name])


def test_mri_contrast_by_label():
    img, lab = phantom.render_slab(phantom.make_scan(0, 4, 0))
    mean = {name: img[lab == k].mean() for k, name in enumerate(phantom.LABELS)}
    background = img[lab == 0]
    # Rician noise floor: the background is dark but not exactly zero
    assert 0 < background.mean() < 0.05 * np.percentile(img, 99)
    assert mean["bladder"] > mean["body"] > mean["bone"] > mean["background"]
    assert mean["bladder"] > mean["prostate"] > mean["bone"]


def test_generate_refuses_to_overwrite(tiny_phantom):
    with pytest.raises(FileExistsError, match="--force"):
        phantom.generate(tiny_phantom, size="tiny")


def _user_folder(tmp_path):
    """A folder of someone's work: no PHANTOM.json."""
    folder = tmp_path / "my_thesis"
    (folder / "chapters").mkdir(parents=True)
    (folder / "notes.txt").write_bytes(b"three years of work\n")
    (folder / "chapters" / "intro.tex").write_bytes(b"\\chapter{Introduction}\n")
    return folder


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_refuses_a_folder_that_is_not_a_phantom(tmp_path):
    folder = _user_folder(tmp_path)
    before = _snapshot(folder)
    with pytest.raises(FileExistsError, match=r"refusing to replace .*my_thesis: it is not a phantom folder "
                                              r"\(no PHANTOM.json; it holds chapters, notes.txt\)"):
        phantom.generate(folder, size="tiny", force=True)
    assert _snapshot(folder) == before
    assert not (tmp_path / "my_thesis.partial").exists()


def test_force_refuses_a_phantom_holding_a_user_file(tiny_phantom, tmp_path):
    folder = tmp_path / "hipmri"
    shutil.copytree(tiny_phantom, folder)
    (folder / "keras_slices_train" / "my_annotations.csv").write_text("slice,label\n")
    (folder / "results.txt").write_text("dice 0.9\n")
    with pytest.raises(FileExistsError, match=r"it holds what the phantom does not write \(keras_slices_train/"
                                              r"my_annotations.csv, results.txt\)"):
        phantom.generate(folder, size="tiny", force=True)
    assert (folder / "results.txt").read_text() == "dice 0.9\n"
    assert _digest(folder) == _digest(tiny_phantom)


def test_force_refuses_a_manifest_that_is_not_the_phantoms(tiny_phantom, tmp_path):
    folder = tmp_path / "hipmri"
    shutil.copytree(tiny_phantom, folder)
    (folder / "PHANTOM.json").write_text('{"written by": "me"}\n')
    with pytest.raises(FileExistsError, match=r"not a phantom folder \(PHANTOM.json is not a phantom manifest\)"):
        phantom.generate(folder, size="tiny", force=True)
    assert (folder / "PHANTOM.json").read_text() == '{"written by": "me"}\n'


@pytest.mark.parametrize("force", [False, True])
def test_a_file_as_out_is_refused(tmp_path, force):
    path = tmp_path / "thesis.pdf"
    path.write_bytes(b"%PDF-1.7")
    with pytest.raises(FileExistsError, match=r"thesis.pdf is a file, not a folder"):
        phantom.generate(path, size="tiny", force=force)
    assert path.read_bytes() == b"%PDF-1.7"


def test_a_partial_folder_that_is_not_ours_is_left_alone(tmp_path):
    partial = tmp_path / "hipmri.partial"
    (partial / "keras_slices_train").mkdir(parents=True)
    (partial / "keras_slices_train" / "draft.docx").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"refusing to remove .*hipmri.partial: it is not an unfinished "
                                              r"phantom \(it holds keras_slices_train/draft.docx\)"):
        phantom.generate(tmp_path / "hipmri", size="tiny")
    assert (partial / "keras_slices_train" / "draft.docx").read_bytes() == b"mine"
    assert not (tmp_path / "hipmri").exists()


class _Interrupted:
    """A worker pool that is interrupted (Ctrl-C) as soon as it starts."""

    def __init__(self, workers):
        pass

    def __enter__(self):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        return False


def test_an_interrupted_force_keeps_the_old_phantom(tiny_phantom, tmp_path, monkeypatch):
    folder = tmp_path / "hipmri"
    shutil.copytree(tiny_phantom, folder)
    monkeypatch.setattr(phantom, "ProcessPoolExecutor", _Interrupted)
    with pytest.raises(KeyboardInterrupt):
        phantom.generate(folder, size="tiny", force=True)
    assert _digest(folder) == _digest(tiny_phantom)
    assert (folder / "PHANTOM.json").read_bytes() == (tiny_phantom / "PHANTOM.json").read_bytes()


def test_force_replaces_a_phantom_with_its_cache_and_an_unfinished_run(tiny_phantom, tmp_path):
    folder = tmp_path / "hipmri"
    shutil.copytree(tiny_phantom, folder, ignore=shutil.ignore_patterns(".cache"))
    (folder / "PHANTOM.json").write_text(json.dumps({**json.loads((folder / "PHANTOM.json").read_text()),
                                                     "seed": 7}))  # an older phantom, another seed
    (folder / ".cache").mkdir()
    (folder / ".cache" / "train-0123.images.npy").write_bytes(b"cached")
    partial = tmp_path / "hipmri.partial"  # left by a killed run
    (partial / "keras_slices_test").mkdir(parents=True)
    shutil.copy(next((tiny_phantom / "keras_slices_test").iterdir()), partial / "keras_slices_test")
    phantom.generate(folder, size="tiny", force=True, progress=False)
    assert _digest(folder) == _digest(tiny_phantom)  # the same bytes as the session phantom
    assert (folder / "PHANTOM.json").read_bytes() == (tiny_phantom / "PHANTOM.json").read_bytes()
    assert not (folder / ".cache").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hipmri"]  # no .partial, no old copy left


@pytest.mark.parametrize("what", ["folder", "file"])
def test_the_cli_refuses_to_replace_what_is_not_a_phantom(tmp_path, capsys, what):
    out = _user_folder(tmp_path) if what == "folder" else tmp_path / "notes.txt"
    if what == "file":
        out.write_text("notes\n")
    assert main(["phantom", "--out", str(out), "--size", "tiny", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}" if what == "file" else f"error: refusing to replace {out}")
    assert "notes.txt" in err and out.exists()


def test_insert_lesion_draws_a_bright_disc_inside_the_body():
    image = np.full((64, 32), 0.3, dtype=np.float32)
    mask = np.zeros((64, 32), dtype=np.uint8)
    mask[8:56, 4:28] = 1
    new, lesion = phantom.insert_lesion(image, mask, np.random.default_rng(0), radius=(4, 5))
    area = lesion.sum()
    assert math.pi * 3.5 ** 2 < area < math.pi * 5.5 ** 2 and new.dtype == image.dtype
    assert np.allclose(new[lesion], 1.0, atol=0.5) and new[lesion].mean() > 0.9
    ys, xs = np.nonzero(lesion)
    assert mask[ys, xs].all() and (np.abs(new - image) > 0).sum() < 2 * area  # only the disc and its edge change
    again, _ = phantom.insert_lesion(image, mask, np.random.default_rng(0), radius=(4, 5))
    assert np.array_equal(new, again)
    with pytest.raises(ValueError, match="no body region wide enough"):
        phantom.insert_lesion(image, np.zeros_like(mask), np.random.default_rng(0))
