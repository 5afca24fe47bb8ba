"""The reference limit: the exported classifier behind the thinnest HTTP server there is.

One uvicorn process (uvloop + httptools), one Starlette route, one onnxruntime session with
one thread, the body read with orjson. It answers the same request and response shapes as
dlpipe's `/v1/classify` (features in, label + probabilities out), but checks nothing beyond
what it needs to run: it is what a hand-written, single-purpose server can reach on this
machine, the ceiling against which the Serve application is measured.

    python -m benchmarks.servers.bare --model artifacts/supervised/export --port 8101
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from benchmarks.servers.response import predictions


def build(model_dir: str) -> Starlette:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(Path(model_dir) / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    card = json.loads((Path(model_dir) / "model_card.json").read_text())
    input_name = session.get_inputs()[0].name
    shape = tuple(card["input"]["shape"][1:])
    names = card["class_names"]

    async def classify(request: Request) -> Response:
        body = orjson.loads(await request.body())
        batch = np.asarray(body["instances"], dtype=np.float32).reshape((-1, *shape))
        probabilities = session.run(None, {input_name: batch})[0]
        return Response(
            orjson.dumps({"model": card["name"], "predictions": predictions(names, probabilities)}),
            media_type="application/json",
        )

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(
        routes=[
            Route("/v1/classify", classify, methods=["POST"]),
            Route("/healthz", healthz),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/supervised/export")
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args()
    uvicorn.run(
        build(args.model),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
