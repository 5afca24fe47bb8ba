"""The models one replica serves, one per slot (classifier, mlm, segmenter), and swapping
a slot's model in place while requests keep coming.

A model is served only after its files pass `verify_model` (graph hashes against the model
card, onnxruntime against torch on the saved parity sample). A swap is one attribute
assignment: a request already holding the old predictor finishes on it, the next one gets
the new. When the new version fails any check the old one keeps serving and the reason is
kept for /v1/models; when a slot has no model yet (replica start) the failure is raised, so
Serve reports the replica as failed instead of serving nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from serving.contracts import Predictor, served_name
from serving.drift import DriftConfig, DriftMonitor, DriftReference
from serving.kinds import BY_SLOT, KINDS, NO_MODEL
from serving.lifecycle import Challenger, ChallengerConfig, ShadowStats, to_challenger
from serving.model_checks import ModelRejected, verify_model
from serving.model_source import ModelNotFound, resolve_model

log = logging.getLogger(__name__)

LOAD_ERRORS = (ModelNotFound, ModelRejected, ValueError, KeyError, OSError)
"""What a bad model (not a bug) raises while loading: missing/mismatched files, wrong task."""


def load_predictor(
    slot: str,
    source: str,
    tracking_uri: str | None = None,
    version: str | None = None,
    threads: int = 1,
    use_gpu: bool | None = None,
):
    """The predictor for `slot` from `source` (pinned to `version` if given), verified."""
    files = resolve_model(source, tracking_uri, version)
    verify_model(files)
    return BY_SLOT[slot].predictor(files, threads=threads, use_gpu=use_gpu)


class LoadedModels:
    """slot -> the predictor serving it (None: no model), one slot per kind of
    serving/kinds.py; `LoadedModels(classifier=predictor)` starts with some filled."""

    def __init__(self, **served: Predictor) -> None:
        unknown = sorted(set(served) - set(BY_SLOT))
        if unknown:
            raise ValueError(f"no model kind {unknown}; kinds: {sorted(BY_SLOT)}")
        self.predictors: dict[str, Predictor | None] = {k.slot: served.get(k.slot) for k in KINDS}
        self.loaded_at: dict[str, float] = {}
        self.failed_reloads: dict[str, dict[str, Any]] = {}
        """slot -> the last version that could not replace the served one, and why."""
        self.challengers: dict[str, Challenger] = {}
        self.challenger_errors: dict[str, str] = {}
        """slot -> why its challenger is not served (the champion serves alone)."""
        self.challenger_config_error: str | None = None
        """Why the last `challengers` setting was refused (the one before it still holds)."""
        self.drift_config = DriftConfig()
        self.monitors: dict[str, tuple[Predictor, DriftMonitor]] = {}
        """slot -> (the champion watched, its inputs' drift; serving/drift.py)."""
        self._updating: set[str] = set()
        """Slots whose monitor's update waits for the event loop's next turn (`observe`)."""
        self.drift_errors: dict[str, str] = {}
        """slot -> why its inputs are not watched (no reference in its export ...)."""
        self.drift_config_error: str | None = None
        """Why the last `drift` setting was refused (the one before it still holds)."""
        self._watching = threading.Lock()
        """Held to replace a slot's monitor (Serve's reconfigure thread) and to stop one that
        failed (the event loop's thread), so that stopping a failed monitor cannot remove
        the one a reconfigure put in its place between the check and the removal."""
        for slot, predictor in self.served():
            self._watch(slot, predictor)

    def get(self, slot: str) -> Predictor | None:
        return self.predictors[slot]

    def pick(
        self, slot: str, client: Callable[[], str | None]
    ) -> tuple[Predictor | None, Challenger | None]:
        """(the predictor that answers this request, the challenger to shadow it or None).
        `client` names the caller, asked only by a sticky canary."""
        champion = self.predictors[slot]
        challenger = self.challengers.get(slot)
        if challenger is None or champion is None:
            return champion, None
        config = challenger.config
        if config.mode == "canary":
            caller = client() if config.sticky else None
            if to_challenger(config, caller, random.random()):
                return challenger.predictor, None
        elif config.mode == "shadow" and random.random() < config.shadow_share:
            if challenger.budget.allows(config.shadow_budget):
                return champion, challenger
            challenger.shadow.over_budget += 1
        return champion, None

    def observe(self, slot: str, predictor: Predictor, seen: Any) -> None:
        """What `predictor` saw answering a request (kinds.py's answers), for drift: only
        the champion's inputs are watched, against its own reference.

        On an event loop the window's update waits for the loop's next turn, so that every
        request answered in this turn joins it: under load a batch's requests are answered
        together, and one update for them replaced one per `check_every` inputs (3 for a
        batch of 32 at the default 10; the updates were 7.7% of a replica's profile at 32
        clients, benchmarks/README.md). The alarm is checked once per update: its delay
        grows by at most that turn's inputs (DriftConfig.check_every)."""
        watched = self.monitors.get(slot)
        if watched is None or watched[0] is not predictor or seen is None:
            return
        monitor = watched[1]
        if not self._drift_step(slot, monitor, monitor.hold, seen) or slot in self._updating:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside a loop (a script, a test): at once
            self._drift_step(slot, monitor, monitor.update)
            return
        self._updating.add(slot)
        loop.call_soon(self._deferred_update, slot)

    def _deferred_update(self, slot: str) -> None:
        # The slot's monitor now: one that replaced the monitor due meanwhile may be due too.
        self._updating.discard(slot)
        watched = self.monitors.get(slot)
        if watched is not None:
            self._drift_step(slot, watched[1], watched[1].update)

    def _drift_step(
        self, slot: str, monitor: DriftMonitor, step: Callable[..., Any], *args: Any
    ) -> Any:
        """`step(*args)`, a call on the slot's `monitor`; None if it raised: an error
        stops the watching (a bug or a reference unlike the model, never the client's)."""
        try:
            return step(*args)
        except Exception as exc:
            log.exception("%s: drift watching stopped", slot)
            with self._watching:
                if self.monitors.get(slot, (None, None))[1] is monitor:
                    del self.monitors[slot]
                    self.drift_errors[slot] = f"watching stopped: {exc!r}"
            return None

    def configure_drift(self, config: DriftConfig) -> None:
        """Watch every champion's inputs with `config` (new settings: new windows)."""
        self.drift_config_error = None
        if config == self.drift_config:  # a load watches each new champion with it already
            return
        self.drift_config = config
        for slot, predictor in self.served():
            self._watch(slot, predictor)

    def _watch(self, slot: str, predictor: Predictor) -> None:
        try:
            watched, error = self._monitor_for(slot, predictor)
        except Exception:  # unforeseen: the old model's monitor must not outlive it
            with self._watching:
                self.monitors.pop(slot, None)
            raise
        with self._watching:
            if watched is None:
                self.monitors.pop(slot, None)
            else:
                self.monitors[slot] = watched
            if error is None:
                self.drift_errors.pop(slot, None)
            else:
                self.drift_errors[slot] = error

    def _monitor_for(
        self, slot: str, predictor: Predictor
    ) -> tuple[tuple[Predictor, DriftMonitor] | None, str | None]:
        """(what watches `predictor`'s inputs, why nothing does): the reference is read
        here, outside the lock."""
        if not self.drift_config.enabled:
            return None, None
        if not BY_SLOT[slot].has_inputs:
            return None, "nothing to watch: its requests carry no inputs"
        name = predictor.card.get("drift_reference")
        if name is None:
            return None, "its export has no drift reference (exported before them)"
        try:
            reference = DriftReference.load(predictor.files.sibling(name))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("%s: drift reference not usable: %s", slot, exc)
            return None, f"drift reference not usable: {exc}"
        return (predictor, DriftMonitor(reference, self.drift_config)), None

    def drift_gauges(self) -> dict[str, dict[str, Any]]:
        """slot -> feature -> value, and "alarm", for the drift gauges (serving/metrics.py)."""
        figures = {}
        for slot, (_, monitor) in list(self.monitors.items()):
            gauges = monitor.gauges()  # folds what is held first
            if monitor.filled >= monitor.config.window:  # a part window is mostly noise
                figures[slot] = {**gauges, "alarm": monitor.alarm}
        return figures

    def drift_info(self, slot: str) -> dict[str, Any] | None:
        if (error := self.drift_errors.get(slot)) is not None:
            return {"error": error}
        watched = self.monitors.get(slot)
        return watched[1].status() if watched is not None else None

    def load_challengers(
        self,
        configs: dict[str, ChallengerConfig],
        tracking_uri: str | None,
        threads: int,
        use_gpu: bool,
    ) -> None:
        """Serve `configs`' challengers (a slot left out: none). A challenger loads through
        the same checks as a champion; one that fails them is not served, the reason kept
        for /v1/models, and the champion goes on alone."""
        self.challenger_config_error = None
        for slot in set(self.challengers) - set(configs):
            del self.challengers[slot]
        for slot in set(self.challenger_errors) - set(configs):
            del self.challenger_errors[slot]
        for slot, config in configs.items():
            current = self.challengers.get(slot)
            if current is not None and current.config.source == config.source:
                current.config = config  # a new mode or share: the same model
                continue
            try:
                predictor = load_predictor(
                    slot, config.source, tracking_uri, threads=threads, use_gpu=use_gpu
                )
                refusal = challenger_refusal(slot, self.predictors[slot], predictor)
            except Exception as exc:  # any failure: a challenger never stops the champion
                refusal = str(exc)
            if refusal is not None:
                log.error("%s: challenger %s not served: %s", slot, config.source, refusal)
                self.challengers.pop(slot, None)
                self.challenger_errors[slot] = f"{config.source}: {refusal}"
                continue
            self.challenger_errors.pop(slot, None)
            self.challengers[slot] = Challenger(
                config, predictor, self._shadow_stats(slot, predictor)
            )
            log.info("%s: challenger %s loaded, mode %s", slot, config.source, config.mode)

    def _shadow_stats(self, slot: str, challenger: Predictor) -> ShadowStats:
        champion = self.predictors[slot]
        return ShadowStats(
            champion.files.version if champion is not None else None, challenger.files.version
        )

    def load(
        self,
        sources: dict[str, str],
        versions: dict[str, str],
        tracking_uri: str | None,
        threads: int,
        use_gpu: bool,
    ) -> list[str]:
        """Bring each slot to `sources[slot]` at `versions.get(slot)` (None: what the alias
        names now, for a slot still empty; a served slot without a pinned version stays).
        Returns the slots whose new version was refused (their old one keeps serving)."""
        refused = []
        for slot, source in sources.items():
            if source == NO_MODEL:
                continue
            current = self.predictors[slot]
            version = versions.get(slot)
            if current is not None and (version is None or current.files.version == version):
                if version is not None:
                    self.failed_reloads.pop(slot, None)  # back on what is served
                continue
            started = time.monotonic()
            try:
                predictor = load_predictor(slot, source, tracking_uri, version, threads, use_gpu)
            except LOAD_ERRORS as exc:
                if current is None:
                    raise
                log.error(
                    "%s: version %s not loaded, %s keeps serving: %s",
                    slot,
                    version,
                    current.files.version,
                    exc,
                )
                self.failed_reloads[slot] = {
                    "version": version,
                    "error": str(exc),
                    "at": _utc(time.time()),
                }
                refused.append(slot)
                continue
            self.predictors[slot] = predictor
            self._watch(slot, predictor)
            self.loaded_at[slot] = time.time()
            self.failed_reloads.pop(slot, None)
            if slot in self.challengers:  # shadow figures compare two versions: start anew
                challenger = self.challengers[slot]
                challenger.shadow = self._shadow_stats(slot, challenger.predictor)
            log.info(
                "%s: now serving %s version %s (loaded and checked in %.2f s)",
                slot,
                source,
                predictor.files.version,
                time.monotonic() - started,
            )
        return refused

    def served(self) -> list[tuple[str, Any]]:
        """(slot, predictor) for every slot with a model."""
        return [(slot, p) for slot, p in self.predictors.items() if p is not None]

    def infos(self) -> list[dict[str, Any]]:
        infos = []
        for slot, predictor in self.served():
            files = predictor.files
            infos.append(
                {
                    "slot": slot,
                    **predictor.info(),
                    "registered_model": files.registered_model,
                    "version": files.version,
                    "alias": files.alias,
                    "loaded_at": _utc(self.loaded_at[slot]) if slot in self.loaded_at else None,
                    "failed_reload": self.failed_reloads.get(slot),
                    "lineage": files.lineage,
                    "challenger": self.challenger_info(slot),
                    "drift": self.drift_info(slot),
                }
            )
        return infos

    def challenger_info(self, slot: str) -> dict[str, Any] | None:
        """The slot's challenger as /v1/models shows it: settings, model, shadow figures."""
        # .get, not `in` then [...]: reconfigure runs on another thread than the requests.
        if (error := self.challenger_errors.get(slot)) is not None:
            return {"error": error}
        challenger = self.challengers.get(slot)
        if challenger is None:
            return None
        return {
            **challenger.config.as_user_config(),
            "name": served_name(challenger.predictor),
            "version": challenger.predictor.files.version,
            "shadow": challenger.shadow.summary(),
        }


def challenger_refusal(slot: str, champion: Any, challenger: Any) -> str | None:
    """Why `challenger` cannot stand beside `champion` in `slot` (None: it can): it is the
    same version, or it takes other inputs (a request valid for one would fail on the
    other: canary clients would see errors, shadow comparisons nothing)."""
    if champion is None:
        return None
    same = champion.files.registered_model, champion.files.version
    if (
        champion.files.version is not None
        and (
            challenger.files.registered_model,
            challenger.files.version,
        )
        == same
    ):
        return f"it is the champion's own version ({same[0]} version {same[1]})"
    for route in BY_SLOT[slot].routes:
        if route.body(champion) != route.body(challenger):
            return f"it takes other inputs than the champion on {route.path}"
    return None


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
