"""The HTTP API's request checks, in-process (Starlette's test client over the real ASGI
app and a real onnxruntime predictor; the Serve app runs the same app in its replicas)."""

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import httpx
import pytest
from starlette.testclient import TestClient

from pipelines.cli import parser as serve_parser
from serving.auth import KeyCheck, hash_key
from serving.http_api import HttpApi, Limits
from serving.http_server import ReplicaHttpServer
from serving.kinds import KINDS, endpoints
from serving.model_slots import LoadedModels
from serving.model_source import resolve_model
from serving.openapi import openapi_document
from serving.predictor import ClassifierPredictor
from tests.helpers import free_port
from tests.unit.test_predictor import export_dir  # noqa: F401 (a fixture: the tiny export)

BRIGHT = [[0.9] * 16]


@contextlib.contextmanager
def real_server(
    export_dir,  # noqa: F811
    keys: KeyCheck | None = None,
    **limits,
) -> Iterator[tuple[ReplicaHttpServer, HttpApi]]:
    """The tiny model behind the replica's own uvicorn server, on a real socket."""
    models = LoadedModels(classifier=ClassifierPredictor(resolve_model(str(export_dir))))
    api = HttpApi(models, Limits(**limits), keys=keys)
    server = ReplicaHttpServer(api, "127.0.0.1", free_port())
    server.start()
    try:
        yield server, api
    finally:
        server.stop()


def client(export_dir, **limits) -> TestClient:  # noqa: F811
    models = LoadedModels(classifier=ClassifierPredictor(resolve_model(str(export_dir))))
    api = HttpApi(models, Limits(**limits), openapi=lambda: openapi_document(models))
    return TestClient(api)


def test_classify_answers_and_health_readiness_and_listing(export_dir):  # noqa: F811
    http = client(export_dir)
    response = http.post("/v1/classify", json={"instances": BRIGHT})
    assert response.status_code == 200
    assert response.json()["predictions"][0]["label"] == "light"
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready", "models": ["tiny"]}
    assert [m["name"] for m in http.get("/v1/models").json()["models"]] == ["tiny"]


def test_a_model_left_out_is_a_404_naming_the_option(export_dir):  # noqa: F811
    http = client(export_dir)
    response = http.post("/v1/fill-mask", json={"texts": ["a [MASK]"]})
    assert response.status_code == 404 and "mlm_model" in response.json()["detail"]


def test_the_endpoints_printed_are_the_served_kinds_routes_and_the_apps_own():
    listed = endpoints("http://h:1", ["classifier"])
    assert "POST http://h:1/v1/classify" in listed and "GET  http://h:1/v1/models" in listed
    assert not any("/v1/fill-mask" in line or "/v1/segment" in line for line in listed)
    every = endpoints("http://h:1")
    assert {f"POST http://h:1{r.path}" for k in KINDS for r in k.routes} <= set(every)


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        (b"\xff\xfe", 400, "UTF-8"),
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"instances": [[0.5] * 15]}).encode(), 422, "expected 16 values"),
        (json.dumps({"instances": [[2.0] * 16]}).encode(), 422, "[0, 1]"),
        (json.dumps({"rows": BRIGHT}).encode(), 422, "rows"),
        (b'{"instances": [[NaN' + b", 0.5" * 15 + b"]]}", 422, "finite"),
        (json.dumps({"instances": BRIGHT, "images": None}).encode(), 422, "`images` is null"),
        (b'{"instances": null}', 422, "`instances` is null"),
        (b"{}", 422, "exactly one of"),
        (b'{"instances": []}', 422, "`instances` is empty"),
        (b'{"instances": [[true' + b", 0.5" * 15 + b"]]}", 422, "valid number"),
    ],
)
def test_client_mistakes_are_4xx_naming_the_problem(export_dir, content, status, message):  # noqa: F811
    http = client(export_dir)
    response = http.post("/v1/classify", content=content)
    assert response.status_code == status, response.text
    assert message in response.text
    assert http.post("/v1/classify", json={"instances": BRIGHT}).status_code == 200


def test_too_large_bodies_are_413_and_overload_is_a_quick_503(export_dir):  # noqa: F811
    small = client(export_dir, max_body_bytes=100)
    response = small.post("/v1/classify", json={"instances": BRIGHT * 10})
    assert response.status_code == 413 and "100 byte limit" in response.text
    assert response.headers["Connection"] == "close"  # the refused body is not read
    full = client(export_dir, max_in_flight=0)
    response = full.post("/v1/classify", json={"instances": BRIGHT})
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert full.get("/healthz").status_code == 200  # liveness is not admission-controlled


