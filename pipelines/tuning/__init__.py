"""Ray Tune search over optimizers and learning rates (stage `tune`, see pipelines/tune.py)."""
