"""Image augmentation for a whole batch at once, in torch.

Each example gets its own random geometry (a crop of random size and aspect, a shift, a
small rotation, a mirror where the labels allow it), composed into one 2x3 affine matrix,
and the batch is resampled once with `grid_sample`: one interpolation instead of one per
transform, and no Python loop over examples. Each Ray Train worker runs it in its batch
loader, on the host before the batch moves to the device (it works on any device's tensors;
on the digits it is about 10% of an epoch on CPU, `data_wait_seconds` in MLflow shows it).
Colour jitter and cutout follow, per example. The random draws come from torch's generator (or `generator`), which the training
loop reseeds every epoch, so an augmented run is as reproducible as a plain one.

Why not torchvision's v2 transforms: PyPI's torchvision wheels for Linux are built against
the CUDA build of torch and do not import beside the CPU build (`operator torchvision::nms
does not exist`); the ops below are the same ones (RandomResizedCrop, RandomAffine,
RandomHorizontalFlip, ColorJitter, RandomErasing), batched.

Inputs are pixels in [0, 1], (B, C, H, W); the model's own first layer normalizes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = False
    """Augment the training batches of image data (never validation or test). Tables and
    token ids are never augmented."""
    scale: tuple[float, float] = (0.8, 1.0)
    """Random resized crop: the share of the image's area a crop keeps, drawn in this range
    (aspect ratio between 3/4 and 4/3), then resized back to the full image. (1, 1): no crop."""
    translate: float = 0.1
    """Largest shift, as a share of the image's width and height."""
    rotation: float = 10.0
    """Largest rotation, in degrees either way."""
    horizontal_flip: bool = False
    """Mirror half of the images left to right. Only where a mirrored image keeps its label:
    not for digits or letters."""
    color_jitter: float = 0.0
    """Largest relative change of brightness and contrast (and saturation for colour
    images), e.g. 0.2 for ±20%."""
    fill: Literal["border", "zeros", "reflection"] = "border"
    """What a shift or rotation brings in from outside the image: `border` repeats the edge
    pixels (a photo's background goes on), `zeros` is black (right where the background is
    black, as in the digits), `reflection` mirrors the image at its edge. Black edges on a
    coloured background are straight lines and corners that are not in the data: on issue
    19's folder of shapes (a 3-block CNN with global pooling, 200 epochs, a one-process run
    outside the benchmark), `zeros` left it at chance, 0.37 on 600 fresh images, against
    0.71 with `border`."""
    cutout: float = 0.0
    """Side of a square blanked to grey at a random place, as a share of the image's side
    (0: none). Part of FixMatch's strong view."""

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(
                f"scale must be [low, high] with 0 < low <= high <= 1, got {list(self.scale)}"
            )
        if not 0.0 <= self.translate <= 0.5:
            raise ValueError(f"translate must be between 0 and 0.5, got {self.translate}")
        if not 0.0 <= self.rotation <= 180.0:
            raise ValueError(f"rotation must be between 0 and 180 degrees, got {self.rotation}")
        if self.fill not in ("border", "zeros", "reflection"):
            raise ValueError(f"fill must be one of border, zeros, reflection, got {self.fill!r}")
        for name in ("color_jitter", "cutout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(
                    f"{name} must be at least 0 and below 1, got {getattr(self, name)}"
                )

    def strong(self) -> AugmentConfig:
        """A heavier version of these settings: FixMatch's strong view (larger crops, shifts
        and rotations, colour jitter and a cutout square), keeping this one's flip rule."""
        return replace(
            self,
            enabled=True,
            scale=(min(self.scale[0], 0.6), 1.0),
            translate=max(self.translate, 0.2),
            rotation=max(self.rotation, 25.0),
            color_jitter=max(self.color_jitter, 0.5),
            cutout=max(self.cutout, 0.4),
        )


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def affine_matrices(
    n: int, height: int, width: int, config: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n, 2, 3) matrices mapping each output pixel to where it samples the input, in
    `affine_grid`'s coordinates (-1..1 across each axis)."""
    # Random resized crop: area share and aspect ratio give the crop's width and height as
    # shares of the image's; the crop's centre may sit anywhere that keeps it inside.
    area = _uniform(n, *config.scale, generator)
    # Only the aspect ratios at which a crop of that area fits inside the image (a whole-
    # image "crop" keeps the image's own aspect).
    low = torch.clamp(torch.log(area), min=math.log(3 / 4))
    high = torch.clamp(-torch.log(area), max=math.log(4 / 3))
    log_ratio = low + (high - low) * torch.rand(n, generator=generator)
    crop_w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    crop_h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    centre_x = (1 - crop_w) * _uniform(n, -1.0, 1.0, generator)
    centre_y = (1 - crop_h) * _uniform(n, -1.0, 1.0, generator)
    # Shift: a share of the size, i.e. twice that in -1..1 coordinates.
    centre_x = centre_x + 2 * config.translate * _uniform(n, -1.0, 1.0, generator)
    centre_y = centre_y + 2 * config.translate * _uniform(n, -1.0, 1.0, generator)
    angle = torch.deg2rad(_uniform(n, -config.rotation, config.rotation, generator))
    mirror = torch.ones(n)
    if config.horizontal_flip:
        mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Rotation in pixels, not in -1..1 units (which would shear a non-square image):
    # aspect = width / height converts between the two axes' units.
    aspect = width / height
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * crop_w * mirror
    theta[:, 0, 1] = -sin * crop_h / aspect
    theta[:, 1, 0] = sin * crop_w * aspect * mirror
    theta[:, 1, 1] = cos * crop_h
    theta[:, 0, 2] = centre_x
    theta[:, 1, 2] = centre_y
    return theta