def test_the_openapi_document_describes_the_loaded_models_as_they_check_requests(
    export_dir,  # noqa: F811
):
    document = client(export_dir).get("/openapi.json").json()
    post = document["paths"]["/v1/classify"]["post"]
    assert {"200", "401", "413", "422", "429", "503"} <= set(post["responses"])
    body = post["requestBody"]["content"]["application/json"]["schema"]
    # The tiny model reads 4x4 pixels in [0, 1]: rows of exactly 16 such numbers.
    row = body["properties"]["instances"]["items"]
    assert (row["minItems"], row["maxItems"]) == (16, 16)
    assert (row["items"]["minimum"], row["items"]["maximum"]) == (0.0, 1.0)
    assert body["additionalProperties"] is False and body["maxProperties"] == 1
    # Only the loaded model's routes: the others answer 404 here.
    assert "/v1/fill-mask" not in document["paths"] and "/v1/segment" not in document["paths"]
    assert "ClassifyRequest" in document["components"]["schemas"]


def test_every_route_of_the_kind_table_is_served_documented_and_has_a_serve_option(
    export_dir,  # noqa: F811
):
    """serving/kinds.py is the one table: the app, the OpenAPI document and `dlpipe serve`
    all follow it."""
    http = client(export_dir)
    generic = openapi_document()  # every kind's routes, as for an app serving them all
    options = {
        a.dest
        for a in next(iter(serve_parser()._subparsers._group_actions)).choices["serve"]._actions
    }
    for kind in KINDS:
        assert kind.source_arg in options
        for route in kind.routes:
            assert route.path in generic["paths"]
            answer = http.post(route.path, json={})
            # The route exists: its schema refuses the empty body (422), or, where an empty
            # body is a valid request (/v1/generate's defaults) for a kind not loaded here,
            # the 404 names the kind, not an unknown path.
            named = answer.status_code == 404 and kind.title in answer.json()["detail"]
            assert answer.status_code == 422 or named, answer.json()
    mlm = next(kind for kind in KINDS if kind.slot == "mlm")
    answer = http.post(mlm.routes[0].path, json={"texts": ["a [MASK] b"]})
    assert answer.status_code == 404 and mlm.title in answer.json()["detail"]


def test_unknown_paths_and_methods_are_404_and_405_in_json(export_dir):  # noqa: F811
    http = client(export_dir)
    missing = http.get("/v2/classify")
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}
    wrong = http.get("/v1/classify")
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "POST"
    head = http.head("/healthz")
    assert head.status_code == 200 and head.content == b""


class RecordedAnswers:
    """The `metrics` side of HttpApi: what it records for each answer."""

    def __init__(self) -> None:
        self.codes: list[tuple[str, int]] = []

    def request(self, route, code, predictor, seconds) -> None:
        self.codes.append((route, code))


