"""A deterministic synthetic male pelvis MRI phantom written in the HipMRI 2D-slice layout.

It is built the way the real slices were built. For every patient and week a 3D volume is painted
(256 x 256 axial in-plane voxels of ~1.7 mm, 128 voxels of 1.56 mm along the body axis), then 60
sagittal reformats through the pelvis are written as 256 x 128 slices (the second axis is the
body axis, as in the real data). Case 019 week 1 has 144 voxels along the body axis and gives
256 x 144 slices, like the real download.

Volume axes are (x: right -> left, y: anterior -> posterior, z: inferior -> superior). Anatomy is
described in millimetres in a patient frame centred between the femoral heads; each scan places it
in the scanner frame with a patient- and week-specific rotation and shift.

Everything is drawn from `numpy.random.default_rng` seeded by (seed, case[, week]), so the same seed
gives byte-identical files whatever the number of worker processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from .data import LABELS, SPLITS, split_folders

FORMAT_VERSION = 1
MANIFEST = "PHANTOM.json"
MANIFEST_KEYS = frozenset({"format_version", "seed", "size", "scans", "slices"})
LOADER_CACHE = ".cache"  # what data.load_split caches in the data folder: deleted with the phantom it caches
SLICE_FILE = re.compile(r"(case|seg)_\d{3}_week_\d+_slice_\d+\.nii\.gz")
LISTED = 3  # foreign entries named in a refusal
# Share of voxels per label in the real 3D scans (HIPMRI_FACTS.md), for comparison.
REAL_LABEL_SHARES = {"background": 0.6035, "body": 0.3546, "bone": 0.0337,
                     "bladder": 0.0057, "rectum": 0.0014, "prostate": 0.0010}
IN_PLANE, N_SLICES_Z, SLICES_PER_SCAN = 256, 128, 60
Z_SPACING = 1.56
WIDE_SCAN = (19, 1)  # the one scan with 144 voxels along the body axis
WIDE_N_Z = 144

# Tissue classes: (name, label, T2-like intensity, texture amplitude, texture kind)
# Texture kind 0 = fine speckle (fat, marrow), 1 = fibres along the body axis (muscle), 2 = mottled.
TISSUES = (
    ("air", 0, 0.0, 0.0, 0),
    ("skin", 1, 330.0, 0.08, 0),
    ("subcutaneous fat", 1, 640.0, 0.10, 0),
    ("pelvic fat", 1, 560.0, 0.10, 0),
    ("muscle", 1, 185.0, 0.10, 1),
    ("cortical bone", 2, 30.0, 0.10, 0),
    ("marrow", 2, 420.0, 0.14, 0),
    ("cartilage", 1, 290.0, 0.06, 0),
    ("bladder wall", 3, 210.0, 0.06, 0),
    ("urine", 3, 1050.0, 0.02, 0),
    ("prostate central gland", 5, 330.0, 0.16, 2),
    ("prostate peripheral zone", 5, 640.0, 0.10, 2),
    ("seminal vesicle", 1, 820.0, 0.15, 2),
    ("rectal wall", 4, 240.0, 0.08, 0),
    ("stool", 4, 340.0, 0.30, 2),
    ("rectal gas", 4, 8.0, 0.10, 0),
    ("rectal fluid", 4, 780.0, 0.05, 0),
    ("bowel wall", 1, 320.0, 0.08, 0),
    ("bowel content", 1, 470.0, 0.30, 2),
    ("bowel gas", 1, 10.0, 0.10, 0),
    ("vessel", 1, 45.0, 0.05, 0),
)
T = {name: i for i, (name, *_rest) in enumerate(TISSUES)}
TISSUE_LABEL = np.array([t[1] for t in TISSUES], np.uint8)
TISSUE_INTENSITY = np.array([t[2] for t in TISSUES], np.float32)
TISSUE_TEXTURE = np.array([t[3] for t in TISSUES], np.float32)
TISSUE_TEXTURE_KIND = np.array([t[4] for t in TISSUES], np.int8)


# ---------------------------------------------------------------------------------------------
# The schedule: which patients, weeks and splits exist
# ---------------------------------------------------------------------------------------------

# Real counts (HIPMRI_FACTS.md): case ids per split, number of scans per split.
SPLIT_CASES = {"train": range(4, 36), "validate": range(36, 40), "test": range(40, 43)}
SPLIT_SCANS = {"train": 191, "validate": 11, "test": 9}
MISSING_CASE = 27  # 39 ids for 38 patients: one train id is unused
# Default size: ~1/8 of the real scans, at least 2 scans in validate and test, case 019 included.
SMALL_SCANS = {"train": 24, "validate": 2, "test": 2}
TINY_SCANS = {"train": 3, "validate": 1, "test": 1}
SIZES = {"full": SPLIT_SCANS, "small": SMALL_SCANS, "tiny": TINY_SCANS}
SHARE_STRIDE = 2  # measured on every 2nd voxel in x and y: within 0.01 % of the full count


def schedule(seed: int = 0, size: str = "small") -> dict[str, list[tuple[int, int]]]:
    """The (case, week) scans of each split.

    `full` mirrors the real counts (191 / 11 / 9 scans, i.e. 11,460 / 660 / 540 slices) with 1 to 8
    weeks per patient; `small` and `tiny` keep whole patients (the split stays by patient) and take the
    first scans of the full schedule, case 019 first so the 256 x 144 scan is always present.
    """
    if size not in SIZES:
        raise ValueError(f"unknown phantom size {size!r}; choose one of {sorted(SIZES)}")
    rng = np.random.default_rng([seed, 1])
    full: dict[str, list[tuple[int, int]]] = {}
    for split, ids in SPLIT_CASES.items():
        cases = [c for c in ids if c != MISSING_CASE]
        counts = _weeks_per_case(rng, len(cases), SPLIT_SCANS[split])
        scans = []
        for case, n in zip(cases, counts):
            weeks = sorted(rng.choice(8, size=n, replace=False).tolist())
            if (case, WIDE_SCAN[1]) == WIDE_SCAN and WIDE_SCAN[1] not in weeks:
                weeks[0] = WIDE_SCAN[1]
                weeks.sort()
            scans += [(case, w) for w in weeks]
        full[split] = scans
    if size == "full":
        return full
    picked = {}
    for split, scans in full.items():
        order = sorted({c for c, _ in scans}, key=lambda c: (c != WIDE_SCAN[0], c))
        chosen: list[tuple[int, int]] = []
        for case in order:
            chosen += [s for s in scans if s[0] == case]
            if len(chosen) >= SIZES[size][split]:
                break
        picked[split] = sorted(chosen[: SIZES[size][split]])
    return picked


def _weeks_per_case(rng: np.random.Generator, n_cases: int, total: int) -> list[int]:
    """Split `total` scans over `n_cases` patients, 1..8 each."""
    counts = np.ones(n_cases, int)
    while counts.sum() < total:
        i = rng.integers(n_cases)
        if counts[i] < 8:
            counts[i] += 1
    return counts.tolist()


# ---------------------------------------------------------------------------------------------
# Anatomy parameters
# ---------------------------------------------------------------------------------------------

@dataclass
class Scan:
    """Everything needed to paint one (case, week) volume. Lengths in mm, angles in radians."""

    case: int
    week: int
    n_z: int
    spacing: float                 # in-plane voxel size
    rotation: np.ndarray           # (3, 3) patient frame -> scanner frame
    shift: np.ndarray              # (3,) patient origin in scanner mm (volume centre = 0)
    first_slice: int               # x index of sagittal slice 0
    body: dict = field(default_factory=dict)
    bone_scale: float = 1.0
    prostate: dict = field(default_factory=dict)
    bladder_volume: float = 200.0  # mL
    bladder_centre: np.ndarray = field(default_factory=lambda: np.zeros(3))
    rectum: dict = field(default_factory=dict)
    bowel: list = field(default_factory=list)
    intensity: np.ndarray = field(default_factory=lambda: TISSUE_INTENSITY.copy())
    gain: float = 1.0
    bias: np.ndarray = field(default_factory=lambda: np.zeros(7))
    noise_sigma: float = 12.0
    seed: tuple = ()


def _rot(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix for small angles about x, y and z (applied in that order)."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_scan(seed: int, case: int, week: int) -> Scan:
    """Draw the anatomy of `case` (fixed across weeks) and its state in `week`."""
    p = np.random.default_rng([seed, 2, case])       # patient: same for every week
    w = np.random.default_rng([seed, 3, case, week])  # week: bladder, rectum, bowel, pose
    deg = np.pi / 180
    n_z = WIDE_N_Z if (case, week) == WIDE_SCAN else N_SLICES_Z

    body = {"ax": p.uniform(163, 197), "ay": p.uniform(114, 137), "fat": p.uniform(14, 34),
            "buttock": p.uniform(0.85, 1.15), "thigh": p.uniform(70, 88),
            "wobble": (p.uniform(0, 0.04), p.uniform(0, 6.3), p.uniform(0, 0.04), p.uniform(0, 6.3))}
    bone_scale = p.uniform(0.93, 1.07) * (body["ax"] / 178) ** 0.3
    prostate_vol = p.uniform(25, 50)                # mL
    pr = (prostate_vol * 1000 * 3 / (4 * np.pi) / (1.3 * 0.85 * 1.0)) ** (1 / 3)
    prostate = {"centre": np.array([p.normal(0, 2), -8 + p.normal(0, 3), -38 + p.normal(0, 4)]),
                "radii": np.array([1.3 * pr, 0.85 * pr, 1.0 * pr]) * w.uniform(0.97, 1.03, 3),
                "tilt": p.normal(0, 6) * deg}

    bladder_volume = float(np.clip(p.uniform(125, 235) * w.lognormal(0, 0.4), 60, 520))
    br = _bladder_radii(bladder_volume)
    pc = prostate["centre"]
    bladder_centre = np.array([p.normal(0, 4) + w.normal(0, 3),
                               pc[1] - 22 + w.normal(0, 3),
                               pc[2] + prostate["radii"][2] + 0.78 * br[2]])

    rectum = {"radius": p.uniform(9, 12) * w.uniform(0.85, 1.3),
              "gas": float(w.uniform(0, 1) ** 2), "fluid": float(w.uniform(0, 0.5) ** 2),
              "offset": w.normal(0, 3, 2)}
    # Small bowel and sigmoid loops above the bladder, moving from week to week.
    bowel = []
    for _ in range(w.integers(12, 20)):
        bowel.append({"centre": np.array([w.uniform(-95, 95), w.uniform(-85, 30), w.uniform(35, 130)]),
                      "radii": w.uniform(10, 19, 3) * np.array([1, 1, 1.4]),
                      "content": int(w.choice([T["bowel content"], T["bowel gas"], T["bowel content"]])),
                      "angle": w.uniform(0, np.pi)})

    intensity = TISSUE_INTENSITY * p.lognormal(0, 0.07, len(TISSUES)).astype(np.float32)
    bias = np.concatenate([p.normal(0, 0.12, 3), p.normal(0, 0.08, 3), [p.normal(0, 0.05)]])
    rotation = _rot(p.normal(0, 3) * deg + w.normal(0, 1) * deg,
                    p.normal(0, 3) * deg + w.normal(0, 1) * deg,
                    p.normal(0, 5) * deg + w.normal(0, 1.5) * deg)
    shift = np.array([p.normal(0, 6), p.normal(-5, 8), p.normal(-10, 6)]) + w.normal(0, 2.5, 3)
    spacing = float(np.clip(p.normal(1.68, 0.1), 1.45, 1.88))
    first = int(round(IN_PLANE / 2 + shift[0] / spacing)) - SLICES_PER_SCAN // 2 + int(w.integers(-2, 3))
    return Scan(case=case, week=week, n_z=n_z, spacing=spacing, rotation=rotation, shift=shift,
                first_slice=first, body=body, bone_scale=bone_scale, prostate=prostate,
                bladder_volume=bladder_volume, bladder_centre=bladder_centre, rectum=rectum,
                bowel=bowel, intensity=intensity, gain=float(p.uniform(0.75, 1.35)), bias=bias,
                noise_sigma=float(p.uniform(8, 16)), seed=(seed, case, week))


def _bladder_radii(volume_ml: float) -> np.ndarray:
    shape = np.array([1.2, 0.95, 0.8])
    r = (volume_ml * 1000 * 3 / (4 * np.pi * shape.prod())) ** (1 / 3)
    return r * shape


# ---------------------------------------------------------------------------------------------
# Painting: a tissue map on a block of the volume
# ---------------------------------------------------------------------------------------------

class Canvas:
    """Tissue classes of the voxels `x_lo <= i < x_hi` of one scan's volume.

    `tissue`: (X, Y, Z) uint8 tissue ids; with `stride` > 1 every stride-th voxel in x and y (a cheap
    estimate of label shares). Primitives are painted in order, later over earlier, each
    only inside its bounding box so that small structures cost little.
    """

    def __init__(self, scan: Scan, x_lo: int = 0, x_hi: int = IN_PLANE, stride: int = 1):
        self.scan = scan
        shape = ((x_hi - x_lo) // stride, IN_PLANE // stride, scan.n_z)
        self.tissue = np.zeros(shape, np.uint8)
        self.step = np.array([scan.spacing * stride, scan.spacing * stride, Z_SPACING])
        self.origin = -(np.array([IN_PLANE, IN_PLANE, scan.n_z]) - 1) / 2 * np.array([scan.spacing, scan.spacing, Z_SPACING])
        self.origin[0] += x_lo * scan.spacing

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient-frame mm coordinates (each broadcastable to the box) of the voxels in `box`."""
        axes = [(np.arange(s.start, s.stop, dtype=np.float32) * st + o).astype(np.float32)
                for s, st, o in zip(box, self.step, self.origin)]
        gx, gy, gz = (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
        r = self.scan.rotation.astype(np.float32)
        t = self.scan.shift.astype(np.float32)
        # patient = R^T (scanner - shift)
        sx, sy, sz = gx - t[0], gy - t[1], gz - t[2]
        return (r[0, 0] * sx + r[1, 0] * sy + r[2, 0] * sz,
                r[0, 1] * sx + r[1, 1] * sy + r[2, 1] * sz,
                r[0, 2] * sx + r[1, 2] * sy + r[2, 2] * sz)

    def box(self, centre, radius: float) -> tuple[slice, slice, slice] | None:
        """Index box holding the ball of `radius` mm around patient-frame `centre`, or None if outside."""
        c = self.scan.rotation @ np.asarray(centre, float) + self.scan.shift
        lo = np.floor((c - radius - self.origin) / self.step).astype(int)
        hi = np.ceil((c + radius - self.origin) / self.step).astype(int) + 1
        lo, hi = np.maximum(lo, 0), np.minimum(hi, self.tissue.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(a, b) for a, b in zip(lo, hi))

    def paint(self, depth_fn, centre, radius: float, tissue: int, *, cortex: tuple[float, int] | None = None,
              where=None) -> None:
        """Set `tissue` where depth_fn(x, y, z) > 0 (depth in mm inside the shape).

        `cortex=(thickness, tissue)`: voxels less than `thickness` deep get that tissue instead.
        `where(x, y, z, current)`: extra boolean condition.
        """
        box = self.box(centre, radius)
        if box is None:
            return
        x, y, z = self.coords(box)
        d = depth_fn(x, y, z)
        block = self.tissue[box]
        inside = d > 0
        if where is not None:
            inside &= where(x, y, z, block)
        if cortex is None:
            block[inside] = tissue
        else:
            thick = d < cortex[0]
            block[inside & ~thick] = tissue
            block[inside & thick] = cortex[1]


def ellipsoid(centre, radii, rot: np.ndarray | None = None):
    """Depth (mm, approximate) inside an ellipsoid; `rot` turns the ellipsoid's axes in the patient frame."""
    c = np.asarray(centre, np.float32)
    r = np.asarray(radii, np.float32)
    m = None if rot is None else np.asarray(rot, np.float32)

    def depth(x, y, z):
        u, v, w = x - c[0], y - c[1], z - c[2]
        if m is not None:
            u, v, w = (m[0, 0] * u + m[1, 0] * v + m[2, 0] * w, m[0, 1] * u + m[1, 1] * v + m[2, 1] * w,
                       m[0, 2] * u + m[1, 2] * v + m[2, 2] * w)
        q = np.sqrt((u / r[0]) ** 2 + (v / r[1]) ** 2 + (w / r[2]) ** 2)
        return (1 - q) * r.min()
    return depth


def capsule(a, b, radius: float):
    """Depth inside the set of points within `radius` mm of the segment a-b."""
    return _cone(a, b, radius, radius)


def _cone(a, b, ra: float, rb: float):
    """Depth inside a cone frustum around the segment a-b, radius ra at a and rb at b."""
    a = np.asarray(a, np.float32)
    ab = np.asarray(b, np.float32) - a
    ll = float(ab @ ab)

    def depth(x, y, z):
        px, py, pz = x - a[0], y - a[1], z - a[2]
        t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / ll, 0, 1)
        dist = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
        return ra + (rb - ra) * t - dist
    return depth


