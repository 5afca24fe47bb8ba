"""Ray Serve as its docs' first example sets it up: a FastAPI ingress deployment with every
Serve default (proxy on port 8000, `max_ongoing_requests` 5, one replica, access logs on)
over the same onnxruntime predictor dlpipe uses. What Serve gives before any tuning.

    python -m benchmarks.servers.ray_default --model artifacts/supervised/export --port 8103
"""

# No `from __future__ import annotations`: FastAPI must see the body type at runtime.
import argparse
import signal
import time
from pathlib import Path

from fastapi import FastAPI
from ray import serve

from serving.model_source import resolve_model
from serving.predictor import ClassifierPredictor
from serving.schemas import ClassifyRequest, ClassifyResponse

api = FastAPI()


@serve.deployment
@serve.ingress(api)
class Classifier:
    def __init__(self, model_dir: str) -> None:
        self.predictor = ClassifierPredictor(resolve_model(model_dir))

    @api.post("/v1/classify", response_model=ClassifyResponse)
    def classify(self, request: ClassifyRequest) -> dict:
        batch = self.predictor.features_to_array(request.instances)
        return {"model": "ray_default", "predictions": self.predictor.classify(batch)}

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/supervised/export")
    parser.add_argument("--port", type=int, default=8103)
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(Classifier.bind(str(Path(args.model).resolve())), route_prefix="/")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
