# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · VQ-VAE versus VAE
#
# The VQ-VAE paper motivates discrete codes against the Gaussian VAE, whose reconstructions and samples are
# often called blurry. Here we test that claim on our slices instead of assuming it. You will learn
#
# - how a Gaussian VAE differs from the VQ-VAE when both have the same encoder, decoder and latent grid;
# - the VAE's loss, the negative ELBO, with the decoder's noise level set to its optimum so no weight is tuned;
# - how to compare the two fairly: reconstruction SSIM and PSNR, a sharpness measure, and samples from each;
# - that a VQ-VAE is a VAE with a one-hot posterior, and which of the two is the better density model of these
#   slices when both are put on one negative ELBO.
#
# **Prerequisites:** notebooks 04 to 06.
#
# **Expected run time:** about 2 minutes on a 2-core CPU (measured by `make figures`: a short demonstration
# run of 5 epochs; the comparison uses the committed `checkpoints/vae_8x.pt`). With a GPU the notebook trains the full VAE itself.

# %% tags=["parameters"]
SMOKE = False  # fast settings for the tests
DATA_DIR = "../data/phantom"
FIG_DIR = "../figures"
SEED = 0
INTERACTIVE = False  # no widgets in this notebook; kept so every notebook takes the same parameters
DEVICE = "auto"
TRAIN = "auto"  # auto: the full run on a GPU, a short run on a CPU; or "full" / "short"
RUN_DIR = "../build/runs/07_vae"
VQ_CHECKPOINT = "../checkpoints/default_8x.pt"
PRIOR_CHECKPOINT = "../checkpoints/prior_8x.pt"
VAE_CHECKPOINT = "../checkpoints/vae_8x.pt"
N_SAMPLES = 16

# %%
from pathlib import Path

DATA = Path(DATA_DIR)
FIGS = Path(FIG_DIR)
RUN = Path(RUN_DIR)
n_samples = 4 if SMOKE else N_SAMPLES

# %%
import inspect
import platform

import numpy as np
import torch

import vqvae_lib
from vqvae_lib import checkpoint, data, metrics, prior, rate, readme, train, vae, viz
from vqvae_lib.claims import Claims

torch.manual_seed(SEED)
claims = Claims(SMOKE, DATA)  # sentences below that state a measured result are checked in full mode
device = train.select_device(DEVICE)
full = TRAIN == "full" or (TRAIN == "auto" and device.type == "cuda" and not SMOKE)
print(f"python {platform.python_version()}, torch {torch.__version__}, vqvae_lib {vqvae_lib.__version__}")
print(f"device: {device}; {'full training run' if full else 'short demonstration run'}")

# %% [markdown]
# ## 1. The Gaussian VAE
#
# The VAE keeps the VQ-VAE's encoder and decoder (`model.Encoder`, `model.Decoder`) and its 8x latent grid of
# 32 x 16 positions with 64 channels; the encoder's last layer gives a mean $\mu$ and a log-variance
# $\log \sigma^2$ for every channel and position, so the posterior is $q(z \mid x) = \mathcal{N}(\mu, \operatorname{diag} \sigma^2)$.
# The decoder sees a sample of it, drawn with the **reparameterisation trick**,
#
# $$
# z = \mu + \sigma \odot \epsilon, \qquad \epsilon \sim \mathcal{N}(0, I), \qquad \sigma = \exp\left(\tfrac{1}{2} \log \sigma^2\right),
# $$
#
# so the randomness sits in $\epsilon$ and gradients flow through $\mu$ and $\sigma$ to the encoder. Training
# maximises the evidence lower bound (ELBO) on the log-likelihood of a slice,
#
# $$
# \log p(x) \ge \mathbb{E}_{q(z \mid x)}\left[\log p(x \mid z)\right] - \mathrm{KL}\left(q(z \mid x) \,\|\, \mathcal{N}(0, I)\right),
# \qquad \mathrm{KL} = \frac{1}{2} \sum_j \left(\mu_j^2 + \sigma_j^2 - 1 - \log \sigma_j^2\right),
# $$
#
# the sum running over every channel and position of the latent grid. With a Gaussian decoder of variance
# $\sigma_x^2$ on each pixel, $-\log p(x \mid z)$ per pixel is $\frac{1}{2} \log(2\pi\sigma_x^2) + \frac{\mathrm{MSE}}{2\sigma_x^2}$;
# its minimum over $\sigma_x^2$ is at $\sigma_x^2 = \mathrm{MSE}$, the batch's mean squared error, where it is
# $\frac{1}{2} \log(2\pi e\, \mathrm{MSE})$. The loss, in nats per pixel of an $H \times W$ slice, is then
# (Rybkin et al. 2021)
#
# $$
# \mathcal{L} = \frac{1}{2} \log\left(2\pi e\, \mathrm{MSE}\right) + \frac{\mathrm{KL}}{HW}:
# $$