def _union(*fns):
    def depth(x, y, z):
        return np.maximum.reduce([np.broadcast_to(f(x, y, z), np.broadcast_shapes(x.shape, y.shape, z.shape))
                                  for f in fns])
    return depth


def _tube(points: np.ndarray, radii: np.ndarray):
    """Depth inside a tube along a polyline (radius interpolated linearly between points)."""
    return _union(*(_cone(a, b, ra, rb) for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:])))


def paint_anatomy(canvas: Canvas) -> None:
    """Paint every structure of the canvas's scan, outside in."""
    s = canvas.scan
    _paint_body(canvas)
    _paint_muscles(canvas)
    _paint_vessels(canvas)
    _paint_bowel(canvas)
    _paint_bones(canvas, s.bone_scale)
    _paint_bladder(canvas)
    _paint_prostate(canvas)
    _paint_rectum(canvas)


def _body_depth(b: dict):
    """Depth inside the skin: a trunk with a belly in front and a lordotic back, buttocks behind,
    two thighs below the perineum."""
    ax, ay, k, wob = b["ax"], b["ay"], b["buttock"], b["wobble"]

    def depth(x, y, z):
        # the trunk narrows smoothly towards the perineum; its front bulges into the belly above
        # the pubis and recedes below it, its back curves in above the buttocks
        taper = np.clip(1 - (np.maximum(-30 - z, 0) / 95) ** 1.6, 0.2, 1)
        front = ay * (0.92 + 0.10 * np.exp(-((z - 55) / 60) ** 2) + wob[0] * np.sin(z / 37 + wob[1])) * taper
        back = ay * (1.0 - 0.10 * np.clip((z - 20) / 90, 0, 1) + wob[2] * np.sin(z / 29 + wob[3])) * taper
        half_y = np.where(y < 10, front, back)
        qx = np.abs(x) / (ax * (0.9 + 0.1 * taper))
        qy = np.abs(y - 10) / half_y
        trunk = (1 - (qx ** 2.6 + qy ** 2.6) ** (1 / 2.6)) * half_y
        butt = np.maximum(ellipsoid((-60, 62, -38), (86 * k, 70 * k, 88))(x, y, z),
                          ellipsoid((60, 62, -38), (86 * k, 70 * k, 88))(x, y, z))
        th = b["thigh"]
        thighs = np.maximum(capsule((-92, 0, -20), (-104, 8, -260), th)(x, y, z),
                            capsule((92, 0, -20), (104, 8, -260), th)(x, y, z))
        return np.maximum(np.maximum(trunk, butt), thighs)
    return depth


