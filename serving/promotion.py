"""Setting a slot's challenger, promoting it to champion and rolling back: what `dlpipe
serve challenger | promote | rollback` do, through the registry's aliases and the
deployment's `user_config` (serving/deploy.py), so every change reaches the replicas in
place (serving/lifecycle.py routes the requests).

Promotion moves the champion's alias (e.g. `dlpipe-classifier@champion`) to the
challenger's version after its checks pass, and `previous-champion` to the version it
replaces; a challenger of another registered model (e.g. the semi-supervised student) is
first copied into the champion's model as a new version, so the slot's model keeps its
name and history. Rollback moves the two aliases back.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.stagekit.tracking import tracking_uri
from serving.deploy import (
    DeployError,
    apply_apps,
    declared_app,
    get_json,
    user_config,
    wait_for_versions,
)
from serving.kinds import BY_SLOT
from serving.lifecycle import ChallengerConfig, ChallengerConfigError, parse_challengers
from serving.model_checks import ModelRejected, verify_model
from serving.model_slots import LOAD_ERRORS, challenger_refusal, load_predictor
from serving.model_source import REGISTRY_URI, resolve_model

PREVIOUS_ALIAS = "previous-champion"
CHALLENGER_ALIAS = "challenger"


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"  [{'pass' if self.passed else 'FAIL'}] {self.name}: {self.detail}"


@dataclass(frozen=True)
class PromotionPolicy:
    margin: float = 0.005
    """The challenger's card figure (kind.quality) may be this much worse than the champion's."""
    min_agreement: float = 0.95
    """Shadow mode's agreement with the champion the challenger must reach."""
    min_shadowed: int = 100
    """Requests shadow mode must have compared."""


def registry_uri(app: dict) -> str:
    """The tracking server the app's replicas load from (its `tracking_uri` argument), else
    this process's (MLFLOW_TRACKING_URI or the repository's store). Aliases are moved and
    challengers checked where the replicas look, never in whatever store an earlier caller
    in this process left as MLflow's process-wide default."""
    return str(app.get("args", {}).get("tracking_uri") or tracking_uri())


