"""Batched image augmentation: what each op does to real pixels, and that it is seeded."""

import pytest
import torch

from models.augmentation import AugmentConfig, augment

STILL = AugmentConfig(enabled=True, scale=(1.0, 1.0), translate=0.0, rotation=0.0)


def images(n=16, channels=1, height=12, width=12, seed=0):
    return torch.rand(n, channels, height, width, generator=torch.Generator().manual_seed(seed))


def dot(height=15, width=15, row=7, col=7):
    x = torch.zeros(1, 1, height, width)
    x[0, 0, row, col] = 1.0
    return x


def centre_of_mass(x):
    _, _, height, width = x.shape
    weights = x[0, 0]
    rows = torch.arange(height, dtype=torch.float32).view(-1, 1)
    cols = torch.arange(width, dtype=torch.float32).view(1, -1)
    total = weights.sum()
    return float((weights * rows).sum() / total), float((weights * cols).sum() / total)


def test_disabled_returns_the_batch_untouched():
    x = images()
    assert augment(x, AugmentConfig(enabled=False)) is x


def test_without_any_op_the_resampling_is_the_identity():
    x = images()
    assert torch.allclose(augment(x, STILL), x, atol=1e-5)


def test_a_flip_mirrors_some_images_and_leaves_the_others():
    x = images(n=64)
    out = augment(x, AugmentConfig(**{**vars(STILL), "horizontal_flip": True}))
    mirrored = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, x)]
    kept = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x)]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 10 < sum(mirrored) < 54


def test_a_shift_moves_content_by_at_most_the_configured_share():
    config = AugmentConfig(enabled=True, scale=(1.0, 1.0), translate=0.2, rotation=0.0)
    generator = torch.Generator().manual_seed(1)
    moves = []
    for _ in range(40):
        out = augment(dot(), config, generator)
        row, col = centre_of_mass(out)
        moves.append((abs(row - 7), abs(col - 7)))
    assert max(max(m) for m in moves) <= 0.2 * 15 + 1e-4
    assert max(max(m) for m in moves) > 1.5  # it does move


def test_a_rotation_keeps_distances_in_pixels_on_a_non_square_image():
    # Two dots 8 pixels apart across a 16x32 image stay 8 pixels apart at any angle: a
    # rotation computed in -1..1 units would stretch them on a non-square image.
    config = AugmentConfig(enabled=True, scale=(1.0, 1.0), translate=0.0, rotation=90.0)
    for seed in range(10):
        # The same seed, the same rotation of each dot.
        first = augment(dot(16, 32, 8, 12), config, torch.Generator().manual_seed(seed))
        second = augment(dot(16, 32, 8, 20), config, torch.Generator().manual_seed(seed))
        (r1, c1), (r2, c2) = centre_of_mass(first), centre_of_mass(second)
        assert ((r1 - r2) ** 2 + (c1 - c2) ** 2) ** 0.5 == pytest.approx(8.0, abs=0.3)


def test_a_crop_zooms_in():
    # Keeping 25-36% of the area blows a 3x3 square up 2.8-4 times (while the crop holds it).
    x = torch.zeros(1, 1, 24, 24)
    x[0, 0, 10:13, 10:13] = 1.0
    config = AugmentConfig(enabled=True, scale=(0.25, 0.36), translate=0.0, rotation=0.0)
    generator = torch.Generator().manual_seed(3)
    sizes = [float(augment(x, config, generator).sum()) for _ in range(10)]
    assert max(sizes) > 9 * 2.7 and max(sizes) < 9 * 4.1


def test_colour_jitter_and_cutout_keep_pixels_in_range_and_blank_a_square():
    x = images(n=8, channels=3)
    out = augment(x, AugmentConfig(**{**vars(STILL), "color_jitter": 0.5}))
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)
    blanked = augment(x, AugmentConfig(**{**vars(STILL), "cutout": 0.25}))
    grey = (blanked == 0.5).all(dim=1)  # every channel of a pixel
    assert grey.flatten(1).sum(dim=1).tolist() == [9] * 8  # a 3x3 square in each 12x12 image


def test_a_shift_of_a_coloured_image_repeats_its_edge_unless_told_to_fill_black():
    # A uniformly coloured image (a photo's background): `border` brings in more of the
    # same colour; `zeros` brings in black edges, lines and corners that are not in the data.
    x = torch.tensor([0.2, 0.6, 0.9]).view(1, 3, 1, 1).expand(8, 3, 20, 20).contiguous()
    shift = AugmentConfig(enabled=True, scale=(1.0, 1.0), translate=0.3, rotation=30.0)
    assert torch.allclose(augment(x, shift, torch.Generator().manual_seed(0)), x, atol=1e-5)
    black = augment(x, AugmentConfig(**{**vars(shift), "fill": "zeros"}), torch.Generator())
    assert (black.amax(dim=1) < 0.01).any(dim=0).sum() > 20  # black pixels brought in


def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    x = images()
    config = AugmentConfig(enabled=True, color_jitter=0.2, horizontal_flip=True)
    first = augment(x, config, torch.Generator().manual_seed(5))
    again = augment(x, config, torch.Generator().manual_seed(5))
    other = augment(x, config, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.allclose(first, other)
    assert first.shape == x.shape and first.dtype == x.dtype


def test_the_strong_view_is_heavier_and_keeps_the_flip_rule():
    strong = AugmentConfig(horizontal_flip=False).strong()
    assert strong.enabled and strong.cutout > 0 and strong.rotation >= 25
    assert strong.horizontal_flip is False


@pytest.mark.parametrize(
    "field, value",
    [
        ("scale", (0.0, 1.0)),
        ("scale", (0.9, 0.5)),
        ("translate", 0.7),
        ("rotation", -1.0),
        ("cutout", 1.0),
        ("fill", "black"),
    ],
)
def test_out_of_range_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**{field: value})
