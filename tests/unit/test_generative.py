"""The generative networks on the real digits, trained by the one training loop (no Ray):
a VAE whose loss falls and whose decoder samples images, and a DCGAN whose two players
take turns, each with its own optimizer, and whose generator moves toward the digits."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from models.gan import GanConfig, Generator
from models.vae import VAE, VaeConfig, VaeLoss
from pipelines.stagekit.config import TrainConfig
from pipelines.training.fitting import fit_task, initial_state
from pipelines.training.tasks import GanTask, VaeTask

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return torch.from_numpy((load_digits().images / 16.0).astype(np.float32)).unsqueeze(1)


def digits_arrays(digits):
    labels = torch.from_numpy(load_digits().target.astype(np.int64))
    return {
        "x_train": digits[:1400],
        "y_train": labels[:1400],
        "x_val": digits[1400:],
        "y_val": labels[1400:],
    }


def test_the_vae_trains_through_fit_task_and_its_decoder_samples_images(digits):
    vae = VAE(VaeConfig(hidden_sizes=(64,), latent=4), (1, 8, 8))
    logits, mean, log_var = vae(digits[:5])
    assert logits.shape == (5, 1, 8, 8) and mean.shape == log_var.shape == (5, 4)

    task = VaeTask(VaeConfig(hidden_sizes=(64,), latent=4), (1, 8, 8))
    train = TrainConfig(epochs=5, lr=0.003, early_stopping_patience=0)
    state = fit_task(initial_state(task, train), task, digits_arrays(digits), train, CPU)
    first, last = state.history[0], state.history[-1]
    assert last["val_loss"] < 0.8 * first["val_loss"], state.history
    # The two terms are logged apart, and add up to the loss (beta 1).
    assert last["train_loss"] == pytest.approx(last["train_reconstruction"] + last["train_kl"])
    assert last["train_kl"] > 0
    samples = state.model.eval().generate(torch.randn(7, 4))
    assert samples.shape == (7, 1, 8, 8) and 0.0 <= samples.min() and samples.max() <= 1.0


def test_the_kl_term_is_zero_exactly_at_the_prior():
    logits = torch.zeros(3, 1, 8, 8)
    images = torch.full((3, 1, 8, 8), 0.5)
    at_prior = VaeLoss(beta=1.0)((logits, torch.zeros(3, 4), torch.zeros(3, 4)), images)
    reconstruction_only = VaeLoss(beta=0.0)((logits, torch.ones(3, 4), torch.ones(3, 4)), images)
    assert torch.isclose(at_prior, reconstruction_only)  # both: 64 x ln 2 per image
    assert torch.isclose(at_prior, torch.tensor(64 * np.log(2.0), dtype=torch.float32))


def test_the_gan_takes_turns_with_two_optimizers_and_moves_toward_the_digits(digits):
    config = GanConfig(latent=16, width=16)
    task = GanTask(config, (1, 8, 8))
    train = TrainConfig(epochs=4, lr=0.002, beta1=0.5, early_stopping_patience=0)
    state = initial_state(task, train)
    assert set(state.optimizers) == {"generator", "discriminator"}
    assert state.optimizers["generator"].param_groups[0]["betas"] == (0.5, 0.999)
    generator = state.model.generator
    # Each optimizer holds its own player's weights, and only those.
    assert {id(p) for p in state.optimizers["generator"].param_groups[0]["params"]} == {
        id(p) for p in generator.parameters()
    }
    mean_digit = digits.mean(dim=0)

    def distance_to_digits() -> float:
        generator.eval()
        with torch.no_grad():
            fake = generator(torch.randn(512, config.latent))
        generator.train()
        return float((fake.mean(dim=0) - mean_digit).pow(2).mean())

    torch.manual_seed(1)
    before = distance_to_digits()
    state = fit_task(state, task, digits_arrays(digits), train, CPU)
    assert distance_to_digits() < 0.5 * before
    for epoch in state.history:
        assert np.isfinite(epoch["train_generator_loss"]) and np.isfinite(
            epoch["train_discriminator_loss"]
        )
        assert 0.0 <= epoch["val_discriminator_accuracy"] <= 1.0
    # Gradient norms of both players, the discriminator's from its own step.
    assert any(k.startswith("grad_norm/generator.") for k in state.history[-1])
    assert any(k.startswith("grad_norm/discriminator.") for k in state.history[-1])
    assert all(p.requires_grad for p in state.model.discriminator.parameters())
    with pytest.raises(ValueError, match="divide by 4"):
        Generator(config, (1, 10, 10))
