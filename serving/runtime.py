"""The one place an onnxruntime session is made: the predictors, the model checks before a
version is served, and the export stages' parity checks all open their graphs here.

One session per graph per replica with a fixed thread count: several sessions with default
threads each would oversubscribe the cores. No I/O binding: on CPU onnxruntime reads the
numpy input in place; on CUDA it would save copying a few KiB per batch, not worth keeping
device buffers per batch size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime


def gpu_visible() -> bool:
    """True when this process can see an NVIDIA GPU (respects CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def execution_providers(use_gpu: bool | None = None) -> list[str]:
    """CUDA first only where a GPU is ours to use (None: wherever one is visible);
    onnxruntime-gpu asked for CUDA without a GPU logs loud errors."""
    import onnxruntime as ort

    if use_gpu is None:
        use_gpu = gpu_visible()
    if use_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


CPU_DISABLED_FUSIONS = ("SkipLayerNormFusion",)
"""onnxruntime graph fusions left off on CPU, each because it measured slower there: its
SkipLayerNormalization kernel took 0.68 ms where the Add and LayerNormalization it replaces
took 0.11 ms (onnxruntime 1.31, one thread, (32, 32, 128) floats; benchmarks/README.md)."""


def ort_session(
    path: str | Path, threads: int = 1, use_gpu: bool | None = False
) -> onnxruntime.InferenceSession:
    """An onnxruntime session for the graph at `path` on `threads` intra-op threads; on CUDA
    when `use_gpu` (None: wherever a GPU is visible), else on CPU. Checks of numerics
    (parity, model checks) leave `use_gpu` False: same provider as the torch reference.

    Every graph optimisation on (constant folding, the transformer and bias fusions), one
    inter-op thread (a replica's graphs are chains), and memory patterns kept between calls
    of the same shape."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_mem_pattern = True
    providers = execution_providers(use_gpu)
    on_cpu = providers == ["CPUExecutionProvider"]
    return ort.InferenceSession(
        str(path),
        options,
        providers=providers,
        disabled_optimizers=list(CPU_DISABLED_FUSIONS) if on_cpu else None,
    )