# %%
print(inspect.getsource(vae.neg_elbo))

# %% [markdown]
# Unlike the VQ-VAE recipe, this loss has no SSIM term: the VAE's reconstruction term is its likelihood, and
# adding terms would leave the ELBO. Keep this in mind when comparing SSIM. Both models get the same data,
# schedule and budget: 15 epochs (675 steps). From a shell:
#
# ```bash
# python -m vqvae_lib vae --data-dir data/phantom --out runs/vae_8x --downsample 8 --epochs 15
# ```

# %%
if full:
    config = train.make_config("default", seed=SEED, device=str(device), downsample=8, epochs=15, ssim_weight=0.0)
else:  # a short run over every training slice; the comparison below uses the committed VAE
    config = train.make_config("default", seed=SEED, device=str(device), downsample=8, epochs=1 if SMOKE else 5,
                               limit=32 if SMOKE else None, ssim_weight=0.0)
history = vae.train_vae(DATA, RUN, config, overwrite=True)
for h in history:
    print(f"epoch {h['epoch']}: negative ELBO {h['train_loss']:.3f} nats per pixel, validation SSIM "
          f"{h['val_ssim']:.3f}, {h['val_active']} latent channels used")
claims(history[-1]["val_ssim"] > history[0]["val_ssim"] + 0.1 and history[-1]["train_loss"] < history[0]["train_loss"],
       "the VAE learns: its loss falls and its validation SSIM rises", f"SSIM {history[0]['val_ssim']:.3f} to "
       f"{history[-1]['val_ssim']:.3f}")

# %% [markdown]
# In the short run the loss falls and validation SSIM rises epoch by epoch; the committed VAE trained the full
# 15 epochs. Its curves, next to the VQ-VAE's validation SSIM over the same epochs:

# %%
vae_path = RUN / "best.pt" if full else Path(VAE_CHECKPOINT)
gauss, vae_payload = vae.load_vae(vae_path, map_location=device)
vq, vq_payload = checkpoint.load_model(VQ_CHECKPOINT, map_location=device)
curve = vae_payload["history"]
epochs = [h["epoch"] for h in curve]
viz.curves({
    "negative ELBO (nats per pixel)": {"training": (epochs, [h["train_loss"] for h in curve])},
    "KL (nats per pixel)": {"training": (epochs, [h["train_kl"] for h in curve]),
                            "validation": (epochs, [h["val_kl"] for h in curve])},
    "validation SSIM": {"VAE": (epochs, [h["val_ssim"] for h in curve]),
                        "VQ-VAE": (epochs, [h["val_ssim"] for h in vq_payload["history"]][:len(epochs)])},
    "latent channels used (validation)": {"VAE": (epochs, [h["val_active"] for h in curve])},
}, FIGS / "07_vae_curves.png", ncols=4, ylim={"latent channels used (validation)": (0, None)});
print(f"{vae_path}: {curve[-1]['val_active']} of {gauss.config.embed_dim} latent channels carry information "
      f"(mean KL above {vae.ACTIVE_KL} nats per position)")
