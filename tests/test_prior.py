"""Tests of vqvae_lib.prior: causality of the gated PixelCNN, exact fast sampling, likelihood bookkeeping,
training runs and the VQ-VAE / prior pairing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vqvae_lib import prior as P
from vqvae_lib import train as T
from vqvae_lib.checkpoint import CheckpointError, load_checkpoint, load_model

SMALL = dict(codebook_size=7, channels=8, layers=3, kernel=3, positions=4)


def small_prior(**overrides) -> P.PixelCNNPrior | P.TransformerPrior:
    torch.manual_seed(0)
    return P.make_prior(P.PriorConfig(**{**SMALL, **overrides})).double().eval()


ARCHS = [dict(arch="pixelcnn"), dict(arch="transformer", channels=8, heads=2, max_rows=12, max_cols=6)]


def random_maps(n=2, h=6, w=5, k=7, seed=1) -> torch.Tensor:
    return torch.randint(0, k, (n, h, w), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", [dict(kernel=3), dict(kernel=5), ARCHS[1]])
def test_no_position_sees_itself_or_the_future(arch):
    """Changing the code at one position moves no logits at it or before it (raster order)."""
    model = small_prior(**arch)
    maps, bins = random_maps(), torch.tensor([0, 3])
    base = model(maps, bins)
    h, w = maps.shape[1:]
    for pos in range(h * w):
        changed = maps.clone()
        changed[:, pos // w, pos % w] = (changed[:, pos // w, pos % w] + 1) % 7
        moved = (model(changed, bins) - base).abs().amax(dim=(0, 1)).flatten()
        assert moved[:pos + 1].max() == 0, f"changing position {pos} moved logits at or before it"
        if pos % w < w - 1:
            assert moved[pos + 1] > 0  # the next position in the row does see it


def test_the_receptive_field_has_no_blind_spot():
    """The last position depends on every earlier position within reach: the horizontal and vertical stacks
    together cover the rows above on both sides (a single masked stack would miss the upper right)."""
    model = small_prior(layers=4)
    maps = random_maps(n=1, h=5, w=5)
    base = model(maps, torch.tensor([1]))[0, :, 4, 2]
    for r in range(5):
        for c in range(5):
            if (r, c) >= (4, 2):
                continue
            changed = maps.clone()
            changed[0, r, c] = (changed[0, r, c] + 1) % 7
            assert (model(changed, torch.tensor([1]))[0, :, 4, 2] - base).abs().max() > 0, (r, c)


@pytest.mark.parametrize("layers", [1, 3, 7])
def test_row_logits_equal_the_full_forward_pass(layers):
    """What the sampler computes (vertical stack once per row on the rows it can see) equals the full pass."""
    model = small_prior(layers=layers)
    maps, bins = random_maps(h=12, w=5), torch.tensor([2, 1])
    full = model(maps, bins)
    for row in range(maps.shape[1]):
        torch.testing.assert_close(model.row_logits(maps, row, bins), full[:, :, row], rtol=1e-10, atol=1e-10)


def test_the_position_condition_changes_the_logits_and_is_checked():
    model = small_prior()
    maps = random_maps()
    assert (model(maps, torch.tensor([0, 0])) - model(maps, torch.tensor([3, 3]))).abs().max() > 0
    with pytest.raises(ValueError, match="conditioned on 4 slice-position bins"):
        model(maps)
    with pytest.raises(ValueError, match="unconditional"):
        small_prior(positions=0)(maps, torch.tensor([0, 0]))


def test_sampling_shapes_determinism_and_temperature():
    model = small_prior().float()
    bins = torch.tensor([0, 1, 2])
    a = model.sample(3, (4, 5), bins, seed=3)
    assert a.shape == (3, 4, 5) and a.dtype == torch.int64 and 0 <= a.min() and a.max() < 7
    assert torch.equal(a, model.sample(3, (4, 5), bins, seed=3))
    assert not torch.equal(a, model.sample(3, (4, 5), bins, seed=4))
    cold = model.sample(3, (4, 5), bins, seed=3, temperature=1e-4)  # greedy: the argmax of each step's logits
    for row in range(4):
        logits = model.row_logits(cold, row, bins)
        assert torch.equal(cold[:, row], logits.argmax(1))
    with pytest.raises(ValueError, match="temperature"):
        model.sample(1, (2, 2), bins[:1], temperature=0)


def test_nll_bookkeeping():
    """Cross-entropy in nats per latent; a uniform model scores log K; bits = nats / ln 2."""
    logits = torch.zeros(2, 7, 3, 4)
    maps = random_maps(h=3, w=4)
    assert P.nll_per_latent(logits, maps).item() == pytest.approx(math.log(7))
    train = np.array([0, 0, 0, 1])
    # add-one smoothing over K = 3: p = (4, 2, 1) / 7
    assert P.unigram_nll(train, np.array([0, 2]), 3) == pytest.approx(-(math.log(4 / 7) + math.log(1 / 7)) / 2)


def test_position_bins(tiny_phantom):
    from vqvae_lib.data import load_split
    data = load_split(tiny_phantom, "validate", progress=False)
    bins = P.position_bins(data, 4)
    assert bins.min() == 0 and bins.max() == 3
    first, last = np.argmin(data.indices), np.argmax(data.indices)
    assert bins[first] == 0 and bins[last] == 3
    assert (P.position_bins(data, 0) == 0).all()


def test_config_checks():
    with pytest.raises(ValueError, match="kernel must be odd"):
        P.PriorConfig(kernel=4)
    with pytest.raises(ValueError, match="unknown prior settings colour"):
        P.make_prior_config(colour=1)
    config = P.make_prior_config(epochs=2, channels=16)
    assert config.model["channels"] == 16 and config.epochs == 2


# ---------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def vq_checkpoint(tiny_phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("vq")
    config = T.make_config("default", hidden=16, res_hidden=8, codebook_size=16, embed_dim=8, downsample=16,
                           epochs=1, limit=16, batch_size=8, device="cpu")
    T.train(tiny_phantom, out, config, progress=False)
    return out / "best.pt"


def tiny_prior_config(**overrides) -> P.PriorTrainConfig:
    return P.make_prior_config(**{"codebook_size": 16, "channels": 8, "layers": 2, "kernel": 3, "positions": 4,
                                  "epochs": 2, "batch_size": 8, "schedule": "constant", "device": "cpu", **overrides})


def test_a_prior_run_learns_resumes_and_pairs_with_its_vqvae(vq_checkpoint, tiny_phantom, tmp_path):
    history = P.train_prior(vq_checkpoint, tiny_phantom, tmp_path / "a", tiny_prior_config(), progress=False)
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        assert h["val_bits"] == pytest.approx(h["val_nll"] / math.log(2))
        assert 0 < h["val_nll"] < math.log(16) + 0.5 and h["train_nll"] > 0
    assert history[1]["train_nll"] < history[0]["train_nll"]
    best = load_checkpoint(tmp_path / "a" / "best.pt", kind="prior")
    assert best["epoch"] == 1 + int(np.argmin([h["val_nll"] for h in history]))
    assert best["vqvae"]["sha256"] == P.file_sha256(vq_checkpoint) and best["vqvae"]["latent_shape"] == [16, 8]
    assert (tmp_path / "a" / "maps_train.npy").exists()

    # interrupted after one epoch, then resumed: the same history as the straight run
    P.train_prior(vq_checkpoint, tiny_phantom, tmp_path / "b", tiny_prior_config(epochs=1), progress=False)
    resumed = P.train_prior(vq_checkpoint, tiny_phantom, tmp_path / "b", tiny_prior_config(), resume=True,
                            progress=False)
    untimed = [{k: v for k, v in h.items() if k not in ("seconds", "maps_per_s")} for h in resumed]
    assert untimed == [{k: v for k, v in h.items() if k not in ("seconds", "maps_per_s")} for h in history]

    images, maps, bins = P.sample_slices(vq_checkpoint, tmp_path / "a" / "best.pt", 3, seed=1, device="cpu")
    assert images.shape == (3, 256, 128) and maps.shape == (3, 16, 8) and bins.shape == (3,)
    vq, _ = load_model(vq_checkpoint)
    np.testing.assert_array_equal(images, vq.decode_indices(torch.from_numpy(maps)).clamp(0, 1)[:, 0].numpy())
    again = P.sample_slices(vq_checkpoint, tmp_path / "a" / "best.pt", 3, seed=1, device="cpu")
    np.testing.assert_array_equal(maps, again[1])


def test_a_prior_refuses_another_vqvae(vq_checkpoint, tiny_phantom, tmp_path):
    P.train_prior(vq_checkpoint, tiny_phantom, tmp_path / "p", tiny_prior_config(epochs=1), progress=False)
    other = tmp_path / "other.pt"
    payload = load_checkpoint(vq_checkpoint)
    payload["epoch"] += 1
    torch.save(payload, other)
    with pytest.raises(CheckpointError, match="trained on the codes of another VQ-VAE"):
        P.sample_slices(other, tmp_path / "p" / "best.pt", 1, device="cpu")
    with pytest.raises(CheckpointError, match="holds a prior model, not a vqvae model"):
        T.evaluate(tmp_path / "p" / "best.pt", tiny_phantom, device="cpu", progress=False)
    with pytest.raises(ValueError, match="codebook_size 512 differs from the VQ-VAE's 16"):
        P.train_prior(vq_checkpoint, tiny_phantom, tmp_path / "q", tiny_prior_config(codebook_size=512))


def test_cli_prior_resume_and_sample(vq_checkpoint, tiny_phantom, tmp_path, capsys):
    from vqvae_lib.cli import main
    run, png = tmp_path / "prior", tmp_path / "samples.png"
    common = ["--checkpoint", str(vq_checkpoint), "--data-dir", str(tiny_phantom), "--out", str(run)]
    assert main(["prior", *common, "--epochs", "1", "--channels", "8", "--layers", "2", "--kernel", "3",
                 "--limit", "8", "--device", "cpu"]) == 0
    assert main(["prior", *common, "--epochs", "2", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "epoch 1/1: train NLL" in text and "epoch 2/2: train NLL" in text and "bits per latent" in text
    history = load_checkpoint(run / "last.pt", kind="prior")["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert main(["sample", "--checkpoint", str(vq_checkpoint), "--prior", str(run / "best.pt"), "--n", "2",
                 "--out", str(png), "--position", "1", "--device", "cpu"]) == 0
    assert png.stat().st_size > 1000 and f"2 samples (seed 0, temperature 1.0) written to {png}" in capsys.readouterr().out
    folder = tmp_path / "grids"
    folder.mkdir()
    assert main(["sample", "--checkpoint", str(vq_checkpoint), "--prior", str(run / "best.pt"), "--n", "1",
                 "--out", str(folder), "--device", "cpu"]) == 0                  # a folder: FOLDER/samples.png
    assert f"written to {folder / 'samples.png'}" in capsys.readouterr().out and list(folder.iterdir()) == [
        folder / "samples.png"]
    assert main(["sample", "--checkpoint", str(vq_checkpoint), "--prior", str(run / "best.pt"), "--n", "1",
                 "--out", str(png), "--position", "9", "--device", "cpu"]) == 2
    assert "error: position must be a bin in [0, 8), got 9" in capsys.readouterr().err


def test_cli_transformer_prior_with_top_k_and_top_p(vq_checkpoint, tiny_phantom, tmp_path, capsys):
    from vqvae_lib.cli import main
    run, png = tmp_path / "transformer", tmp_path / "samples.png"
    assert main(["prior", "--checkpoint", str(vq_checkpoint), "--data-dir", str(tiny_phantom), "--out", str(run),
                 "--arch", "transformer", "--channels", "8", "--layers", "1", "--heads", "2", "--dropout", "0.1",
                 "--epochs", "1", "--limit", "8", "--device", "cpu"]) == 0
    model, payload = P.load_prior(run / "best.pt")
    assert isinstance(model, P.TransformerPrior) and payload["model_config"]["dropout"] == 0.1
    assert main(["sample", "--checkpoint", str(vq_checkpoint), "--prior", str(run / "best.pt"), "--n", "2",
                 "--out", str(png), "--top-k", "3", "--top-p", "0.9", "--device", "cpu"]) == 0
    assert png.stat().st_size > 1000
    with pytest.raises(SystemExit) as error:
        main(["sample", "--checkpoint", str(vq_checkpoint), "--prior", str(run / "best.pt"), "--out", str(png),
              "--top-p", "1.5"])
    assert error.value.code == 2
    assert "argument --top-p: must be a number in (0, 1], got 1.5" in capsys.readouterr().err

    generator = P.load_generator(vq_checkpoint, run / "best.pt", device="cpu")
    real = generator.encode(np.zeros((1, 256, 128), dtype=np.float32))[0]
    images, maps = generator.complete(real, 5, 2, position=3, seed=1)
    assert images.shape == (2, 256, 128) and (maps[:, :5] == real[:5]).all()
    surprise = generator.surprise(maps, np.array([3, 3]))
    assert surprise.shape == (2, 16, 8) and (surprise >= 0).all()
    with pytest.raises(ValueError, match="rows must be in"):
        generator.complete(real, 17, 1)


def test_the_transformer_sees_every_earlier_position():
    model = small_prior(**ARCHS[1])
    maps, bins = random_maps(), torch.tensor([0, 3])
    base = model(maps, bins)[:, :, -1, -1]
    for pos in range(6 * 5 - 1):
        changed = maps.clone()
        changed[:, pos // 5, pos % 5] = (changed[:, pos // 5, pos % 5] + 1) % 7
        assert (model(changed, bins)[:, :, -1, -1] - base).abs().max() > 0, pos
    with pytest.raises(ValueError, match="exceeds this prior's grid of at most 12 x 6"):
        model(random_maps(h=13), bins)


@pytest.mark.parametrize("arch", ARCHS, ids=["pixelcnn", "transformer"])
def test_cached_sampling_follows_the_full_forward_pass(arch):
    """Greedy sampling (a tiny temperature) picks, at every position, the argmax of the full network's logits
    for the map drawn so far: the cached / row-wise sampler computes what forward computes."""
    model = small_prior(**arch)
    bins = torch.tensor([0, 1, 3])
    cold = model.sample(3, (4, 5), bins, seed=3, temperature=1e-6)
    torch.testing.assert_close(cold, model(cold, bins).argmax(1), rtol=0, atol=0)
    a = model.sample(3, (4, 5), bins, seed=3)
    assert a.shape == (3, 4, 5) and torch.equal(a, model.sample(3, (4, 5), bins, seed=3))
    assert not torch.equal(a, model.sample(3, (4, 5), bins, seed=4))


@pytest.mark.parametrize("arch", ARCHS, ids=["pixelcnn", "transformer"])
def test_completion_keeps_the_prefix_and_draws_the_rest(arch):
    model = small_prior(**arch)
    prefix, bins = random_maps(n=4, h=4, w=5, seed=2), torch.tensor([1, 1, 1, 1])
    for start in (0, 7, 10, 20):
        done = model.sample(4, (4, 5), bins, seed=5, prefix=prefix, start=start)
        flat, kept = done.flatten(1), prefix.flatten(1)
        assert torch.equal(flat[:, :start], kept[:, :start])
        if start < 20:
            assert not torch.equal(flat[:, start:], kept[:, start:])
        cold = model.sample(4, (4, 5), bins, seed=5, prefix=prefix, start=start, temperature=1e-6)
        greedy = model(cold, bins).argmax(1).flatten(1)
        assert torch.equal(cold.flatten(1)[:, start:], greedy[:, start:])
    with pytest.raises(ValueError, match="pass that map as prefix"):
        model.sample(1, (4, 5), bins[:1], start=3)
    with pytest.raises(ValueError, match="prefix must be"):
        model.sample(2, (4, 5), bins[:2], prefix=prefix, start=3)


def test_top_k_and_top_p_restrict_the_codes_drawn():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    def drawn(**options):
        sampling = P.Sampling(2000, (1, 1), device=torch.device("cpu"), **options)
        return torch.bincount(sampling(logits), minlength=4)
    assert (drawn() > 0).all()
    assert drawn(top_k=2)[2:].sum() == 0 and (drawn(top_k=2)[:2] > 0).all()
    assert drawn(top_p=0.8)[2:].sum() == 0 and drawn(top_p=0.81)[2] > 0  # 0.5 + 0.3 reaches 0.8
    assert drawn(top_p=0.4)[1:].sum() == 0 and drawn(top_k=1)[1:].sum() == 0
    for bad, match in [(dict(top_k=0), "top_k"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p")]:
        with pytest.raises(ValueError, match=match):
            P.Sampling(1, (1, 1), device=torch.device("cpu"), **bad)


@pytest.mark.parametrize("arch", ARCHS, ids=["pixelcnn", "transformer"])
def test_position_nll_is_the_cross_entropy_at_each_position(arch):
    model = small_prior(**arch)
    maps, bins = random_maps(h=4, w=5), np.array([0, 2])
    nll = P.position_nll(model, maps.numpy(), bins)
    logits = model(maps, torch.from_numpy(bins))
    expected = -logits.log_softmax(1).gather(1, maps[:, None])[:, 0]
    np.testing.assert_allclose(nll, expected.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(P.map_nll(model, maps.numpy(), bins), nll.mean((1, 2)))


def test_dropout_acts_in_training_only():
    for arch in ARCHS:
        model = small_prior(**{**arch, "dropout": 0.5})
        maps, bins = random_maps(), torch.tensor([0, 1])
        torch.testing.assert_close(model(maps, bins), model(maps, bins))
        model.train()
        assert (model(maps, bins) - model(maps, bins)).abs().max() > 0
    with pytest.raises(ValueError, match="dropout"):
        P.PriorConfig(dropout=1.0)
    with pytest.raises(ValueError, match="divisible by heads"):
        P.PriorConfig(arch="transformer", channels=10, heads=4)
    with pytest.raises(ValueError, match="arch must be one of"):
        P.PriorConfig(arch="lstm")


def test_run_defaults_for_old_priors_are_the_config_defaults():
    from vqvae_lib import runs
    defaults = P.PriorConfig().to_dict()
    added = ("arch", "dropout", "heads", "max_rows", "max_cols")
    assert {k: runs.MODEL_DEFAULTS[k] for k in added} == {k: defaults[k] for k in added}
