"""Deploying the app and reloading its models through Serve's REST API on the Ray dashboard:
the API behind `serve deploy` and KubeRay, so the app is in Serve's declarative mode, where
a change of `user_config` alone reaches every replica's `reconfigure` without a restart.

`reload_models` resolves each registry alias the app serves (e.g. `@champion`) to its
version now, writes those versions into the deployment's `user_config.versions`, and
re-applies the config; `wait_for_versions` then watches /v1/models until the replicas
serve them or report why not (the old version keeps serving).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.auth import ENV_CLIENT_KEY, client_headers
from serving.kinds import KINDS
from serving.model_source import REGISTRY_URI

DEPLOYMENT = "dlpipe"
CONFIG_FILE = Path(__file__).with_name("config.yaml")


class DeployError(Exception):
    """Serve refused or could not be reached; the message says which and why."""


def dashboard_address() -> str:
    """Where the Ray dashboard answers (as for `serve deploy`): RAY_DASHBOARD_ADDRESS or local."""
    return os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265")


def default_app() -> dict:
    """The dlpipe application as serving/config.yaml declares it (args, autoscaling,
    batching): `dlpipe serve` starts from it, so the settings live in one place."""
    import yaml

    config = yaml.safe_load(CONFIG_FILE.read_text())
    return next(app for app in config["applications"] if app["name"] == "dlpipe")


def _client(dashboard: str):
    # Ray's own client for this API (the one `serve deploy` uses): it adds the cluster's
    # authentication token, which Ray >= 2.5x requires by default.
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    try:
        return ServeSubmissionClient(dashboard, headers=_auth_headers())
    except (ConnectionError, ValueError) as exc:
        raise DeployError(
            f"cannot reach the Ray dashboard at {dashboard} ({exc}); set "
            "RAY_DASHBOARD_ADDRESS or --dashboard to the cluster's dashboard"
        ) from None


def _auth_headers() -> dict[str, str]:
    """The cluster's token, from where Ray keeps it. Ray starts local clusters with token
    authentication on, but only processes that joined the cluster send the token by
    themselves; this one (e.g. `dlpipe serve reload`) may not have."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def serve_details(dashboard: str) -> dict:
    try:
        return _client(dashboard).get_serve_details()
    except RuntimeError as exc:
        raise DeployError(f"Serve did not answer: {exc}") from None


def declared_apps(details: dict) -> dict[str, dict]:
    """The applications deployed from a config (not by `serve.run`), by name."""
    return {
        name: app["deployed_app_config"]
        for name, app in details.get("applications", {}).items()
        if app.get("deployed_app_config")
    }


def apply_apps(dashboard: str, apps: dict[str, dict], details: dict) -> None:
    """PUT every declared application (Serve deletes declared apps missing from the list)."""
    config = {
        "proxy_location": details.get("proxy_location") or "Disabled",
        "applications": list(apps.values()),
    }
    try:
        _client(dashboard).deploy_applications(config)
    except RuntimeError as exc:
        raise DeployError(f"Serve refused the config: {exc}") from None


def deploy_app(dashboard: str, app: dict) -> None:
    """Add or replace one application, leaving the cluster's other declared apps as they are."""
    details = serve_details(dashboard)
    apps = declared_apps(details)
    apps[app["name"]] = app
    apply_apps(dashboard, apps, details)


def app_status(dashboard: str, name: str) -> tuple[str, str]:
    app = serve_details(dashboard).get("applications", {}).get(name)
    if app is None:
        return "NOT_STARTED", ""
    return app["status"], app.get("message", "")


