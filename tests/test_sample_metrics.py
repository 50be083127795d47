"""Tests of vqvae_lib.sample_metrics: the metrics against closed forms and brute force, the feature network's runs
on the tiny phantom, and the features command."""

import json
import shutil
import time

import numpy as np
import pytest
import torch

from vqvae_lib import sample_metrics as S
from vqvae_lib.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vqvae_lib.cli import main
from vqvae_lib.model import VQVAE, ModelConfig


def whitened(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """n vectors with sample mean exactly 0 and sample covariance exactly the identity."""
    x = np.random.default_rng(seed).normal(size=(n, dim))
    x -= x.mean(0)
    return x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T


# ---------------------------------------------------------------------------------------------- FID and KID


def test_frechet_distance_matches_the_closed_form():
    a = whitened(400, 6)
    assert np.allclose(np.cov(a, rowvar=False), np.eye(6)) and S.frechet_distance(a, a) < 1e-9
    shift = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    assert S.frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-9)  # equal covariances
    scale = np.array([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])  # diagonal covariances: sum of (sigma_a - sigma_b)^2 adds
    assert S.frechet_distance(a, a * scale + shift) == pytest.approx(shift @ shift + np.sum((1 - scale) ** 2),
                                                                     rel=1e-9)
    assert S.frechet_distance(a * scale, a) == pytest.approx(S.frechet_distance(a, a * scale))
    few = np.random.default_rng(1).normal(size=(5, 6))  # fewer vectors than features: singular covariances
    assert np.isfinite(S.frechet_distance(few, few + 1))
    with pytest.raises(ValueError, match="same F"):
        S.frechet_distance(a, a[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        S.frechet_distance(a[:1], a)


def test_kernel_distance_is_the_unbiased_mmd():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    same, _ = S.kernel_distance(a, b)
    shifted, _ = S.kernel_distance(a, b + 1)
    assert shifted > 0.5 and abs(same) < 0.02 * shifted
    assert S.kernel_distance(a, b, subset_size=100, seed=3) == S.kernel_distance(a, b, subset_size=100, seed=3)
    assert S.kernel_distance(a, b, subset_size=100)[1] > 0  # the subsets differ

    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.5  # one subset of everything, by brute force
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(6)) / 36
    mean, std = S.kernel_distance(x, y, subsets=1)
    assert mean == pytest.approx(xx + yy - 2 * xy) and std == 0
    with pytest.raises(ValueError, match=r"subset_size must lie in \[2, 6\], got 7"):
        S.kernel_distance(x, y, subset_size=7)


# ---------------------------------------------------------------------------------------------- manifolds


def brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        return np.array([sorted(np.linalg.norm(x - p, axis=1))[k] for p in x])

    def share_inside(points, centres, r):
        return np.mean([any(np.linalg.norm(p - c) <= rc for c, rc in zip(centres, r)) for p in points])

    return share_inside(fake, real, radii(real)), share_inside(real, fake, radii(fake))


def test_precision_and_recall():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 4))
    assert S.precision_recall(real, real) == (1.0, 1.0)
    assert S.precision_recall(real, real + 100) == (0.0, 0.0)
    collapsed = real[real[:, 0] > 1]  # realistic but covering one corner only
    precision, recall = S.precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.5
    fake = rng.normal(size=(60, 4)) * 1.5 + 0.3
    assert S.precision_recall(real[:50], fake, k=3) == pytest.approx(brute_precision_recall(real[:50], fake, 3))
    with pytest.raises(ValueError, match=r"k must lie in \[1, 49\]"):
        S.precision_recall(real[:50], fake, k=50)


def test_density_and_coverage():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(150, 4))
    # each real ball holds its centre and k neighbours: density (k + 1) / k
    assert S.density_coverage(real, real, k=5) == pytest.approx((6 / 5, 1.0))
    assert S.density_coverage(real, real + 100) == (0.0, 0.0)
    density, coverage = S.density_coverage(real, np.zeros((50, 4)))  # every fake where the real ones are densest
    inside = sum(np.linalg.norm(x) <= sorted(np.linalg.norm(real - x, axis=1))[5] for x in real)
    assert (density, coverage) == pytest.approx((inside / 5, inside / 150)) and density > 1 and coverage < 0.1
    density, coverage = S.density_coverage(real, rng.normal(size=(150, 4)))
    assert 0.6 < density < 1.5 and 0.8 < coverage <= 1


# ---------------------------------------------------------------------------------------------- code maps, SSIM, AUROC


