"""Judging generated slices: a feature space learned here, and the sample metrics computed in it.

FID, KID, precision / recall and density / coverage all compare two sets of slices as sets of feature vectors,
so they are only as good as the feature space. No pretrained weights are available (and an ImageNet network
knows nothing of pelvic MRI), so the features come from `FeatureNet`, a small CNN trained on the train split to
say which part of the pelvis a slice shows (its position bin within the scan, `prior.position_bins`) and which
organs it contains (bone, bladder, rectum, prostate, from the masks). What makes a sample look like a real
slice is its anatomy: the right organs, in shapes that fit the part of the pelvis they are in. A classifier of
exactly those facts is the cheapest network that has to represent them, and it trains in a minute or two on a
CPU. Its 64-d feature layer is the space the metrics use; the reference for any score is the same score between
the train and test splits (`judge`: fid_train_test). It knows anatomy, not texture: blur or blockiness barely moves
a slice in this space, so judge sharpness otherwise (`metrics.high_frequency_share`).

Memorisation is judged in code space: a sample whose index map is nearer (in Hamming distance) to a training
map than any test slice's map is to its nearest training map may be a copy (`nearest_hamming`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg import sqrtm
from scipy.spatial.distance import cdist
from scipy.stats import rankdata
from torch import nn
from tqdm.auto import tqdm

from . import runs
from .checkpoint import load_module
from .data import LABELS, SplitData, find_split_dirs, load_split
from .metrics import ssim_psnr
from .prior import position_bins
from .train import (autocast, batch_to, check_run_settings, cudnn_autotune, for_device, grad_scaler, optimizer_for,
                    optimizer_step, resident_images, run_config, select_device)

ORGANS = LABELS[2:]  # bone, bladder, rectum, prostate: the organ head says which of these a slice shows


@dataclass
class FeatureConfig:
    """Every hyperparameter of `FeatureNet`; plain values, so it round-trips through JSON with a checkpoint."""

    channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64, 64])  # one strided block each
    features: int = 64  # the feature layer the metrics use
    positions: int = 8  # slice-position bins the position head predicts

    def __post_init__(self) -> None:
        if not self.channels or any(type(c) is not int or c < 1 for c in self.channels):
            raise ValueError(f"channels must be a non-empty list of whole numbers >= 1, got {self.channels}")
        self.channels = list(self.channels)
        if self.features < 1:
            raise ValueError(f"features must be positive, got {self.features}")
        if self.positions < 2:
            raise ValueError(f"positions must be >= 2 bins, got {self.positions}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureConfig:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown FeatureConfig keys: {', '.join(unknown)}")
        return cls(**d)


class FeatureNet(nn.Module):
    """x (B, 1, H, W) in [0, 1] -> (position logits (B, positions), organ logits (B, 4)); H and W divisible by
    2 ** len(channels) (16 by default). Each block is a stride-2 3x3 convolution, GroupNorm and ReLU, but the last
    has no GroupNorm: its output is averaged over positions, and a per-image normalisation just before that mean
    would make it nearly the same for every slice (training then stalls at chance). The mean is mapped to the
    feature layer, which the heads read through a ReLU."""

    def __init__(self, config: FeatureConfig) -> None:
        super().__init__()
        self.config = config
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip([1, *config.channels], config.channels)):
            norm = [nn.GroupNorm(math.gcd(8, c_out), c_out)] if i < len(config.channels) - 1 else []
            blocks += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), *norm, nn.ReLU()]
        self.body = nn.Sequential(*blocks)
        self.feature_layer = nn.Linear(config.channels[-1], config.features)
        self.position_head = nn.Linear(config.features, config.positions)
        self.organ_head = nn.Linear(config.features, len(ORGANS))

    @property
    def downsample(self) -> int:
        """What H and W must be divisible by."""
        return 2 ** len(self.config.channels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, H, W) -> the feature layer (B, features)."""
        if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] % self.downsample or x.shape[3] % self.downsample:
            raise ValueError(f"x must be (B, 1, H, W) with H and W divisible by {self.downsample}, "
                             f"got {tuple(x.shape)}")
        return self.feature_layer(self.body(x).mean((2, 3)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.features(x))
        return self.position_head(h), self.organ_head(h)


def organ_presence(masks: np.ndarray) -> np.ndarray:
    """(N, 4) float32: 1 where the mask (N, H, W) of labels 0..5 holds the organ (ORGANS, in order), else 0."""
    masks = np.asarray(masks)
    return np.stack([(masks == LABELS.index(organ)).any(axis=(1, 2)) for organ in ORGANS], 1).astype(np.float32)


@torch.no_grad()
def embed(model: FeatureNet, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The feature layer (N, features) float64 of images (N, H, W) in [0, 1], in eval mode on the model's device
    (the model is left in the mode it was in)."""
    if np.ndim(images) != 3:
        raise ValueError(f"images must be (N, H, W), got shape {np.shape(images)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.empty((len(images), model.config.features))
    try:
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[start:start + batch_size], dtype=np.float32))[:, None].to(device)
            out[start:start + len(x)] = model.features(x).double().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def load_features(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[FeatureNet, dict[str, Any]]:
    """The feature network a checkpoint holds (eval mode) and its payload (payload["organs"]: the organs its organ
    head was trained on, empty when the data had no masks)."""
    return load_module(path, "features", lambda c: FeatureNet(FeatureConfig.from_dict(c)), map_location)


# ---------------------------------------------------------------------------------------------- training


@dataclass
class FeatureTrainConfig:
    """A feature network's training run. model: FeatureConfig fields. The schedule fields, amp and precision mean
    what they mean in `train.TrainConfig`."""

    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup: float = 0.03
    final_lr: float = 0.1
    amp: bool = False
    precision: str = "auto"
    seed: int = 0
    device: str = "auto"
    limit: int | None = None
    model: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_run_settings(self)
        self.model = FeatureConfig.from_dict(self.model).to_dict()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_feature_config(**settings: Any) -> FeatureTrainConfig:
    """A FeatureTrainConfig from FeatureTrainConfig and FeatureConfig fields (e.g. epochs=2, channels=[8, 8])."""
    return run_config(FeatureTrainConfig, FeatureConfig, "feature", settings)


def train_features(data_dir: str | Path, out_dir: str | Path, config: FeatureTrainConfig, *, resume: bool = False,
                   overwrite: bool = False, progress: bool = True, data_options: dict[str, Any] | None = None,
                   allow_other_data: bool = False,
                   callback: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train a FeatureNet on the train split of data_dir: cross-entropy of the position bin, plus (where both the
    train and validate splits have masks) the binary cross-entropy of each organ's presence.

    The run folder works as in `train.train` (best.pt: lowest validation loss). Returns the history, one record
    per epoch: epoch, lr, train_loss (training mode), val_loss, val_position_accuracy, val_organ_accuracy (over
    slices and organs; absent without masks), seconds; the val_ scores are of the whole validate split.
    """
    options = runs.data_options(data_options)
    runs.check_data_dir(data_dir)
    with runs.claim(out_dir, "features", config.to_dict(), config.model, resume=resume, overwrite=overwrite,
                    inputs=(data_dir,)) as payload:
        return _fit_features(data_dir, Path(out_dir), config, payload, options, allow_other_data, progress,
                             callback)


def _fit_features(data_dir: str | Path, out_dir: Path, config: FeatureTrainConfig, payload: dict[str, Any] | None,
                  options: dict[str, Any], allow_other_data: bool, progress: bool,
                  callback: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    """The body of `train_features`, in its claimed run folder."""
    device = select_device(config.device)
    saved, config = config, for_device(config, device)
    dirs = find_split_dirs(data_dir)
    masks = all(dirs[split][1] is not None for split in ("train", "validate"))
    train_split = load_split(data_dir, "train", progress=progress, memory_map=False, masks=masks, **options)
    val_split = load_split(data_dir, "validate", progress=progress, masks=masks, **options)
    record = runs.data_record(data_dir, [train_split, val_split], options)
    positions = config.model["positions"]

    images = resident_images(train_split.images[:config.limit], device)

    def targets(split: SplitData, limit: int | None, on: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        bins = torch.from_numpy(position_bins(split, positions)[:limit]).to(on)
        organs = torch.from_numpy(organ_presence(split.masks[:limit])).to(on) if masks else None
        return bins, organs

    train_bins, train_organs = targets(train_split, config.limit, images.device)
    val_images, (val_bins, val_organs) = val_split.images, targets(val_split, None, device)
    del train_split
    steps = config.epochs * math.ceil(len(images) / config.batch_size)

    with torch.random.fork_rng(devices=runs.cuda_devices(device)), cudnn_autotune(device):
        torch.manual_seed(config.seed)
        model = FeatureNet(FeatureConfig.from_dict(config.model)).to(device)
        optimizer, scheduler = optimizer_for(model, config, steps)
        scaler = grad_scaler(config.precision, device)

        def losses(x: torch.Tensor, bins: torch.Tensor, organs: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """(mean loss, position logits, organ logits) of a batch."""
            with autocast(device, config.precision):
                position, organ = model(x)
            position, organ = position.float(), organ.float()
            loss = F.cross_entropy(position, bins)
            if organs is not None:
                loss = loss + F.binary_cross_entropy_with_logits(organ, organs)
            return loss, position, organ

        def one_epoch(epoch: int) -> dict[str, Any]:
            model.train()
            total = torch.zeros((), device=device)  # float32: MPS has no float64
            order = torch.randperm(len(images), generator=runs.epoch_generator(config.seed, epoch)).to(images.device)
            with tqdm(total=len(images), desc=f"features epoch {epoch}/{config.epochs}", unit="img",
                      disable=not progress or None, leave=False) as bar:
                for start in range(0, len(images), config.batch_size):
                    batch = order[start:start + config.batch_size]
                    loss, _, _ = losses(batch_to(images[batch], device), batch_to(train_bins[batch], device),
                                        batch_to(train_organs[batch], device) if masks else None)
                    optimizer_step(loss, optimizer, scheduler, scaler)
                    total += loss.detach() * len(batch)
                    bar.update(len(batch))
            mean = total.item() / len(images)
            if not math.isfinite(mean):
                raise RuntimeError(f"feature training diverged in epoch {epoch}: the loss is {mean}; lower the lr")
            return {"train_loss": mean}

        @torch.no_grad()
        def score() -> dict[str, Any]:
            model.eval()
            sums = torch.zeros(3, device=device)  # loss, correct positions, correct organ answers
            for start in range(0, len(val_images), 64):
                x = torch.from_numpy(np.array(val_images[start:start + 64], dtype=np.float32))[:, None].to(device)
                bins = val_bins[start:start + 64]
                organs = val_organs[start:start + 64] if masks else None
                loss, position, organ = losses(x, bins, organs)
                right = ((organ > 0) == (organs > 0.5)).sum().float() if masks else loss.new_zeros(())
                sums += torch.stack([loss * len(x), (position.argmax(1) == bins).sum().float(), right])
            loss, right_positions, right_organs = sums.tolist()
            scores = {"val_loss": loss / len(val_images), "val_position_accuracy": right_positions / len(val_images)}
            if masks:
                scores["val_organ_accuracy"] = right_organs / (len(val_images) * len(ORGANS))
            return scores

        return runs.fit(out_dir, kind="features", model=model, optimizer=optimizer, scheduler=scheduler,
                        scaler=scaler, payload=payload, train_config=saved.to_dict(),
                        model_config=model.config.to_dict(), epochs=config.epochs, device=device,
                        one_epoch=one_epoch, score=score, best="val_loss", minimize=True,
                        extra={"precision": config.precision, "organs": list(ORGANS) if masks else []},
                        data=record, allow_other_data=allow_other_data, callback=callback)


# ---------------------------------------------------------------------------------------------- metrics


def _feature_sets(a: np.ndarray, b: np.ndarray, at_least: int = 2) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, F) and (M, F) with the same F, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < at_least:
        raise ValueError(f"need at least {at_least} feature vectors in each set, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("feature sets must be finite: they hold NaN or infinite values")
    return a, b


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to feature sets a (N, F) and b (M, F), the formula of FID
    (Heusel et al. 2017): ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)). A covariance product whose square
    root is not finite is retried with 1e-6 added to the diagonals; ValueError when the root has more than a
    rounding error's imaginary part."""
    a, b = _feature_sets(a, b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = sqrtm(s_a @ s_b)
    if not np.isfinite(root).all():
        offset = 1e-6 * np.eye(len(s_a))
        root = sqrtm((s_a + offset) @ (s_b + offset))
    if np.iscomplexobj(root):
        imaginary = np.abs(root.imag).max()
        if imaginary > 1e-3 * max(1.0, np.abs(root.real).max()):
            raise ValueError(f"the square root of the covariance product has an imaginary part of {imaginary:.3g}: "
                             f"the covariances of {len(a)} and {len(b)} vectors of {a.shape[1]} features are too "
                             "singular; use more samples")
        root = root.real
    distance = np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root)
    return max(0.0, float(distance))


def kernel_distance(a: np.ndarray, b: np.ndarray, *, subsets: int = 50, subset_size: int | None = None,
                    seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): the unbiased MMD^2 between feature sets a (N, F) and b (M, F) with the kernel
    k(x, y) = (x . y / F + 1)^3, over `subsets` random subsets of subset_size vectors of each (default
    min(N, M, 1000)), drawn without replacement by a numpy Generator seeded with `seed`. Returns (mean, std)."""
    a, b = _feature_sets(a, b)
    size = min(len(a), len(b), 1000) if subset_size is None else subset_size
    if not 2 <= size <= min(len(a), len(b)):
        raise ValueError(f"subset_size must lie in [2, {min(len(a), len(b))}], got {size}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    rng = np.random.default_rng(seed)
    dim = a.shape[1]

    def within(k: np.ndarray) -> float:
        return (k.sum() - np.trace(k)) / (size * (size - 1))

    values = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)]
        values.append(within((x @ x.T / dim + 1) ** 3) + within((y @ y.T / dim + 1) ** 3)
                      - 2 * ((x @ y.T / dim + 1) ** 3).mean())
    return float(np.mean(values)), float(np.std(values))


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """(N,): each vector's distance to its k-th nearest other vector of x (N, F)."""
    if not 1 <= k < len(x):
        raise ValueError(f"k must lie in [1, {len(x) - 1}] for {len(x)} vectors, got {k}")
    return np.partition(cdist(x, x), k, axis=1)[:, k]  # column 0: the vector itself


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of feature sets real (N, F) and fake (M, F): each
    set's manifold is the union of balls around its vectors reaching their k-th nearest neighbour. Precision: the
    share of fake vectors inside the real manifold (realism); recall: the share of real vectors inside the fake
    manifold (how much of the real variety is covered)."""
    real, fake = _feature_sets(real, fake)
    distances = cdist(real, fake)  # (N, M)
    precision = (distances <= _knn_radii(real, k)[:, None]).any(0).mean()
    recall = (distances <= _knn_radii(fake, k)[None, :]).any(1).mean()
    return float(precision), float(recall)


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) of feature sets real (N, F) and fake (M, F), with balls around the
    real vectors only (reaching their k-th nearest neighbour). Density: how many real balls hold a fake vector,
    on average, divided by k (about 1 when the sets match; above 1 where fakes crowd dense regions); coverage: the
    share of real balls holding at least one fake vector."""
    real, fake = _feature_sets(real, fake)
    inside = cdist(real, fake) <= _knn_radii(real, k)[:, None]  # (N, M)
    return float(inside.sum() / (k * len(fake))), float(inside.any(1).mean())


def nearest_hamming(maps: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each code index map of maps (N, h, w), the reference map (M, h, w) with the fewest differing positions:
    (the share of positions that differ (N,) float64, its index into reference (N,) int64; the first on ties).
    Positions where every map of both holds the same code are skipped; the rest are compared in chunks."""
    maps, reference = np.asarray(maps), np.asarray(reference)
    if maps.ndim != 3 or reference.ndim != 3 or maps.shape[1:] != reference.shape[1:] or not len(reference):
        raise ValueError(f"maps and reference must be (N, h, w) and (M >= 1, h, w), got {maps.shape} and "
                         f"{reference.shape}")
    if not (np.issubdtype(maps.dtype, np.integer) and np.issubdtype(reference.dtype, np.integer)):
        raise ValueError(f"code index maps must be integers, got {maps.dtype} and {reference.dtype}")
    a, b = maps.reshape(len(maps), -1), reference.reshape(len(reference), -1)
    positions = a.shape[1]
    varying = ~((a == b[0]).all(0) & (b == b[0]).all(0))
    small = max(a.max(initial=0), b.max()) < 2 ** 15 and min(a.min(initial=0), b.min()) >= -2 ** 15
    a, b = (x[:, varying].astype(np.int16 if small else np.int64) for x in (a, b))
    fraction, index = np.empty(len(a)), np.empty(len(a), dtype=np.int64)
    chunk = max(1, 2 ** 20 // max(1, len(b) * a.shape[1]))  # about a million comparisons at a time
    for start in range(0, len(a), chunk):
        equal = a[start:start + chunk, None, :] == b[None]  # (chunk, M, positions)
        matches = equal.view(np.uint8).sum(-1, dtype=np.int32)  # 2-3x faster than count_nonzero
        best = matches.argmax(1)
        index[start:start + len(best)] = best
        fraction[start:start + len(best)] = (a.shape[1] - matches[np.arange(len(best)), best]) / positions
    return fraction, index


def mean_pairwise_ssim(images: np.ndarray, max_pairs: int = 500, seed: int = 0) -> float:
    """Mean SSIM (`metrics.ssim_psnr`) over distinct pairs of images (N, H, W): all of them, or max_pairs drawn
    without replacement (a numpy Generator seeded with `seed`) when there are more. Low: a varied set."""
    if np.ndim(images) != 3 or len(images) < 2:
        raise ValueError(f"images must be (N >= 2, H, W), got shape {np.shape(images)}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    first, second = np.triu_indices(len(images), 1)
    if len(first) > max_pairs:
        pick = np.sort(np.random.default_rng(seed).choice(len(first), max_pairs, replace=False))
        first, second = first[pick], second[pick]
    return float(ssim_psnr(np.asarray(images[first]), np.asarray(images[second]))[0].mean())


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """The area under the ROC curve of scores that should rank `positive` above `negative`: the share of
    (positive, negative) pairs ordered so, ties counted half (the Mann-Whitney U / (n_pos n_neg)), in [0, 1]."""
    positive, negative = np.asarray(positive, dtype=np.float64).ravel(), np.asarray(negative, dtype=np.float64).ravel()
    if not len(positive) or not len(negative):
        raise ValueError(f"auroc needs scores in both groups, got {len(positive)} positive and {len(negative)} "
                         "negative")
    if not (np.isfinite(positive).all() and np.isfinite(negative).all()):
        raise ValueError("auroc needs finite scores: they hold NaN or infinite values")
    ranks = rankdata(np.concatenate([positive, negative]))
    u = ranks[:len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


# ---------------------------------------------------------------------------------------------- the verdict


def judge(feature_model: FeatureNet, samples: np.ndarray, sample_maps: np.ndarray, train_images: np.ndarray,
          train_maps: np.ndarray, test_images: np.ndarray, test_maps: np.ndarray, *,
          sample_nll: np.ndarray | None = None, test_nll: np.ndarray | None = None) -> dict[str, float]:
    """Every score of generated slices samples (N, H, W) with their code maps (N, h, w), against the train and
    test splits (images and their VQ-VAE code maps), in the feature space of feature_model (`embed`).

    Returns plain numbers: fid_samples_test, fid_samples_train, fid_train_test (the reference: what real slices
    of other patients score); kid_samples_test, kid_train_test (means) and their _std; precision, recall,
    density, coverage (samples against the test split as the real set); hamming_samples_min / _mean (each
    sample's nearest training map, `nearest_hamming`), hamming_test_min / _mean (each test map's); diversity_samples,
    diversity_test (`mean_pairwise_ssim`: lower is more varied); sample_nll_mean, test_nll_mean (the means of
    the given NLLs, if given); n_samples, n_test. FID is biased upwards for small sets: draw hundreds of samples
    before reading fid_samples_test against fid_train_test.
    """
    for name, images, maps in (("samples", samples, sample_maps), ("train", train_images, train_maps),
                               ("test", test_images, test_maps)):
        if len(images) != len(maps):
            raise ValueError(f"{name}: {len(images)} images but {len(maps)} code maps")
    f_samples, f_train, f_test = (embed(feature_model, x) for x in (samples, train_images, test_images))
    kid_samples, kid_samples_std = kernel_distance(f_samples, f_test)
    kid_train, kid_train_std = kernel_distance(f_train, f_test)
    precision, recall = precision_recall(f_test, f_samples)
    density, coverage = density_coverage(f_test, f_samples)
    hamming_samples, _ = nearest_hamming(sample_maps, train_maps)
    hamming_test, _ = nearest_hamming(test_maps, train_maps)
    report = {
        "fid_samples_test": frechet_distance(f_samples, f_test),
        "fid_samples_train": frechet_distance(f_samples, f_train),
        "fid_train_test": frechet_distance(f_train, f_test),
        "kid_samples_test": kid_samples, "kid_samples_test_std": kid_samples_std,
        "kid_train_test": kid_train, "kid_train_test_std": kid_train_std,
        "precision": precision, "recall": recall, "density": density, "coverage": coverage,
        "hamming_samples_min": float(hamming_samples.min()), "hamming_samples_mean": float(hamming_samples.mean()),
        "hamming_test_min": float(hamming_test.min()), "hamming_test_mean": float(hamming_test.mean()),
        "diversity_samples": mean_pairwise_ssim(samples), "diversity_test": mean_pairwise_ssim(test_images),
        "n_samples": len(samples), "n_test": len(test_images),
    }
    for name, nll in (("sample_nll_mean", sample_nll), ("test_nll_mean", test_nll)):
        if nll is not None:
            report[name] = float(np.mean(nll))
    return report


def targets(report: dict[str, float]) -> dict[str, bool]:
    """The project's targets for a `judge` report: fid (FID to the test split at most twice the train split's),
    recall (above 0.5), memorisation (no sample nearer in code space to a training map than the nearest test
    map is)."""
    return {"fid": report["fid_samples_test"] <= 2 * report["fid_train_test"],
            "recall": report["recall"] > 0.5,
            "memorisation": report["hamming_samples_min"] >= report["hamming_test_min"]}
