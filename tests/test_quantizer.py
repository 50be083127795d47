import pytest
import torch

from vqvae_lib.quantizer import VectorQuantizer

PLAIN = dict(ema=False, init="uniform", restart=False)


def _grid(flat, b=2):
    """(N, D) vectors -> (b, D, N // b, 1), the layout of an encoder output."""
    return flat.reshape(b, -1, 1, flat.shape[1]).permute(0, 3, 1, 2).contiguous()


def _mixture(n, centers, spread=0.1):
    return centers[torch.randint(len(centers), (n,))] + spread * torch.randn(n, centers.shape[1])


def test_nearest_matches_brute_force():
    torch.manual_seed(0)
    q = VectorQuantizer(48, 8, init="uniform")
    q.codebook.copy_(torch.randn(48, 8))
    flat = torch.randn(700, 8)
    brute = ((flat[:, None, :] - q.codebook[None]) ** 2).sum(-1).argmin(1)
    got = q.nearest(flat)
    assert got.dtype == torch.int64 and got.shape == (700,)
    assert torch.equal(got, brute)


@pytest.mark.parametrize("ema", [True, False])
def test_forward_value_is_the_looked_up_code_and_losses_match_their_definitions(ema):
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, ema=ema, init="uniform", restart=False).eval()
    with torch.no_grad():
        q.codebook.copy_(torch.randn(16, 4))
    z = torch.randn(3, 4, 5, 6)
    out = q(z)
    assert out.indices.shape == (3, 5, 6) and out.indices.dtype == torch.int64
    e = q.lookup(out.indices).detach()
    assert torch.equal(out.quantized, e)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(out.indices.flatten(), q.nearest(flat))
    commitment = ((z - e) ** 2).mean()
    torch.testing.assert_close(out.commitment, commitment)
    expected_codebook = torch.tensor(0.0) if ema else commitment
    torch.testing.assert_close(out.codebook_loss, expected_codebook)
    assert out.codebook_loss.dim() == 0
    torch.testing.assert_close(out.loss, expected_codebook + 0.25 * commitment)


@pytest.mark.parametrize("ema", [True, False])
def test_straight_through_gradient(ema):
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, ema=ema, init="uniform", restart=False).eval()
    with torch.no_grad():
        q.codebook.copy_(torch.randn(16, 4))
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    w = torch.randn(2, 4, 3, 5)
    (w * q(z).quantized).sum().backward()
    assert torch.equal(z.grad, w)  # the decoder's gradient reaches the encoder unchanged

    z.grad = None
    out = q(z)
    ((w * out.quantized).sum() + out.loss).backward()
    e = q.lookup(out.indices).detach()
    torch.testing.assert_close(z.grad, w + 0.25 * 2 * (z.detach() - e) / z.numel())


def test_plain_codebook_is_trained_by_the_codebook_loss_only():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, **PLAIN)
    assert isinstance(q.codebook, torch.nn.Parameter)
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    out = q(z)
    ((torch.randn_like(z) * out.quantized).sum() + out.commitment).backward()
    assert q.codebook.grad is None or not q.codebook.grad.any()

    q.codebook.grad = None
    out = q(z)
    out.codebook_loss.backward()
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    idx = out.indices.flatten()
    expected = torch.zeros(16, 4).index_add_(0, idx, 2 * (q.codebook.detach()[idx] - flat) / z.numel())
    torch.testing.assert_close(q.codebook.grad, expected)
    assert q.codebook.grad[idx].abs().sum() > 0


def test_ema_update_matches_the_hand_computed_laplace_smoothed_average():
    torch.manual_seed(0)
    k, d, decay, eps = 4, 3, 0.9, 1e-2
    q = VectorQuantizer(k, d, decay=decay, eps=eps, init="uniform", restart=False)
    assert "codebook" not in dict(q.named_parameters())
    q.codebook.copy_(torch.tensor([[0.0, 0, 0], [5, 5, 5], [-5, -5, -5], [5, -5, 5]]))
    q.embed_sum.copy_(q.codebook)  # cluster_size starts at 1 per code: codebook = embed_sum / cluster_size
    flat = torch.tensor([0.5, 0.2, -0.1]) + 0.1 * torch.randn(40, d)  # all nearest to code 0
    size0, sum0, code0 = q.cluster_size.clone(), q.embed_sum.clone(), q.codebook.clone()
    out = q(_grid(flat))
    assert (out.indices == 0).all()
    assert torch.equal(q.codebook.new_tensor(0), out.codebook_loss)

    counts = torch.tensor([40.0, 0, 0, 0])
    sums = torch.zeros(k, d)
    sums[0] = flat.sum(0)
    size = decay * size0 + (1 - decay) * counts
    total = size.sum()
    smoothed = (size + eps) / (total + k * eps) * total
    expected = (decay * sum0 + (1 - decay) * sums) / smoothed[:, None]
    torch.testing.assert_close(q.codebook, expected)
    torch.testing.assert_close(q.cluster_size, size)
    mean = flat.mean(0)
    assert (q.codebook[0] - mean).norm() < 0.5 * (code0[0] - mean).norm()  # it did move towards the mean


@pytest.mark.parametrize("init", ["uniform", "kmeans"])
def test_eval_mode_changes_nothing(init):
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, init=init, decay=0.5, restart_threshold=0.9)
    q.eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z = torch.randn(2, 2, 4, 4) + 3
    for _ in range(3):
        out = q(z)
    with torch.no_grad():
        out_ng = q(z)
    assert torch.equal(out.indices, out_ng.indices)
    after = q.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert q.restarts_total == 0 and bool(q.initialized) == (init == "uniform")


