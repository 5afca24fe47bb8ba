"""Small real inputs that tests write themselves (no downloads)."""

from __future__ import annotations

import contextlib
import csv
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.faults.serving import free_port
from benchmarks.workspace import run_process_group as run_command  # noqa: F401 (for the tests)

REPO = Path(__file__).resolve().parents[1]


def write_image_folder(
    root: Path, sizes: dict[str, list[tuple[int, int]]], rgb: bool = False
) -> Path:
    """Generated images: class 'dark' is mostly black, class 'light' mostly white."""
    rng = np.random.default_rng(0)
    for class_name, shapes in sizes.items():
        (root / class_name).mkdir(parents=True, exist_ok=True)
        base = 40 if class_name.startswith("dark") else 215
        for i, (h, w) in enumerate(shapes):
            shape = (h, w, 3) if rgb else (h, w)
            pixels = np.clip(base + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
            suffix = ".jpg" if i % 2 else ".png"
            Image.fromarray(pixels).save(root / class_name / f"img{i}{suffix}")
    return root


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def generated_transaction_log(path: Path, customers: int = 240) -> Path:
    """Two kinds of customers: loyal (recent, frequent, high spend) and lapsed one-offs."""
    rng = random.Random(0)
    rows = []
    start = date(2024, 1, 1)
    for n in range(customers):
        loyal = n % 2 == 0
        purchases = rng.randint(8, 15) if loyal else 1
        first = rng.randint(0, 60) if loyal else rng.randint(0, 120)
        for p in range(purchases):
            day = start + timedelta(days=first + p * rng.randint(15, 25))
            amount = rng.uniform(60, 120) if loyal else rng.uniform(5, 20)
            rows.append([f"c{n:04d}", day.isoformat(), f"{amount:.2f}", rng.randint(1, 3)])
    return write_csv(path, ["client", "bought_on", "value", "items"], rows)


@contextlib.contextmanager
def declared_app(
    dashboard: str, name: str, args: dict, deployment: dict | None = None
) -> Iterator[str]:
    """The Serve app built from `args` (serving.app:build_app) deployed on the session's
    cluster as `dlpipe serve` deploys it (Serve's config API), with `deployment` options,
    answering on a free port; yields its URL. Serve is shut down afterwards, so the next
    module starts afresh."""
    from ray import serve

    from serving.deploy import deploy_app, wait_until_running

    port = free_port()
    app = {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "serving.app:build_app",
        "args": {**args, "http": {**args.get("http", {}), "port": port}},
    }
    if deployment:
        app["deployments"] = [{"name": "dlpipe", **deployment}]
    try:
        deploy_app(dashboard, app)
        wait_until_running(dashboard, name)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@contextlib.contextmanager
def served_app(dashboard: str, name: str, args: dict) -> Iterator[httpx.Client]:
    """`declared_app` with an HTTP client on it."""
    with declared_app(dashboard, name, args) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client


class SteadyLoad:
    """POST /v1/classify at `rate` requests/s in all, from `connections` keep-alive
    connections on their own threads (a late answer on one does not hold up the others; a
    late thread catches up on its schedule); keeps every answer's status and version."""

    def __init__(self, url: str, body: dict, rate: float, connections: int = 2) -> None:
        self.url, self.body, self.interval = url, body, connections / rate
        self.answers: list[tuple[int, str | None]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(connections)]

    def __enter__(self) -> SteadyLoad:
        self.started = time.perf_counter()
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        self.seconds = time.perf_counter() - self.started

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            next_at = time.perf_counter()
            while not self.stop.is_set():
                try:
                    response = client.post("/v1/classify", json=self.body)
                    version = response.json().get("version") if response.is_success else None
                    self.answers.append((response.status_code, version))
                except httpx.HTTPError as exc:  # a refused or dropped connection is a failure
                    self.answers.append((0, repr(exc)))
                next_at += self.interval
                time.sleep(max(0.0, next_at - time.perf_counter()))


def register_export_copy(
    trained, tmp_path: Path, model: str, alias: str = "champion", tamper: bool = False
) -> str:
    """The session's trained export registered as a new version of `model` (`alias` moves
    to it), its graph optionally edited after export. Returns the version."""
    import pytest

    from pipelines.stagekit import tracking
    from pipelines.stagekit.model_bundle import MODEL_FILE

    export = shutil.copytree(trained.export_dir, tmp_path / "export")
    if tamper:  # a valid graph, same answers, but not the bytes the card vouches for
        import onnx

        graph = onnx.load(str(export / "model.onnx"))
        graph.doc_string = "edited after export"
        onnx.save(graph, str(export / "model.onnx"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", trained.mlflow_uri)
        return tracking.register_onnx_model(
            tracking.producing_run(trained.model_dir / MODEL_FILE, trained.tracking.experiment),
            export / "model.onnx",
            export / "model_card.json",
            model,
            alias,
            extra_files=(export / "parity_sample.npz", export / "drift_reference.json"),
        )


def swap_in_store(tracking_uri: str, name: str, version: str) -> Path:
    """What someone with write access to the artifact store (not to the tracking database)
    could do: rewrite registry version `version` of `name`'s graph (same answers, other
    bytes) and its model card to match, so that the card's own hash check passes. Returns
    the folder rewritten."""
    import json

    import onnx
    from mlflow import MlflowClient

    from serving.model_checks import sha256

    uri = MlflowClient(tracking_uri).get_model_version_download_uri(name, version)
    stored = Path(uri.removeprefix("file://"))
    graph = onnx.load(str(stored / "model.onnx"))
    graph.doc_string = "not what the export stage registered"
    onnx.save(graph, str(stored / "model.onnx"))
    card_path = next(stored.rglob("model_card.json"))
    card = json.loads(card_path.read_text())
    card["parity_sample"]["graphs"]["model.onnx"] = sha256(stored / "model.onnx")
    card_path.write_text(json.dumps(card))
    return stored


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


@contextlib.contextmanager
def headless_chromium(width: int = 1400, height: int = 1000) -> Iterator:
    """A Selenium driver on Debian's headless chromium (`make test` installs it: apt-get
    install chromium chromium-driver; CHROMIUM / CHROMEDRIVER point elsewhere)."""
    import pytest
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() or shutil.which(path)):
            pytest.fail(
                f"{path} missing: apt-get install chromium chromium-driver (make test-deps)"
            )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def broken_images(driver) -> list[str]:
    """The page's images that did not load (missing file, not an image)."""
    return driver.execute_script(
        "return Array.from(document.images)"
        ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
    )
