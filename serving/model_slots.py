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

import logging
import time
from typing import Any

from serving.contracts import Predictor
from serving.kinds import BY_SLOT, KINDS, NO_MODEL
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

    def get(self, slot: str) -> Predictor | None:
        return self.predictors[slot]

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
            self.loaded_at[slot] = time.time()
            self.failed_reloads.pop(slot, None)
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
                }
            )
        return infos


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
