"""Ray Tune search over optimizers and learning rates (stage `tune`, see pipelines/tuning/tune.py)."""