def augment(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A randomly augmented copy of `images` (B, C, H, W), pixels in [0, 1]."""
    if not config.enabled:
        return images
    n, channels, height, width = images.shape
    theta = affine_matrices(n, height, width, config, generator).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2)
    out = F.grid_sample(
        images, grid, mode="bilinear", padding_mode=config.fill, align_corners=False
    )
    if config.color_jitter > 0:
        out = _jitter(out, config.color_jitter, generator)
    if config.cutout > 0:
        out = _cutout(out, config.cutout, generator)
    return out


def _per_example(
    n: int, jitter: float, generator: torch.Generator | None, like: torch.Tensor
) -> torch.Tensor:
    """(B, 1, 1, 1) factors in [1 - jitter, 1 + jitter]."""
    return (
        _uniform(n, 1 - jitter, 1 + jitter, generator).to(like.device, like.dtype).view(n, 1, 1, 1)
    )


def _jitter(images: torch.Tensor, jitter: float, generator: torch.Generator | None) -> torch.Tensor:
    n = images.shape[0]
    out = images * _per_example(n, jitter, generator, images)  # brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = mean + (out - mean) * _per_example(n, jitter, generator, images)  # contrast
    if images.shape[1] == 3:  # saturation: towards or away from each pixel's grey
        grey = out.mean(dim=1, keepdim=True)
        out = grey + (out - grey) * _per_example(n, jitter, generator, images)
    return out.clamp(0.0, 1.0)


def _cutout(images: torch.Tensor, share: float, generator: torch.Generator | None) -> torch.Tensor:
    n, _, height, width = images.shape
    side_y, side_x = max(1, round(share * height)), max(1, round(share * width))
    top = (torch.rand(n, generator=generator) * (height - side_y + 1)).long().view(n, 1, 1)
    left = (torch.rand(n, generator=generator) * (width - side_x + 1)).long().view(n, 1, 1)
    rows = torch.arange(height).view(1, height, 1)
    cols = torch.arange(width).view(1, 1, width)
    square = (rows >= top) & (rows < top + side_y) & (cols >= left) & (cols < left + side_x)
    return torch.where(square.unsqueeze(1).to(images.device), 0.5, images)