claims(vae_payload["train_config"]["epochs"] == vq_payload["train_config"]["epochs"] == 15,
       "both models trained 15 epochs", f"VAE {vae_payload['train_config']['epochs']}, VQ-VAE "
       f"{vq_payload['train_config']['epochs']}")

# %% [markdown]
# ## 2. Reconstructions
#
# Both models on every test slice. The VAE reconstructs from the posterior mean.

# %%
test = data.load_split(DATA, "test", progress=False)
real = np.asarray(test.images)
vq_amp = train.checkpoint_precision(vq_payload, device)  # as trained, where this device has it
vq_recon, _ = train.reconstruct(vq, real, device=device, amp=vq_amp)
vae_amp = train.checkpoint_precision(vae_payload, device)
vae_recon, _ = vae.reconstruct(gauss, real, amp=vae_amp)
scores = {"VQ-VAE": metrics.ssim_psnr(vq_recon, real), "VAE": metrics.ssim_psnr(vae_recon, real)}
for name, (ssim, psnr) in scores.items():
    print(f"{name:<7} test SSIM {ssim.mean():.3f} (min {ssim.min():.3f}), PSNR {psnr.mean():.2f} dB")
pick = np.linspace(0, len(real) - 1, 4).astype(int)
viz.image_rows({"original": [real[i] for i in pick], "VQ-VAE": [vq_recon[i] for i in pick],
                "VAE": [vae_recon[i] for i in pick]}, [test.files[i].name for i in pick],
               FIGS / "07_reconstructions.png");

# %% [markdown]
# ## 3. Sharpness, measured
#
# "Blurry" means missing high spatial frequencies. We measure the share of each image's spectral power above
# 0.25 cycles per pixel (`metrics.high_frequency_share`),
#
# $$
# \frac{\sum_{\|f\| > 0.25} |X(f)|^2}{\sum_{f} |X(f)|^2},
# $$
#
# with $X$ the 2-D discrete Fourier transform of the image minus its mean and $\|f\|$ the radial frequency in
# cycles per pixel, and compare it with the real slices': a blurred image has less, a noisy one more.

# %%
samples_vq, _, _ = prior.sample_slices(VQ_CHECKPOINT, PRIOR_CHECKPOINT, n_samples, seed=SEED, device=str(device))
samples_vae = gauss.sample(n_samples, real.shape[1:], seed=SEED).float().clamp(0, 1)[:, 0].cpu().numpy()
sharpness = {"real (test)": metrics.high_frequency_share(real),
             "VQ-VAE recon": metrics.high_frequency_share(vq_recon),
             "VAE recon": metrics.high_frequency_share(vae_recon)}
for name, values in sharpness.items():
    print(f"{name:<14} high-frequency share {values.mean():.4f}")
print(f"{'VQ-VAE samples':<14} high-frequency share {metrics.high_frequency_share(samples_vq).mean():.4f}")
print(f"{'VAE samples':<14} high-frequency share {metrics.high_frequency_share(samples_vae).mean():.4f}")
viz.distributions({"high-frequency share": sharpness}, FIGS / "07_sharpness.png");

# %% [markdown]
# On these slices the common claim does not hold for reconstructions: with the same grid and budget the
# VAE's reconstructions are about as sharp as the VQ-VAE's, and both have well under half of the real slices'
# high-frequency share (a 32 x 16 bottleneck loses the fine texture whatever the latent). The VAE has lower
# SSIM and about the same PSNR (section 2); the VQ-VAE was trained with the SSIM term and the VAE was not.
# Where the two really differ is sampling: decoding z ~ N(0, I) gives the VAE's samples far more
# high-frequency energy than real slices have (texture without anatomy), while the VQ-VAE's samples from its
# prior are as smooth as its reconstructions.

