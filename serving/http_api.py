"""The HTTP API: routes, request checks and error answers, as one plain ASGI app over the
loaded predictors.

Why no web framework: at the request rates a replica reaches, the layers of one cost more
CPU than the model. FastAPI's routing and dependencies did first; then Starlette's own
stack (error and exception middleware, router, request/response wrappers: about a fifth
of a replica's time under load, profiled with py-spy), so requests go from uvicorn
straight to a dict of routes here (measured: see benchmarks/README.md). The bodies are
still pydantic models (serving/schemas.py), validated straight from the JSON bytes, and
the OpenAPI document is generated from them (serving/openapi.py).

Every client mistake is a 4xx with a message naming the problem; a 500 means a bug:
- 400: not UTF-8 JSON at all;  401: no valid API key (serving/auth.py), when keys are set;
- 404: that model is not loaded;  413: body too large;
- 422: a field is wrong (`detail` lists each, with its location, as FastAPI does);
- 429: the key's request rate is used up (Retry-After says when to come back);
- 503: the replica already has `max_in_flight` requests (retry after a moment);
- 504: the request waited `request_timeout_s` for the model (queued behind other batches).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from pydantic import BaseModel, ValidationError

from serving.auth import OPEN_PATHS, KeyCheck, RateLimit, retry_after
from serving.capture import RequestCapture
from serving.contracts import served_name
from serving.kinds import KINDS, Batch, ModelKind, Route
from serving.lifecycle import ShadowCopies
from serving.predictor import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one replica accepts. Settings of the app (serving/config.yaml, `http`)."""

    max_body_bytes: int = 16 * 2**20
    """Larger bodies get a 413 before they are read."""
    max_in_flight: int = 256
    """Requests a replica works on at once; more get a quick 503, not an unbounded queue."""
    request_timeout_s: float = 10.0
    """A request still waiting for the model by then gets a 504 (it queued behind others
    for that long; a model call already running is not interrupted). The batcher the app
    hands HttpApi enforces it (serving/app.py gives it this value; serving/batcher.py)."""
    max_requests_per_s_per_key: float = 1000.0
    """Per API key and replica (bursts of one second's worth); more get a 429 with
    Retry-After. Only with keys configured; 0 turns it off."""
    drain_s: float = 2.0
    """When the replica stops (scale-down, redeploy, shutdown), it closes its port at once
    (new connections go to the other replicas) and for this long still answers on the
    connections already open, each answer telling its client to reconnect (`Connection:
    close`; /readyz says 503); then it closes the rest, letting requests in flight finish."""


class ClientError(Exception):
    """A request we refuse; `detail` is what the client reads."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


class ClientDisconnected(Exception):
    """The client went away before its request body arrived."""


class Answer(NamedTuple):
    status: int
    body: bytes
    headers: dict[str, str] | None = None


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None):
    return Answer(status, orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), headers)


async def send_answer(
    send: Callable, answer: Answer, with_body: bool = True, close: bool = False
) -> None:
    """`close`: ask the client to take its next request elsewhere (uvicorn closes the
    connection after this answer)."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(answer.body)).encode()),
    ]
    for name, value in (answer.headers or {}).items():
        headers.append((name.lower().encode(), value.encode()))
    if close and not any(name == b"connection" for name, _ in headers):
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body if with_body else b""})


def internal_error(scope: dict[str, Any]) -> Answer:
    """A bug, not a client mistake: logged with its traceback (call it in an `except`)."""
    log.exception("%s %s failed", scope["method"], scope["path"])
    return json_response({"detail": "internal server error"}, 500)


def header(scope: dict[str, Any], name: bytes) -> str | None:
    """A request header's value (`name` lower-case, as ASGI servers give them)."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def field_error(exc: InputError) -> ClientError:
    """A predictor's InputError as a 422 shaped like a validation error (field in `loc`)."""
    loc = ["body", *exc.field.replace("]", "").replace("[", ".").split(".")]  # a[1][0] -> a,1,0
    return ClientError(422, [{"loc": loc, "msg": exc.message, "type": "value_error"}])