def test_sample_init_takes_codes_from_the_first_training_batch():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 3, init="sample", restart=False, ema=False)
    assert not q.initialized
    flat = torch.randn(64, 3) + 10
    q(_grid(flat))
    assert q.initialized
    # every code is one of the batch's vectors, each used once
    matches = (q.codebook.detach()[:, None] == flat[None]).all(-1)
    assert (matches.sum(1) == 1).all() and (matches.sum(0) <= 1).all()


def test_kmeans_init_finds_the_clusters_and_survives_a_checkpoint():
    torch.manual_seed(0)
    centers = torch.tensor([[5.0, 0], [0, 5], [-5, 0], [0, -5]])
    q = VectorQuantizer(16, 2, init="kmeans", restart=False, ema=False)
    flat = _mixture(400, centers)
    q(_grid(flat))
    assert q.initialized
    dist = torch.cdist(centers, q.codebook.detach())  # (4 centres, 16 codes)
    assert (dist.min(1).values < 0.1).all()  # a code at every cluster centre ...
    assert (dist.min(0).values < 0.3).all()  # ... and every code inside a cluster

    fresh = VectorQuantizer(16, 2, init="kmeans", restart=False, ema=False)
    fresh.load_state_dict(q.state_dict())
    assert fresh.initialized
    fresh(_grid(torch.randn(400, 2) - 20))  # far from every centre: a re-initialisation would move the codes
    assert torch.equal(fresh.codebook, q.codebook)


@pytest.mark.parametrize("init", ["sample", "kmeans"])
def test_data_init_with_fewer_vectors_than_codes(init):
    torch.manual_seed(0)
    q = VectorQuantizer(32, 4, init=init, restart=False, ema=False)
    flat = torch.randn(6, 4)
    q(_grid(flat))
    codes = q.codebook.detach()
    assert torch.isfinite(codes).all()
    assert torch.cdist(codes, flat).min(1).values.max() < 0.1  # every code sits on a data vector
    assert len(torch.unique(codes, dim=0)) == 32  # the noise keeps repeated samples apart


@pytest.mark.parametrize("ema", [True, False])
def test_dead_code_is_restarted_near_the_data(ema):
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2, ema=ema, init="uniform", usage_decay=0.9, restart_threshold=0.1)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 1], [1, -1], [-1, 1], [100, 100]]))
        if ema:
            q.embed_sum.copy_(q.codebook)
    centers = torch.tensor([[1.0, 1], [1, -1], [-1, 1], [-1, -1]])
    for step in range(60):
        q(_grid(_mixture(64, centers)))
        if q.restarts_total:
            break
    # usage 1/4 * 0.9^t drops below 0.1/4 after t = 22 steps of not being chosen
    assert step == 21 and q.restarts_total == 1
    dead = q.codebook.detach()[3]
    assert torch.cdist(dead[None], centers).min() < 1.0
    assert q.usage[3] == pytest.approx(0.25)
    if ema:  # statistics restart with the code, so the next update does not pull it back
        assert q.cluster_size[3] == 1.0 and torch.equal(q.embed_sum[3], dead)
    restored = VectorQuantizer(4, 2, ema=ema, init="uniform", usage_decay=0.9, restart_threshold=0.1)
    restored.load_state_dict(q.state_dict())
    assert restored.restarts_total == 1


def test_full_quantizer_uses_many_more_codes_than_the_plain_one():
    centers = torch.tensor([[i, j] for i in range(4) for j in range(4)], dtype=torch.float) * 2 + 5
    active = {}
    for name, kwargs in {"plain": PLAIN, "full": {}}.items():
        torch.manual_seed(0)
        q = VectorQuantizer(32, 2, **kwargs)
        opt = torch.optim.Adam(q.parameters(), lr=1e-2) if not q.ema else None
        for _ in range(100):
            out = q(_grid(_mixture(256, centers, spread=0.3)))
            if opt:
                opt.zero_grad()
                out.loss.backward()
                opt.step()
        q.eval()
        active[name] = len(q(_grid(_mixture(2048, centers, spread=0.3))).indices.unique())
    assert active["plain"] <= 4 and active["full"] >= 28


def test_computes_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    q = VectorQuantizer(64, 16, init="uniform", restart=False).eval()
    q.codebook.copy_(torch.randn(64, 16))
    z = torch.randn(8, 16, 16, 16)
    reference = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
        out_bf16 = q(z.bfloat16())
    assert torch.equal(out.indices, reference.indices)
    assert out.quantized.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert torch.equal(out.quantized, reference.quantized)
    assert out_bf16.quantized.dtype == torch.bfloat16 and out_bf16.commitment.dtype == torch.float32
    assert torch.equal(out_bf16.indices, q(z.bfloat16().float()).indices)


def test_perplexity_counts_the_codes_in_use():
    q = VectorQuantizer(8, 2, init="uniform", restart=False).eval()
    q.codebook.copy_(torch.randn(8, 2, generator=torch.Generator().manual_seed(0)) * 10)
    uniform = q.codebook.repeat(4, 1)  # every code chosen 4 times
    assert q(_grid(uniform)).perplexity.item() == pytest.approx(8.0)
    one = q.codebook[:1].repeat(32, 1)
    assert q(_grid(one)).perplexity.item() == pytest.approx(1.0)
    half = q.codebook[:4].repeat(8, 1)
    assert q(_grid(half)).perplexity.item() == pytest.approx(4.0)


def test_rejects_bad_arguments_and_shapes():
    with pytest.raises(ValueError, match="init"):
        VectorQuantizer(8, 2, init="random")
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(8, 2, decay=1.0)
    with pytest.raises(ValueError, match=r"\(B, 2, h, w\)"):
        VectorQuantizer(8, 2)(torch.zeros(1, 3, 4, 4))