def _paint_body(c: Canvas) -> None:
    b = c.scan.body
    box = tuple(slice(0, n) for n in c.tissue.shape)
    x, y, z = c.coords(box)
    d = _body_depth(b)(x, y, z)
    t = c.tissue
    # subcutaneous fat is thicker over the buttocks and belly
    fat = b["fat"] * (1 + 0.5 * np.clip((y - 40) / 80, 0, 1) + 0.25 * np.clip((-y - 60) / 60, 0, 1))
    t[d > 0] = T["pelvic fat"]
    t[(d > 0) & (d < fat)] = T["subcutaneous fat"]
    t[(d > 0) & (d < 2.0)] = T["skin"]


def _paint_muscles(c: Canvas) -> None:
    m, f = T["muscle"], c.scan.body["fat"]
    # Trunk-wall muscles: the anterior abdominal wall (rectus) and the posterior paraspinals.
    for side in (-1, 1):
        c.paint(ellipsoid((side * 40, -112 + f, 70), (38, 11, 110)), (side * 40, -112 + f, 70), 112, m)
        c.paint(ellipsoid((side * 30, 108, 110), (26, 22, 60)), (side * 30, 108, 110), 62, m)
        # gluteus maximus, medius; iliopsoas; obturator internus; thigh muscles
        c.paint(ellipsoid((side * 78, 78, -30), (52, 38, 80), _rot(0, side * 0.35, 0)), (side * 78, 78, -30), 82, m)
        c.paint(ellipsoid((side * 105, 45, 45), (30, 30, 55), _rot(0, side * 0.3, 0)), (side * 105, 45, 45), 57, m)
        c.paint(capsule((side * 60, 15, 130), (side * 80, -35, -40), 24), (side * 70, -10, 45), 120, m)
        c.paint(ellipsoid((side * 62, 8, -28), (13, 38, 32)), (side * 62, 8, -28), 40, m)
        c.paint(capsule((side * 28, 85, 45), (side * 115, 20, 5), 13), (side * 70, 50, 25), 75, m)  # piriformis
        c.paint(capsule((side * 85, 10, -60), (side * 95, 10, -260), 62), (side * 90, 10, -160), 170, m,
                where=lambda x, y, z, cur: cur != T["subcutaneous fat"])
    # levator ani: a sling under the prostate and around the rectum
    pc = c.scan.prostate["centre"]
    sling = ellipsoid((pc[0], pc[1] + 18, pc[2] - 6), (42, 42, 30))
    c.paint(lambda x, y, z: np.minimum(sling(x, y, z), 6 - sling(x, y, z)), pc, 60, m,
            where=lambda x, y, z, cur: z < pc[2] + 6)


