"""The cluster manifests parse, and the RayService runs the same app builder as `dlpipe serve`."""

import importlib

import yaml

from tests.helpers import REPO


def test_every_infra_manifest_is_valid_yaml():
    files = sorted((REPO / "infra").rglob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path


def test_rayservice_import_path_is_the_serving_app_builder():
    service = yaml.safe_load((REPO / "infra/kuberay/rayservice.yaml").read_text())
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    [app] = config["applications"]
    module, name = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), name)
    from serving.app import build_app

    assert builder is build_app
    assert app["args"]["model"].startswith("models:/")
