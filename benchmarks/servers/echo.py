"""The HTTP stack's own ceiling: a raw ASGI app on uvicorn (uvloop + httptools) that reads the
request body and answers a fixed JSON document, the size of dlpipe's answer to the same
request. No routing, no parsing, no model: what this machine's HTTP server can do at all,
against which dlpipe's request path is a share.

    DLPIPE_ECHO_ANSWER=answer.json python -m uvicorn --factory \
        benchmarks.servers.echo:app_from_env --loop uvloop --http httptools --port 8104

(benchmarks/serving_throughput.py starts it so, and on granian too.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

HEALTH = b'{"status":"ok"}'


def echo_app(answer: bytes) -> Callable:
    """The ASGI app: /healthz answers its probe, every other path `answer`, after reading
    the whole body (as a real endpoint must)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    health_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(HEALTH)),
    ]

    async def app(scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        if scope["path"] == "/healthz":
            await send({"type": "http.response.start", "status": 200, "headers": health_headers})
            await send({"type": "http.response.body", "body": HEALTH})
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return app


def app_from_env() -> Callable:
    """The app answering the file named by DLPIPE_ECHO_ANSWER (ASGI servers import an app
    factory by name, without arguments)."""
    return echo_app(Path(os.environ["DLPIPE_ECHO_ANSWER"]).read_bytes())