def _paint_vessels(c: Canvas) -> None:
    v = T["vessel"]
    for side in (-1, 1):
        pts = np.array([[side * 35, 40, 135], [side * 52, -20, 60], [side * 68, -55, 5], [side * 75, -55, -80]])
        c.paint(_tube(pts, np.array([6.0, 5.5, 5, 5])), pts.mean(0), 110, v)
        c.paint(_tube(pts + np.array([side * 6, 8, 0]), np.array([7.0, 6.5, 6, 6])), pts.mean(0), 115, v)
        c.paint(capsule((side * 38, 50, 120), (side * 45, 75, 20), 4), (side * 42, 62, 70), 60, v)


def _paint_bowel(c: Canvas) -> None:
    for loop in c.scan.bowel:
        rot = _rot(0, 0.3, loop["angle"])
        outer = ellipsoid(loop["centre"], loop["radii"], rot)
        inner = ellipsoid(loop["centre"], loop["radii"] - 3.0, rot)
        rad = float(loop["radii"].max()) + 2
        keep = lambda x, y, z, cur: (cur != T["subcutaneous fat"]) & (cur != T["skin"]) & (cur != T["air"])
        c.paint(outer, loop["centre"], rad, T["bowel wall"], where=keep)
        c.paint(inner, loop["centre"], rad, loop["content"], where=keep)


