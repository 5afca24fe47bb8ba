"""ONNX Runtime image generation: a count and a seed in, base64 PNG images out.

No Ray here. The exported graph (export_generate) maps latents (batch, latent) to images
(batch, C, H, W) in [0, 1]; the latents are drawn here from numpy's seeded generator, so
the same seed and count give the same images on every replica and after every restart.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from serving.contracts import card_info, read_card
from serving.model_source import ModelFiles
from serving.predictor import InputError
from serving.runtime import ort_session

INPUT, OUTPUT = "latent", "images"


def latents(seed: int, count: int, size: int) -> np.ndarray:
    """The `count` latents (count, size) of `seed`: standard normal, float32. The first n of
    a larger count are the n of a smaller one, so count 1 shows the first of count 10."""
    return np.random.default_rng(seed).standard_normal((count, size), dtype=np.float32)


def png_base64(image: np.ndarray) -> str:
    """An image (C, H, W) in [0, 1] as base64 PNG: grey for one channel, RGB for three."""
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    picture = Image.fromarray(pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class GeneratorPredictor:
    def __init__(self, files: ModelFiles, threads: int = 1, use_gpu: bool | None = None) -> None:
        self.files = files
        self.card = read_card(files, "generation", "a generative model")
        self.session = ort_session(files.onnx, threads, use_gpu)
        self.latent_size = int(self.card["input"]["shape"][1])
        self.image_shape = [int(d) for d in self.card["output"]["shape"][1:]]
        self.conditional = bool(self.card.get("conditional", False))

    def info(self) -> dict[str, Any]:
        return {
            **card_info(self.files, self.card, self.session),
            "model": self.card["model"],
            "input": {"latent": self.latent_size, "conditional": self.conditional},
            "output": {"image_shape": self.image_shape, "format": "PNG, base64"},
        }

    def generate(self, count: int, seed: int, label: int | None = None) -> list[str]:
        if label is not None and not self.conditional:
            raise InputError(
                "label", "this generator is unconditional (it draws any digit): leave label out"
            )
        z = latents(seed, count, self.latent_size)
        (images,) = self.session.run([OUTPUT], {INPUT: z})
        return [png_base64(image) for image in images]
