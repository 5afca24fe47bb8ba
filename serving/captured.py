"""Captured requests read back (serving/capture.py writes them): the drift report of
`dlpipe drift`, and the unlabeled pool `dlpipe capture export` makes of them for the
semi-supervised stages (`pseudolabel.unlabeled_source`).

Both read every `*.jsonl` file of the capture directory; a line that is not a whole
record (a file still being written, a hand edit) is skipped and counted, never fatal.
The model that answered a record (its `model` and `version`) is loaded from the registry
to read the record's inputs exactly as the replica did, through its kind's route.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import csv
import io
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from serving.drift import DriftConfig, DriftMonitor, DriftReference
from serving.kinds import KINDS, ModelKind, Route

ROUTES: dict[str, tuple[ModelKind, Route]] = {
    route.path: (kind, route) for kind in KINDS for route in kind.routes
}
DRIFT_ROUTES = ("/v1/classify", "/v1/embed", "/v1/segment")
"""The routes whose inputs are watched for drift (kinds.py: the others see None)."""
POOL_ROUTE = "/v1/classify"
"""Pseudo-labeling trains classifiers: the pool is what the classifier was asked."""
POOL_CSV = "captured.csv"
RECORD_KEYS = {"request_id", "time", "route", "body", "model", "version"}


class CaptureReadError(ValueError):
    """Captures that cannot be used; the message names the directory, file or model."""


@dataclass
class Captures:
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """`file:line: why` of every line that is not a whole record."""


def read_captures(directory: str | Path) -> Captures:
    """Every record under `directory`, in the order written (files by name, then lines)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CaptureReadError(
            f"{directory}: no capture directory (start one with dlpipe serve capture --rate R)"
        )
    files = sorted(directory.glob("*.jsonl"))
    if not files:
        raise CaptureReadError(f"{directory}: no captured requests (*.jsonl) in it")
    captures = Captures()
    for file in files:
        with file.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                try:
                    record = orjson.loads(line)
                    if not RECORD_KEYS <= set(record) or record["route"] not in ROUTES:
                        raise ValueError("not a capture record")
                except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
                    captures.skipped.append(f"{file.name}:{number}: {exc}")
                    continue
                captures.records.append(record)
    return captures


