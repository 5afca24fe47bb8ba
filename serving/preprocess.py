"""Image preprocessing shared by training data preparation and the HTTP endpoint.

One function for both sides means an image sent to `/v1/classify` is resized, converted
and scaled exactly as the training images were: no train/serve skew.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def image_to_array(image: Image.Image, size: tuple[int, int], grayscale: bool) -> np.ndarray:
    """PIL image -> float32 array (C, H, W) with values in [0, 1], resized to size=(H, W)."""
    image = image.convert("L" if grayscale else "RGB")
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    if grayscale:
        return pixels[None, :, :]  # (1, H, W)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)
