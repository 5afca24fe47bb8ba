import pytest
import torch

from models.activations import ACTIVATIONS, Maxout, make_activation
from models.architecture import ArchitectureConfig
from models.networks import build_network
from models.pooling import Pool2d

HIDDEN_ACTIVATIONS = [a for a in ACTIVATIONS if a != "softmax"]


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("activation", HIDDEN_ACTIVATIONS)
def test_every_network_and_activation_maps_images_to_outputs(kind, activation):
    arch = ArchitectureConfig(kind=kind, activation=activation, channels=(4, 8), hidden_sizes=(16,))
    net = build_network(arch, (1, 8, 8), num_outputs=10)
    out = net(torch.randn(5, 1, 8, 8))
    assert out.shape == (5, 10)
    out.sum().backward()  # every parameter receives a gradient
    assert all(p.grad is not None for p in net.parameters())


def test_mlp_takes_tabular_rows_and_conv_nets_refuse_them():
    net = build_network(ArchitectureConfig(kind="mlp", hidden_sizes=(8, 8)), (5,), num_outputs=1)
    assert net(torch.randn(3, 5)).shape == (3, 1)
    with pytest.raises(ValueError, match="image inputs"):
        build_network(ArchitectureConfig(kind="cnn"), (5,), num_outputs=2)


def test_rgb_and_non_square_images():
    net = build_network(ArchitectureConfig(kind="cnn", channels=(4, 4, 4)), (3, 12, 20), 3)
    assert net(torch.randn(2, 3, 12, 20)).shape == (2, 3)


def test_pooling_modes_pick_max_mean_and_min():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])
    assert Pool2d("max")(x).item() == 6.0
    assert Pool2d("avg")(x).item() == 3.0
    assert Pool2d("min")(x).item() == 1.0


def test_maxout_takes_the_max_of_each_group():
    x = torch.tensor([[1.0, 5.0, -2.0, -3.0]])
    assert torch.equal(Maxout(2)(x), torch.tensor([[5.0, -2.0]]))


def test_prelu_has_one_slope_per_unit_and_softmax_normalises():
    assert make_activation("prelu", 7).weight.shape == (7,)
    probs = make_activation("softmax", 3)(torch.randn(4, 3))
    assert torch.allclose(probs.sum(dim=1), torch.ones(4))


def test_architecture_rejects_bad_values():
    with pytest.raises(ValueError, match="dropout"):
        ArchitectureConfig(dropout=1.5)
    with pytest.raises(ValueError, match="activation"):
        ArchitectureConfig(activation="softmax")
    with pytest.raises(ValueError, match="kernel_size"):
        ArchitectureConfig(kernel_size=2)


def test_global_pooling_feeds_the_head_one_value_per_channel_at_any_image_size():
    from models.cnn import ConvNet

    pooled = ArchitectureConfig(channels=(8, 16), hidden_sizes=(4,), global_pool="avg")
    small, large = ConvNet(pooled, (3, 16, 16), 3), ConvNet(pooled, (3, 48, 40), 3)
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(small) == count(large)
    assert large(torch.rand(2, 3, 48, 40)).shape == (2, 3)
    flat = ArchitectureConfig(channels=(8, 16), hidden_sizes=(4,))
    assert ConvNet(flat, (3, 48, 40), 3).head[1].in_features == 16 * 12 * 10
    assert isinstance(ConvNet(flat, (3, 48, 40), 3).pool, torch.nn.Identity)


def test_fit_warnings_name_the_setting_that_cannot_learn_objects_anywhere():
    from models.cnn import fit_warnings, receptive_field

    default = ArchitectureConfig()
    assert fit_warnings(default, (1, 8, 8), 1257) == []  # the digits
    [flat] = fit_warnings(default, (3, 40, 40), 126)  # issue 19's folder of shapes
    assert "10x10 feature map" in flat and "model.global_pool: avg" in flat
    two_blocks = ArchitectureConfig(global_pool="avg")
    assert receptive_field(two_blocks, (3, 40, 40)) == 10
    [small] = fit_warnings(two_blocks, (3, 40, 40), 126)
    assert "sees 10x10 pixels of the 40x40 images" in small and "model.channels" in small
    three_blocks = ArchitectureConfig(global_pool="avg", channels=(32, 64, 128))
    assert receptive_field(three_blocks, (3, 40, 40)) == 22
    assert fit_warnings(three_blocks, (3, 40, 40), 126) == []
    assert fit_warnings(default, (1, 28, 28), 60_000) == []  # a large set may flatten