def _paint_bones(c: Canvas, k: float) -> None:
    bone, cortex = T["marrow"], (2.5, T["cortical bone"])
    cart = T["cartilage"]
    for side in (-1, 1):
        head = np.array([side * 88, 0, 0]) * k
        # acetabulum (a cup of bone around the head, open laterally and below), then its cartilage
        cup = ellipsoid(head, np.array([37, 37, 37]) * k)
        c.paint(cup, head, 40 * k, bone, cortex=cortex,
                where=lambda x, y, z, cur, h=head: ((x - h[0]) * side < 10) & (z - h[2] > -22 * k))
        c.paint(ellipsoid(head, np.array([27, 27, 27]) * k), head, 30 * k, cart)
        # femur: head, neck, greater trochanter, shaft
        femur = _union(ellipsoid(head, np.array([24, 24, 24]) * k),
                       capsule(head, head + np.array([side * 38, 6, -34]) * k, 15 * k),
                       ellipsoid(head + np.array([side * 46, 10, -28]) * k, np.array([19, 22, 26]) * k),
                       capsule(head + np.array([side * 40, 8, -40]) * k, head + np.array([side * 26, 12, -260]) * k, 16 * k))
        c.paint(femur, head + np.array([side * 30, 8, -120]) * k, 160 * k, bone, cortex=cortex)
        # ilium: a thick plate rising from the acetabulum, flaring laterally and back to the sacrum
        ilium_c = np.array([side * 84, 40, 70]) * k
        ilium = _union(ellipsoid(ilium_c, np.array([11, 62, 58]) * k, _rot(0, -side * 0.25, side * 0.55)),
                       ellipsoid(np.array([side * 76, 20, 28]) * k, np.array([22, 32, 36]) * k))
        c.paint(ilium, ilium_c - np.array([0, 10, 20]) * k, 95 * k, bone, cortex=cortex)
        # pubis: superior ramus to the symphysis, body, inferior ramus; ischium down to the tuberosity
        sym = np.array([side * 9, -62, -34]) * k
        pubis = _union(capsule(head + np.array([-side * 12, -22, -6]) * k, sym + np.array([0, 2, 8]) * k, 11 * k),
                       ellipsoid(sym, np.array([8.5, 13, 22]) * k),
                       capsule(sym + np.array([side * 4, 6, -14]) * k, np.array([side * 52, 12, -74]) * k, 8 * k),
                       capsule(head + np.array([-side * 10, 24, -14]) * k, np.array([side * 56, 26, -64]) * k, 14 * k),
                       ellipsoid(np.array([side * 56, 26, -70]) * k, np.array([15, 19, 14]) * k))
        c.paint(pubis, np.array([side * 45, -15, -40]) * k, 85 * k, bone, cortex=cortex)
    # sacrum and coccyx: a plate curving down the back of the pelvis
    c.paint(_sacrum_depth(k), np.array([0, 80, 50]) * k, 115 * k, bone, cortex=cortex)


