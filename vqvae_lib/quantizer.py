"""The vector quantiser of the VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning").

The encoder gives one D-dimensional vector z_e per latent position. The quantiser replaces each by the nearest of
K code vectors e_1..e_K (the codebook) and trains with

    loss = ||sg[z_e] - e||^2  +  beta * ||z_e - sg[e]||^2        (sg = stop-gradient)
           codebook loss         commitment loss

Gradients skip the non-differentiable nearest-code lookup: the decoder's gradient is copied straight through
to the encoder ("straight-through estimator").

On top of the paper's plain version, three optional fixes against codebook collapse (few codes ever used):

- ``ema``: move each code to the exponential moving average of the vectors assigned to it (paper, appendix A.1)
  instead of learning it by gradient descent;
- ``init``: start the codebook from the encoder's outputs ("sample" or "kmeans") instead of random numbers;
- ``restart``: re-set codes that are (nearly) never chosen to random encoder outputs of the current batch.

Two options change the quantiser itself (both off in the paper's version):

- ``estimator="rotation"``: the rotation trick (Fifty et al. 2024) instead of the straight-through copy;
- ``normalize``: nearest code by cosine similarity, as in Improved VQGAN (`quantizers.CosineQuantizer`).

`quantizers` adds Finite Scalar Quantization, which needs no codebook at all. `model.ModelConfig.quantizer`
picks one of these.

All state lives in registered buffers, so a checkpoint (``state_dict``) restores it exactly. Under data-parallel
training (``torchrun``) the codebook statistics are summed across processes (`distributed`), so every replica
makes the same update as one process would on the whole global batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed

INITS = ("uniform", "sample", "kmeans")
ESTIMATORS = ("ste", "rotation")
KMEANS_MAX_POINTS = 20_000  # k-means at initialisation runs on at most this many sampled encoder outputs


@dataclass
class QuantizerOutput:
    """What one forward pass of a quantiser returns (all scalars are fp32 0-d tensors)."""

    quantized: torch.Tensor  # (B, D, h, w): forward value = the chosen codes, gradient flows to the encoder output
    indices: torch.Tensor  # (B, h, w) int64: index of the chosen code at each position
    loss: torch.Tensor  # codebook_loss + beta * commitment: add it to the reconstruction loss
    commitment: torch.Tensor  # mean ||z_e - sg[e]||^2, before beta
    codebook_loss: torch.Tensor  # mean ||sg[z_e] - e||^2; exactly 0 with ema=True (EMA moves the codes instead)
    perplexity: torch.Tensor  # exp(entropy of the code histogram of this batch): K when all codes are used equally


@contextlib.contextmanager
def full_fp32(device_type: str) -> Iterator[None]:
    """fp32 arithmetic for the block, whatever the caller set: no autocast, and float32 matrix products at full
    precision (`torch.set_float32_matmul_precision("high")` lets them run in TF32 on CUDA, "medium" in bf16 on
    the CPU). The caller's settings are restored afterwards."""
    if hasattr(torch.backends.mkldnn, "matmul"):  # torch >= 2.9: a precision per backend
        knobs = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
        saved = [knob.fp32_precision for knob in knobs]
        for knob in knobs:
            knob.fp32_precision = "ieee"

        def restore() -> None:
            for knob, value in zip(knobs, saved):
                knob.fp32_precision = value
    else:
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")

        def restore() -> None:
            torch.set_float32_matmul_precision(precision)
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        restore()