def by_model(records: list[dict[str, Any]], routes: tuple[str, ...]) -> dict[tuple, list[dict]]:
    """(slot, model, version) -> the records of `routes` it answered, in order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        if record["route"] in routes:
            kind, _ = ROUTES[record["route"]]
            groups[kind.slot, record["model"], record["version"]].append(record)
    return dict(groups)


def load_answering_model(slot: str, model: str, version: str | None, tracking_uri: str | None):
    """The predictor of the registry version that answered (a folder-served model has no
    version: its captures cannot be traced back to a model)."""
    from serving.model_slots import LOAD_ERRORS, load_predictor

    if version is None:
        raise CaptureReadError(
            f"{model}: served from a folder, not the registry; its captures name no version"
        )
    source = f"models:/{model}/{version}"
    try:
        return load_predictor(slot, source, tracking_uri)
    except LOAD_ERRORS as exc:
        raise CaptureReadError(f"{source}: cannot load the model that answered: {exc}") from None


def seen_inputs(predictor: Any, records: list[dict[str, Any]], skipped: list[str]) -> list[Any]:
    """What the model saw of each record, as its route computed it for drift; a record
    this model cannot read (edited by hand, another model's) is named in `skipped`."""
    from pydantic import ValidationError

    from serving.predictor import InputError

    loop = asyncio.new_event_loop()
    seen_all = []
    try:
        for record in records:
            _, route = ROUTES[record["route"]]
            try:
                request = route.request.model_validate(record["body"])
                _, seen = loop.run_until_complete(route.answer(predictor, request, None))
            except (ValidationError, InputError) as exc:
                skipped.append(f"request {record['request_id']}: {str(exc).splitlines()[0]}")
                continue
            if seen is not None:
                seen_all.append(seen)
    finally:
        loop.close()
    return seen_all


# --- dlpipe drift -------------------------------------------------------------------------


def drift_report(
    directory: str | Path, tracking_uri: str | None, config: DriftConfig
) -> dict[str, Any]:
    """Per model version that answered captured requests: its inputs against the model's
    drift reference, all together and, in the order captured, in windows of
    `config.window` (the alarms a replica would have raised)."""
    captures = read_captures(directory)
    models = []
    for (slot, model, version), records in by_model(captures.records, DRIFT_ROUTES).items():
        entry: dict[str, Any] = {
            "slot": slot,
            "model": model,
            "version": version,
            "records": len(records),
            "first": min(r["time"] for r in records),
            "last": max(r["time"] for r in records),
        }
        try:
            predictor = load_answering_model(slot, model, version, tracking_uri)
            name = predictor.card.get("drift_reference")
            if name is None:
                raise CaptureReadError(f"{model}/{version}: its export has no drift reference")
            reference = DriftReference.load(predictor.files.sibling(name))
        except CaptureReadError as exc:
            models.append({**entry, "error": str(exc)})
            continue
        seen = seen_inputs(predictor, records, captures.skipped)
        inputs = sum(len(s[0]) if reference.layout == "text" else len(s) for s in seen)
        whole = DriftMonitor(reference, DriftConfig(window=max(inputs, 10), check_every=inputs))
        stream = DriftMonitor(reference, config)
        first_alarm = None
        for one in seen:
            whole.observe(one)
            stream.observe(one)
            if first_alarm is None and stream.alarms:
                first_alarm = stream.alarm_at
        overall = whole.status(top=10)
        entry.update(
            inputs=inputs,
            max_psi=overall["max_psi"],
            top_psi=overall["top_psi"],
            max_ks=overall["max_ks"],
            embedding_distance=overall["embedding_distance"],
            # Fewer inputs than a window: PSI's floor from chance alone is too high to judge.
            drifted=overall["max_psi"] >= config.psi_alarm if inputs >= config.window else None,
            window=config.window,
            window_alarms=stream.alarms,
            first_alarm_at=first_alarm,
        )
        models.append(entry)
    return {
        "directory": str(Path(directory).resolve()),
        "records": len(captures.records),
        "skipped_lines": len(captures.skipped),
        "skipped": captures.skipped[:10],
        "window": config.window,
        "psi_alarm": config.psi_alarm,
        "models": models,
    }


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report as people read it."""
    import time

    def when(stamp: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp))

    lines = [f"{report['records']:,} captured requests in {report['directory']}"]
    if report["skipped_lines"]:
        lines.append(f"  {report['skipped_lines']} line(s) skipped, e.g. {report['skipped'][0]}")
    for entry in report["models"]:
        head = (
            f"{entry['slot']}: {entry['model']} version {entry['version']}, "
            f"{entry['records']:,} requests from {when(entry['first'])} to {when(entry['last'])} UTC"
        )
        lines.append(head)
        if "error" in entry:
            lines.append(f"  not compared: {entry['error']}")
            continue
        verdict = {True: "DRIFTED", False: "no drift", None: "too few inputs to judge"}[
            entry["drifted"]
        ]
        lines.append(
            f"  all {entry['inputs']:,} inputs against the training reference: {verdict} "
            f"(max PSI {entry['max_psi']:.3f}, alarm at {report['psi_alarm']:g})"
        )
        top = ", ".join(f"{name} {psi:.3f}" for name, psi in list(entry["top_psi"].items())[:5])
        lines.append(f"  highest PSI: {top}")
        extra = []
        if entry["max_ks"] is not None:
            extra.append(f"max KS {entry['max_ks']:.3f}")
        if entry["embedding_distance"] is not None:
            extra.append(f"embedding distance {entry['embedding_distance']:.2f} std")
        if extra:
            lines.append("  " + ", ".join(extra))
        if entry["inputs"] < entry["window"]:
            lines.append(f"  fewer inputs than a window ({entry['window']:,}): no window verdict")
        elif entry["window_alarms"]:
            lines.append(
                f"  windows of {entry['window']:,} in capture order: the alarm went up "
                f"{entry['window_alarms']} time(s), first at input {entry['first_alarm_at']:,}"
            )
        else:
            lines.append(f"  windows of {entry['window']:,} in capture order: no alarm")
    return lines


# --- dlpipe capture export ----------------------------------------------------------------


def export_pool(
    directory: str | Path,
    output: str | Path,
    tracking_uri: str | None,
    track: bool = True,
) -> dict[str, Any]:
    """The classifier's captured inputs as an unlabeled pool in `output`: PNG files for an
    image model (sent images as they came, pixel rows drawn), rows of `captured.csv` for a
    feature-vector model, which `prepare_pseudolabel` reads. Inputs already in the pool
    (by request id) are kept and not written twice; with `track`, `dvc add output`."""
    captures = read_captures(directory)
    groups = by_model(captures.records, (POOL_ROUTE,))
    if not groups:
        raise CaptureReadError(f"{directory}: no captured {POOL_ROUTE} requests to export")
    output = Path(output)
    cards = {}
    for slot, model, version in groups:
        card = load_answering_model(slot, model, version, tracking_uri).card
        cards[model, version] = card
    inputs = {tuple(c["input"]["shape"][1:]) for c in cards.values()}
    kinds = {c["input"]["kind"] for c in cards.values()}
    if len(inputs) > 1 or len(kinds) > 1:
        raise CaptureReadError(
            f"{directory}: the captured {POOL_ROUTE} requests were answered by models of "
            f"different inputs ({sorted(map(str, inputs))}); export one model's captures "
            "(move the others' files aside)"
        )
    card = next(iter(cards.values()))
    kind = card["input"]["kind"]
    if kind == "sequence":
        raise CaptureReadError(
            "a time-series classifier's captures cannot become a pool: prepare_pseudolabel "
            "reads unlabeled images or CSV rows"
        )
    records = [r for group in groups.values() for r in group]
    tracked_before = Path(f"{output}.dvc")
    if track and tracked_before.is_file() and not (output.is_dir() and any(output.iterdir())):
        # dvc add would record the new inputs alone: the pool's earlier ones would be lost.
        raise CaptureReadError(
            f"{tracked_before} tracks a pool that is not in the workspace: run "
            f"dvc pull {tracked_before} (or dvc checkout) first"
        )
    output.mkdir(parents=True, exist_ok=True)
    if kind == "image":
        written, kept = _write_images(records, output, card)
    else:
        written, kept = _write_rows(records, output, card["input"]["feature_names"])
    tracked = _dvc_add(output) if track else None
    return {
        "output": str(output),
        # What pseudolabel.unlabeled_source names: the folder of images, or the CSV file.
        "source": str(output if kind == "image" else output / POOL_CSV),
        "requests": len(records),
        "written": written,
        "already_there": kept,
        "skipped_lines": len(captures.skipped),
        "dvc_file": tracked,
    }


def _write_images(records: list[dict], output: Path, card: dict) -> tuple[int, int]:
    from PIL import Image

    shape = card["input"]["shape"][1:]  # (C, H, W)
    written = kept = 0
    for record in records:
        body = record["body"]
        items = body.get("images") or body.get("instances") or []
        for row, item in enumerate(items):
            path = output / f"{record['request_id']}-{row}.png"
            if path.exists():
                kept += 1
                continue
            if isinstance(item, str):  # an image as sent (PNG or JPEG), re-encoded as PNG
                try:
                    with Image.open(io.BytesIO(base64.b64decode(item, validate=True))) as image:
                        image.load()
                        picture = image.copy()
                except (binascii.Error, OSError, ValueError):
                    continue  # it was answered, so readable; skip rather than fail the rest
            else:  # pixels in [0, 1], as the model took them
                pixels = np.asarray(item, dtype=np.float64).reshape(shape)
                pixels = np.rint(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)
                picture = Image.fromarray(pixels[0] if shape[0] == 1 else pixels.transpose(1, 2, 0))
            staging = path.with_suffix(".png.tmp")
            picture.save(staging, format="PNG")
            staging.replace(path)
            written += 1
    return written, kept


def _write_rows(records: list[dict], output: Path, features: list[str]) -> tuple[int, int]:
    """Rows appended to captured.csv (a request id column, then the features)."""
    path = output / POOL_CSV
    done: set[str] = set()
    if path.exists():
        with path.open(newline="") as handle:
            done = {row["request_id"] for row in csv.DictReader(handle)}
    new = [r for r in records if r["request_id"] not in done]
    header = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(["request_id", *features])
        for record in new:
            for values in record["body"].get("instances") or []:
                writer.writerow([record["request_id"], *values])
    return sum(len(r["body"].get("instances") or []) for r in new), len(done)


def _dvc_add(output: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "add", str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise CaptureReadError(
            f"dvc add {output} failed (run it from the DVC repository, or pass --no-dvc): "
            f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}"
        )
    return f"{output}.dvc"