def parse_body(schema: type[BaseModel], body: bytes) -> BaseModel:
    """The JSON body validated as `schema`: 400 when it is not JSON, 422 naming bad fields."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise ClientError(
            400, "the request body is not valid JSON text: send UTF-8 encoded JSON"
        ) from None
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise ClientError(
                400, f"the request body is not valid JSON: {errors[0]['msg']}"
            ) from None
        detail = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in errors]
        raise ClientError(422, detail) from None


# A refused body (a 401, 404, 413 or 429 decided before it was read) is still read, and
# thrown away, up to this many bytes before the answer is sent: a server that answers and
# closes while the client is still sending makes the kernel reset the connection, and the
# client then reads a reset instead of the answer. Beyond this bound the connection is
# closed at once (reading more would let anyone make the replica receive unbounded data).
DRAIN_LIMIT = 64 * 2**20

# A 413 closes the connection: what was not read of the body would otherwise be taken for
# the next request.
CLOSE = {"Connection": "close"}


async def read_body(scope: dict[str, Any], receive: Callable, limit: int) -> bytes:
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await skip_body(scope, receive)
        raise ClientError(
            413, f"request body of {declared} bytes is over the {limit} byte limit", CLOSE
        )
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        more = message.get("more_body", False)
        if size > limit:
            if more:
                await discard_body(receive, DRAIN_LIMIT - size)
            raise ClientError(413, f"request body is over the {limit} byte limit", CLOSE)
        chunks.append(chunk)
        if not more:
            return b"".join(chunks)


async def skip_body(scope: dict[str, Any], receive: Callable) -> bool:
    """Read the request's body and throw it away, for an answer (a 401, 404, 413, 429)
    decided before the body was read: sent while the client is still sending, the client
    would read a connection reset instead. False when the body was not all read (over
    DRAIN_LIMIT, or a client that waits for `Expect: 100-continue` before it sends): the
    answer must then close the connection."""
    declared = header(scope, b"content-length")
    if header(scope, b"expect") == "100-continue":
        return False
    if declared is not None and declared.isdigit() and int(declared) > DRAIN_LIMIT:
        return False
    return await discard_body(receive, DRAIN_LIMIT)


async def discard_body(receive: Callable, budget: int) -> bool:
    """Read the rest of the request body without keeping it, up to `budget` bytes; True
    when it was all read."""
    while budget > 0:
        message = await receive()
        if message["type"] == "http.disconnect":
            return True
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


Predict = Callable[[Any, dict[str, Any]], Awaitable[dict[str, Any]]]
ANSWERED_BY = "dlpipe.answered_by"
"""The ASGI scope key (a server-specific extension) holding the predictor that answered."""
Endpoint = Callable[[dict[str, Any], Callable], Awaitable[Answer]]


class HttpApi:
    """The endpoints of every model kind (serving/kinds.py) over `models`, a
    serving/model_slots.py `LoadedModels` (each slot's predictor, swapped in place on
    reload); `batches` (route path -> batched call) batch the concurrent requests of the
    routes with a `many` (serving/app.py passes serving/batcher.py's); `metrics`
    (serving/metrics.py) records every answer; `replica` names the replica answering in
    /v1/models (several share a port); `keys` (serving/auth.py) the API keys every route
    but the probes requires, none by default.

    The object is the ASGI app: give it to uvicorn (or any ASGI server or test client)."""

    def __init__(
        self,
        models: Any,
        limits: Limits,
        batches: dict[str, Batch] | None = None,
        openapi: Callable[[], dict[str, Any]] | None = None,
        metrics: Any = None,
        replica: str | None = None,
        keys: KeyCheck | None = None,
    ) -> None:
        self.models = models
        self.keys = keys if keys is not None else KeyCheck({})
        self.rate = RateLimit(limits.max_requests_per_s_per_key)
        self.replica = replica
        self.metrics = metrics
        self.limits = limits
        self.in_flight = 0
        self.draining = False
        """Set when the replica stops: see Limits.drain_s."""
        self._batches = batches or {}
        self._openapi = openapi
        self._routes = self._route_table()
        self.capture: RequestCapture | None = None
        """Sampled requests and answers to files (serving/capture.py), when configured."""
        self.capture_error: str | None = None
        """Why the last `capture` setting was refused (the one before it still holds)."""
        self._shadows = ShadowCopies()

    def _route_table(self) -> dict[str, dict[str, Endpoint]]:
        """path -> method -> endpoint."""
        get = [
            ("/healthz", self.healthz),
            ("/readyz", self.readyz),
            ("/v1/models", self.list_models),
            ("/openapi.json", self.openapi),
        ]
        table: dict[str, dict[str, Endpoint]] = {}
        for kind in KINDS:
            for route in kind.routes:
                table[route.path] = {"POST": self._post(kind, route)}
        for path, fn in get:
            endpoint = self._get(fn)
            table[path] = {"GET": endpoint, "HEAD": endpoint}
        return table

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":  # no lifespan events (uvicorn's lifespan is off), no websockets
            return
        methods = self._routes.get(scope["path"])
        refused = self._admit(scope) if self.keys.enabled else None
        endpoint = None
        if refused is not None:  # before 404/405: without a key, not even the routes show
            answer = refused
            if methods is not None and scope["method"] == "POST":
                self._record(scope["path"], None, answer.status, time.perf_counter())
        elif methods is None:
            answer = json_response({"detail": "Not Found"}, 404)
        elif (endpoint := methods.get(scope["method"])) is None:
            answer = json_response(
                {"detail": "Method Not Allowed"}, 405, {"Allow": ", ".join(methods)}
            )
        if endpoint is None:
            # Answered without reading the body: read it first (see skip_body).
            if not await skip_body(scope, receive):
                answer = answer._replace(headers={**(answer.headers or {}), **CLOSE})
        else:
            try:
                answer = await endpoint(scope, receive)
            except Exception:
                answer = internal_error(scope)
        await send_answer(send, answer, with_body=scope["method"] != "HEAD", close=self.draining)

    # --- plumbing: admission, body, validation, timeout, errors, metrics ----------------

    def _admit(self, scope: dict[str, Any]) -> Answer | None:
        """None when the request may go on; else its 401 (no valid key) or 429 (rate)."""
        if scope["path"] in OPEN_PATHS:
            return None
        key = self.keys.identify(header(scope, b"authorization"))
        if key is None:
            # The same answer for a missing and a wrong key, and never the key itself.
            return json_response(
                {"detail": "missing or invalid API key: send Authorization: Bearer KEY"},
                401,
                {"WWW-Authenticate": 'Bearer realm="dlpipe"'},
            )
        wait = self.rate.wait_s(key)
        if wait > 0:
            limit = self.limits.max_requests_per_s_per_key
            return json_response(
                {"detail": f"rate limit: {limit:g} requests/s per key; retry shortly"},
                429,
                {"Retry-After": retry_after(wait)},
            )
        return None

    def _post(self, kind: ModelKind, route: Route) -> Endpoint:
        batch = self._batches.get(route.path)

        async def predict(request: BaseModel, scope: dict[str, Any]) -> dict[str, Any]:
            # The champion, or the challenger for a canary's share (serving/lifecycle.py).
            predictor, shadow = self.models.pick(kind.slot, lambda: self._client(scope))
            if predictor is None:
                raise ClientError(
                    404,
                    f"no {kind.title} is loaded in this app "
                    f"(start it with {kind.source_arg}=<source>)",
                )
            scope[ANSWERED_BY] = predictor  # for the metrics: a canary's answers are its own
            started = time.perf_counter()
            try:
                answer, seen = await route.answer(predictor, request, batch)
            except (ClientError, InputError, TimeoutError):
                raise
            except Exception:
                champion = self.models.get(kind.slot)
                if predictor is champion:
                    raise
                # The challenger failed where the champion may not: the client gets the
                # champion's answer; the failure is logged and counted under its version.
                log.exception("%s: the challenger failed a canary request", route.path)
                self._record(route.path, kind.slot, 500, started, predictor)
                predictor = scope[ANSWERED_BY] = champion
                answer, seen = await route.answer(predictor, request, batch)
            self.models.observe(kind.slot, predictor, seen)
            if shadow is not None:
                # Answered after this answer has gone, at most an eighth of max_in_flight
                # copies waiting (pick made it only within the copies' time budget);
                # recorded in the figures of this champion and challenger, even if a
                # reload replaces them meanwhile.
                copy = (request, seen, answer, time.perf_counter() - started)
                limit = max(1, self.limits.max_in_flight // 8)
                self._shadows.offer(route, shadow, copy, limit)
            # Which model answered: its name and registry version (None for a folder).
            return {"model": served_name(predictor), "version": predictor.files.version, **answer}

        async def endpoint(scope: dict[str, Any], receive: Callable) -> Answer:
            started = time.perf_counter()
            if self.in_flight >= self.limits.max_in_flight:
                answer = json_response(
                    {"detail": "overloaded: too many requests in flight, retry shortly"},
                    503,
                    {"Retry-After": "1"},
                )
                self._record(route.path, kind.slot, answer.status, started)
                return answer
            self.in_flight += 1
            try:
                answer = await self._answer(scope, receive, route.request, predict)
            except Exception:  # here, not only in __call__, so that the 500 is counted
                answer = internal_error(scope)
            finally:
                self.in_flight -= 1
            self._record(route.path, kind.slot, answer.status, started, scope.get(ANSWERED_BY))
            return answer

        return endpoint

    async def _answer(
        self, scope: dict[str, Any], receive: Callable, schema: type[BaseModel], predict: Predict
    ) -> Answer:
        try:
            body = await read_body(scope, receive, self.limits.max_body_bytes)
            payload = parse_body(schema, body)
            # The batcher times out a request that waited too long (TimeoutError below); the
            # other routes run their model on the loop at once, never waiting.
            result = await predict(payload, scope)
            if self.capture is not None:
                self.capture.offer(scope["path"], body, result)
            return json_response(result)
        except ClientError as exc:
            return json_response({"detail": exc.detail}, exc.status, exc.headers)
        except InputError as exc:
            error = field_error(exc)
            return json_response({"detail": error.detail}, 422)
        except TimeoutError:
            return json_response(
                {"detail": f"no answer within {self.limits.request_timeout_s:g} s"}, 504
            )
        except ClientDisconnected:
            return Answer(499, b"")

    def _client(self, scope: dict[str, Any]) -> str | None:
        """Who is calling, for a sticky canary: the API key's holder, else X-Client-Id."""
        if self.keys.enabled:
            key = self.keys.identify(header(scope, b"authorization"))
            if key is not None:
                return key
        return header(scope, b"x-client-id")

    def _record(
        self, route: str, slot: str | None, code: int, started: float, predictor: Any = None
    ) -> None:
        """Count an answer under the model that gave it (`predictor`; else the slot's)."""
        if self.metrics is not None:
            if predictor is None and slot is not None:
                predictor = self.models.get(slot)
            self.metrics.request(route, code, predictor, time.perf_counter() - started)

    @staticmethod
    def _get(handler: Callable[[], Awaitable[tuple[int, Any]]]) -> Endpoint:
        async def endpoint(scope: dict[str, Any], receive: Callable) -> Answer:
            status, content = await handler()
            return json_response(content, status)

        return endpoint

    # --- the endpoints -------------------------------------------------------------------

    async def healthz(self) -> tuple[int, Any]:
        return 200, {"status": "ok"}

    async def readyz(self) -> tuple[int, Any]:
        if self.draining:
            return 503, {"status": "stopping"}
        infos = self.models.infos()
        if not infos:
            return 503, {"status": "no model loaded"}
        return 200, {"status": "ready", "models": [m["name"] for m in infos]}

    async def list_models(self) -> tuple[int, Any]:
        listing = {"replica": self.replica, "models": self.models.infos()}
        refused = getattr(self.models, "challenger_config_error", None)
        capture = self.capture.status() if self.capture is not None else None
        return 200, {
            **listing,
            "challenger_config_error": refused,
            "drift_config_error": getattr(self.models, "drift_config_error", None),
            "capture": capture,
            "capture_error": self.capture_error,
        }

    async def openapi(self) -> tuple[int, Any]:
        if self._openapi is None:
            return 404, {"detail": "no OpenAPI document"}
        return 200, self._openapi()
