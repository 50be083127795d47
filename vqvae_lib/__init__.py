"""hipmri-vqvae: the helper package of the VQ-VAE tutorial series on HipMRI prostate MRI slices."""

from pathlib import Path

__version__ = "0.1.0"
REPO = Path(__file__).resolve().parents[1]  # the repository of an editable install (or a clone on the path)
