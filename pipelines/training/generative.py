"""The training steps of the generative models, in plain PyTorch (see loop.Step).

They are not `SupervisedStep`'s model(x) -> loss(output, y): the VAE's loss has two terms
worth watching apart (how well it reconstructs, how far its codes stray from the prior), and
a GAN is two networks taking turns, each with its own optimizer. Both run in the same `fit`
loop, on the same Ray Train workers, as every other task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.gan import discriminator_loss, generator_loss
from models.vae import vae_terms
from pipelines.training.loop import backward_and_step, unwrap


def _update(scaler: torch.amp.GradScaler | None) -> None:
    if scaler is not None and scaler.is_enabled():
        scaler.update()


@dataclass(frozen=True)
class VaeStep:
    """Reconstruction + beta * KL per image; totals [reconstruction sum, KL sum, n], figures
    `loss`, `reconstruction` and `kl` (per image)."""

    beta: float
    likelihood: str = "bernoulli"
    size = 3

    def _totals(self, model, images, autocast) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast():
            output = model(images)
        reconstruction, kl = vae_terms(tuple(o.float() for o in output), images, self.likelihood)
        loss = (reconstruction + self.beta * kl).mean()
        n = torch.tensor(float(len(images)), device=images.device)
        return loss, torch.stack([reconstruction.sum().detach(), kl.sum().detach(), n])

    def train(self, model, batch, optimizers, autocast, scaler) -> torch.Tensor:
        images = batch[0]
        (optimizer,) = optimizers.values()
        optimizer.zero_grad(set_to_none=True)
        loss, totals = self._totals(model, images, autocast)
        backward_and_step(loss, optimizer, scaler)
        _update(scaler)
        return totals

    @torch.no_grad()
    def evaluate(self, model, batch, autocast) -> torch.Tensor:
        return self._totals(model, batch[0], autocast)[1]

    def metrics(self, totals: torch.Tensor) -> dict[str, float]:
        reconstruction, kl, n = (float(v) for v in totals.cpu())
        n = max(n, 1.0)
        return {
            "loss": (reconstruction + self.beta * kl) / n,
            "reconstruction": reconstruction / n,
            "kl": kl / n,
        }


@dataclass(frozen=True)
class GanStep:
    """One round of the two-player game on a batch of real images: the discriminator steps
    on real vs generated images, then the generator steps to fool it, on the same latents.
    Totals [discriminator loss sum, generator loss sum, real judged real, generated judged
    generated, n]; figures `discriminator_loss`, `generator_loss`, their sum as `loss`
    (what divergence detection watches) and `discriminator_accuracy`."""

    latent: int
    real_label: float
    size = 5

    def train(self, model, batch, optimizers, autocast, scaler) -> torch.Tensor:
        real = batch[0]
        z = torch.randn(len(real), self.latent, device=real.device)
        discriminator = unwrap(model).discriminator

        optimizers["discriminator"].zero_grad(set_to_none=True)
        with autocast():
            real_logits, fake_logits = model(real, z, "discriminator")
        d_loss = discriminator_loss(real_logits.float(), fake_logits.float(), self.real_label)
        backward_and_step(d_loss, optimizers["discriminator"], scaler)

        # Frozen while the generator steps: its gradients would be thrown away, and the
        # epoch's gradient norms keep the ones of its own step.
        discriminator.requires_grad_(False)
        try:
            optimizers["generator"].zero_grad(set_to_none=True)
            with autocast():
                fooled_logits, _ = model(real, z, "generator")
            g_loss = generator_loss(fooled_logits.float())
            backward_and_step(g_loss, optimizers["generator"], scaler)
        finally:
            discriminator.requires_grad_(True)
        _update(scaler)
        return self._totals(d_loss, g_loss, real_logits, fake_logits)

    @torch.no_grad()
    def evaluate(self, model, batch, autocast) -> torch.Tensor:
        real = batch[0]
        z = torch.randn(len(real), self.latent, device=real.device)
        with autocast():
            real_logits, fake_logits = model(real, z, "discriminator")
        real_logits, fake_logits = real_logits.float(), fake_logits.float()
        d_loss = discriminator_loss(real_logits, fake_logits, self.real_label)
        return self._totals(d_loss, generator_loss(fake_logits), real_logits, fake_logits)

    @staticmethod
    def _totals(d_loss, g_loss, real_logits, fake_logits) -> torch.Tensor:
        n = float(len(real_logits))
        return torch.stack(
            [
                d_loss.detach() * n,
                g_loss.detach() * n,
                (real_logits > 0).sum().float(),
                (fake_logits < 0).sum().float(),
                torch.tensor(n, device=real_logits.device),
            ]
        )

    def metrics(self, totals: torch.Tensor) -> dict[str, float]:
        d_loss, g_loss, real_right, fake_right, n = (float(v) for v in totals.cpu())
        n = max(n, 1.0)
        return {
            "loss": (d_loss + g_loss) / n,
            "discriminator_loss": d_loss / n,
            "generator_loss": g_loss / n,
            "discriminator_accuracy": (real_right + fake_right) / (2 * n),
        }