# %%
hf = {name: values.mean() for name, values in sharpness.items()}
hf_vq_samples, hf_vae_samples = (metrics.high_frequency_share(s).mean() for s in (samples_vq, samples_vae))
claims(hf["VAE recon"] >= 0.8 * hf["VQ-VAE recon"] and max(hf["VAE recon"], hf["VQ-VAE recon"]) < 0.5 * hf["real (test)"],
       "the VAE's reconstructions are about as sharp as the VQ-VAE's, both under half the real slices' share",
       f"VAE {hf['VAE recon']:.4f}, VQ-VAE {hf['VQ-VAE recon']:.4f}, real {hf['real (test)']:.4f}")
vq_ssim, vq_psnr = (v.mean() for v in scores["VQ-VAE"])
vae_ssim, vae_psnr = (v.mean() for v in scores["VAE"])
claims(vae_ssim < vq_ssim and abs(vae_psnr - vq_psnr) < 1.0, "the VAE has lower SSIM and about the same PSNR",
       f"SSIM {vae_ssim:.3f} against {vq_ssim:.3f}, PSNR {vae_psnr:.2f} against {vq_psnr:.2f} dB")
claims(hf_vae_samples > hf["real (test)"] > hf_vq_samples and hf_vq_samples < 2 * hf["VQ-VAE recon"],
       "the VAE's samples have more high-frequency energy than real slices; the VQ-VAE's are as smooth as its "
       "reconstructions", f"VAE samples {hf_vae_samples:.4f}, real {hf['real (test)']:.4f}, VQ-VAE samples "
       f"{hf_vq_samples:.4f}, VQ-VAE recon {hf['VQ-VAE recon']:.4f}")

# %% [markdown]
# ## 4. Samples
#
# The VAE samples by decoding z ~ N(0, I); the VQ-VAE samples index maps from the PixelCNN prior of notebook
# 06. We score both with the plausibility statistics of notebook 06, against the real training slices and
# against each model's own reconstructions of them (what a perfect prior would give).

# %%
train_images = np.asarray(data.load_split(DATA, "train", progress=False).images)
references = {"real training slices": metrics.slice_stats(train_images),
              "VQ-VAE reconstructions": metrics.slice_stats(train.reconstruct(vq, train_images, device=device,
                                                                              amp=vq_amp)[0]),
              "VAE reconstructions": metrics.slice_stats(vae.reconstruct(gauss, train_images, amp=vae_amp)[0])}
in_range = {}
for name, images, own in (("VQ-VAE + prior", samples_vq, "VQ-VAE reconstructions"),
                          ("VAE", samples_vae, "VAE reconstructions")):
    stats = metrics.slice_stats(images)
    real_share = metrics.in_real_range(stats, references["real training slices"]).all(1).mean()
    own_share = metrics.in_real_range(stats, references[own]).all(1).mean()
    in_range[name] = (real_share, own_share)
    print(f"{name:<15} samples with all four statistics in range: {100 * real_share:3.0f} % against real slices, "
          f"{100 * own_share:3.0f} % against its own reconstructions of them")
shown = min(8, n_samples)
viz.image_rows({"VQ-VAE + prior": list(samples_vq[:shown]), "VAE": list(samples_vae[:shown])}, None,
               FIGS / "07_samples.png");
results_07 = {
    "vq_ssim": scores["VQ-VAE"][0].mean(), "vq_psnr": scores["VQ-VAE"][1].mean(),
    "vae_ssim": scores["VAE"][0].mean(), "vae_psnr": scores["VAE"][1].mean(),
    "hf_real": sharpness["real (test)"].mean(), "hf_vq_recon": sharpness["VQ-VAE recon"].mean(),
    "hf_vae_recon": sharpness["VAE recon"].mean(), "hf_vq_samples": metrics.high_frequency_share(samples_vq).mean(),
    "hf_vae_samples": metrics.high_frequency_share(samples_vae).mean(),
    "vq_in_range_real": in_range["VQ-VAE + prior"][0], "vq_in_range_own": in_range["VQ-VAE + prior"][1],
    "vae_in_range_real": in_range["VAE"][0], "vae_in_range_own": in_range["VAE"][1]}

