"""Optional int8 dynamic quantisation of exported graphs, kept only past an accuracy gate.

`export.quantize: int8` makes an export stage quantise its graphs' matrix multiplications
to int8 (weights converted once, each call's activations scaled on the fly: no calibration
data), score the fp32 and the int8 graphs on the same held-out data through onnxruntime,
and serve the int8 graph only if the score drops by at most `export.quantize_max_drop`.
Kept, the int8 graph takes the served file's name and the fp32 graph stays beside it as
`<name>.fp32.onnx`; refused, the int8 graph is deleted and the fp32 graph serves. Both
scores go into the stage's metrics either way.

The transformer's and the MLPs' time is in their MatMuls (3-4x faster in int8 on CPU);
convolutions are left in fp32 (onnxruntime's ConvInteger is slower than its fp32 conv).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.stagekit.errors import UserError
from serving.runtime import ort_session

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("MatMul", "Gemm")
FP32_SUFFIX = ".fp32.onnx"
ATOL_MARGIN = 2.0
"""A quantised graph's parity-sample tolerance is this many times its own largest difference
from torch on the sample at export: int8 kernels round differently on other CPUs (VNNI or
not), and a replica there must still accept the graph the gate passed."""


def quantize_int8(source: Path, target: Path) -> None:
    """Write `source`'s graph to `target` with its MatMul/Gemm weights in int8 (dynamic
    quantisation: activations are quantised per call from their own range)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(source))
    # The exporter records the shape of every weight; the quantiser rewrites the weights of
    # Gemm/MatMul and then fails its own shape inference on the stale records.
    del proto.graph.value_info[:]
    # The quantiser prints advice for every graph ("please run pre-processing"), on stdout
    # and as a root-logger warning.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_dynamic(
                proto,
                target,
                weight_type=QuantType.QInt8,
                # Only these: left to itself it also rewrites ONNX's Attention into the
                # contrib QAttention, which rejects Attention-23's attributes.
                op_types_to_quantize=list(QUANTIZED_OPS),
            )
    except Exception as exc:  # onnxruntime's quantiser raises many types
        raise UserError(
            f"export.quantize int8: onnxruntime could not quantise {Path(source).name} "
            f"({type(exc).__name__}: {exc}); set export.quantize: none"
        ) from None
    finally:
        logging.disable(previous)


@dataclass(frozen=True)
class Gate:
    """fp32 against int8 on one score (higher is better), and whether int8 serves."""

    metric: str
    fp32: float
    int8: float
    max_drop: float
    sample_max_abs_diff: float | None = None
    """A kept int8 graph's largest difference from torch on the parity sample."""

    @property
    def drop(self) -> float:
        return self.fp32 - self.int8

    @property
    def kept(self) -> bool:
        # A drop of exactly max_drop (e.g. one example in 200 at 0.005) is allowed, whatever
        # the float rounding of the two accuracies' difference.
        return self.drop <= self.max_drop + 1e-9

    def figures(self) -> dict[str, float]:
        """What the stage's metrics file gets: both scores and the verdict (1.0 kept)."""
        figures = {
            f"fp32_{self.metric}": self.fp32,
            f"int8_{self.metric}": self.int8,
            "int8_kept": float(self.kept),
        }
        if self.sample_max_abs_diff is not None:
            figures["int8_max_abs_diff"] = self.sample_max_abs_diff
        return figures

    def card(self, graphs: tuple[str, ...] = ()) -> dict:
        """The model card's `quantization` entry; `graphs` the files quantised."""
        fp32 = {graph: fp32_name(graph) for graph in graphs} if self.kept else {}
        return {
            "mode": "int8",
            "kept": self.kept,
            **self.figures(),
            "max_drop": self.max_drop,
            "fp32_graphs": fp32,
        }


def quantize_with_gate(
    staging: Path,
    graphs: tuple[str, ...],
    score: Callable[[Path], float],
    metric: str,
    max_drop: float,
) -> Gate:
    """Quantise each of `graphs` (files in `staging`), score the first in fp32 and in int8
    with `score(path)` and keep the int8 graphs only if the score drops by at most
    `max_drop`. The graphs share their weights (one model), so the first one's score
    speaks for all."""
    for graph in graphs:
        quantize_int8(staging / graph, staging / _int8_name(graph))
    gate = Gate(
        metric, score(staging / graphs[0]), score(staging / _int8_name(graphs[0])), max_drop
    )
    log.info(
        "int8: %s %.4f against fp32 %.4f (drop %.4f, at most %.4f allowed): %s",
        metric,
        gate.int8,
        gate.fp32,
        gate.drop,
        max_drop,
        "serving int8" if gate.kept else "serving fp32",
    )
    for graph in graphs:
        if gate.kept:
            (staging / graph).rename(staging / fp32_name(graph))
            (staging / _int8_name(graph)).rename(staging / graph)
        else:
            (staging / _int8_name(graph)).unlink()
    return gate


def fp32_name(graph: str) -> str:
    """Where a kept int8 graph's fp32 original stays: model.onnx -> model.fp32.onnx."""
    return graph.removesuffix(".onnx") + FP32_SUFFIX


def _int8_name(graph: str) -> str:
    return graph.removesuffix(".onnx") + ".int8.onnx"


def sample_atol(
    staging: Path,
    graphs: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
    parity_atol: float,
) -> tuple[float, float]:
    """(the parity-sample tolerance of quantised graphs, their largest difference from
    torch's outputs on the sample): ATOL_MARGIN times that difference, never below the
    fp32 `parity_atol` (`graphs` as write_parity_sample takes it)."""
    worst = 0.0
    for graph, (inputs, outputs) in graphs.items():
        got = ort_session(staging / graph).run(list(outputs), inputs)
        for want, actual in zip(outputs.values(), got, strict=True):
            diff = np.abs(want.astype(np.float64) - actual.astype(np.float64))
            worst = max(worst, float(diff.max()))
    return max(parity_atol, ATOL_MARGIN * worst), worst
