"""Export to ONNX and check parity with torch, for every network family (real onnxruntime)."""

import numpy as np
import pytest
import torch

from models.architecture import ArchitectureConfig
from pipelines.stagekit.model_bundle import build_model, inference_model, load_bundle, save_bundle
from pipelines.stagekit.onnx_export import check_parity, export_onnx, onnx_session

MANIFEST = {
    "task": "classification",
    "input_kind": "image",
    "input_shape": [1, 8, 8],
    "class_names": [str(i) for i in range(10)],
    "normalization": {"mean": [0.3], "std": [0.4]},
}


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("activation", ["relu", "maxout", "prelu"])
def test_export_matches_torch_and_accepts_any_batch_size(tmp_path, kind, activation):
    torch.manual_seed(0)
    arch = ArchitectureConfig(kind=kind, activation=activation, channels=(4, 8), hidden_sizes=(16,))
    model = inference_model(build_model(arch, MANIFEST), "classification")
    inputs = np.random.default_rng(0).random((37, 1, 8, 8), dtype=np.float32)
    path = tmp_path / "m.onnx"
    export_onnx(model, torch.from_numpy(inputs[:2]), path, opset=18)
    parity = check_parity(model, path, inputs)
    assert parity.max_abs_diff <= 1e-4 and parity.argmax_agreement == 1.0
    assert parity.holds(1e-4, classification=True)
    session = onnx_session(path)
    for batch in (1, 5):
        probs = session.run(None, {"input": inputs[:batch]})[0]
        assert probs.shape == (batch, 10)
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # softmax is inside the graph


def test_an_export_holds_no_source_paths_and_repeats_byte_for_byte(tmp_path):
    """The exporter tags every node with the Python stack that made it (absolute paths,
    line numbers): kept, the same model from another checkout would hash differently."""
    import onnx

    torch.manual_seed(0)
    model = inference_model(
        build_model(ArchitectureConfig(channels=(4,)), MANIFEST), "classification"
    )
    example = torch.zeros(2, 1, 8, 8)
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export_onnx(model, example, first, opset=18)
    export_onnx(model, example, second, opset=18)
    assert first.read_bytes() == second.read_bytes()
    graph = onnx.load(str(first)).graph
    assert not any(node.metadata_props for node in graph.node)
    assert (
        b"site-packages" not in first.read_bytes()
        and str(tmp_path).encode() not in first.read_bytes()
    )


def test_parity_detects_a_different_model(tmp_path):
    torch.manual_seed(0)
    arch = ArchitectureConfig(kind="mlp", hidden_sizes=(16,))
    exported = inference_model(build_model(arch, MANIFEST), "classification")
    inputs = np.random.default_rng(1).random((20, 1, 8, 8), dtype=np.float32)
    export_onnx(exported, torch.from_numpy(inputs[:2]), tmp_path / "m.onnx", opset=18)
    torch.manual_seed(1)
    other = inference_model(build_model(arch, MANIFEST), "classification")
    parity = check_parity(other, tmp_path / "m.onnx", inputs)
    assert not parity.holds(1e-4, classification=True)


def test_bundle_round_trip_rebuilds_the_same_network(tmp_path):
    torch.manual_seed(0)
    arch = ArchitectureConfig(kind="cnn", channels=(4,), hidden_sizes=(8,), pooling="min")
    model = build_model(arch, MANIFEST).eval()
    save_bundle(tmp_path, model, arch, MANIFEST)
    loaded, bundle = load_bundle(tmp_path)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
    assert bundle["manifest"] == MANIFEST
