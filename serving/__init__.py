"""Serving: ONNX Runtime predictors (usable without Ray) and the thin Ray Serve app around them."""
