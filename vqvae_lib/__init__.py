"""hipmri-vqvae: the helper package of the VQ-VAE tutorial series on HipMRI prostate MRI slices."""

__version__ = "0.1.0"