# %% [markdown]
# ## 5. Both as density models: rate, distortion and one ELBO
#
# A VQ-VAE is a VAE whose posterior $q(z \mid x)$ is one-hot: all its mass sits on the encoder's nearest code at
# every position. Its KL to a uniform prior over $K$ codes is then, at each position,
#
# $$
# \mathrm{KL}(q \,\|\, u) = \sum_{k=1}^{K} q_k \log \frac{q_k}{1/K} = 1 \cdot \log \frac{1}{1/K} = \log K,
# $$
#
# whatever the slice: a constant, which is why the paper's loss leaves it out.

# %%
K = vq.config.codebook_size
print(f"KL(one-hot || uniform over {K} codes) = {rate.one_hot_kl(K):.4f} nats; log {K} = {np.log(K):.4f}")
claims(abs(rate.one_hot_kl(K) - np.log(K)) < 1e-6, "a one-hot posterior's KL to the uniform prior is log K",
       f"{rate.one_hot_kl(K):.6f} against {np.log(K):.6f}")

# %% [markdown]
# With a prior $p(c)$ over whole code maps in place of the uniform one, the one-hot posterior's KL is
# $\mathrm{KL}(q \,\|\, p) = -H(q) - \log p(c) = -\log p(c)$ (its entropy $H(q)$ is zero): the prior's NLL of the
# code map, what the map costs to store (notebook 05, section 6). The Gaussian VAE's rate is its KL to
# $\mathcal{N}(0, I)$. Both models then have a negative ELBO in the same units, nats per pixel:
#
# $$
# -\mathrm{ELBO} = \underbrace{\tfrac{1}{2} \log\left(2\pi e\, \mathrm{MSE}\right)}_{\text{distortion}}
# + \underbrace{\frac{R}{HW}}_{\text{rate}},
# $$
#
# the distortion being the Gaussian decoder's NLL with its noise at the optimum ($\sigma_x^2 = \mathrm{MSE}$, section
# 1) and $R$ the rate in nats per slice ($-\log p(c)$ or the KL), spread over the $HW = 256 \cdot 128$ pixels. For
# the VAE the distortion is that of a slice decoded from a posterior sample, as the ELBO has it. Lower is the
# better density model of these slices; the intensities are continuous, so these are densities and may be
# negative.

# %%
pixels = real.shape[1] * real.shape[2]
vq_maps = prior.encode_maps(vq, real, amp=vq_amp)
pixel_prior, _ = prior.load_prior(PRIOR_CHECKPOINT, map_location=device)
positions = vq_maps.shape[1] * vq_maps.shape[2]
train_maps = prior.encode_maps(vq, train_images, amp=vq_amp)
vq_rates = {  # nats per slice
    "VQ-VAE, uniform prior": positions * np.log(K),
    "VQ-VAE, code frequencies": np.log(2) * rate.bits_per_map(vq_maps, rate.code_frequencies(train_maps, K)).mean(),
    "VQ-VAE + PixelCNN prior": positions * prior.map_nll(
        pixel_prior, vq_maps, prior.position_bins(test, pixel_prior.config.positions)).mean()}
vq_mse = float(((vq_recon - real) ** 2).mean())
torch.manual_seed(SEED)
with torch.no_grad():  # the VAE's distortion with z drawn from the posterior, as in its ELBO
    x = torch.from_numpy(np.array(real))[:, None].to(device)
    vae_mse = float(sum(((gauss(x[i:i + 32], sample=True).recon.float().clamp(0, 1) - x[i:i + 32]) ** 2).sum()
                        for i in range(0, len(x), 32)) / x.numel())