def _sacrum_depth(k: float):
    def depth(x, y, z):
        zz = z / k
        t = np.clip((zz + 40) / 170, 0, 1)                 # 0 at the coccyx tip, 1 at S1
        centre_y = (60 + 45 * np.sin(np.pi * t) - 20 * t) * k  # concave to the front
        half_w = (8 + 55 * t ** 1.3) * k
        half_t = (6 + 20 * t) * k
        q = np.sqrt((np.abs(x) / half_w) ** 4 + ((y - centre_y) / half_t) ** 2) ** 0.5
        d = (1 - q) * half_t
        return np.where((zz > -40) & (zz < 130), d, -1.0)
    return depth


def _paint_bladder(c: Canvas) -> None:
    s = c.scan
    radii = _bladder_radii(s.bladder_volume)
    centre = s.bladder_centre
    # flattened on the prostate, slightly squared: a superellipsoid via q^p
    def outer(x, y, z, r=radii):
        u, v, w = (x - centre[0]) / r[0], (y - centre[1]) / r[1], (z - centre[2]) / r[2]
        w = np.where(w < 0, w * 1.25, w)
        q = (np.abs(u) ** 2.4 + np.abs(v) ** 2.4 + np.abs(w) ** 2.4) ** (1 / 2.4)
        return (1 - q) * r.min()
    c.paint(outer, centre, float(radii.max()) * 1.3, T["bladder wall"])
    c.paint(lambda x, y, z: outer(x, y, z) - 3.5, centre, float(radii.max()) * 1.3, T["urine"])


def _paint_prostate(c: Canvas) -> None:
    p = c.scan.prostate
    ctr, r = p["centre"], p["radii"]
    rot = _rot(p["tilt"], 0, 0)
    gland = ellipsoid(ctr, r, rot)
    c.paint(gland, ctr, float(r.max()) + 2, T["prostate peripheral zone"])
    # central gland: the anterior and central part of the gland
    cg_c = ctr + np.array([0, -0.28 * r[1], 0.15 * r[2]])
    c.paint(ellipsoid(cg_c, r * np.array([0.66, 0.6, 0.72]), rot), ctr, float(r.max()) + 2,
            T["prostate central gland"], where=lambda x, y, z, cur: cur == T["prostate peripheral zone"])
    # seminal vesicles: paired sacs above and behind the gland
    for side in (-1, 1):
        sv_c = ctr + np.array([side * 20, 14, r[2] + 4])
        c.paint(ellipsoid(sv_c, (20, 6, 8), _rot(0, side * -0.5, 0)), sv_c, 22, T["seminal vesicle"],
                where=lambda x, y, z, cur: (cur != T["urine"]) & (cur != T["bladder wall"]))


def _paint_rectum(c: Canvas) -> None:
    s, rc = c.scan, c.scan.rectum
    pc = s.prostate["centre"]
    off = rc["offset"]
    back = pc[1] + s.prostate["radii"][1] + rc["radius"] + 3
    pts = np.array([[off[0], back + 4, pc[2] - 48],     # anal canal
                    [off[0], back + 2, pc[2] - 25],
                    [off[0] * 0.5, back + off[1], pc[2] + 5],
                    [0, back + 20 + off[1], pc[2] + 40],
                    [8, back + 38, pc[2] + 70],
                    [18, back + 30, pc[2] + 100]], float)
    radius = rc["radius"]
    radii = np.array([5, 0.75 * radius, radius, radius * 1.05, 0.9 * radius, 0.8 * radius])
    tube = _tube(pts, radii)
    inner = _tube(pts, np.maximum(radii - 3.5, 1.0))
    centre, reach = pts.mean(0), float(np.linalg.norm(pts - pts.mean(0), axis=1).max() + radius + 4)
    c.paint(tube, centre, reach, T["rectal wall"])
    c.paint(inner, centre, reach, T["stool"])
    # gas rises to the front (anterior, low y) of the lumen; fluid settles at the back
    box = c.box(centre, reach)
    if box is None:
        return
    x, y, z = c.coords(box)
    block = c.tissue[box]
    lumen = block == T["stool"]
    rel = (y - back) / radius
    block[lumen & (rel < -1 + 2 * rc["gas"]) & (z > pc[2] - 30)] = T["rectal gas"]
    block[lumen & (rel > 1 - 2 * rc["fluid"])] = T["rectal fluid"]


# ---------------------------------------------------------------------------------------------
# MRI appearance
# ---------------------------------------------------------------------------------------------

def render_slab(scan: Scan) -> tuple[np.ndarray, np.ndarray]:
    """Paint and image the 60 sagittal slices of `scan`.

    Returns `image`: (60, 256, n_z) float32 non-negative scanner-like intensities and
    `labels`: (60, 256, n_z) uint8 in 0..5.
    """
    margin = 4  # for the blur at the slab's faces
    lo, hi = scan.first_slice - margin, scan.first_slice + SLICES_PER_SCAN + margin
    canvas = Canvas(scan, lo, hi)
    paint_anatomy(canvas)
    tissue = canvas.tissue
    rng = np.random.default_rng([*scan.seed, 4])

    # tissue texture: fine speckle, fibres along the body axis, and coarse mottling
    white = rng.standard_normal(tissue.shape, dtype=np.float32)
    textures = [ndimage.gaussian_filter(white, 0.7), ndimage.gaussian_filter(white, (0.6, 0.6, 2.5)),
                ndimage.gaussian_filter(white, 1.8)]
    kinds = TISSUE_TEXTURE_KIND[tissue]
    texture = np.empty_like(white)
    for k, tex in enumerate(textures):
        mask = kinds == k
        texture[mask] = tex[mask] / tex.std()
    clean = scan.intensity[tissue] * (1 + TISSUE_TEXTURE[tissue] * texture)
    # partial volume: each voxel averages over its extent and the scanner's point spread
    clean = ndimage.gaussian_filter(np.maximum(clean, 0), (0.6, 0.6, 0.7))
    clean *= scan.gain * _bias_field(canvas)
    n1 = rng.standard_normal(tissue.shape, dtype=np.float32)
    n2 = rng.standard_normal(tissue.shape, dtype=np.float32)
    image = np.sqrt((clean + scan.noise_sigma * n1) ** 2 + (scan.noise_sigma * n2) ** 2)  # Rician
    keep = slice(margin, margin + SLICES_PER_SCAN)
    return image[keep].astype(np.float32), TISSUE_LABEL[tissue[keep]]


