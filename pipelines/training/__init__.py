"""Training: the pure-torch loop, the per-worker Ray adapter and the Ray Train driver."""
