"""What the `generate` stage hands on to `export_generate`: one model file per generative
model (its kind, config, image shape and weights), and how export rebuilds the network."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.gan import GanConfig, GanPair
from models.vae import VAE, VaeConfig
from pipelines.stagekit.atomic import write_bytes
from pipelines.stagekit.errors import UserError

MODEL_FILE = "generator.pt"
KINDS: dict[str, tuple[type, type[nn.Module]]] = {
    "vae": (VaeConfig, VAE),
    "gan": (GanConfig, GanPair),
}
"""Each generative model: its config and its network (both have `generate(z)`)."""


def save_generator(
    directory: Path, kind: str, model: nn.Module, image_shape: tuple[int, ...], history: list
) -> Path:
    buffer = io.BytesIO()
    torch.save(
        {
            "kind": kind,
            "config": dataclasses.asdict(model.config),
            "image_shape": list(image_shape),
            "state_dict": model.state_dict(),
            "history": history,
        },
        buffer,
    )
    path = directory / MODEL_FILE
    write_bytes(path, buffer.getvalue())
    return path


def load_generator(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(the network in eval mode, its saved bundle) of `directory`'s model file."""
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; run the generate stage first")
    bundle = torch.load(path, map_location="cpu", weights_only=True)
    config_type, network = KINDS[bundle["kind"]]
    config = config_type(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in bundle["config"].items()}
    )
    model = network(config, tuple(bundle["image_shape"]))
    model.load_state_dict(bundle["state_dict"])
    return model.eval(), bundle


class Sampler(nn.Module):
    """A generative model's `generate(z)` as its forward: latents (B, latent) -> images
    (B, C, H, W) in [0, 1], the graph export writes and /v1/generate runs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.generate(z)

    def export_form(self) -> Sampler:
        """The same function in the layers onnxruntime runs fastest: the GAN generator's
        transposed convolutions folded into matrix products (GanPair.inference_form). The
        parity check compares its graph with this sampler, not with the folded copy."""
        if isinstance(self.model, GanPair):
            return Sampler(self.model.inference_form())
        return self
