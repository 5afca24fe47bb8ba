"""Checks a model must pass before a replica serves it: its files are the ones exported, and
onnxruntime still gives torch's answers on the sample saved at export time.

The export stages write `parity_sample.npz` (a few inputs and torch's outputs on them) and
put in the model card the sha256 of the sample and of every graph (`parity_sample` entry).
A registry download, a copied folder or a half-written file that differs in one byte is
refused with the file named, before anything runs it.

The card travels with the files, so it catches corruption but not a swap: whoever can
rewrite the artifact store can rewrite the card too. So a registry model is also checked
against the hashes the registry itself records for its version (tags `sha256/<graph>`,
written by the export stage): the tracking database, not the artifact store, says which
graph a version is.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from serving.model_source import ModelFiles
from serving.runtime import ort_session


class ModelRejected(Exception):
    """The model files fail a check; the message names the file and the check."""


def sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def verify_model(files: ModelFiles) -> None:
    """Raise ModelRejected unless every graph's hash and the parity sample check out."""
    sample = json.loads(files.card.read_text()).get("parity_sample")
    if not sample:
        raise ModelRejected(
            f"{files.source}: the model card has no parity_sample (exported by an older "
            "dlpipe): re-run its export stage"
        )
    sample_path = _existing(files, sample["file"])
    if sha256(sample_path) != sample["sha256"]:
        raise ModelRejected(
            f"{files.source}: {sample['file']} does not match its sha256 in the card"
        )
    if files.registered_model is not None:
        _check_registry_hashes(files, sample["graphs"])
    for graph, expected in sample["graphs"].items():
        actual = sha256(_existing(files, graph))
        if actual != expected:
            raise ModelRejected(
                f"{files.source}: {graph} has sha256 {actual[:12]}..., the model card says "
                f"{expected[:12]}...: not the file that was exported"
            )
    with np.load(sample_path) as arrays:
        stored = {key: arrays[key] for key in arrays.files}
    for graph in sample["graphs"]:
        _check_graph(files, graph, stored, float(sample["atol"]))


def _check_registry_hashes(files: ModelFiles, card_graphs: dict[str, str]) -> None:
    recorded = files.registry_hashes or {}
    where = f"{files.registered_model} version {files.version}"
    for graph in sorted(set(card_graphs) | set(recorded)):
        if graph not in recorded:
            raise ModelRejected(
                f"{files.source}: the registry records no sha256 for {graph} of {where} "
                "(registered by an older dlpipe, or not by an export stage): re-run its "
                "export stage"
            )
        actual = sha256(_existing(files, graph))
        if actual != recorded[graph]:
            raise ModelRejected(
                f"{files.source}: {graph} has sha256 {actual[:12]}..., the registry records "
                f"{recorded[graph][:12]}... for {where}: the artifact store holds a file "
                "the export stage did not register"
            )


def _check_graph(files: ModelFiles, graph: str, stored: dict[str, np.ndarray], atol: float) -> None:

    def named(kind: str) -> dict[str, np.ndarray]:
        prefix = f"{graph}/{kind}/"
        return {k[len(prefix) :]: v for k, v in stored.items() if k.startswith(prefix)}

    inputs, expected = named("input"), named("output")
    try:
        session = ort_session(_existing(files, graph))
        outputs = session.run(list(expected), inputs)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelRejected(
            f"{files.source}: {graph} does not run on its parity sample: {exc}"
        ) from None
    for (name, want), got in zip(expected.items(), outputs):
        if got.shape != want.shape:
            raise ModelRejected(
                f"{files.source}: {graph} output {name} has shape {got.shape}, "
                f"the parity sample {want.shape}"
            )
        diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
        if not diff <= atol:
            raise ModelRejected(
                f"{files.source}: {graph} output {name} differs from torch's by {diff:.3g} on "
                f"the parity sample (atol {atol:g})"
            )


def _existing(files: ModelFiles, name: str) -> Path:
    try:
        return files.sibling(name)
    except FileNotFoundError as exc:
        raise ModelRejected(str(exc)) from None