def nearest_code(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code vector for each row of `flat`: (N, D), codebook (K, D) -> (N,) int64.

    Squared distances come from the expansion ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2: one (N, K) matrix
    product instead of an (N, K, D) tensor of differences, always in full fp32 (`full_fp32`): in bf16 or TF32
    the rounding of z.e changes the nearest code of a few percent of the vectors.
    """
    with full_fp32(flat.device.type):
        flat, codebook = flat.float(), codebook.float()
        distances = torch.addmm(
            flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1),  # ||z||^2 + ||e||^2: (N, 1) + (K,) -> (N, K)
            flat, codebook.t(), alpha=-2.0,  # - 2 z.e
        )
        return distances.argmin(1)


def rotation_trick(z: torch.Tensor, e: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The rotation trick's stand-in for the codes e: z, e (B, D, ...) with vectors along dim 1 -> (B, D, ...).

    Fifty et al. 2024 ("Restructuring Vector Quantization with the Rotation Trick", arXiv 2410.06424) pass the
    gradient through the quantiser by a rotation instead of a copy: q = sg[||e|| / ||z||] sg[R] z, where R is
    the rotation in the plane of z and e that turns u = z / ||z|| onto q^ = e / ||e||. In Householder form, with
    r = (u + q^) / ||u + q^||, R z = z - 2 r (r.z) + 2 q^ (u.z). The value of q is e up to rounding; q is linear
    in z with everything else held constant, so the encoder gets the decoder's gradient rotated and scaled by
    sg[||e|| / ||z||] R^T, and the codes get none. Norms below `eps` count as `eps` (no division by zero; for
    opposite u and q^, R becomes the reflection z -> -z, which still lands on e).
    """
    z_norm, e_norm = z.norm(dim=1, keepdim=True), e.norm(dim=1, keepdim=True)
    u = (z / z_norm.clamp(min=eps)).detach()
    q = (e / e_norm.clamp(min=eps)).detach()
    r = F.normalize(u + q, dim=1, eps=eps)
    rotated = z - 2 * r * (r * z).sum(1, keepdim=True) + 2 * q * (u * z).sum(1, keepdim=True)
    return (e_norm / z_norm.clamp(min=eps)).detach() * rotated


def sample_rows(flat: torch.Tensor, n: int) -> torch.Tensor:
    """`n` randomly chosen rows of `flat`: (N, D) -> (n, D), from torch's global RNG.

    Without replacement when N >= n; otherwise with replacement plus small noise (1% of the data's spread), so
    repeated rows still differ by more than the rounding error of `nearest_code`'s distances.
    """
    if len(flat) >= n:
        return flat[torch.randperm(len(flat), device=flat.device)[:n]]
    rows = flat[torch.randint(len(flat), (n,), device=flat.device)]
    return rows + 0.01 * (flat.std() + 1e-6) * torch.randn_like(rows)


def kmeans(points: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """`k` centroids of `points`: (N, D) -> (k, D), by `iters` rounds of Lloyd's k-means started from samples."""
    centroids = sample_rows(points, k)
    for _ in range(iters):
        assign = nearest_code(points, centroids)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).float()  # (k, 1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)  # (k, D)
        # Each centroid moves to the mean of its points; one left without points stays where it is.
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


class VectorQuantizer(nn.Module):
    """Replace each encoder output vector by its nearest code vector: z (B, D, h, w) -> `QuantizerOutput`.

    Args:
        num_codes: K, the number of code vectors.
        dim: D, the length of each code vector (the encoder's output channels).
        beta: weight of the commitment loss (the paper uses 0.25).
        ema: learn the codebook by exponential moving averages (True) or by the codebook loss (False).
        decay: EMA decay of the codebook statistics.
        usage_decay: EMA decay of each code's usage share, which decides when a code is dead. Short on purpose:
            with 0.9 a code unused for about 45 steps is restarted, early enough to matter in a short run.
        eps: Laplace smoothing of the EMA cluster sizes.
        init: "uniform" (the paper: uniform(-1/K, 1/K)), "sample" (random encoder outputs) or "kmeans"
            (k-means on the encoder outputs); the last two run on the first forward pass in training mode.
        restart: re-set codes whose smoothed usage falls below `restart_threshold / num_codes`.
        restart_threshold: see `restart`.
        kmeans_iters: k-means iterations for init="kmeans".
        estimator: how the gradient passes the lookup: "ste", the paper's straight-through copy, or "rotation",
            the rotation trick (`rotation_trick`). Either way the forward value is exactly the chosen codes.
        normalize: l2-normalise the encoder outputs and the codes (`codes`) before everything else, so the
            nearest code is the one of highest cosine similarity (Yu et al. 2022, "Vector-quantized Image
            Modeling with Improved VQGAN"): lookup, losses, EMA, k-means initialisation and restarts all see unit
            vectors. `quantizers.CosineQuantizer` adds the low-dimensional projections that paper uses.

    Nothing changes in eval mode: the forward pass is then a pure nearest-code lookup.
    Plain paper version: ``VectorQuantizer(K, D, ema=False, init="uniform", restart=False)``.
    """

    def __init__(self, num_codes: int, dim: int, *, beta: float = 0.25, ema: bool = True, decay: float = 0.99,
                 usage_decay: float = 0.9, eps: float = 1e-5, init: str = "kmeans", restart: bool = True,
                 restart_threshold: float = 0.01, kmeans_iters: int = 10, estimator: str = "ste",
                 normalize: bool = False) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes and dim must be positive, got {num_codes} and {dim}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        for name, value in (("decay", decay), ("usage_decay", usage_decay)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        self.num_codes, self.dim = num_codes, dim
        self.beta, self.ema, self.decay, self.usage_decay, self.eps = beta, ema, decay, usage_decay, eps
        self.init, self.kmeans_iters = init, kmeans_iters
        self.restart, self.restart_threshold = restart, restart_threshold
        self.estimator, self.normalize = estimator, normalize

        codebook = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if ema:
            # Moved by EMA, not by the optimiser: codebook = embed_sum / cluster_size (smoothed).
            self.register_buffer("codebook", codebook)
            self.register_buffer("cluster_size", torch.ones(num_codes))  # EMA of N_k, the vectors assigned to code k
            self.register_buffer("embed_sum", codebook.clone())  # EMA of m_k, the sum of those vectors
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("initialized", torch.tensor(init == "uniform"))
        # The same flag on the Python side, so a training step need not read the buffer from the GPU (a sync);
        # loading a state_dict refreshes it.
        self._initialized = init == "uniform"
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_initialized",
                                                                           bool(module.initialized)))
        self.register_buffer("usage", torch.full((num_codes,), 1.0 / num_codes))  # EMA of each code's share
        self.register_buffer("restart_count", torch.zeros((), dtype=torch.long))

    @property
    def restarts_total(self) -> int:
        """How many code restarts have happened so far (saved in the state_dict as `restart_count`)."""
        return int(self.restart_count)

    @property
    def codes(self) -> torch.Tensor:
        """The code vectors that lookups return, (K, D): the codebook, l2-normalised with normalize=True."""
        return F.normalize(self.codebook, dim=1) if self.normalize else self.codebook

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each vector: flat (N, D) -> (N,) int64 (with normalize=True, of the
        l2-normalised vector: the code of highest cosine similarity)."""
        return self._nearest(F.normalize(flat, dim=1) if self.normalize else flat)

    @torch.no_grad()
    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """`nearest` for rows flat (N, D) already l2-normalised if normalize=True."""
        return nearest_code(flat, self.codes)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors at the given indices: (B, h, w) int64 -> (B, D, h, w)."""
        return F.embedding(indices, self.codes).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise the encoder output z_e: z (B, D, h, w) -> `QuantizerOutput`; computed in fp32."""
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"expected z of shape (B, {self.dim}, h, w), got {tuple(z.shape)}")
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_e = F.normalize(z.float(), dim=1) if self.normalize else z.float()
            # One row per latent position; choosing codes and updating them needs no gradient.
            flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, self.dim)  # (N, D), N = B*h*w vectors

            # 1. Data-dependent initialisation, once, on the first training batch.
            if self.training and not self._initialized:
                self._init_from_data(flat)

            # 2. Nearest code for every vector, and the chosen code vectors e.
            indices = self._nearest(flat)  # (N,)
            e = self.lookup(indices.view(b, h, w))  # (B, D, h, w)

            # 3. The two loss terms. The commitment loss pulls the encoder output towards its code; the codebook
            #    loss pulls the code towards the encoder output (with EMA, the update in step 6 does that instead).
            commitment = F.mse_loss(z_e, e.detach())
            codebook_loss = z_e.new_zeros(()) if self.ema else F.mse_loss(e, z_e.detach())
            loss = codebook_loss + self.beta * commitment

            # 4. Straight-through estimator: the forward value is exactly e (z_e - sg[z_e] = 0), while the backward
            #    pass copies the decoder's gradient to z_e unchanged (and none to the codebook).
            if self.estimator == "ste":
                quantized = e.detach() + (z_e - z_e.detach())
            else:  # the rotation trick: the same value, the gradient rotated and scaled (`rotation_trick`)
                rotated = rotation_trick(z_e, e.detach())
                quantized = e.detach() + (rotated - rotated.detach())

            # 5. Code usage in this batch (over all processes): perplexity = exp(entropy of the code histogram).
            counts = flat.new_zeros(self.num_codes).index_add_(0, indices, flat.new_ones(len(indices)))  # (K,)
            if self.training:
                distributed.all_reduce_sum(counts)
            probs = counts / counts.sum()
            perplexity = torch.exp(-torch.special.xlogy(probs, probs).sum())

            # 6. Training only: update the codebook (EMA), track code usage, restart dead codes. This batch has
            #    already been quantised with the codebook as it was before these updates.
            if self.training:
                with torch.no_grad():
                    if self.ema:
                        self._ema_update(flat, indices, counts)
                    self.usage.mul_(self.usage_decay).add_(probs, alpha=1.0 - self.usage_decay)
                    if self.restart:
                        self._restart_dead_codes(flat)

        return QuantizerOutput(quantized=quantized.to(z.dtype), indices=indices.view(b, h, w), loss=loss,
                               commitment=commitment, codebook_loss=codebook_loss, perplexity=perplexity)

    @torch.no_grad()
    def _init_from_data(self, flat: torch.Tensor) -> None:
        """Set every code from the encoder outputs flat (N, D) of the first training batch."""
        flat = distributed.gather_rows(flat)  # every process initialises from the same global batch
        if self.init == "sample":
            codes = sample_rows(flat, self.num_codes)
        else:
            points = sample_rows(flat, min(len(flat), KMEANS_MAX_POINTS))
            codes = kmeans(points, self.num_codes, self.kmeans_iters)
        # Rank 0's codes for all: k-means sums with float atomics on CUDA, so replicas could differ in the last bits.
        distributed.broadcast_tensor(codes)
        self._reset_codes(torch.ones(self.num_codes, dtype=torch.bool, device=flat.device), codes)
        self.initialized.fill_(True)
        self._initialized = True

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """Move each code to the EMA of the vectors assigned to it: flat (N, D) vectors, indices (N,) their codes,
        counts (K,) = n_k, how many vectors of the batch chose code k.

        Under data-parallel training, `counts` and `sums` are summed over all processes' batches.
        """
        sums = torch.zeros_like(self.codebook).index_add_(0, indices, flat)  # sum of the vectors of each code, (K, D)
        distributed.all_reduce_sum(sums)
        # Moving averages (paper, appendix A.1):
        # N_k <- decay N_k + (1 - decay) n_k  and  m_k <- decay m_k + (1 - decay) sums_k
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        # Laplace smoothing keeps a code nobody chooses from dividing by zero:
        # smoothed N_k = (N_k + eps) / (N + K eps) * N, where N = sum_k N_k (the total stays N).
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        # Each code becomes the (smoothed) mean of the vectors that chose it: e_k = m_k / N_k.
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Re-set codes whose smoothed usage is below threshold to random encoder outputs of flat (N, D) (drawn
        from every process's batch under data-parallel training).

        Shapes never depend on how many codes are dead, so nothing waits for the GPU: K candidate vectors are
        drawn every step and only the dead codes take theirs.
        """
        dead = self.usage < self.restart_threshold / self.num_codes  # (K,) bool
        candidates = sample_rows(distributed.gather_rows(sample_rows(flat, self.num_codes)), self.num_codes)
        self._reset_codes(dead, candidates)
        self.restart_count += dead.sum()

    @torch.no_grad()
    def _reset_codes(self, mask: torch.Tensor, vectors: torch.Tensor) -> None:
        """Set the codes where mask (K,) bool is True to their rows of vectors (K, D), as if each had just been
        chosen once, by itself.

        With EMA their statistics restart too (count 1, sum = the vector), so the old averages do not pull them
        straight back; their usage restarts at 1/K, which gives them time to be chosen before the next restart.
        """
        rows = mask.unsqueeze(1)
        self.codebook.copy_(torch.where(rows, vectors, self.codebook))
        if self.ema:
            self.cluster_size.masked_fill_(mask, 1.0)
            self.embed_sum.copy_(torch.where(rows, vectors, self.embed_sum))
        self.usage.masked_fill_(mask, 1.0 / self.num_codes)
