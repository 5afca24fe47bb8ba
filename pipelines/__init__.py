"""Pipeline stages and the orchestration around `models/`: config, data, Ray Train, MLflow, ONNX."""