def _bias_field(c: Canvas) -> np.ndarray:
    """Smooth multiplicative coil sensitivity, brighter near the anterior and posterior coils."""
    b = c.scan.bias
    x, y, z = (a / 200.0 for a in c.coords(tuple(slice(0, n) for n in c.tissue.shape)))
    log_b = (b[0] * x + b[1] * y + b[2] * z + b[3] * x * y + b[4] * y * z + b[5] * x * z
             + (0.18 + b[6]) * (y ** 2) - 0.08 * x ** 2)
    return np.exp(log_b).astype(np.float32)


def label_volume(scan: Scan, stride: int = 1) -> np.ndarray:
    """The full 3D label volume of `scan`: (256 / stride, 256 / stride, n_z) uint8 in 0..5."""
    canvas = Canvas(scan, stride=stride)
    paint_anatomy(canvas)
    return TISSUE_LABEL[canvas.tissue]


def label_shares(labels: np.ndarray) -> dict[str, float]:
    """Fraction of voxels per label name."""
    counts = np.bincount(labels.ravel(), minlength=len(LABELS))
    return {name: float(n) / labels.size for name, n in zip(LABELS, counts)}


def insert_lesion(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, *,
                  radius: tuple[float, float] = (4.0, 7.0), intensity: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """An abnormality drawn into one slice (H, W) in [0, 1]: a round bright lesion with a soft edge and a radius
    drawn from `radius` pixels, placed at random inside the body (mask labels > 0, or without a mask pixels
    above 0.1) at least twice its radius from the outline. Works the same on real slices. Returns (the new
    slice, the lesion's mask (H, W) bool)."""
    body = (mask > 0) if mask is not None else (image > 0.1)
    r = rng.uniform(*radius)
    inside = np.argwhere(ndimage.distance_transform_edt(body) > 2 * r)
    if not len(inside):
        raise ValueError(f"the slice has no body region wide enough for a lesion of radius {r:.1f} pixels")
    cy, cx = inside[rng.integers(len(inside))]
    yy, xx = np.mgrid[:image.shape[0], :image.shape[1]]
    weight = np.clip(r + 0.5 - np.hypot(yy - cy, xx - cx), 0, 1)  # 1 inside, a one-pixel ramp at the edge
    return (image * (1 - weight) + intensity * weight).astype(image.dtype), weight > 0.5


# ---------------------------------------------------------------------------------------------
# Writing the dataset
# ---------------------------------------------------------------------------------------------

def _affine(scan: Scan, index: int) -> np.ndarray:
    """Voxel -> scanner mm for one sagittal slice: axis 0 runs anterior-posterior (y), axis 1 along the
    body (z); the slice sits at its x position."""
    a = np.eye(4)
    a[:3, :3] = 0
    a[1, 0], a[2, 1], a[0, 2] = scan.spacing, Z_SPACING, scan.spacing
    a[0, 3] = (scan.first_slice + index - (IN_PLANE - 1) / 2) * scan.spacing
    a[1, 3] = -(IN_PLANE - 1) / 2 * scan.spacing
    a[2, 3] = -(scan.n_z - 1) / 2 * Z_SPACING
    return a


def write_scan(out: Path, split: str, seed: int, case: int, week: int) -> dict[str, float]:
    """Render one scan, write its 60 image and 60 label slices; return its 3D label shares."""
    scan = make_scan(seed, case, week)
    image, labels = render_slab(scan)
    img_dir, seg_dir = (out / name for name in split_folders(split))
    # like some real files, one scan in seven carries a singleton third axis
    extra_axis = (case + week) % 7 == 3
    for z in range(SLICES_PER_SCAN):
        name = f"{case:03d}_week_{week}_slice_{z}.nii.gz"
        img, lab = image[z], labels[z]
        if extra_axis:
            img, lab = img[..., None], lab[..., None]
        aff = _affine(scan, z)
        nib.save(nib.Nifti1Image(img, aff), img_dir / f"case_{name}")
        nib.save(nib.Nifti1Image(lab, aff), seg_dir / f"seg_{name}")
    return label_shares(label_volume(scan, stride=SHARE_STRIDE))


def _write_job(args) -> dict[str, float]:
    return write_scan(*args)


def generate(out: str | os.PathLike, *, seed: int = 0, size: str = "small", workers: int | None = None,
             force: bool = False, progress: bool = True) -> dict:
    """Write the phantom dataset to `out` in the HipMRI layout and return its manifest.

    The files are written into `out.partial` and moved into place when complete, so an interrupted run never
    leaves a folder that looks finished. With `force` an existing `out` is replaced only if it is a phantom
    folder (`_check_out`); it is moved aside (into `out.old-XXXX`) until the new one is in place, then deleted.
    All checks come before anything is deleted. Raises FileExistsError when `out` or `out.partial` is in the way.
    The manifest (`out/PHANTOM.json`) records the seed, size, counts and the label shares of the 3D volumes
    next to the real ones.
    """
    out = Path(out)
    plan = schedule(seed, size)
    _check_out(out, force)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists() or tmp.is_symlink():
        _check_partial(tmp)
        shutil.rmtree(tmp)
    for split in plan:
        for name in split_folders(split):
            (tmp / name).mkdir(parents=True)
    jobs = [(tmp, split, seed, case, week) for split, scans in plan.items() for case, week in scans]
    workers = workers or min(2, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        shares = list(tqdm(pool.map(_write_job, jobs), total=len(jobs), desc=f"phantom ({size})",
                           unit="scan", disable=not progress or None))
    manifest = {
        "format_version": FORMAT_VERSION, "seed": seed, "size": size,
        "scans": {split: [f"case_{c:03d}_week_{w}" for c, w in scans] for split, scans in plan.items()},
        "slices": {split: len(scans) * SLICES_PER_SCAN for split, scans in plan.items()},
        "label_shares_3d": {name: round(float(np.mean([s[name] for s in shares])), 5) for name in LABELS},
        "real_label_shares_3d": REAL_LABEL_SHARES,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _swap_in(tmp, out, force)
    return manifest


def _swap_in(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished `tmp` to `out`. An existing `out` (checked again: the run took a while) is first
    moved into a new folder `out.old-XXXX` beside it, which is deleted once `tmp` is in place."""
    if not _check_out(out, force):
        tmp.rename(out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
    out.rename(aside / out.name)
    tmp.rename(out)
    shutil.rmtree(aside)


def _check_out(out: Path, force: bool) -> bool:
    """Whether `out` exists. Raises FileExistsError if it is not a folder, or exists without `force`, or is
    not a phantom folder this module wrote (`_foreign`, `_manifest_problem`)."""
    if not (out.exists() or out.is_symlink()):
        return False
    _require_folder(out, "replace")
    if not force:
        raise FileExistsError(f"{out} already exists; pass force=True (--force) to replace it")
    problem, foreign = _manifest_problem(out), _foreign(out, cache=True)
    if problem:
        held = f"; it holds {_listing(foreign)}" if foreign else ""
        raise FileExistsError(f"refusing to replace {out}: it is not a phantom folder ({problem}{held})")
    if foreign:
        raise FileExistsError(f"refusing to replace {out}: it holds what the phantom does not write "
                              f"({_listing(foreign)}); move that elsewhere first")
    return True


def _check_partial(tmp: Path) -> None:
    """Raise FileExistsError unless `tmp` looks like an unfinished phantom (split folders of slices, the
    manifest), which `generate` may delete."""
    _require_folder(tmp, "remove")
    foreign = _foreign(tmp, cache=False)
    if foreign:
        raise FileExistsError(f"refusing to remove {tmp}: it is not an unfinished phantom "
                              f"(it holds {_listing(foreign)})")


def _require_folder(path: Path, action: str) -> None:
    """Raise FileExistsError if `path` is a file, a symbolic link or anything else but a folder."""
    if path.is_file():
        raise FileExistsError(f"{path} is a file, not a folder")
    if path.is_symlink():
        raise FileExistsError(f"refusing to {action} {path}: it is a symbolic link")
    if not path.is_dir():
        raise FileExistsError(f"{path} is not a folder")


def _manifest_problem(folder: Path) -> str | None:
    """Why `folder`/PHANTOM.json is not a phantom manifest, or None if it is one."""
    path = folder / MANIFEST
    if not path.is_file():
        return f"no {MANIFEST}"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"{MANIFEST} is not readable JSON"
    if not isinstance(manifest, dict) or not MANIFEST_KEYS <= manifest.keys():
        return f"{MANIFEST} is not a phantom manifest"
    return None


def _foreign(folder: Path, cache: bool) -> list[str]:
    """What in `folder` the phantom does not write, as sorted relative paths: anything but PHANTOM.json, the
    split folders holding only case_ (image) or seg_ (mask) slices, and, if `cache`, the loader's .cache."""
    prefixes = {name: prefix for split in SPLITS for name, prefix in zip(split_folders(split), ("case_", "seg_"))}
    foreign = []
    for entry in os.scandir(folder):
        if entry.name in prefixes and entry.is_dir(follow_symlinks=False):
            foreign += [f"{entry.name}/{f.name}" for f in os.scandir(entry.path)
                        if not (f.is_file(follow_symlinks=False) and f.name.startswith(prefixes[entry.name])
                                and SLICE_FILE.fullmatch(f.name))]
        elif not ((entry.name == MANIFEST and entry.is_file(follow_symlinks=False))
                  or (cache and entry.name == LOADER_CACHE and entry.is_dir(follow_symlinks=False))):
            foreign.append(entry.name)
    return sorted(foreign)


def _listing(entries: list[str]) -> str:
    """The first few entries, and how many more there are."""
    more = f" and {len(entries) - LISTED} more" if len(entries) > LISTED else ""
    return ", ".join(entries[:LISTED]) + more