def _registry(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def champion_uri(app: dict, slot: str) -> tuple[str, str]:
    """(registered model, alias) the app serves in `slot`; DeployError when it serves a
    folder or a fixed version (no alias to move)."""
    kind = BY_SLOT[slot]
    source = str(app.get("args", {}).get(kind.source_arg, kind.app_default))
    match = REGISTRY_URI.match(source)
    if match is None or not match["alias"]:
        raise DeployError(
            f"{slot} serves {source}: promotion moves a registry alias, so serve "
            f"models:/NAME@ALIAS in that slot"
        )
    return match["name"], match["alias"]


def pin(source: str, uri: str) -> str:
    """`source` with its alias resolved in the registry at `uri`: models:/NAME/VERSION (a
    folder stays as it is)."""
    match = REGISTRY_URI.match(source)
    if match is None:
        if source.startswith("models:/"):
            raise DeployError(f"{source}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        # The replicas do not run in this directory: a folder reaches them absolute.
        return str(Path(source).resolve())
    if not match["alias"]:
        return source
    registry = _registry(uri)
    try:
        version = registry.get_model_version_by_alias(match["name"], match["alias"]).version
    except Exception:
        raise DeployError(
            f"{source}: no alias {match['alias']!r} on {match['name']} "
            f"(its aliases: {_aliases(match['name'], uri)})"
        ) from None
    return f"models:/{match['name']}/{version}"


def _aliases(name: str, uri: str) -> str:
    try:
        model = _registry(uri).get_registered_model(name)
    except Exception:
        return "none: no such registered model"
    return ", ".join(sorted(model.aliases)) or "none"


def set_challenger(
    dashboard: str,
    slot: str,
    settings: dict[str, Any],
    source: str | None = None,
    alias: str | None = None,
    app_name: str = "dlpipe",
) -> ChallengerConfig | None:
    """Serve `slot`'s challenger with `settings` (mode, share, sticky, shadow_share,
    shadow_budget; those left out stay as they were): `source` (a registry URI or folder),
    else the champion's model @`alias`, else the challenger served now, else the champion's
    model @challenger.
    Checked and loaded here first, then asked of every replica. Mode off with no model
    named takes the challenger away (returns None)."""
    if slot not in BY_SLOT:
        raise DeployError(f"no slot {slot!r}; slots: {', '.join(BY_SLOT)}")
    details, apps = declared_app(dashboard, app_name)
    app = apps[app_name]
    uri = registry_uri(app)
    config = user_config(app)
    challengers = dict(config.get("challengers") or {})
    current = challengers.get(slot, {})
    if settings.get("mode") == "off" and source is None and alias is None:
        challengers.pop(slot, None)
        chosen = None
    else:
        # The settings first: a bad share is named before any model is looked up.
        shadowable = {name: kind.can_shadow for name, kind in BY_SLOT.items()}
        try:
            parse_challengers({slot: {**current, **settings, "source": "?"}}, shadowable)
        except ChallengerConfigError as exc:
            raise DeployError(str(exc)) from None
        if source is None:
            if alias is None and current.get("source"):
                source = current["source"]
            else:
                source = f"models:/{champion_uri(app, slot)[0]}@{alias or CHALLENGER_ALIAS}"
        raw = {**current, **settings, "source": pin(source, uri)}
        try:  # the whole block: the replicas refuse it whole if one entry is wrong
            chosen = parse_challengers({**challengers, slot: raw}, shadowable)[slot]
        except ChallengerConfigError as exc:
            raise DeployError(str(exc)) from None
        # The checks a replica runs, here: a refusal is one line, not a log entry.
        name, alias = champion_uri(app, slot)
        try:
            loaded = load_predictor(slot, chosen.source, uri, use_gpu=False)
            champion = load_predictor(slot, f"models:/{name}@{alias}", uri, use_gpu=False)
        except LOAD_ERRORS as exc:
            raise DeployError(f"challenger {chosen.source} cannot serve {slot}: {exc}") from None
        refusal = challenger_refusal(slot, champion, loaded)
        if refusal is not None:
            raise DeployError(f"challenger {chosen.source} cannot serve {slot}: {refusal}")
        challengers[slot] = chosen.as_user_config()
    config["challengers"] = challengers
    apply_apps(dashboard, apps, details)
    return chosen


def wait_for_challenger(
    url: str, slot: str, config: ChallengerConfig | None, timeout_s: float = 120, probes: int = 8
) -> dict[str, Any]:
    """Watch /v1/models until `probes` answers in a row show `slot` with `config` (or no
    challenger for None); returns the slot's entry. Replicas that refuse it say why."""
    wanted = config.as_user_config() if config is not None else None
    deadline = time.monotonic() + timeout_s
    refused = None  # a replica's refusal of the whole block, maybe of the one before this
    while time.monotonic() < deadline:
        for _ in range(probes):
            listing = get_json(url.rstrip("/") + "/v1/models")
            refused = listing.get("challenger_config_error") or refused
            entry = _slot_in(listing, slot, url)
            shown = entry.get("challenger")
            error = (shown or {}).get("error", "")
            if wanted is not None and error.startswith(f"{wanted['source']}:"):
                raise DeployError(f"the replicas refused the challenger: {error}")
            if wanted is None and shown is not None:
                break
            if wanted is not None and (
                shown is None or any(shown.get(k) != v for k, v in wanted.items())
            ):
                break
        else:
            return entry
        time.sleep(0.5)
    why = f": they refused {refused}" if refused else ""
    raise DeployError(
        f"the replicas at {url} did not take the {slot} challenger in {timeout_s:g} s{why}"
    )


def slot_entry(url: str, slot: str) -> dict[str, Any]:
    return _slot_in(get_json(url.rstrip("/") + "/v1/models"), slot, url)


def _slot_in(listing: dict[str, Any], slot: str, url: str) -> dict[str, Any]:
    for entry in listing["models"]:
        if entry["slot"] == slot:
            return entry
    raise DeployError(f"{url} serves no {slot}")


def promotion_checks(
    slot: str, champion: Any, challenger: Any, shadow: dict[str, Any], policy: PromotionPolicy
) -> list[Check]:
    """The checks a promotion runs: the challenger's parity against torch (its export's
    sample, re-run here), its card figure against the champion's, shadow agreement."""
    checks = []
    try:
        verify_model(challenger)
        checks.append(Check("parity", True, "onnxruntime matches the export's torch outputs"))
    except ModelRejected as exc:
        checks.append(Check("parity", False, str(exc)))
    key, higher_is_better = BY_SLOT[slot].quality
    ours = _card_figure(challenger, key)
    theirs = _card_figure(champion, key)
    if ours is None or theirs is None:
        checks.append(Check(key, False, f"missing from a model card ({ours} vs {theirs})"))
    else:
        bound = theirs - policy.margin if higher_is_better else theirs + policy.margin
        passed = ours >= bound if higher_is_better else ours <= bound
        checks.append(
            Check(
                f"held-out {key}",
                passed,
                f"{ours:.4f} against the champion's {theirs:.4f} "
                f"({'at least' if higher_is_better else 'at most'} {bound:.4f})",
            )
        )
    compared, agreement = shadow.get("requests", 0), shadow.get("agreement")
    if not BY_SLOT[slot].can_shadow:  # random draws: nothing to compare
        checks.append(Check("shadow agreement", True, f"not compared ({slot}: random draws)"))
    elif compared < policy.min_shadowed or agreement is None:
        checks.append(
            Check(
                "shadow agreement",
                False,
                f"{compared} shadowed requests, at least {policy.min_shadowed} needed "
                f"(dlpipe serve challenger {slot} --mode shadow, under traffic)",
            )
        )
    else:
        checks.append(
            Check(
                "shadow agreement",
                agreement >= policy.min_agreement,
                f"{agreement:.4f} over {shadow['rows']} rows of {compared} requests "
                f"(at least {policy.min_agreement:g}); mean confidence gap "
                f"{shadow['mean_confidence_gap']:.4f}",
            )
        )
    return checks


def _card_figure(files: Any, key: str) -> float | None:
    value = json.loads(files.card.read_text()).get("metrics", {}).get(key)
    return float(value) if value is not None else None


def promote(
    dashboard: str,
    url: str,
    slot: str,
    policy: PromotionPolicy,
    app_name: str = "dlpipe",
) -> tuple[list[Check], str | None]:
    """Run the checks; when all pass, move the aliases, drop the challenger and reload.
    Returns (the checks, the new champion version or None when refused)."""
    details, apps = declared_app(dashboard, app_name)
    app = apps[app_name]
    uri = registry_uri(app)
    config = user_config(app)
    raw = (config.get("challengers") or {}).get(slot)
    if raw is None:
        raise DeployError(f"{slot} has no challenger: dlpipe serve challenger {slot} first")
    name, alias = champion_uri(app, slot)
    if not str(raw["source"]).startswith("models:/"):
        raise DeployError(
            f"the challenger {raw['source']} is a folder: register it (a version of a "
            "registered model) to promote it"
        )
    entry = slot_entry(url, slot)
    champion_version = str(entry["version"])
    champion = resolve_model(f"models:/{name}/{champion_version}", uri)
    challenger = resolve_model(raw["source"], uri)
    shown = entry.get("challenger") or {}
    shadow = shown.get("shadow") or {}
    if shown.get("source") != raw["source"] or (
        shadow.get("champion_version"),
        shadow.get("challenger_version"),
    ) != (champion_version, str(challenger.version)):
        shadow = {}  # figures of another pair (the replicas have not taken this one yet)
    checks = promotion_checks(slot, champion, challenger, shadow, policy)
    if not all(check.passed for check in checks):
        return checks, None
    registry = _registry(uri)
    if challenger.registered_model == name:
        target = str(challenger.version)
    else:  # another model's version: copied in, so the slot's model keeps its name
        copied = registry.copy_model_version(
            f"models:/{challenger.registered_model}/{challenger.version}", name
        )
        target = str(copied.version)
    before = _aliases_of(registry, name, (alias, PREVIOUS_ALIAS))
    registry.set_registered_model_alias(name, PREVIOUS_ALIAS, champion_version)
    registry.set_registered_model_alias(name, alias, target)
    _serve_version(
        dashboard, url, apps, details, app_name, slot, target, True, registry, name, before
    )
    return checks, target


def rollback(
    dashboard: str, url: str, slot: str, app_name: str = "dlpipe"
) -> tuple[list[Check], str | None]:
    """Move the champion alias back to `previous-champion`'s version (and that alias to the
    version it replaces, so a second rollback undoes the first), after its parity check."""

    details, apps = declared_app(dashboard, app_name)
    name, alias = champion_uri(apps[app_name], slot)
    uri = registry_uri(apps[app_name])
    registry = _registry(uri)
    try:
        previous = str(registry.get_model_version_by_alias(name, PREVIOUS_ALIAS).version)
    except Exception:
        raise DeployError(
            f"nothing to roll back to: {name} has no {PREVIOUS_ALIAS!r} alias "
            f"(its aliases: {_aliases(name, uri)})"
        ) from None
    before = _aliases_of(registry, name, (alias, PREVIOUS_ALIAS))
    current = before[alias]
    try:
        verify_model(resolve_model(f"models:/{name}/{previous}", uri))
        checks = [Check("parity", True, f"version {previous} matches its export's torch outputs")]
    except ModelRejected as exc:
        return [Check("parity", False, str(exc))], None
    registry.set_registered_model_alias(name, alias, previous)
    registry.set_registered_model_alias(name, PREVIOUS_ALIAS, current)
    _serve_version(
        dashboard, url, apps, details, app_name, slot, previous, False, registry, name, before
    )
    return checks, previous


def _aliases_of(registry: Any, name: str, aliases: tuple[str, ...]) -> dict[str, str | None]:
    """alias -> the version it names now (None: unset), to put back if the replicas refuse."""
    model = registry.get_registered_model(name)
    return {alias: model.aliases.get(alias) for alias in aliases}


def _serve_version(
    dashboard: str,
    url: str,
    apps: dict,
    details: dict,
    app_name: str,
    slot: str,
    version: str,
    drop_challenger: bool,
    registry: Any,
    name: str,
    aliases_before: dict[str, str | None],
) -> None:
    """Serve `version` in `slot` (the aliases already moved); if the replicas refuse it, put
    the aliases and the pinned versions back as they were and say why."""
    config = user_config(apps[app_name])
    versions_before = dict(config.get("versions") or {})
    config["versions"] = {**versions_before, slot: version}
    if drop_challenger:
        challengers = dict(config.get("challengers") or {})
        challengers.pop(slot, None)
        config["challengers"] = challengers
    apply_apps(dashboard, apps, details)
    settled = wait_for_versions(url, {slot: version})
    if settled[slot]["version"] == version:
        return
    for alias, old in aliases_before.items():
        if old is None:
            registry.delete_registered_model_alias(name, alias)
        else:
            registry.set_registered_model_alias(name, alias, old)
    config["versions"] = versions_before
    apply_apps(dashboard, apps, details)
    raise DeployError(
        f"the replicas refused version {version} ({settled[slot]['failed_reload']['error']}); "
        "the aliases are back where they were"
    )
