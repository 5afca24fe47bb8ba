"""What a user would write instead: FastAPI, pydantic and the torch model in eager mode.

The trained `model.pt` rebuilt with the pipeline's own loader, a sync FastAPI handler (run
in FastAPI's thread pool), torch with its default threads and `no_grad`, uvicorn with
default settings. Same request and response shapes as dlpipe's `/v1/classify`.

    python -m benchmarks.servers.naive --model artifacts/supervised/model --port 8102
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from benchmarks.servers.response import predictions
from pipelines.stagekit.model_bundle import inference_model, load_bundle


class ClassifyRequest(BaseModel):
    instances: list[list[float]]


def build(model_dir: str) -> FastAPI:
    model, bundle = load_bundle(model_dir)
    model = inference_model(model, "classification")
    manifest = bundle["manifest"]
    shape = tuple(manifest["input_shape"])
    names = manifest["class_names"]
    app = FastAPI()

    @app.post("/v1/classify")
    def classify(request: ClassifyRequest) -> dict:
        with torch.no_grad():
            probabilities = model(torch.tensor(request.instances).reshape(-1, *shape))
        return {"model": "naive", "predictions": predictions(names, probabilities)}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/supervised/model")
    parser.add_argument("--port", type=int, default=8102)
    args = parser.parse_args()
    uvicorn.run(build(args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
