"""The network of each `model.kind`: the one table a new supervised network is added to.

A network is a module of its own (`mlp.py`, `cnn.py`, `resnet.py`) taking the
`ArchitectureConfig`, the input shape and the number of outputs.
"""

from __future__ import annotations

from torch import nn

from models.architecture import ArchitectureConfig
from models.cnn import ConvNet
from models.mlp import MLP
from models.resnet import ResidualCNN

NETWORKS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": ConvNet, "resnet": ResidualCNN}
"""model.kind -> network class; every kind but mlp takes images (channels, height, width)."""


def build_network(
    arch: ArchitectureConfig, input_shape: tuple[int, ...], num_outputs: int
) -> nn.Module:
    """Build the network for inputs of `input_shape` (without batch) and `num_outputs` outputs."""
    if arch.kind != "mlp" and len(input_shape) != 3:
        raise ValueError(
            f"a {arch.kind} needs image inputs shaped (channels, height, width), got {input_shape}; "
            "use kind: mlp for tabular data"
        )
    return NETWORKS[arch.kind](arch, input_shape, num_outputs)
