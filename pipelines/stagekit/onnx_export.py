"""Torch -> ONNX with a dynamic batch axis, and the parity check against torch."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipelines.stagekit.atomic import write_bytes
from pipelines.stagekit.dataset import sha256_file
from serving.runtime import ort_session

if TYPE_CHECKING:
    import onnx

INPUT_NAME = "input"
OUTPUT_NAME = "output"
PARITY_SAMPLE_FILE = "parity_sample.npz"
PARITY_SAMPLE_SIZE = 16
"""Examples kept in the parity sample: enough to catch a wrong graph, small to store."""


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    opset: int,
    *,
    input_name: str = INPUT_NAME,
    output_name: str | tuple[str, ...] = OUTPUT_NAME,
    dynamic_axes: tuple[str, ...] = ("batch",),
) -> None:
    """Export `model` (eval mode) with its leading input axes named in `dynamic_axes` left
    free (any batch size; for token ids also any sequence length); written atomically.
    `opset` is a floor: a layer whose export form needs a newer one says so in its
    `onnx_min_opset` attribute (the transformer's Attention and RotaryEmbedding: 23)."""
    model = model.eval()
    opset = max([opset, *(getattr(m, "onnx_min_opset", opset) for m in model.modules())])
    outputs = [output_name] if isinstance(output_name, str) else list(output_name)
    # The exporter narrates every pass on stdout and warns about torchvision ops this model
    # does not use; keep the stage log readable.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        if any(isinstance(module, nn.RNNBase) for module in model.modules()):
            proto = _export_recurrent(model, example, input_name, outputs, dynamic_axes, opset)
        else:
            dims = {axis: torch.export.Dim(name, min=1) for axis, name in enumerate(dynamic_axes)}
            proto = torch.onnx.export(
                model,
                (example,),
                input_names=[input_name],
                output_names=outputs,
                dynamic_shapes=(dims,),
                opset_version=opset,
                dynamo=True,
            ).model_proto
    _check_dynamic(proto, dynamic_axes)
    strip_debug_info(proto)
    # Weights are small: one self-contained file, no external-data side files.
    write_bytes(path, proto.SerializeToString())


def _export_recurrent(
    model: nn.Module,
    example: torch.Tensor,
    input_name: str,
    outputs: list[str],
    dynamic_axes: tuple[str, ...],
    opset: int,
) -> onnx.ModelProto:
    """torch's TorchScript exporter, for networks with RNN/LSTM/GRU layers: torch.export
    (the dynamo exporter) unrolls them over the example's time steps, fixing the sequence
    length (torch 2.13), while this exporter writes ONNX's own LSTM/GRU/RNN operators,
    which take any length and run as one kernel in onnxruntime."""
    import onnx

    warnings.filterwarnings("ignore", category=UserWarning)  # "LSTM can only be exported..."
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (example,),
        buffer,
        input_names=[input_name],
        output_names=outputs,
        dynamic_axes={
            input_name: dict(enumerate(dynamic_axes)),
            **{name: {0: dynamic_axes[0]} for name in outputs},
        },
        opset_version=opset,
        dynamo=False,
    )
    return onnx.load_from_string(buffer.getvalue())


def _check_dynamic(proto: onnx.ModelProto, dynamic_axes: tuple[str, ...]) -> None:
    """Fail if the exporter fixed an axis meant to be free (it may do so silently)."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    fixed = [name for name, dim in zip(dynamic_axes, dims) if dim.HasField("dim_value")]
    if fixed:
        raise RuntimeError(f"ONNX export fixed the size of the {', '.join(fixed)} axis")


def strip_debug_info(proto) -> None:
    """Drop the exporter's per-node debug metadata (`pkg.torch.onnx.stack_trace` holds the
    absolute paths and line numbers of the Python source, `class_hierarchy` module names):
    with it the same model exported from another checkout, or after code moved, gave other
    bytes, so DVC saw a changed output. The graph itself is untouched."""
    import onnx

    def clean(nodes) -> None:
        for node in nodes:
            del node.metadata_props[:]
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    clean_graph(attribute.g)
                for graph in attribute.graphs:
                    clean_graph(graph)

    def clean_graph(graph) -> None:
        del graph.metadata_props[:]
        for info in (*graph.input, *graph.output, *graph.value_info):
            del info.metadata_props[:]
        for initializer in graph.initializer:
            del initializer.metadata_props[:]
        clean(graph.node)

    clean_graph(proto.graph)
    for function in proto.functions:
        del function.metadata_props[:]
        clean(function.node)


def onnx_session(path: str | Path, threads: int = 1):
    """A CPU onnxruntime session (export checks are about numerics, not speed)."""
    return ort_session(path, threads)


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    argmax_agreement: float
    examples: int

    def merge(self, other: Parity) -> Parity:
        """Both checks as one: the worst difference, the agreement over all examples."""
        examples = self.examples + other.examples
        agreement = (
            self.argmax_agreement * self.examples + other.argmax_agreement * other.examples
        ) / examples
        return Parity(max(self.max_abs_diff, other.max_abs_diff), agreement, examples)

    def holds(self, atol: float, classification: bool) -> bool:
        return self.max_abs_diff <= atol and (not classification or self.argmax_agreement == 1.0)


def check_parity(model: nn.Module, onnx_path: str | Path, inputs: np.ndarray) -> Parity:
    """Compare onnxruntime's and torch's outputs on `inputs` (e.g. the whole test split)."""
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(inputs)).numpy()
    actual = onnx_session(onnx_path).run([OUTPUT_NAME], {INPUT_NAME: inputs})[0]
    agreement = (
        float(np.mean(expected.argmax(axis=1) == actual.argmax(axis=1)))
        if expected.ndim == 2 and expected.shape[1] > 1
        else 1.0
    )
    return Parity(float(np.max(np.abs(expected - actual))), agreement, len(inputs))


def write_parity_sample(
    directory: Path,
    graphs: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
    atol: float,
) -> dict:
    """Save a few inputs and torch's outputs on them beside the exported graphs, so whoever
    loads the model later (a Serve replica swapping versions) can re-check onnxruntime
    against torch without torch. `graphs` maps an ONNX file name in `directory` to
    ({input name: array}, {output name: torch's array}). Returns the model card's
    `parity_sample` entry: the file, its atol, and the sha256 of the sample and of each
    graph, which the loader checks before running anything."""
    arrays = {}
    for graph, (inputs, outputs) in graphs.items():
        arrays.update({f"{graph}/input/{name}": value for name, value in inputs.items()})
        arrays.update({f"{graph}/output/{name}": value for name, value in outputs.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(directory / PARITY_SAMPLE_FILE, buffer.getvalue())
    return {
        "file": PARITY_SAMPLE_FILE,
        "atol": atol,
        "sha256": sha256_file(directory / PARITY_SAMPLE_FILE),
        "graphs": {graph: sha256_file(directory / graph) for graph in graphs},
    }
