"""The generative networks, plain torch on the real digits: a VAE whose loss falls and
whose decoder samples images, and a DCGAN whose generator moves toward the digits."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from models.gan import (
    Discriminator,
    GanConfig,
    Generator,
    discriminator_loss,
    generator_loss,
)
from models.vae import VAE, VaeConfig, VaeLoss


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return torch.from_numpy((load_digits().images / 16.0).astype(np.float32)).unsqueeze(1)


def test_vae_shapes_and_its_loss_falls_on_the_digits(digits):
    torch.manual_seed(0)
    vae = VAE(VaeConfig(hidden_sizes=(64,), latent=4), (1, 8, 8))
    loss_fn = VaeLoss(beta=1.0)
    logits, mean, log_var = vae(digits[:5])
    assert logits.shape == (5, 1, 8, 8) and mean.shape == log_var.shape == (5, 4)
    optimizer = torch.optim.Adam(vae.parameters(), lr=0.003)
    epoch_losses = []
    for _ in range(5):
        total = 0.0
        for batch in torch.randperm(len(digits)).split(64):
            optimizer.zero_grad()
            loss = loss_fn(vae(digits[batch]), digits[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        epoch_losses.append(total / len(digits))
    assert epoch_losses[-1] < 0.8 * epoch_losses[0], epoch_losses
    samples = vae.eval().generate(torch.randn(7, 4))
    assert samples.shape == (7, 1, 8, 8) and 0.0 <= samples.min() and samples.max() <= 1.0


def test_the_kl_term_is_zero_exactly_at_the_prior():
    logits = torch.zeros(3, 1, 8, 8)
    images = torch.full((3, 1, 8, 8), 0.5)
    at_prior = VaeLoss(beta=1.0)((logits, torch.zeros(3, 4), torch.zeros(3, 4)), images)
    reconstruction_only = VaeLoss(beta=0.0)((logits, torch.ones(3, 4), torch.ones(3, 4)), images)
    assert torch.isclose(at_prior, reconstruction_only)  # both: 64 x ln 2 per image
    assert torch.isclose(at_prior, torch.tensor(64 * np.log(2.0), dtype=torch.float32))


def test_gan_generator_moves_toward_the_digits(digits):
    torch.manual_seed(0)
    config = GanConfig(latent=16, width=16)
    generator, discriminator = Generator(config, (1, 8, 8)), Discriminator(config, (1, 8, 8))
    g_opt = torch.optim.Adam(generator.parameters(), lr=0.002, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=0.002, betas=(0.5, 0.999))
    mean_digit = digits.mean(dim=0)

    def distance_to_digits() -> float:
        generator.eval()
        with torch.no_grad():
            fake = generator(torch.randn(512, config.latent))
        generator.train()
        return float((fake.mean(dim=0) - mean_digit).pow(2).mean())

    before = distance_to_digits()
    for _ in range(4):
        for batch in torch.randperm(len(digits)).split(64):
            real = digits[batch]
            fake = generator(torch.randn(len(real), config.latent))
            d_opt.zero_grad()
            d_loss = discriminator_loss(
                discriminator(real), discriminator(fake.detach()), config.real_label
            )
            d_loss.backward()
            d_opt.step()
            g_opt.zero_grad()
            g_loss = generator_loss(discriminator(fake))
            g_loss.backward()
            g_opt.step()
            assert torch.isfinite(d_loss) and torch.isfinite(g_loss)
    assert distance_to_digits() < 0.5 * before
    with pytest.raises(ValueError, match="divide by 4"):
        Generator(config, (1, 10, 10))