def wait_until_running(dashboard: str, name: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, message = app_status(dashboard, name)
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise DeployError(f"application {name} {status}: {message}")
        time.sleep(1)
    raise DeployError(f"application {name} not running after {timeout_s:g} s")


def resolve_versions(args: dict[str, Any], tracking_uri: str | None) -> dict[str, str]:
    """slot -> the version each registry alias in the app's args names now."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or args.get("tracking_uri"))
    versions = {}
    for kind in KINDS:
        slot, source = kind.slot, str(args.get(kind.source_arg, kind.app_default))
        match = REGISTRY_URI.match(source)
        if match is None or not match["alias"]:
            continue  # a folder or a fixed version: nothing to resolve
        try:
            found = client.get_model_version_by_alias(match["name"], match["alias"])
        except Exception as exc:
            raise DeployError(f"{source}: cannot resolve the alias ({exc})") from None
        versions[slot] = str(found.version)
    return versions


def reload_models(dashboard: str, name: str = "dlpipe", tracking_uri: str | None = None) -> dict:
    """Pin the app's aliases to their current versions; Serve reconfigures every replica.
    Returns slot -> version asked for."""
    details, apps = declared_app(dashboard, name)
    versions = resolve_versions(apps[name].get("args", {}), tracking_uri)
    user_config(apps[name])["versions"] = versions
    apply_apps(dashboard, apps, details)
    return versions


def declared_app(dashboard: str, name: str) -> tuple[dict, dict[str, dict]]:
    """(Serve's details, the declared apps) where app `name` is one of them."""
    details = serve_details(dashboard)
    apps = declared_apps(details)
    if name not in apps:
        raise DeployError(
            f"no application {name!r} deployed from a config on this cluster (started with "
            "`dlpipe serve` or `serve deploy`?); an app started by serve.run cannot be "
            "reconfigured through the config API"
        )
    return details, apps


def user_config(app: dict) -> dict:
    """The dlpipe deployment's `user_config` in `app` (created empty), to edit in place."""
    deployments = app.setdefault("deployments", [])
    deployment = next((d for d in deployments if d["name"] == DEPLOYMENT), None)
    if deployment is None:
        deployment = {"name": DEPLOYMENT}
        deployments.append(deployment)
    deployment["user_config"] = dict(deployment.get("user_config") or {})
    return deployment["user_config"]


def get_json(url: str, timeout_s: float = 10) -> Any:
    """GET `url` from the app with this process's API key (DLPIPE_API_KEY), if any."""
    request = urllib.request.Request(url, headers=client_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise DeployError(
                f"{url} asks for an API key: set {ENV_CLIENT_KEY} to one of the app's keys"
            ) from None
        raise


def wait_for_versions(
    url: str, versions: dict[str, str], timeout_s: float = 120, probes: int = 8
) -> dict[str, dict]:
    """Watch GET /v1/models until every slot serves its version or reports that version as a
    failed reload. Asks `probes` times in a row (replicas share the port, so each answer
    may come from another replica). Returns slot -> that model's /v1/models entry."""
    deadline = time.monotonic() + timeout_s
    settled: dict[str, dict] = {}
    while time.monotonic() < deadline:
        settled = {}
        for _ in range(probes):
            models = {m["slot"]: m for m in get_json(url.rstrip("/") + "/v1/models")["models"]}
            done = {
                slot: models[slot]
                for slot, version in versions.items()
                if slot in models
                and (
                    models[slot]["version"] == version
                    or (models[slot]["failed_reload"] or {}).get("version") == version
                )
            }
            if len(done) < len(versions):
                break
            settled = done
        else:
            return settled
        time.sleep(0.5)
    raise DeployError(f"replicas at {url} did not take versions {versions} within {timeout_s:g} s")


def set_capture(dashboard: str, settings: dict[str, Any] | None, name: str = "dlpipe") -> None:
    """Ask every replica to capture requests as `settings` say (serving/capture.py), or to
    stop (None); checked here first, so a bad setting is named before it is sent."""
    from serving.capture import CaptureConfig

    def checked(merged: dict[str, Any]) -> None:
        # The replicas do not run in this directory: the default reaches them absolute.
        merged.setdefault("directory", str(Path(CaptureConfig.directory).resolve()))
        CaptureConfig.parse(merged)

    set_section(dashboard, "capture", settings, checked, name)


def set_drift(dashboard: str, settings: dict[str, Any] | None, name: str = "dlpipe") -> None:
    """Ask every replica to watch drift as `settings` say (serving/drift.py), or go back
    to the defaults (None); checked here first."""
    from serving.drift import DriftConfig

    set_section(dashboard, "drift", settings, DriftConfig.parse, name)


def wait_for_drift(
    url: str, settings: dict[str, Any], timeout_s: float = 60, probes: int = 4
) -> dict[str, Any]:
    """Watch GET /v1/models until every watched slot shows the drift `settings` (`enabled`
    false: no slot watched), `probes` answers in a row (replicas share the port). Returns
    the last listing; a replica's refusal of the setting is raised."""
    deadline = time.monotonic() + timeout_s
    wanted = {k: v for k, v in settings.items() if k != "enabled"}
    off = settings.get("enabled") is False
    refused = None  # a replica's refusal, maybe of a setting before this one
    while True:
        for _ in range(probes):
            listing = get_json(url.rstrip("/") + "/v1/models")
            refused = listing.get("drift_config_error") or refused
            if listing.get("drift_config_error"):
                break
            states = [m["drift"] for m in listing["models"] if m.get("drift") is not None]
            watched = [state for state in states if "error" not in state]
            if off and watched:
                break
            if any(state.get(k) != v for state in watched for k, v in wanted.items()):
                break
            if not off and not watched and not states:
                break  # on, but nothing watched yet: the setting has not arrived
        else:
            return listing
        if time.monotonic() > deadline:
            if refused:
                raise DeployError(f"the replicas refused: {refused}")
            raise DeployError(
                f"the replicas at {url} did not take the drift setting in {timeout_s:g} s"
            )
        time.sleep(0.5)


def set_section(
    dashboard: str,
    key: str,
    settings: dict[str, Any] | None,
    check: Callable[[dict[str, Any]], Any],
    name: str = "dlpipe",
) -> None:
    """Merge `settings` into `user_config[key]` of app `name` (None: remove the section),
    after `check` (which raises a ValueError naming the setting) passes on the result."""
    details, apps = declared_app(dashboard, name)
    config = user_config(apps[name])
    if settings is None:
        config.pop(key, None)
    else:
        merged = {**(config.get(key) or {}), **settings}
        try:
            check(merged)
        except ValueError as exc:
            raise DeployError(str(exc)) from None
        config[key] = merged
    apply_apps(dashboard, apps, details)