def test_nearest_hamming_matches_brute_force():
    rng = np.random.default_rng(0)
    maps, reference = rng.integers(0, 4, (20, 4, 3)), rng.integers(0, 4, (15, 4, 3))
    maps[:, 0, 0] = reference[:, 0, 0] = 2  # a position every map shares
    maps[3] = reference[7]
    fraction, index = S.nearest_hamming(maps, reference)
    for i, m in enumerate(maps):
        distances = [(m != r).mean() for r in reference]
        assert fraction[i] == pytest.approx(min(distances)) and index[i] == int(np.argmin(distances))
    assert fraction[3] == 0 and index[3] == 7
    with pytest.raises(ValueError, match=r"\(N, h, w\) and \(M >= 1, h, w\)"):
        S.nearest_hamming(maps, reference[:, :2])


def test_nearest_hamming_is_fast_enough_for_whole_splits():
    rng = np.random.default_rng(0)
    maps, reference = rng.integers(0, 512, (1500, 32, 16)), rng.integers(0, 512, (1500, 32, 16))
    start = time.perf_counter()
    fraction, index = S.nearest_hamming(maps, reference)
    assert time.perf_counter() - start < 10 and fraction.shape == index.shape == (1500,)
    assert 0.9 < fraction.min() <= fraction.max() < 1  # random codes: almost every position differs


def test_mean_pairwise_ssim():
    rng = np.random.default_rng(0)
    same = np.repeat(rng.random((1, 32, 32)), 4, axis=0)
    assert S.mean_pairwise_ssim(same) == pytest.approx(1.0)
    noise = rng.random((40, 32, 32))  # 780 pairs: 500 of them are drawn
    assert S.mean_pairwise_ssim(noise) < 0.2
    assert S.mean_pairwise_ssim(noise, seed=1) != S.mean_pairwise_ssim(noise, seed=2)
    with pytest.raises(ValueError, match="N >= 2"):
        S.mean_pairwise_ssim(noise[:1])


def test_auroc_counts_ordered_pairs():
    rng = np.random.default_rng(0)
    positive, negative = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 20).astype(float)  # many ties
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]
    assert S.auroc(positive, negative) == pytest.approx(np.mean(pairs))
    assert S.auroc(positive, positive) == 0.5
    assert S.auroc([3, 4, 5], [0, 1, 2]) == 1.0 and S.auroc([0, 1], [2, 3]) == 0.0
    with pytest.raises(ValueError, match="both groups"):
        S.auroc([], [1.0])


# ---------------------------------------------------------------------------------------------- judge


def tiny_net() -> S.FeatureNet:
    torch.manual_seed(0)
    return S.FeatureNet(S.FeatureConfig(channels=[4, 8], features=6)).eval()


def test_judge_reports_every_score_and_the_targets():
    rng = np.random.default_rng(0)
    train, test = rng.random((30, 32, 16)).astype(np.float32), rng.random((20, 32, 16)).astype(np.float32)
    train_maps, test_maps = rng.integers(0, 8, (30, 4, 2)), rng.integers(0, 8, (20, 4, 2))
    report = S.judge(tiny_net(), train[:12], train_maps[:12], train, train_maps, test, test_maps,
                     sample_nll=np.array([1.0, 2.0]), test_nll=np.array([3.0]))
    expected = {"fid_samples_test", "fid_train_test", "fid_samples_train", "kid_samples_test", "kid_train_test",
                "precision", "recall", "density", "coverage", "hamming_samples_min", "hamming_samples_mean",
                "hamming_test_min", "hamming_test_mean", "diversity_samples", "diversity_test", "sample_nll_mean",
                "test_nll_mean", "n_samples", "n_test"}
    assert expected <= set(report) and all(type(v) in (int, float) for v in report.values())
    assert report["sample_nll_mean"] == 1.5 and report["n_samples"] == 12 and report["n_test"] == 20
    assert report["hamming_samples_min"] == 0 and report["hamming_test_min"] > 0  # copies of training slices
    assert S.targets(report)["memorisation"] is False
    assert S.targets({"fid_samples_test": 2.0, "fid_train_test": 1.0, "recall": 0.6, "hamming_samples_min": 0.3,
                      "hamming_test_min": 0.3}) == {"fid": True, "recall": True, "memorisation": True}
    assert S.targets({"fid_samples_test": 2.1, "fid_train_test": 1.0, "recall": 0.5, "hamming_samples_min": 0.2,
                      "hamming_test_min": 0.3}) == {"fid": False, "recall": False, "memorisation": False}
    with pytest.raises(ValueError, match="samples: 12 images but 11 code maps"):
        S.judge(tiny_net(), train[:12], train_maps[:11], train, train_maps, test, test_maps)


