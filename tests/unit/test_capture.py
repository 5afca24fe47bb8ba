"""Request capture (serving/capture.py): sampled records written off the request path to
rotating JSON-lines files; a full queue drops and counts, a failing disk counts, and the
settings' errors name the setting."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from serving.capture import CaptureConfig, CaptureConfigError, RequestCapture
from tests.unit.test_predictor import export_dir  # noqa: F401 (a fixture: the tiny export)

ANSWER = {"model": "m", "version": "3", "predictions": [{"label": "7", "confidence": 0.9}]}


def written(capture: RequestCapture, count: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while capture.written + capture.failed < count and time.monotonic() < deadline:
        time.sleep(0.01)


def records(directory) -> list[dict]:
    lines = []
    for path in sorted(directory.glob("*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def test_records_rotate_and_keep_request_and_answer(tmp_path):
    config = CaptureConfig(rate=1.0, directory=str(tmp_path / "c"), rotate_rows=4)
    capture = RequestCapture(config, replica="replica/1")
    for i in range(10):
        capture.offer("/v1/classify", json.dumps({"instances": [[i, 0.5]]}).encode(), ANSWER)
    embed = {"model": "e", "version": "1", "embeddings": np.ones((1, 3), np.float32)}
    capture.offer("/v1/embed", b'{"texts": ["a b"]}', embed)
    written(capture, 11)
    capture.close()
    files = sorted((tmp_path / "c").glob("*.jsonl"))
    assert len(files) == 3 and capture.files == 3  # 4 + 4 + 3 records
    kept = records(tmp_path / "c")
    assert [r["body"]["instances"][0][0] for r in kept[:10]] == list(range(10))
    assert kept[0]["model"] == "m" and kept[0]["version"] == "3"
    assert kept[0]["answer"]["predictions"][0]["label"] == "7"
    assert len({r["request_id"] for r in kept}) == 11 and kept[0]["time"] > 0
    assert kept[10]["answer"]["embeddings"] == [[1.0, 1.0, 1.0]]
    assert "replica-1" in files[0].name


def test_the_rate_samples_and_zero_keeps_nothing(tmp_path):
    capture = RequestCapture(CaptureConfig(rate=0.1, directory=str(tmp_path)))
    for _ in range(5000):
        capture.offer("/v1/classify", b"{}", ANSWER)
    assert 350 <= capture.captured <= 650
    off = RequestCapture(CaptureConfig(rate=0.0, directory=str(tmp_path / "off")))
    off.offer("/v1/classify", b"{}", ANSWER)
    assert off.captured == 0
    capture.close()
    off.close()


def test_a_full_queue_drops_and_counts(tmp_path):
    capture = RequestCapture(CaptureConfig(rate=1.0, directory=str(tmp_path), max_queue=1))
    capture.close()  # the writer stopped: nothing drains the queue
    capture.offer("/v1/classify", b"{}", ANSWER)
    capture.offer("/v1/classify", b"{}", ANSWER)
    assert (capture.captured, capture.dropped) == (1, 1)


def test_a_directory_that_goes_away_is_counted_and_serving_goes_on(tmp_path):
    directory = tmp_path / "gone"
    capture = RequestCapture(CaptureConfig(rate=1.0, directory=str(directory)))
    directory.rmdir()
    directory.write_text("a file now: nothing can be written under it, not even by root")
    for _ in range(3):
        capture.offer("/v1/classify", b"{}", ANSWER)  # never raises
    written(capture, 3)
    assert capture.failed == 3 and capture.written == 0
    directory.unlink()
    directory.mkdir()  # back: the next record opens a new file
    capture.offer("/v1/classify", b"{}", ANSWER)
    written(capture, 4)
    capture.close()
    assert capture.written == 1 and len(records(directory)) == 1


@pytest.mark.parametrize(
    "raw, named",
    [
        ({"rate": 2}, "capture.rate"),
        ({"rate": "all"}, "capture.rate"),
        ({"max_queue": 0}, "capture.max_queue"),
        ({"rotate_rows": 1.5}, "capture.rotate_rows"),
        ({"directory": ""}, "capture.directory"),
        ({"every": 3}, "unknown setting(s) every"),
    ],
)
def test_each_bad_setting_is_named(raw, named):
    with pytest.raises(CaptureConfigError, match="capture") as caught:
        CaptureConfig.parse(raw)
    assert named in str(caught.value)


def test_an_unwritable_directory_is_refused_at_once(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CaptureConfigError, match="capture.directory: cannot write"):
        RequestCapture(CaptureConfig(rate=1.0, directory=str(blocker / "captures")))


def test_the_app_captures_what_it_answers_and_lists_it(export_dir, tmp_path):  # noqa: F811
    from starlette.testclient import TestClient

    from serving.http_api import HttpApi, Limits
    from serving.model_slots import LoadedModels
    from serving.model_source import resolve_model
    from serving.predictor import ClassifierPredictor

    models = LoadedModels(classifier=ClassifierPredictor(resolve_model(str(export_dir))))
    api = HttpApi(models, Limits())
    api.capture = RequestCapture(CaptureConfig(rate=1.0, directory=str(tmp_path)))
    http = TestClient(api)
    assert http.post("/v1/classify", json={"instances": [[0.9] * 16]}).status_code == 200
    assert http.post("/v1/classify", json={"instances": [[0.9] * 3]}).status_code == 422
    written(api.capture, 1)
    listing = http.get("/v1/models").json()
    assert listing["capture"]["written"] == 1 and listing["capture_error"] is None
    api.capture.close()
    [record] = records(tmp_path)  # the refused request is not kept: it has no answer
    assert record["route"] == "/v1/classify" and record["body"] == {"instances": [[0.9] * 16]}
    assert record["answer"]["predictions"][0]["label"] == "light"
