"""The onnxruntime predictor without Ray: inputs checked against the model card."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.architecture import ArchitectureConfig
from pipelines.stagekit.model_bundle import build_model, inference_model
from pipelines.stagekit.onnx_export import export_onnx, write_parity_sample
from serving.model_source import ModelNotFound, resolve_model
from serving.predictor import ClassifierPredictor, InputError
from serving.runtime import execution_providers

MANIFEST = {
    "task": "classification",
    "input_kind": "image",
    "input_shape": [1, 4, 4],
    "class_names": ["dark", "light"],
    "normalization": {"mean": [0.5], "std": [0.3]},
}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny classifier whose decision is the mean brightness, exported with its card."""
    directory = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_model(ArchitectureConfig(kind="mlp", hidden_sizes=(4,), dropout=0.0), MANIFEST)
    with torch.no_grad():  # hand-set weights: logit(light) - logit(dark) grows with brightness
        net = model.network.layers
        net[0].weight.fill_(1.0), net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4])), net[2].bias.zero_()
    servable = inference_model(model, "classification")
    export_onnx(servable, torch.rand(2, 1, 4, 4), directory / "model.onnx", 18)
    sample = torch.rand(4, 1, 4, 4)
    with torch.no_grad():
        expected = servable(sample).numpy()
    parity_sample = write_parity_sample(
        directory, {"model.onnx": ({"input": sample.numpy()}, {"output": expected})}, 1e-5
    )
    card = {
        "name": "tiny",
        "task": "classification",
        "class_names": MANIFEST["class_names"],
        "input": {
            "name": "input",
            "shape": ["batch", 1, 4, 4],
            "kind": "image",
            "dtype": "float32",
        },
        "preprocessing": {"image_size": [4, 4], "grayscale": True},
        "metrics": {"test_accuracy": 1.0},
        "hashes": {"onnx_sha256": parity_sample["graphs"]["model.onnx"]},
        "parity_sample": parity_sample,
    }
    (directory / "model_card.json").write_text(json.dumps(card))
    return directory


def png(value: int, size=(9, 7)) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_features_and_images_are_classified(export_dir):
    predictor = ClassifierPredictor(resolve_model(str(export_dir)))
    dark, light = predictor.classify(predictor.features_to_array([[0.05] * 16, [0.95] * 16]))
    assert (dark["label"], light["label"]) == ("dark", "light")
    assert sum(dark["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    batch = predictor.images_to_array([png(250), png(5)])  # any size: resized like training
    assert batch.shape == (2, 1, 4, 4)
    assert [p["label"] for p in predictor.classify(batch)] == ["light", "dark"]
    assert predictor.info()["name"] == "tiny"


def test_requests_batched_together_get_their_own_answers(export_dir):
    predictor = ClassifierPredictor(resolve_model(str(export_dir)))
    dark = predictor.features_to_array([[0.05] * 16])
    light = predictor.features_to_array([[0.95] * 16, [0.9] * 16])
    answers = predictor.classify_many([dark, light, dark])
    assert [[p["label"] for p in a] for a in answers] == [["dark"], ["light", "light"], ["dark"]]
    # The same figures as each request answered alone, to the bit.
    assert answers[1] == predictor.classify(light) and answers[2] == predictor.classify(dark)
    assert answers[0][0]["confidence"] == answers[0][0]["probabilities"]["dark"]
    # A request whose output is not finite gets its own InputError naming its row; the
    # requests beside it are answered.
    probabilities = predictor.predict_proba(np.concatenate([dark, light, dark]))
    probabilities[2, 0] = np.nan
    first, second, third = predictor.answers(probabilities, [1, 2, 1])
    assert isinstance(second, InputError) and second.field == "instances[1]"
    assert first == answers[0] and third == answers[2]
    with pytest.raises(InputError, match="not finite"):
        predictor.predictions(probabilities[1:3])


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda p: p.features_to_array([[0.1] * 16, [0.1] * 15]), "instances[1]"),
        (lambda p: p.features_to_array([[0.1] * 15 + [float("nan")]]), "instances[0]"),
        (lambda p: p.features_to_array([[0.1] * 16, [3e38] * 16]), "instances[1]"),
        (lambda p: p.images_to_array([png(10), "@@not base64@@"]), "images[1]"),
        (lambda p: p.images_to_array([base64.b64encode(b"hello").decode()]), "images[0]"),
    ],
)
def test_bad_inputs_name_the_field(export_dir, call, field):
    predictor = ClassifierPredictor(resolve_model(str(export_dir)))
    with pytest.raises(InputError) as caught:
        call(predictor)
    assert caught.value.field == field


def test_cpu_provider_without_a_gpu_and_missing_model(tmp_path):
    assert execution_providers()[-1] == "CPUExecutionProvider"
    with pytest.raises(ModelNotFound, match="expected model.onnx and model_card.json"):
        resolve_model(str(tmp_path))


def test_a_registry_model_is_read_from_the_store_named_not_mlflows_default(
    export_dir, tmp_path, monkeypatch
):
    """A stage registering elsewhere earlier in the process leaves MLflow's process-wide
    URI on its store; the serving side reads the store it is given and leaves that alone."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.stagekit import tracking
    from serving.promotion import pin

    served, other = (f"sqlite:///{tmp_path / name}.db" for name in ("served", "other"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served)
    client = MlflowClient(served)
    run = client.create_run(client.create_experiment("tiny", str(tmp_path / "artifacts")))
    version = tracking.register_onnx_model(
        run.info.run_id,
        export_dir / "model.onnx",
        export_dir / "model_card.json",
        "tiny",
        "champion",
        extra_files=(export_dir / "parity_sample.npz",),
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(other)
    try:
        files = resolve_model("models:/tiny@champion", served)
        assert (files.registered_model, files.version) == ("tiny", version)
        assert ClassifierPredictor(files).card["name"] == "tiny"
        assert pin("models:/tiny@champion", served) == f"models:/tiny/{version}"
        assert mlflow.get_tracking_uri() == other
        with pytest.raises(ModelNotFound, match="tiny"):
            resolve_model("models:/tiny@champion", other)
    finally:
        mlflow.set_tracking_uri(None)