def test_a_bug_is_a_counted_500_and_the_app_keeps_serving(export_dir):  # noqa: F811
    models = LoadedModels(classifier=ClassifierPredictor(resolve_model(str(export_dir))))
    calls = []

    async def batch_that_fails_once(classifier, batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("a bug in the batching code")
        return classifier.classify(batch)

    metrics = RecordedAnswers()
    http = TestClient(
        HttpApi(models, Limits(), {"/v1/classify": batch_that_fails_once}, metrics=metrics)
    )
    broken = http.post("/v1/classify", json={"instances": BRIGHT})
    assert broken.status_code == 500 and broken.json() == {"detail": "internal server error"}
    assert http.post("/v1/classify", json={"instances": BRIGHT}).status_code == 200
    assert metrics.codes == [("/v1/classify", 500), ("/v1/classify", 200)]


def test_a_request_that_waited_too_long_for_the_model_is_a_counted_504(export_dir):  # noqa: F811
    """As the replica wires it (serving/app.py): the batcher gets request_timeout_s. One
    slow batch holds the loop; the requests queued behind it past the timeout read 504,
    the first one its answer, and the app goes on answering."""
    import asyncio
    import time

    from serving.batcher import DynamicBatcher

    classifier = ClassifierPredictor(resolve_model(str(export_dir)))
    models = LoadedModels(classifier=classifier)

    def slow_then_fast(requests):
        time.sleep(0.3 if len(slow_then_fast.calls) == 0 else 0)
        slow_then_fast.calls.append(len(requests))
        return [c.classify(batch) for c, batch in requests]

    slow_then_fast.calls = []
    limits = Limits(request_timeout_s=0.1)
    batcher = DynamicBatcher(slow_then_fast, max_batch_size=1, timeout_s=limits.request_timeout_s)

    async def classify_batched(c, batch):
        return await batcher.submit((c, batch))

    metrics = RecordedAnswers()
    api = HttpApi(models, limits, {"/v1/classify": classify_batched}, metrics=metrics)

    async def three_at_once():
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            answers = await asyncio.gather(
                *(http.post("/v1/classify", json={"instances": BRIGHT}) for _ in range(3))
            )
            after = await http.post("/v1/classify", json={"instances": BRIGHT})
        return [a.status_code for a in answers], after

    codes, after = asyncio.run(three_at_once())
    assert sorted(codes) == [200, 504, 504] and after.status_code == 200
    assert slow_then_fast.calls == [1, 1]  # the timed-out requests never reached the model
    assert [code for _, code in metrics.codes].count(504) == 2


def test_a_body_over_the_limit_reads_as_413_on_a_real_server_not_a_reset(export_dir):  # noqa: F811
    # Over a real socket: a server that answers and closes while the client is still
    # sending makes the kernel reset the connection, and the client never sees the 413.
    with real_server(export_dir) as (server, _):
        url = f"http://127.0.0.1:{server.port}/v1/classify"
        big = b'{"instances": [[' + b"0.5, " * (4 * 2**20) + b"0.5]]}"  # 20 MB
        # urllib, as most clients (and `dlpipe predict`): it sends the whole body before it
        # reads the answer. (httpx would read an early answer after a failed send.)
        for chunked in (False, True):
            body = iter([big[i : i + 2**20] for i in range(0, len(big), 2**20)]) if chunked else big
            headers = {"Content-Type": "application/json"}
            if chunked:
                headers["Transfer-Encoding"] = "chunked"
            request = urllib.request.Request(url, data=body, headers=headers)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 413
            assert "byte limit" in json.loads(refused.value.read())["detail"]
        assert httpx.post(url, json={"instances": BRIGHT}).status_code == 200


def test_a_large_body_refused_before_it_is_read_reads_as_the_refusal_not_a_reset(
    export_dir,  # noqa: F811
):
    # A 401, 429 or 404 is decided from the headers alone; answered while a client still
    # sends a large body, it reached the client as a connection reset (CI saw it: a 413 test
    # that ran into the 429 of the test before it).
    key = "a-test-key"
    keys = KeyCheck({"tests": hash_key(key)})
    with real_server(export_dir, keys, max_requests_per_s_per_key=0.01) as (server, _):
        base = f"http://127.0.0.1:{server.port}"
        big = b'{"instances": [[' + b"0.5, " * 2**20 + b"0.5]]}"  # 5 MB, within the limit

        def refusal(path: str, authorization: str | None) -> tuple[int, str]:
            headers = {"Content-Type": "application/json"}
            if authorization:
                headers["Authorization"] = f"Bearer {authorization}"
            request = urllib.request.Request(base + path, data=big, headers=headers)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            return refused.value.code, json.loads(refused.value.read())["detail"]

        assert refusal("/v1/classify", None)[0] == 401
        assert refusal("/v1/classify", key)[0] == 422  # the one request of the bucket
        code, detail = refusal("/v1/classify", key)
        assert code == 429 and "rate limit" in detail
        # The connection is kept after a refusal whose body was read: the next request on it
        # is answered.
        with httpx.Client(base_url=base, headers={"Authorization": "Bearer wrong"}) as http:
            codes = [http.post("/v1/classify", content=big).status_code for _ in range(2)]
        assert codes == [401, 401]


def test_a_draining_replica_answers_but_sends_its_clients_elsewhere(export_dir):  # noqa: F811
    # Over a real socket: the keep-alive connection must be closed by the server after the
    # answer, so the client's next request opens a new one (to a replica that stays).
    with real_server(export_dir) as (server, api):
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}") as http:
            before = http.post("/v1/classify", json={"instances": BRIGHT})
            assert before.status_code == 200 and "connection" not in before.headers
            api.draining = True
            during = http.post("/v1/classify", json={"instances": BRIGHT})
            assert during.status_code == 200 and during.headers["connection"] == "close"
            ready = http.get("/readyz")
            assert ready.status_code == 503 and ready.json() == {"status": "stopping"}


def test_a_replica_that_stops_listening_still_answers_its_open_connections(export_dir):  # noqa: F811
    with real_server(export_dir) as (server, _):
        url = f"http://127.0.0.1:{server.port}"
        with httpx.Client(base_url=url) as open_connection:
            assert open_connection.get("/healthz").status_code == 200
            server.stop_listening()
            with pytest.raises(httpx.ConnectError):  # the port is closed to new clients
                httpx.get(f"{url}/healthz")
            answer = open_connection.post("/v1/classify", json={"instances": BRIGHT})
            assert answer.status_code == 200
