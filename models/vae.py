"""A variational autoencoder for images with pixels in [0, 1] (Kingma & Welling, 2014).

The encoder maps an image to the mean and log-variance of a Gaussian over a small latent
space; a latent drawn from it (the reparameterisation: mean + sigma * noise, so the draw
stays differentiable) is decoded back to pixel logits. The loss is the reconstruction's
binary cross-entropy plus `beta` times the KL divergence from the standard normal prior,
the term that makes the latent space smooth enough to sample new images from: decode
z ~ N(0, I) (`generate`), which is the graph export keeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VaeConfig:
    hidden_sizes: tuple[int, ...] = (256, 128)
    """Encoder layer widths, image side first (the decoder uses them in reverse)."""
    latent: int = 8
    """Size of the latent space (the codes segmentation can cluster)."""
    beta: float = 1.0
    """Weight of the KL term: above 1 a smoother, blurrier latent space (beta-VAE)."""
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    """How the decoder's output scores the input: bernoulli for pixels in [0, 1] (binary
    cross-entropy on logits), gaussian for standardized features (half the squared error:
    a unit-variance normal)."""

    def __post_init__(self) -> None:
        if self.latent < 1 or any(size < 1 for size in self.hidden_sizes):
            raise ValueError("latent and hidden_sizes must be >= 1")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be bernoulli or gaussian, got {self.likelihood!r}")


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers through `sizes` with ReLU between them, none after the last."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class VAE(nn.Module):
    def __init__(self, config: VaeConfig, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.config = config
        self.image_shape = tuple(image_shape)
        pixels = math.prod(image_shape)
        widths = [pixels, *config.hidden_sizes]
        self.encoder = nn.Sequential(_mlp(widths), nn.ReLU())
        self.mean = nn.Linear(widths[-1], config.latent)
        self.log_var = nn.Linear(widths[-1], config.latent)
        self.decoder = _mlp([config.latent, *reversed(widths)])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x.flatten(1))  # (B, C, H, W) -> (B, hidden)
        return self.mean(h), self.log_var(h)  # (B, latent) each

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel logits (B, C, H, W), or feature values (B, F) for the gaussian kind."""
        return self.decoder(z).view(-1, *self.image_shape)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_var = self.encode(x)
        if self.training:  # the reparameterisation trick: noise outside the gradient path
            z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_var)
        else:
            z = mean
        return self.decode(z), mean, log_var

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent), e.g. drawn from N(0, I) -> images in [0, 1] (B, C, H, W)
        (feature values for the gaussian kind)."""
        decoded = self.decode(z)
        return torch.sigmoid(decoded) if self.config.likelihood == "bernoulli" else decoded


class VaeLoss(nn.Module):
    """Reconstruction BCE (summed over pixels) + beta * KL(q(z|x) || N(0, I)), per image."""

    def __init__(self, beta: float, likelihood: str = "bernoulli") -> None:
        super().__init__()
        self.beta = beta
        self.likelihood = likelihood

    def forward(
        self, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor], images: torch.Tensor
    ) -> torch.Tensor:
        reconstruction, kl = vae_terms(output, images, self.likelihood)
        return (reconstruction + self.beta * kl).mean()


def vae_terms(
    output: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    images: torch.Tensor,
    likelihood: str = "bernoulli",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the VAE's loss, per input (B,) each: the reconstruction's negative
    log-likelihood (bernoulli: binary cross-entropy; gaussian: half the squared error),
    summed over pixels or features, and KL(q(z|x) || N(0, I)), summed over the latent."""
    decoded, mean, log_var = output
    if likelihood == "bernoulli":
        reconstruction = F.binary_cross_entropy_with_logits(decoded, images, reduction="none")
    else:
        reconstruction = 0.5 * (decoded - images).pow(2)
    reconstruction = reconstruction.flatten(1).sum(dim=1)  # (B,)
    # KL of N(mean, exp(log_var)) from N(0, 1), closed form.
    kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(dim=1)  # (B,)
    return reconstruction, kl


class PosteriorMean(nn.Module):
    """A VAE's encoder as a code: x -> the mean of q(z|x) (what segmentation clusters; a
    draw would add noise)."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x)[0]
