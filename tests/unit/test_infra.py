"""The cluster manifests parse, and the RayService runs the same app builder as `dlpipe serve`."""

import importlib

import pytest
import yaml

from tests.helpers import REPO


def test_every_infra_manifest_is_valid_yaml():
    files = sorted((REPO / "infra").rglob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path


def serve_configs() -> dict[str, dict]:
    service = yaml.safe_load((REPO / "infra/kuberay/rayservice.yaml").read_text())
    return {
        "serving/config.yaml": yaml.safe_load((REPO / "serving/config.yaml").read_text()),
        "rayservice serveConfigV2": yaml.safe_load(service["spec"]["serveConfigV2"]),
    }


@pytest.mark.parametrize("where", ["serving/config.yaml", "rayservice serveConfigV2"])
def test_serve_configs_are_valid_and_build_the_serving_app(where):
    from ray.serve.schema import ServeDeploySchema

    from serving.app import PredictionService, build_app

    config = serve_configs()[where]
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks first
    assert config["proxy_location"] == "Disabled"  # the replicas serve HTTP themselves
    [app] = config["applications"]
    module, name = app["import_path"].split(":")
    assert getattr(importlib.import_module(module), name) is build_app
    assert app["args"]["model"].startswith("models:/")
    built = build_app({**app["args"], "num_gpus": 0})  # auto would ask a Ray cluster
    # Settings in `deployments` apply only to a deployment of that name.
    assert [d["name"] for d in app["deployments"]] == [PredictionService.name]
    assert built._bound_deployment.name == PredictionService.name
