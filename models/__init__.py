"""Pure PyTorch building blocks: networks, activations, losses and optimizers.

Nothing here imports Ray, MLflow or DVC, so every piece is testable in isolation.
"""
