"""The cluster manifests would run: the RayService serves serving/config.yaml unchanged, the
RayJob's entrypoint uses only variables its pods define, in the repository the image carries,
the launcher config passes the checks `ray up` makes, and every manifest names the installed
Ray. Nothing here starts Ray or talks to Kubernetes."""

import copy
import importlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from tests.helpers import REPO

KUBERAY = REPO / "infra/kuberay"
LAUNCHER = REPO / "infra/ray-cluster.yaml"


def test_every_infra_manifest_is_valid_yaml():
    files = sorted((REPO / "infra").rglob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path


# --- the KubeRay manifests ----------------------------------------------------------------


def kuberay_documents() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(KUBERAY.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def kuberay(kind: str) -> dict[str, Any]:
    [doc] = [doc for doc in kuberay_documents() if doc["kind"] == kind]
    return doc


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec inside a RayCluster, RayJob or RayService."""
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec")}.get(
        doc["kind"], spec.get("rayClusterConfig")
    )


def ray_containers(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group name ("head" for the head) -> the Ray container of its pods."""
    groups = {"head": spec["headGroupSpec"]}
    groups.update({group["groupName"]: group for group in spec.get("workerGroupSpecs", [])})
    return {name: group["template"]["spec"]["containers"][0] for name, group in groups.items()}


def serve_configs() -> dict[str, dict]:
    return {
        "serving/config.yaml": yaml.safe_load((REPO / "serving/config.yaml").read_text()),
        "rayservice serveConfigV2": yaml.safe_load(kuberay("RayService")["spec"]["serveConfigV2"]),
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


def test_the_rayservice_serves_serving_config_yaml_unchanged():
    configs = serve_configs()
    assert configs["rayservice serveConfigV2"] == configs["serving/config.yaml"], (
        "infra/kuberay/rayservice.yaml serveConfigV2 differs from serving/config.yaml: paste "
        "the file from `proxy_location:` on under `serveConfigV2: |`, indented 4 spaces"
    )


def test_the_rayservice_pods_take_traffic_when_a_replica_answers_on_them():
    """KubeRay's default readiness probe asks Serve's proxy, which the app turns off."""
    [app] = serve_configs()["serving/config.yaml"]["applications"]
    port = app["args"]["http"]["port"]
    workers = ray_containers(cluster_spec(kuberay("RayService")))
    del workers["head"]
    assert workers
    for container in workers.values():
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}


def variables(command: str) -> set[str]:
    return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", command))


def expanded_outside_single_quotes(command: str) -> list[str]:
    """The variables a POSIX shell expands in `command` as it parses it."""
    found, quote, i = [], None, 0
    while i < len(command):
        char = command[i]
        if quote == "'":
            quote = None if char == "'" else quote
        elif char == "\\":
            i += 1  # the next character is literal
        elif char == '"':
            quote = None if quote == '"' else '"'
        elif char == "'":
            quote = "'"
        elif char == "$":
            found.append(re.match(r"\$\{?(\w*)", command[i:])[1])
        i += 1
    return found


def test_every_configmap_and_secret_the_pods_need_is_defined_in_infra_kuberay():
    defined = {(doc["kind"], doc["metadata"]["name"]) for doc in kuberay_documents()}
    needed = set()
    for doc in kuberay_documents():
        if doc["kind"].startswith("Ray"):
            for container in ray_containers(cluster_spec(doc)).values():
                for source in container.get("envFrom", []):
                    for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                        if key in source and not source[key].get("optional"):
                            needed.add((kind, source[key]["name"]))
    assert ("ConfigMap", "dlpipe-env") in needed
    assert needed <= defined


def test_the_rayjob_entrypoint_uses_only_variables_its_head_pod_defines():
    job = kuberay("RayJob")
    entrypoint = job["spec"]["entrypoint"]
    head = ray_containers(cluster_spec(job))["head"]
    configmaps = {
        doc["metadata"]["name"]: doc.get("data", {})
        for doc in kuberay_documents()
        if doc["kind"] == "ConfigMap"
    }
    defined = {env["name"] for env in head.get("env", [])}
    for source in head.get("envFrom", []):
        if "configMapRef" in source:
            defined |= set(configmaps[source["configMapRef"]["name"]])
    assert variables(entrypoint) <= defined, variables(entrypoint) - defined
    # KubeRay puts the entrypoint in the submitter pod's `ray job submit` command line; that
    # pod has none of these variables, so only the head's shell may expand them.
    assert not expanded_outside_single_quotes(entrypoint)
    assert expanded_outside_single_quotes("""echo $HOME '$NOT' "${THIS}" \\$NOR""") == [
        "HOME",
        "THIS",
    ]


# --- the image ----------------------------------------------------------------------------


def dockerfile() -> tuple[str, str, set[str]]:
    """infra/Dockerfile's FROM image, WORKDIR and the repository paths it COPYs."""
    text = (REPO / "infra/Dockerfile").read_text().replace("\\\n", " ")
    base, workdir, copied = "", "", set()
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "FROM":
            base = words[1]
        elif words[0] == "WORKDIR":
            workdir = words[1]
        elif words[0] == "COPY":
            sources = [word for word in words[1:-1] if not word.startswith("--")]
            copied |= {source.rstrip("/") for source in sources}
    return base, workdir, copied


def pipeline_inputs() -> set[str]:
    """What `dvc repro` reads that no stage writes: the files the image must carry."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())

    def resolve(path: str) -> str:
        def lookup(match: re.Match) -> str:
            value: Any = params
            for key in match[1].split("."):
                value = value[key]
            return str(value)

        return re.sub(r"\$\{([^}]+)\}", lookup, path)

    def paths(entries: list) -> list[str]:
        return [resolve(e if isinstance(e, str) else next(iter(e))) for e in entries]

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
    written = [p for s in stages for k in ("outs", "metrics", "plots") for p in paths(s.get(k, []))]
    deps = {dep for stage in stages for dep in paths(stage.get("deps", []))}
    inputs = {d for d in deps if not any(d == w or d.startswith(w + "/") for w in written)}
    return inputs | {"dvc.yaml", "dvc.lock", "params.yaml", ".dvc/config"}


def test_the_image_carries_the_repository_the_rayjob_runs_dvc_repro_in():
    _, workdir, copied = dockerfile()
    inputs = pipeline_inputs()
    assert {"pipelines/training", "data/sources", "params.yaml"} <= inputs
    missing = {p for p in inputs if not any(p == c or p.startswith(c + "/") for c in copied)}
    assert not missing, f"infra/Dockerfile does not COPY {sorted(missing)}"
    [command] = shlex.split(kuberay("RayJob")["spec"]["entrypoint"])[2:]  # bash -c '...'
    assert command.startswith(f"cd {workdir} && ")
    assert "dvc repro" in command


def test_the_manifests_and_the_image_run_the_installed_ray():
    docs = [doc for doc in kuberay_documents() if doc["kind"].startswith("Ray")]
    assert sorted(doc["kind"] for doc in docs) == ["RayCluster", "RayJob", "RayService"]
    for doc in docs:
        assert cluster_spec(doc)["rayVersion"] == ray.__version__, doc["kind"]
    base, _, _ = dockerfile()
    assert base.startswith(f"rayproject/ray:{ray.__version__}-"), base


# --- the cluster launcher config ----------------------------------------------------------


def validate_launcher_config(path: Path) -> None:
    """The checks `ray up` makes before it asks the cloud for anything: the file against the
    JSON schema shipped in the ray package, then, merged with the provider's defaults,
    Ray's own `validate_config` (which repeats the schema and checks the node types)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    validate_config(prepare_config(copy.deepcopy(config)))


def test_the_launcher_config_passes_rays_own_validation():
    validate_launcher_config(LAUNCHER)


def _misspell_max_workers(config: dict) -> None:
    config["max_worker"] = config.pop("max_workers")


def _drop_worker_resources(config: dict) -> None:
    del config["available_node_types"]["gpu_worker"]["resources"]


def _name_a_missing_head_type(config: dict) -> None:
    config["head_node_type"] = "gpu-head"


@pytest.mark.parametrize(
    "breakage, message",
    [
        (_misspell_max_workers, "'max_worker' was unexpected"),
        (_drop_worker_resources, "'resources' is a required property"),
        (_name_a_missing_head_type, "`head_node_type` must be one of"),
    ],
)
def test_a_broken_launcher_config_fails_validation(tmp_path, breakage, message):
    config = yaml.safe_load(LAUNCHER.read_text())
    breakage(config)
    broken = tmp_path / "ray-cluster.yaml"
    broken.write_text(yaml.safe_dump(config))
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        validate_launcher_config(broken)


def test_both_tracking_server_recipes_run_the_basic_auth_app():
    # local-server.sh is run by tests/cluster/test_team_tracking.py; the compose file, which
    # needs Docker, is held to the same settings here.
    script = (REPO / "infra/mlflow/local-server.sh").read_text()
    compose = yaml.safe_load((REPO / "infra/mlflow/docker-compose.yaml").read_text())
    mlflow = compose["services"]["mlflow"]
    assert "--app-name basic-auth" in script and "--app-name basic-auth" in mlflow["command"]
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in mlflow["environment"]
    ini = (REPO / "infra/mlflow/basic_auth.ini").read_text()
    assert "postgresql+psycopg://" in ini and "auth_cache_ttl_seconds" in ini
    assert "auth_cache_ttl_seconds" in script
