"""A generator's export and its /v1/generate endpoint, in-process: a small DCGAN and VAE
exported to ONNX by the export stage's own code, served by the real predictor behind the
real HTTP app (Starlette's test client); plus the Fréchet distance's arithmetic."""

import base64
import io

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from models.gan import GanConfig, GanPair
from models.vae import VAE, VaeConfig
from pipelines.stagekit.config import ExportConfig
from pipelines.unsupervised.export_generate import write_export
from pipelines.unsupervised.generator_model import Sampler
from pipelines.unsupervised.sample_quality import class_entropy, frechet_distance
from serving.generate_predictor import GeneratorPredictor
from serving.http_api import HttpApi, Limits
from serving.model_checks import verify_model
from serving.model_slots import LoadedModels
from serving.model_source import resolve_model
from serving.schemas import MAX_GENERATE


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    samplers = {
        "vae": Sampler(VAE(VaeConfig(hidden_sizes=(16,), latent=3), (1, 8, 8)).eval()),
        "gan": Sampler(GanPair(GanConfig(latent=5, width=4), (1, 8, 8)).eval()),
    }
    directory = tmp_path_factory.mktemp("generator")
    parity = write_export(
        samplers, "gan", directory, ExportConfig(), "tiny-generator", {"fid": 12.5}
    )
    return directory, parity


@pytest.fixture(scope="module")
def http(exported):
    directory, _ = exported
    models = LoadedModels(generator=GeneratorPredictor(resolve_model(str(directory))))
    return TestClient(HttpApi(models, Limits()))


def decode(image: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(image))) as picture:
        assert picture.format == "PNG"
        return np.asarray(picture)


def test_both_generators_export_within_parity_and_the_served_one_passes_its_checks(exported):
    directory, parity = exported
    assert set(parity) == {"vae", "gan"} and max(parity.values()) < 1e-5
    for graph in ("vae.onnx", "gan.onnx", "model.onnx"):
        assert (directory / graph).stat().st_size > 0
    verify_model(resolve_model(str(directory)))  # what a replica runs before serving it
    # The first upsampling (2x2 -> 4x4) went out as a matrix product, the second stayed.
    ops = [node.op_type for node in onnx.load(str(directory / "gan.onnx")).graph.node]
    assert ops.count("ConvTranspose") == 1


@pytest.mark.parametrize(("image", "folded"), [((1, 8, 8), 1), ((1, 28, 28), 0)])
def test_the_generator_folds_a_transposed_conv_only_where_it_costs_no_more(image, folded):
    torch.manual_seed(0)
    pair = GanPair(GanConfig(latent=5, width=4), image).eval()
    form = pair.inference_form()
    kinds = [type(layer).__name__ for layer in form.generator.upsample]
    assert kinds.count("DenseTransposedConv") == folded
    assert isinstance(pair.generator.upsample[0], torch.nn.ConvTranspose2d)  # a copy, untouched
    z = torch.randn(9, 5)
    with torch.no_grad():
        assert torch.allclose(form.generate(z), pair.generate(z), atol=1e-6)


def test_generate_draws_the_same_images_for_the_same_seed(http):
    first = http.post("/v1/generate", json={"count": 3, "seed": 7})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["model"] == "tiny-generator" and body["seed"] == 7 and len(body["images"]) == 3
    assert decode(body["images"][0]).shape == (8, 8)
    again = http.post("/v1/generate", json={"count": 3, "seed": 7}).json()
    assert again["images"] == body["images"]
    # The first image of a larger count is the image of count 1: the latents are a stream.
    assert http.post("/v1/generate", json={"seed": 7}).json()["images"][0] == body["images"][0]
    other = http.post("/v1/generate", json={"count": 3, "seed": 8}).json()
    assert other["images"] != body["images"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"count": 0}, "count"),
        ({"count": MAX_GENERATE + 1}, "count"),
        ({"count": "many"}, "count"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"label": 3}, "label"),  # an unconditional generator
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_requests_get_a_422_naming_the_field(http, body, field):
    response = http.post("/v1/generate", json=body)
    assert response.status_code == 422, response.text
    assert field in str(response.json()["detail"])


def test_models_lists_the_generator_with_its_latent_and_image_shape(http):
    [model] = http.get("/v1/models").json()["models"]
    assert model["task"] == "generation" and model["model"] == "gan"
    assert model["input"] == {"latent": 5, "conditional": False}
    assert model["output"]["image_shape"] == [1, 8, 8]


def test_the_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6))
    a[:, 5] = 0.0  # a unit that never fires: a singular covariance, as ReLU features give
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.r_[np.ones(5), 0.0]
    assert frechet_distance(a, shifted) == pytest.approx(5.0, rel=1e-6)
    b = rng.normal(size=(500, 6)) * 2.0
    b[:, 5] = 0.0
    # Against the eigenvalue route: Tr (S_a S_b)^(1/2) = sum of sqrt(eigenvalues of S_a S_b).
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    roots = np.sqrt(np.clip(np.linalg.eigvals(cov_a @ cov_b).real, 0.0, None)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b) - 2 * roots
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_class_entropy_reads_mode_collapse():
    one_class = np.tile(np.eye(10)[3], (100, 1))
    every_class = np.tile(np.eye(10), (10, 1))
    assert class_entropy(one_class, 10) == 0.0
    assert class_entropy(every_class, 10) == pytest.approx(np.log2(10))
