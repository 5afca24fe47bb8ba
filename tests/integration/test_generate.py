"""The generative models end to end on the real Ray cluster: the `generate` stage trains a
VAE (one Train worker) and a DCGAN (two: its two optimizers in one DDP worker loop) on the
prepared digits, judges their samples with the session's trained classifier,
`export_generate` writes and registers the ONNX generators, and /v1/generate serves one
over HTTP from Ray Serve."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from models.gan import GanConfig
from models.vae import VaeConfig
from pipelines.stagekit.config import ExportConfig, TrainConfig, view
from pipelines.unsupervised.config import GenerateConfig
from tests.helpers import served_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def generated(trained, tmp_path_factory):
    from pipelines.unsupervised import export_generate, generate

    root = tmp_path_factory.mktemp("generate")
    # Short runs that still leave noise behind, judged by the session's 6-epoch classifier
    # (whose noise ceiling is low: 180 where the stage's classifier puts it at 520): the
    # VAE was at 160 after 30 epochs, the GAN at 270 after 4 at lr 0.001.
    # The VAE on one worker, the GAN on two: DDP with two optimizers is the GAN's subject.
    train = TrainConfig(
        epochs=60,
        batch_size=64,
        lr=0.003,
        weight_decay=0.0,
        early_stopping_patience=0,
        num_workers=1,
    )
    config = GenerateConfig(
        vae=VaeConfig(hidden_sizes=(64,), latent=4),
        vae_train=train,
        gan=GanConfig(latent=8, width=16),
        gan_train=TrainConfig(
            **{**vars_of(train), "lr": 0.002, "beta1": 0.5, "epochs": 12, "num_workers": 2}
        ),
        sample_every=2,  # and the last epoch's
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", trained.mlflow_uri)
        env.setenv("DLPIPE_STORAGE", str(root / "checkpoints"))
        table = generate.generate(
            config,
            str(trained.prepared),
            str(trained.model_dir),
            str(root / "models"),
            str(root / "generate.json"),
        )
        parity = export_generate.export_generate(
            view(ExportConfig(), export_generate.EXPORT_KEYS),
            view(config, export_generate.GENERATE_KEYS),
            str(root / "models"),
            str(root / "generate.json"),
            str(trained.prepared),
            str(root / "export"),
            str(root / "export.json"),
        )
    return root, table, parity, config


def vars_of(config) -> dict:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


def test_both_models_train_on_ray_and_are_judged_beside_real_digits_and_noise(generated, trained):
    root, table, parity, config = generated
    assert json.loads((root / "generate.json").read_text()) == table
    assert set(table) == {"vae", "gan", "real", "noise"}, table
    print(json.dumps(table, indent=1))
    for name in ("vae", "gan", "real", "noise"):
        assert {"fid", "mean_confidence", "class_entropy"} <= set(table[name])
        assert 0.0 <= table[name]["class_entropy"] <= np.log2(10) + 1e-9
    # Held-out digits are the floor, noise the ceiling: even a few epochs' drawings sit
    # between them.
    assert table["real"]["fid"] < table["vae"]["fid"] < table["noise"]["fid"]
    assert table["real"]["fid"] < table["gan"]["fid"] < table["noise"]["fid"]
    assert max(parity.values()) <= ExportConfig().parity_atol

    client = MlflowClient(trained.mlflow_uri)
    experiment = client.get_experiment_by_name(config.experiment)
    runs = {
        r.data.tags["model_kind"]: r
        for r in client.search_runs([experiment.experiment_id], "tags.dvc_stage = 'generate'")
    }
    vae, gan = runs["vae"], runs["gan"]
    # The VAE's loss fell; both GAN losses were logged every epoch, from 2 workers.
    curve = client.get_metric_history(vae.info.run_id, "val_loss")
    assert len(curve) == 60 and curve[-1].value < curve[0].value
    for key in ("train_generator_loss", "train_discriminator_loss"):
        assert len(client.get_metric_history(gan.info.run_id, key)) == 12
    assert "," in gan.data.tags["worker_nodes"] or gan.data.tags["worker_devices"].count("@") == 2
    # A grid of samples every 2 epochs.
    grids = [a.path for a in client.list_artifacts(gan.info.run_id, "samples")]
    assert {"samples/epoch_002.png", "samples/epoch_012.png"} <= set(grids)


@pytest.fixture(scope="module")
def server(generated, trained, ray_dashboard):
    args = {
        "model": "none",
        "generator_model": "models:/dlpipe-generator@champion",
        "tracking_uri": trained.mlflow_uri,
    }
    with served_app(ray_dashboard, "dlpipe-generate-test", args) as client:
        yield client


def test_generate_serves_seeded_pngs_over_http(server):
    answer = server.post("/v1/generate", json={"count": 4, "seed": 3})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == "dlpipe-generator" and body["version"] == "1"
    assert len(body["images"]) == 4
    with Image.open(io.BytesIO(base64.b64decode(body["images"][0]))) as image:
        assert image.format == "PNG" and image.size == (8, 8)
    assert (
        server.post("/v1/generate", json={"count": 4, "seed": 3}).json()["images"]
        == (body["images"])
    )
    [model] = server.get("/v1/models").json()["models"]
    assert model["task"] == "generation" and model["model"] == "gan"


@pytest.mark.parametrize(
    ("body", "field"),
    [({"count": 65}, "count"), ({"label": 1}, "label"), ({"seed": "x"}, "seed")],
)
def test_bad_generate_requests_are_422_naming_the_field(server, body, field):
    response = server.post("/v1/generate", json=body)
    assert response.status_code == 422, response.text
    assert field in json.dumps(response.json()["detail"])
    assert server.get("/healthz").status_code == 200
