"""The quantisers beyond the paper's (rotation trick, cosine lookup, FSQ): config, shared interface, gradients,
training, checkpoints, and a cross-check of the FSQ and rotation-trick math against vector-quantize-pytorch."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from vector_quantize_pytorch import FSQ
from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to

from vqvae_lib.checkpoint import load_model, save_checkpoint
from vqvae_lib.model import QUANTIZERS, VQVAE, ModelConfig
from vqvae_lib.quantizer import VectorQuantizer, rotation_trick
from vqvae_lib.quantizers import CosineQuantizer, FiniteScalarQuantizer

SMALL = dict(hidden=16, res_hidden=8, n_res=1, embed_dim=8)
LEVELS = [4, 3, 5]  # 60 codes, even and odd levels


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; with two, a busy second core (a training job) slows
    convolution backward passes down tens of times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(quantizer: str, **extra) -> ModelConfig:
    codes = dict(codebook_size=math.prod(LEVELS), fsq_levels=LEVELS) if quantizer == "fsq" else dict(codebook_size=16)
    return ModelConfig(quantizer=quantizer, **SMALL, **codes, **extra)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    """n smooth random images (n, 1, 32, 64) in [0, 1]: blurred noise, which a tiny model learns quickly."""
    gen = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 1, 8, 16, generator=gen), size=(32, 64), mode="bilinear", align_corners=False)
    return (x - x.amin()) / (x.amax() - x.amin())


# --- config ---------------------------------------------------------------------------------------------------

def test_config_round_trips_the_new_fields_through_json():
    config = ModelConfig(quantizer="fsq", codebook_size=60, fsq_levels=(4, 3, 5), lookup_dim=3)
    assert config.fsq_levels == [4, 3, 5]  # a tuple becomes a list, so the JSON round trip gives an equal config
    d = json.loads(json.dumps(config.to_dict()))
    assert d["quantizer"] == "fsq" and d["fsq_levels"] == [4, 3, 5] and d["lookup_dim"] == 3
    assert ModelConfig.from_dict(d) == config
    assert ModelConfig().quantizer == "vq" and ModelConfig().fsq_levels == [8, 5, 5, 5]
    assert ModelConfig().fsq_levels is not ModelConfig().fsq_levels  # no list shared between configs


def test_config_rejects_bad_quantizer_settings_naming_the_value():
    with pytest.raises(ValueError, match=r"quantizer must be one of .*'lfq'"):
        ModelConfig(quantizer="lfq")
    with pytest.raises(ValueError, match="lookup_dim must be positive, got 0"):
        ModelConfig(lookup_dim=0)
    with pytest.raises(ValueError, match=r"fsq_levels .* got \[\]"):
        ModelConfig(fsq_levels=[])
    with pytest.raises(ValueError, match=r"fsq_levels .* got \[8, 1\]"):
        ModelConfig(fsq_levels=[8, 1])
    with pytest.raises(ValueError, match="codebook_size 512 does not match fsq_levels 8x5x5x5 = 1000 codes: "
                                         "set codebook_size to 1000"):
        ModelConfig(quantizer="fsq")
    ModelConfig(quantizer="fsq", codebook_size=1000)
    ModelConfig(quantizer="vq", fsq_levels=[2, 2])  # levels matter for "fsq" only, but must be valid


def test_an_old_config_without_the_new_keys_builds_the_papers_quantizer():
    new_keys = ("quantizer", "lookup_dim", "fsq_levels")
    old = {k: v for k, v in ModelConfig(**SMALL).to_dict().items() if k not in new_keys}
    model = VQVAE(ModelConfig.from_dict(old))
    q = model.quantizer
    assert model.config.quantizer == "vq"
    assert type(q) is VectorQuantizer and q.estimator == "ste" and not q.normalize


def test_each_name_builds_its_quantizer():
    kinds = {name: VQVAE(_config(name)).quantizer for name in QUANTIZERS}
    assert type(kinds["vq"]) is VectorQuantizer and kinds["vq"].estimator == "ste"
    assert type(kinds["rotation"]) is VectorQuantizer and kinds["rotation"].estimator == "rotation"
    assert isinstance(kinds["cosine"], CosineQuantizer) and kinds["cosine"].vq.normalize
    assert kinds["cosine"].vq.codebook.shape == (16, 8) and kinds["cosine"].project_in.out_features == 8
    assert isinstance(kinds["fsq"], FiniteScalarQuantizer) and kinds["fsq"].levels == LEVELS
    assert all(q.num_codes == VQVAE(_config(name)).config.codebook_size for name, q in kinds.items())
    cosine = VQVAE(_config("cosine", lookup_dim=3, ema=False, init="sample", restart=False)).quantizer
    assert cosine.vq.dim == 3 and not cosine.vq.ema and cosine.vq.init == "sample" and not cosine.vq.restart


# --- the shared interface, in a small VQ-VAE ------------------------------------------------------------------

@pytest.mark.parametrize("name", QUANTIZERS)
def test_shapes_indices_and_encode_decode_match_the_eval_forward_pass(name):
    torch.manual_seed(0)
    model = VQVAE(_config(name))
    x = _images()
    out = model(x)  # training mode: initialises the codebook from the data
    k = model.config.codebook_size
    assert out.recon.shape == x.shape and out.vq.quantized.shape == (4, 8, 8, 16)
    assert out.vq.indices.shape == (4, 8, 16) and out.vq.indices.dtype == torch.int64
    assert 0 <= out.vq.indices.min() and out.vq.indices.max() < k
    assert all(t.dim() == 0 and t.dtype == torch.float32 for t in (out.vq.loss, out.vq.commitment,
                                                                     out.vq.codebook_loss, out.vq.perplexity))
    assert 1 <= out.vq.perplexity <= k
    model.eval()
    with torch.no_grad():
        ref = model(x)
    indices = model.encode(x)
    assert torch.equal(indices, ref.vq.indices)
    assert torch.equal(model.decode_indices(indices), ref.recon)
    assert torch.equal(model.quantizer.lookup(indices), ref.vq.quantized)
    assert model.quantizer.restarts_total >= 0


@pytest.mark.parametrize("name", QUANTIZERS)
def test_quantizer_math_stays_fp32_under_autocast(name):
    torch.manual_seed(0)
    q = VQVAE(_config(name, init="uniform")).quantizer.eval()
    z = torch.randn(2, 8, 6, 5).bfloat16()
    ref = q(z.float())
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # bf16 matrix products on the CPU, unless the quantiser says no
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = q(z)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert out.quantized.dtype == torch.bfloat16
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out.quantized, ref.quantized.bfloat16())
    assert torch.equal(out.commitment, ref.commitment) and out.loss.dtype == torch.float32


@pytest.mark.parametrize("name", QUANTIZERS)
def test_a_few_optimiser_steps_reduce_the_reconstruction_loss(name):
    torch.manual_seed(0)
    model = VQVAE(_config(name))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = _images()
    mses = []
    for _ in range(25):
        out = model(x)
        mse = F.mse_loss(out.recon, x)
        opt.zero_grad()
        (mse + out.vq.loss).backward()
        opt.step()
        mses.append(mse.item())
    assert mses[-1] < 0.5 * mses[0], mses
    assert all(p.grad.abs().sum() > 0 for p in model.encoder.parameters())  # the gradient passed the quantiser


@pytest.mark.parametrize("name", QUANTIZERS)
def test_a_checkpoint_restores_each_quantizer_exactly(tmp_path, name):
    torch.manual_seed(0)
    model = VQVAE(_config(name))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = _images()
    for _ in range(3):
        out = model(x)
        opt.zero_grad()
        (F.mse_loss(out.recon, x) + out.vq.loss).backward()
        opt.step()
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model_config": model.config.to_dict(), "train_config": {}, "epoch": 1, "history": [],
                           "model_state": model.state_dict()})
    torch.manual_seed(1)  # the new model starts from other weights
    loaded, _ = load_model(path, expect_config=model.config)
    assert loaded.config == model.config and type(loaded.quantizer) is type(model.quantizer)
    model.eval()
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.recon, b.recon) and torch.equal(a.vq.indices, b.vq.indices)
    assert loaded.quantizer.restarts_total == model.quantizer.restarts_total


# --- rotation trick -------------------------------------------------------------------------------------------

def _fixed_codebook(estimator: str) -> VectorQuantizer:
    q = VectorQuantizer(16, 4, ema=False, init="uniform", restart=False, estimator=estimator).eval()
    with torch.no_grad():
        q.codebook.copy_(torch.randn(16, 4, generator=torch.Generator().manual_seed(1)))
    return q


def test_rotation_gives_the_straight_through_value_with_another_gradient():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 3, 5)
    w = torch.randn(2, 4, 3, 5)
    outs, grads = {}, {}
    for estimator in ("ste", "rotation"):
        zz = z.clone().requires_grad_()
        outs[estimator] = _fixed_codebook(estimator)(zz)
        (w * outs[estimator].quantized).sum().backward()
        grads[estimator] = zz.grad
    assert torch.equal(outs["rotation"].quantized, outs["ste"].quantized)  # exactly the codes, both
    assert torch.equal(outs["rotation"].indices, outs["ste"].indices)
    assert torch.equal(grads["ste"], w)
    assert not torch.allclose(grads["rotation"], w, atol=1e-2)


def test_rotation_gradient_is_the_scaled_transposed_rotation():
    """q = s R z with s = ||e|| / ||z|| and R = I - 2 r r^T + 2 q^ u^T, built as matrices here."""
    torch.manual_seed(0)
    z, e, w = torch.randn(50, 6, requires_grad=True), torch.randn(50, 6), torch.randn(50, 6)
    out = rotation_trick(z, e)
    (w * out).sum().backward()
    u, qh = F.normalize(z.detach(), dim=1), F.normalize(e, dim=1)
    r = F.normalize(u + qh, dim=1)
    eye = torch.eye(6).expand(50, 6, 6)
    rot = eye - 2 * r[:, :, None] * r[:, None, :] + 2 * qh[:, :, None] * u[:, None, :]  # (N, D, D)
    torch.testing.assert_close(rot @ rot.transpose(1, 2), eye, atol=1e-5, rtol=0)  # a rotation ...
    torch.testing.assert_close((rot @ u[:, :, None])[..., 0], qh, atol=1e-5, rtol=0)  # ... turning u onto q^
    scale = e.norm(dim=1, keepdim=True) / z.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(out.detach(), e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z.grad, scale * (rot.transpose(1, 2) @ w[:, :, None])[..., 0])


def test_rotation_survives_zero_and_opposite_vectors():
    z = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [1.0, -1.0, 2.0]], requires_grad=True)
    e = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-2.0, 2.0, -4.0]])  # last row: opposite to z
    out = rotation_trick(z, e)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()
    torch.testing.assert_close(out.detach()[1:], e[1:])


def test_rotation_matches_vector_quantize_pytorch():
    """Their `rotate_to(src, tgt)` works on the last dimension, ours on dim 1: compare on (N, D) rows."""
    torch.manual_seed(0)
    z, e, w = torch.randn(300, 8), 2 * torch.randn(300, 8), torch.randn(300, 8)
    ours_z, theirs_z = z.clone().requires_grad_(), z.clone().requires_grad_()
    ours, theirs = rotation_trick(ours_z, e), rotate_to(theirs_z, e)
    torch.testing.assert_close(ours, theirs)
    (w * ours).sum().backward()
    (w * theirs).sum().backward()
    torch.testing.assert_close(ours_z.grad, theirs_z.grad)
    # and inside the quantiser, on (B, D, h, w) grids against their rotation of the chosen codes
    q = _fixed_codebook("rotation")
    grid = torch.randn(2, 4, 3, 5, requires_grad=True)
    out = q(grid)
    g = torch.randn_like(out.quantized)
    (g * out.quantized).sum().backward()
    rows = grid.detach().permute(0, 2, 3, 1).reshape(-1, 4).requires_grad_()
    codes = q.lookup(out.indices).detach().permute(0, 2, 3, 1).reshape(-1, 4)
    (g.permute(0, 2, 3, 1).reshape(-1, 4) * rotate_to(rows, codes)).sum().backward()
    torch.testing.assert_close(grid.grad.permute(0, 2, 3, 1).reshape(-1, 4), rows.grad)


# --- cosine lookup --------------------------------------------------------------------------------------------

def test_cosine_lookup_picks_the_code_of_highest_cosine_similarity():
    torch.manual_seed(0)
    q = CosineQuantizer(32, 8, lookup_dim=3, init="uniform", restart=False).eval()
    flat = torch.randn(500, 8)
    low = q.project_in(flat).detach()
    brute = (F.normalize(low, dim=1) @ F.normalize(q.vq.codebook, dim=1).t()).argmax(1)
    assert torch.equal(q.nearest(flat), brute)
    assert torch.equal(q.vq.nearest(3.7 * low), q.vq.nearest(low))  # only directions count
    torch.testing.assert_close(q.vq.codes.norm(dim=1), torch.ones(32))
    z = torch.randn(2, 8, 4, 4)
    out = q(z)
    z_low = F.normalize(q.project_in(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), dim=1).detach()
    torch.testing.assert_close(out.commitment, F.mse_loss(z_low, q.vq.lookup(out.indices)))


def test_cosine_kmeans_init_and_ema_work_on_unit_vectors():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 3, normalize=True, init="kmeans", restart=False)
    z = 5.0 + 3.0 * torch.randn(4, 3, 6, 6)  # far from unit length
    q(z)
    assert q.codebook.norm(dim=1).max() <= 1.0 + 1e-5  # means of unit vectors
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    before = q.nearest(flat)
    assert torch.equal(before, q.eval()(z).indices.flatten())
    with torch.no_grad():
        q.codebook.mul_(torch.rand(8, 1) * 100)  # the length of a code does not matter, only its direction
    assert torch.equal(q.nearest(flat), before)


# --- finite scalar quantization -------------------------------------------------------------------------------

@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3, 4]])
def test_fsq_indices_and_codes_round_trip_over_the_whole_grid(levels):
    q = FiniteScalarQuantizer(levels, dim=4)
    k = math.prod(levels)
    assert q.num_codes == k and q.restarts_total == 0
    codes = q.indices_to_codes(torch.arange(k))  # (K, d)
    assert codes.shape == (k, len(levels)) and codes.abs().max() <= 1.0
    assert len(torch.unique(codes, dim=0)) == k
    assert torch.equal(q.codes_to_indices(codes), torch.arange(k))
    # Every grid point is reached by `quantize`: invert the bound at each code's integer value.
    integers = codes * q._half_width
    z = torch.atanh((integers + q._offset) / q._half_l) - q._shift
    assert torch.equal(q.quantize(z), codes)
    # Mixed radix with the first channel as the least significant digit (the paper's order).
    assert q._basis.tolist() == [math.prod(levels[:i]) for i in range(len(levels))]
    step = codes[1] - codes[0]
    assert step[0] == 1 / q._half_width[0] and (step[1:] == 0).all()


@pytest.mark.parametrize("level", [2, 7, 8, 1000])
def test_fsq_bound_rounds_to_exactly_its_levels_integers(level):
    q = FiniteScalarQuantizer([level], dim=1)
    codes = q.quantize(torch.linspace(-40, 40, 200_001)[:, None])  # past tanh's saturation on both sides
    assert len(torch.unique(codes)) == level
    indices = q.codes_to_indices(codes)
    assert indices.min() == 0 and indices.max() == level - 1


def test_fsq_refuses_levels_it_cannot_represent():
    for levels in ([], [8, 1], [1001]):
        with pytest.raises(ValueError, match="levels must be"):
            FiniteScalarQuantizer(levels, dim=4)


def test_fsq_has_no_codebook_loss_and_a_straight_through_rounding():
    torch.manual_seed(0)
    q = FiniteScalarQuantizer(LEVELS, dim=8)
    assert {name for name, _ in q.named_parameters()} == {"project_in.weight", "project_in.bias",
                                                          "project_out.weight", "project_out.bias"}
    assert set(q.state_dict()) == {"project_in.weight", "project_in.bias", "project_out.weight", "project_out.bias"}
    z = torch.randn(2, 3, requires_grad=True)
    q.quantize(z).sum().backward()
    bound_grad = (1 - torch.tanh(z.detach() + q._shift) ** 2) * q._half_l / q._half_width  # d bound / dz, scaled
    torch.testing.assert_close(z.grad, bound_grad)
    out = q(torch.randn(2, 8, 3, 3))
    assert out.loss == 0 and out.commitment == 0 and out.codebook_loss == 0


def test_fsq_matches_vector_quantize_pytorch():
    """Their FSQ with the paper's settings: preserve_symmetry=False (the paper's bound and rounding, not the
    symmetric variant of arXiv 2411.19842), noise_dropout=0, no hard clamp, no orthogonal rotation, one codebook,
    biased projections (as ours). Their index uses the same digit order as ours (basis cumprod([1] + levels[:-1]):
    the first channel least significant), so indices compare directly; both use atanh and (1 + eps) in the bound."""
    torch.manual_seed(0)
    levels = [8, 5, 5, 5]
    ours = FiniteScalarQuantizer(levels, dim=8)
    theirs = FSQ(levels=levels, dim=8, preserve_symmetry=False, noise_dropout=0.0, bound_hard_clamp=False,
                 orthogonal_rotation=False, num_codebooks=1, projection_has_bias=True)
    with torch.no_grad():
        for name in ("project_in", "project_out"):
            getattr(theirs, name).weight.copy_(getattr(ours, name).weight)
            getattr(theirs, name).bias.copy_(getattr(ours, name).bias)
    z = 3.0 * torch.randn(4, 8, 6, 7)
    z_ours, z_theirs = z.clone().requires_grad_(), z.clone().requires_grad_()
    out = ours(z_ours)
    quantized, indices = theirs(z_theirs)
    assert len(torch.unique(out.indices)) > 50  # many codes in play, not just the centre
    assert torch.equal(theirs._basis.long(), ours._basis)  # the same digit order: no remapping of indices
    assert torch.equal(out.indices, indices.long())
    torch.testing.assert_close(out.quantized, quantized)
    torch.testing.assert_close(theirs.implicit_codebook, ours.indices_to_codes(torch.arange(ours.num_codes)))
    w = torch.randn_like(quantized)
    (w * out.quantized).sum().backward()
    (w * quantized).sum().backward()
    torch.testing.assert_close(z_ours.grad, z_theirs.grad)
    for name in ("project_in", "project_out"):
        torch.testing.assert_close(getattr(ours, name).weight.grad, getattr(theirs, name).weight.grad)
    # the bound and rounding alone, at dim == len(levels)
    bare = FSQ(levels=levels, preserve_symmetry=False, noise_dropout=0.0)
    x = 2.0 * torch.randn(1000, len(levels))
    torch.testing.assert_close(ours.quantize(x), bare.quantize(x))