vae_kl = np.log(2) * rate.vae_kl_bits(gauss, real).mean()
elbo = {name: rate.neg_elbo_per_pixel(vq_mse, r, pixels) for name, r in vq_rates.items()}
elbo["Gaussian VAE"] = rate.neg_elbo_per_pixel(vae_mse, vae_kl, pixels)
print(f"{'':<26}{'distortion':>12}{'rate':>10}{'-ELBO':>10}   nats per pixel; rate in bits per slice")
for name, e in elbo.items():
    print(f"{name:<26}{e['distortion']:12.3f}{e['rate']:10.4f}{e['total']:10.3f}   "
          f"{e['rate'] * pixels / np.log(2):9,.0f} bits")

# %% [markdown]
# The VAE has the smaller distortion and pays for it with the larger rate: its KL costs about three times the
# bits of the VQ-VAE's map under the prior. Which is the better density model depends on the VQ-VAE's prior.
# Under the uniform prior its bound is a little worse than the VAE's, under the code frequencies about equal,
# and with the PixelCNN prior of notebook 06 it is the better density model of these slices, by a margin
# larger than all the others' differences. A VQ-VAE is only as good a model of the data as the prior over its
# codes; training the prior is not an afterthought but half the model.

# %%
vq_best, vae_elbo = elbo["VQ-VAE + PixelCNN prior"], elbo["Gaussian VAE"]
claims(vae_elbo["distortion"] < vq_best["distortion"] and vae_elbo["rate"] > 2 * vq_best["rate"],
       "the VAE has the smaller distortion and more than twice the rate of the VQ-VAE with its prior",
       f"distortion {vae_elbo['distortion']:.3f} against {vq_best['distortion']:.3f}, rate "
       f"{vae_elbo['rate']:.4f} against {vq_best['rate']:.4f} nats per pixel")
claims(elbo["VQ-VAE, uniform prior"]["total"] > vae_elbo["total"] > vq_best["total"]
       and abs(elbo["VQ-VAE, code frequencies"]["total"] - vae_elbo["total"]) < 0.01
       and vae_elbo["total"] - vq_best["total"] > elbo["VQ-VAE, uniform prior"]["total"] - vae_elbo["total"],
       "with the uniform prior the VQ-VAE's bound is worse than the VAE's, with the frequencies about equal, with "
       "the PixelCNN prior it is the best by the widest margin",
       ", ".join(f"{name} {e['total']:.3f}" for name, e in elbo.items()))
for key, name in (("uniform", "VQ-VAE, uniform prior"), ("frequencies", "VQ-VAE, code frequencies"),
                  ("prior", "VQ-VAE + PixelCNN prior"), ("vae", "Gaussian VAE")):
    results_07.update({f"elbo_{key}_{part}": value for part, value in elbo[name].items()})
readme.save_results(FIGS / "07_results.json", results_07)

# %% [markdown]
# ## Checked claims
#
# Every sentence above that states a measured result was checked by an assertion next to the cell that
# measures it (in full mode, the mode of `make figures`; the tests' SMOKE runs only count them):

# %%
print(claims)

# %% [markdown]
# ## Questions

# %% [markdown]
# **Question 1.** Look at the sharpness numbers: which model is blurrier in its reconstructions, and in its
# samples? Does it agree with the common claim?
#
# <details><summary>Answer</summary>
#
# The hidden cell prints each high-frequency share and its ratio to the real slices'. In reconstructions the two
# are close (the VAE's share is at least 0.8 of the VQ-VAE's, a checked claim), and with the committed checkpoints
# it is the VQ-VAE, if either, that has the smaller share; both keep well under half of the real slices' high frequencies, because
# a $32 \times 16$ bottleneck loses the fine texture whatever the latent. In samples the VAE is not blurrier at
# all: decoding $z \sim \mathcal{N}(0, I)$ gives more high-frequency power than real slices have. Those $z$ are
# unlike the posterior samples the decoder was trained on (the KL term pulls each $q(z \mid x)$ towards
# $\mathcal{N}(0, I)$, but their mixture over the training slices does not fill it), so it decodes texture without
# anatomy. The VQ-VAE's samples, code maps from a prior trained on real maps, are as smooth as its
# reconstructions. So the common claim does not hold here: with the same grid and budget the VAE's weakness is
# implausible, noisy samples, not blur.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
for name, value in {**hf, "VQ-VAE samples": hf_vq_samples, "VAE samples": hf_vae_samples}.items():
    print(f"{name:<15} high-frequency share {value:.4f}, {value / hf['real (test)']:.2f} of the real slices'")