def test_the_feature_network_takes_any_size_divisible_by_its_downsampling():
    net = tiny_net()
    assert S.embed(net, np.zeros((3, 8, 12), np.float32)).shape == (3, 6)
    assert S.embed(net, np.zeros((3, 8, 12), np.float32)).dtype == np.float64
    with pytest.raises(ValueError, match=r"divisible by 4, got \(3, 1, 8, 10\)"):
        S.embed(net, np.zeros((3, 8, 10), np.float32))
    with pytest.raises(ValueError, match="channels must be a non-empty list"):
        S.FeatureConfig(channels=[])
    with pytest.raises(ValueError, match="unknown FeatureConfig keys: colour"):
        S.FeatureConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="unknown feature settings colour"):
        S.make_feature_config(colour=1)


# ---------------------------------------------------------------------------------------------- runs


def tiny_config(**overrides) -> S.FeatureTrainConfig:
    return S.make_feature_config(**{"channels": [4, 8, 8, 8], "features": 8, "epochs": 1, "limit": 32,
                                    "batch_size": 8, "schedule": "constant", "device": "cpu", **overrides})


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_a_feature_run_is_deterministic_resumes_and_loads(tiny_phantom, tmp_path):
    straight = S.train_features(tiny_phantom, tmp_path / "a", tiny_config(epochs=2), progress=False)
    assert [h["epoch"] for h in straight] == [1, 2]
    assert set(straight[0]) == {"epoch", "lr", "train_loss", "val_loss", "val_position_accuracy",
                                "val_organ_accuracy", "seconds"}
    assert all(0 <= h["val_position_accuracy"] <= 1 and 0 <= h["val_organ_accuracy"] <= 1 for h in straight)
    for name in ("best.pt", "last.pt", "metrics.json"):
        assert (tmp_path / "a" / name).is_file()
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == straight
    best = load_checkpoint(tmp_path / "a" / "best.pt", kind="features")
    assert best["epoch"] == 1 + int(np.argmin([h["val_loss"] for h in straight]))
    assert best["organs"] == ["bone", "bladder", "rectum", "prostate"]

    # the same seed (and a schedule that does not depend on the epochs): the same first epoch; resumed to two:
    # the straight run's history
    first = S.train_features(tiny_phantom, tmp_path / "b", tiny_config(), progress=False)
    assert untimed(first) == untimed(straight[:1])
    resumed = S.train_features(tiny_phantom, tmp_path / "b", tiny_config(epochs=2), resume=True, progress=False)
    assert untimed(resumed) == untimed(straight)

    model, payload = S.load_features(tmp_path / "a" / "best.pt")
    assert not model.training and payload["kind"] == "features"
    features = S.embed(model, np.zeros((5, 256, 128), np.float32))
    assert features.shape == (5, 8) and np.isfinite(features).all()

    vq = tmp_path / "vq.pt"
    save_checkpoint(vq, {"kind": "vqvae", "model_config": ModelConfig(hidden=8, res_hidden=4).to_dict(),
                         "train_config": {}, "model_state": VQVAE(ModelConfig(hidden=8, res_hidden=4)).state_dict(),
                         "epoch": 0, "history": []})
    with pytest.raises(CheckpointError, match="holds a vqvae model, not a features model"):
        S.load_features(vq)


def test_without_masks_only_the_position_head_trains(tiny_phantom, tmp_path):
    images_only = tmp_path / "data"
    for folder in tiny_phantom.glob("keras_slices_*"):
        if not folder.name.startswith("keras_slices_seg"):
            shutil.copytree(folder, images_only / folder.name)
    history = S.train_features(images_only, tmp_path / "run", tiny_config(limit=16), progress=False)
    assert "val_organ_accuracy" not in history[0] and 0 <= history[0]["val_position_accuracy"] <= 1
    assert load_checkpoint(tmp_path / "run" / "best.pt")["organs"] == []


def test_cli_features_trains_resumes_and_refuses_bad_data(tiny_phantom, tmp_path, capsys):
    run = tmp_path / "features"
    common = ["features", "--data-dir", str(tiny_phantom), "--out", str(run), "--limit", "16", "--device", "cpu"]
    assert main([*common, "--epochs", "1"]) == 0
    assert main([*common, "--epochs", "2", "--resume", "auto"]) == 0
    text = capsys.readouterr().out
    assert "epoch 1/1: train loss" in text and "epoch 2/2: train loss" in text and "accuracy: position" in text
    assert "best validation loss" in text and str(run / "best.pt") in text
    assert [h["epoch"] for h in load_checkpoint(run / "last.pt", kind="features")["history"]] == [1, 2]

    assert main(["features", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert f"error: data folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
