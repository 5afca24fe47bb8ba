"""int8 dynamic quantisation and its accuracy gate, on real exported graphs in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from models.architecture import ArchitectureConfig
from pipelines.stagekit.config import ExportConfig
from pipelines.stagekit.model_bundle import build_model, inference_model
from pipelines.stagekit.onnx_export import export_onnx, onnx_session, write_parity_sample
from pipelines.stagekit.quantize import Gate, fp32_name, quantize_with_gate, sample_atol
from serving.model_checks import verify_model
from serving.model_source import resolve_model

MANIFEST = {
    "task": "classification",
    "input_kind": "tabular",
    "input_shape": [64],
    "class_names": [str(i) for i in range(10)],
    "normalization": {"mean": [0.0], "std": [1.0]},
}


@pytest.fixture
def exported(tmp_path):
    """An MLP classifier exported in fp32, and inputs with torch's outputs on them."""
    torch.manual_seed(0)
    arch = ArchitectureConfig(kind="mlp", hidden_sizes=(128, 64))
    model = inference_model(build_model(arch, MANIFEST), "classification").eval()
    x = np.random.default_rng(0).standard_normal((64, 64), dtype=np.float32)
    export_onnx(model, torch.from_numpy(x[:2]), tmp_path / "model.onnx", opset=18)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    return tmp_path, x, expected


def closeness(x: np.ndarray, expected: np.ndarray):
    """A score that any rounding lowers: minus the graph's largest difference from torch."""
    return lambda graph: (
        -float(np.abs(onnx_session(graph).run(None, {"input": x})[0] - expected).max())
    )


def test_int8_is_kept_within_the_allowed_drop_and_the_fp32_graph_stays_beside_it(exported):
    directory, x, expected = exported
    fp32_bytes = (directory / "model.onnx").read_bytes()
    gate = quantize_with_gate(directory, ("model.onnx",), closeness(x, expected), "closeness", 0.5)
    assert gate.kept and gate.figures()["int8_kept"] == 1.0
    assert 0 < gate.drop <= 0.5  # int8 rounds: a real, small difference
    assert (directory / fp32_name("model.onnx")).read_bytes() == fp32_bytes
    ops = {node.op_type for node in onnx.load(str(directory / "model.onnx")).graph.node}
    assert (
        "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    )
    assert sorted(p.name for p in directory.iterdir()) == ["model.fp32.onnx", "model.onnx"]


def test_int8_is_refused_past_the_allowed_drop_and_the_fp32_graph_serves(exported):
    directory, x, expected = exported
    fp32_bytes = (directory / "model.onnx").read_bytes()
    gate = quantize_with_gate(directory, ("model.onnx",), closeness(x, expected), "closeness", 0.0)
    assert not gate.kept and gate.figures()["int8_kept"] == 0.0
    assert (directory / "model.onnx").read_bytes() == fp32_bytes
    assert [p.name for p in directory.iterdir()] == ["model.onnx"]


def test_a_kept_int8_graph_passes_the_checks_a_replica_runs(exported):
    """The parity sample holds torch's outputs; the int8 graph's tolerance is widened to
    twice its own difference, so a replica accepts the graph the gate passed."""
    directory, x, expected = exported
    quantize_with_gate(directory, ("model.onnx",), closeness(x, expected), "closeness", 0.5)
    replay = {"model.onnx": ({"input": x[:16]}, {"output": expected[:16]})}
    atol, worst = sample_atol(directory, replay, 1e-4)
    assert atol > 1e-4 and atol == pytest.approx(2 * worst)
    sample = write_parity_sample(directory, replay, atol)
    card = {"name": "tiny", "task": "classification", "parity_sample": sample}
    (directory / "model_card.json").write_text(json.dumps(card))
    verify_model(resolve_model(str(directory)))


def test_the_gate_compares_higher_is_better_scores():
    assert Gate("test_accuracy", 0.98, 0.976, 0.005).kept
    assert not Gate("test_accuracy", 0.98, 0.974, 0.005).kept
    assert Gate("test_accuracy", 0.98, 0.99, 0.0).kept  # better is always kept
    # A drop of exactly the limit passes, whatever the float rounding: 1 of 200 examples.
    assert Gate("test_accuracy", 199 / 200, 198 / 200, 0.005).kept


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"quantize": "int4"}, "quantize 'int4' unknown"),
        ({"quantize_max_drop": -0.1}, "quantize_max_drop"),
    ],
)
def test_bad_quantize_settings_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        ExportConfig(**fields)
