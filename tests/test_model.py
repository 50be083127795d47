import json

import pytest
import torch
import torch.nn.functional as F

from vqvae_lib.model import VQVAE, Decoder, Encoder, ModelConfig, ResidualStack
from vqvae_lib.quantizer import VectorQuantizer

SMALL = dict(hidden=16, res_hidden=8, n_res=1, codebook_size=16, embed_dim=8)


@pytest.mark.parametrize("downsample, grid", [(4, (64, 32)), (8, (32, 16)), (16, (16, 8))])
def test_shapes_for_each_downsampling(downsample, grid):
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(downsample=downsample, **SMALL))
    assert model.latent_shape((256, 128)) == grid
    x = torch.rand(2, 1, 64, 32)
    out = model(x)
    h, w = 64 // downsample, 32 // downsample
    assert out.recon.shape == x.shape
    assert out.vq.quantized.shape == (2, 8, h, w) and out.vq.indices.shape == (2, h, w)
    strided = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    transposed = [m for m in model.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(strided) == len(transposed) == {4: 2, 8: 3, 16: 4}[downsample]
    assert transposed[-1].out_channels == 1


def test_full_size_input_with_the_default_config():
    model = VQVAE(ModelConfig(hidden=16, res_hidden=8, downsample=8)).eval()
    z_e = model.encoder(torch.rand(1, 1, 256, 128))
    assert z_e.shape == (1, 64, 32, 16)


def test_residual_stack_adds_its_blocks_to_the_input_and_ends_with_relu():
    torch.manual_seed(0)
    stack = ResidualStack(6, 3, 2)
    x = torch.randn(2, 6, 5, 4)
    expected = x
    for block in stack.blocks:
        conv3, conv1 = block[1], block[3]
        expected = expected + conv1(F.relu(conv3(F.relu(expected))))
    torch.testing.assert_close(stack(x), F.relu(expected))
    assert stack(x).min() >= 0


def test_decoder_output_is_linear():
    torch.manual_seed(0)
    decoder = Decoder(ModelConfig(**SMALL))
    recon = decoder(torch.randn(4, 8, 8, 4))
    assert recon.min() < 0  # no ReLU or sigmoid after the last layer


def test_encode_decode_round_trip():
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(downsample=8, **SMALL))
    x = torch.rand(3, 1, 32, 16)
    model(x)  # training-mode pass: k-means initialisation of the codebook
    model.eval()
    indices = model.encode(x)
    assert indices.shape == (3, 4, 2) and indices.dtype == torch.int64
    assert torch.equal(indices, model(x).vq.indices)
    images = model.decode_indices(indices)
    assert images.shape == x.shape
    torch.testing.assert_close(images, model(x).recon)


def test_encode_never_changes_the_codebook_even_in_training_mode():
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(**SMALL))
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    model.encode(torch.rand(2, 1, 32, 16))
    assert all(torch.equal(before[k], v) for k, v in model.quantizer.state_dict().items())


@pytest.mark.parametrize("ema", [True, False])
def test_gradients_reach_every_trainable_part(ema):
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(ema=ema, **SMALL))
    x = torch.rand(2, 1, 32, 16)
    out = model(x)
    (F.mse_loss(out.recon, x) + out.vq.loss).backward()
    for part in (model.encoder, model.decoder):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    if ema:
        assert list(model.quantizer.parameters()) == []
    else:
        assert model.quantizer.codebook.grad.abs().sum() > 0


def test_config_round_trips_through_json():
    config = ModelConfig(hidden=64, downsample=16, ema=False, init="uniform", beta=0.5)
    d = json.loads(json.dumps(config.to_dict()))
    assert d["downsample"] == 16 and d["ema"] is False
    assert ModelConfig.from_dict(d) == config
    assert ModelConfig.from_dict({}) == ModelConfig()


def test_config_errors():
    with pytest.raises(ValueError, match="colour.*depth|depth.*colour"):
        ModelConfig.from_dict({"hidden": 64, "colour": 3, "depth": 2})
    with pytest.raises(ValueError, match="downsample.*32"):
        ModelConfig.from_dict({"downsample": 32})
    with pytest.raises(ValueError, match="codebook_size"):
        ModelConfig(codebook_size=0)
    with pytest.raises(ValueError, match="init"):
        ModelConfig(init="random")


def test_indivisible_input_is_rejected():
    model = VQVAE(ModelConfig(downsample=8, **SMALL))
    with pytest.raises(ValueError, match="36x16"):
        model(torch.rand(1, 1, 36, 16))
    with pytest.raises(ValueError, match="256x100"):
        model.latent_shape((256, 100))
    with pytest.raises(ValueError, match="256x100"):
        model.encode(torch.rand(1, 1, 256, 100))


def _train(seed, steps=10):
    torch.manual_seed(seed)
    model = VQVAE(ModelConfig(**SMALL))
    x = torch.rand(4, 1, 32, 16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        out = model(x)
        recon = F.mse_loss(out.recon, x)
        opt.zero_grad()
        (recon + out.vq.loss).backward()
        opt.step()
        losses.append(recon.item())
    return losses


def test_a_few_adam_steps_reduce_the_loss_deterministically():
    losses = _train(0)
    assert losses[-1] < 0.7 * losses[0]
    assert _train(0) == losses
    assert _train(1) != losses


def test_quantizer_is_configured_from_the_config():
    model = VQVAE(ModelConfig(codebook_size=32, embed_dim=4, beta=0.1, ema=False, decay=0.9, init="sample",
                              restart=False, hidden=8, res_hidden=4))
    q = model.quantizer
    assert isinstance(q, VectorQuantizer) and q.codebook.shape == (32, 4)
    assert (q.beta, q.ema, q.decay, q.init, q.restart) == (0.1, False, 0.9, "sample", False)
    assert isinstance(model.encoder, Encoder)


@pytest.mark.parametrize("precision", ["highest", "medium"])
def test_encode_picks_the_codes_of_forward_and_of_exact_distances_under_bf16_autocast(precision):
    """Nearest codes are searched in full fp32 in both paths, whatever autocast or matmul precision is set."""
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(hidden=32, res_hidden=16, codebook_size=256, embed_dim=32, downsample=4)).eval()
    with torch.no_grad():  # codes close together, as in a trained codebook, so rounding matters
        model.quantizer.codebook.copy_(torch.randn(256, 32) * 0.05)
    x = torch.rand(8, 1, 64, 32)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            codes = model.encode(x)
            out = model(x)
            z = model.encoder(x).double()
        assert torch.get_float32_matmul_precision() == precision  # left as the caller set it
        assert torch.backends.mkldnn.matmul.fp32_precision == ("bf16" if precision == "medium" else "ieee")
    finally:
        torch.set_float32_matmul_precision(before)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 32)
    exact = torch.cdist(flat, model.quantizer.codebook.double()).argmin(1).view(codes.shape)
    assert torch.equal(codes, out.vq.indices)
    assert (codes != exact).float().mean() < 0.002  # ties of the float32 expansion, not bf16 rounding