# %% [markdown]
# **Question 2.** The VAE's KL shows how many latent channels it uses. Why would a VAE switch channels off, and what
# does a VQ-VAE do instead (compare the active codes of notebook 05)?
#
# <details><summary>Answer</summary>
#
# Every channel pays for what it carries: its KL term $\frac{1}{2}(\mu_j^2 + \sigma_j^2 - 1 - \log \sigma_j^2)$ is
# zero only when $\mu_j = 0$ and $\sigma_j = 1$ whatever the slice, that is when the channel carries no
# information about $x$. A channel whose information lowers the distortion by less than its KL costs is cheaper
# switched off (posterior collapse of that channel), and the decoder learns to ignore it. The VQ-VAE's rate is
# fixed instead: a one-hot posterior costs $\log K$ per position against the uniform prior (section 5), whatever the
# encoder does, so nothing in its loss rewards carrying less, and all its channels feed the lookup. Its
# equivalent of an unused channel is an unused code (notebook 03's collapse): capacity it leaves idle, which
# lowers its effective rate (the perplexity) but not its nominal $\log K$. With EMA, k-means initialisation and
# restarts the default recipe keeps hundreds of its codes in use (notebook 05). The hidden cell prints both:
# the VAE's active channels at its last epoch (at this budget the KL switches off only a few, if any) and the
# distinct codes in the VQ-VAE's test maps.
#
# </details>

# %% tags=["hide-cell"] jupyter={"source_hidden": true, "outputs_hidden": true}
print(f"VAE: {curve[-1]['val_active']} of {gauss.config.embed_dim} latent channels active on the validation split "
      f"(mean KL above {vae.ACTIVE_KL} nats per position)")
print(f"VQ-VAE: {len(np.unique(vq_maps))} of {K} codes used in the test maps")

# %% [markdown]
# **Question 3.** The VQ-VAE was trained with an SSIM term and the VAE was not. Train the VQ-VAE with `ssim_weight=0`
# and compare again: which differences remain?
#
# <details><summary>Answer</summary>
#
# This needs a training run (about 12 minutes on a 2-core CPU, as `default_8x.pt`):
# `python -m vqvae_lib train --preset default --downsample 8 --epochs 15 --ssim-weight 0 --data-dir data/phantom --out runs/vq_mse`,
# then set `VQ_CHECKPOINT` to its `best.pt`. Sections 4 and 5 also need a prior trained on the new model's codes
# (`python -m vqvae_lib prior --checkpoint runs/vq_mse/best.pt --data-dir data/phantom --out runs/vq_mse_prior`,
# and set `PRIOR_CHECKPOINT` to its `best.pt`). What to expect: both models then minimise a squared error, so the
# VQ-VAE's SSIM should fall towards the VAE's, its PSNR stay about the same or rise a little, and its
# reconstructions grow smoother (MSE alone rewards a blurred average of the noisy texture, notebook 04).
# What the loss term cannot explain, and so should remain: the rates (a VQ-VAE's map costs at most
# $\log_2 K$ bits per position, the VAE's KL about three times the bits of the VQ-VAE's map under its prior),
# and the samples (the VAE's decoded from $\mathcal{N}(0, I)$, noisy; the VQ-VAE's from a prior over real code
# maps). Whether the VQ-VAE with its prior stays the better density model on one negative ELBO is the real test:
# its distortion term $\frac{1}{2}\log(2\pi e\,\mathrm{MSE})$ is what the squared-error training optimises.
#
# </details>
