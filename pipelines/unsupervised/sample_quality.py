"""How good generated digits are, judged by the project's own supervised classifier.

Inception-based FID needs downloaded weights and 299-pixel photographs; papers on MNIST-
sized data compute the same Fréchet distance on a small classifier trained on the data
(its penultimate layer), which is what the digits classifier of `train_supervised` is.
Three figures per set of images, each against the training digits:
- `fid`: the Fréchet distance between Gaussians fitted to the classifier's penultimate
  features. Held-out real digits give the floor (finite-sample noise: not 0), uniform
  noise images the ceiling.
- `mean_confidence`: the classifier's mean top-class probability: a digit it can read.
- `class_entropy`: entropy of the predicted classes' histogram, in bits (log2(10) = 3.32
  when the ten digits are equally common; mode collapse shows as a few classes, well below).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg
from torch import nn


@torch.no_grad()
def classifier_features(classifier: nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features (N, F), class probabilities (N, classes)) of `images` (N, C, H,
    W). The penultimate features are the input of the classifier's last linear layer."""
    last = [m for m in classifier.modules() if isinstance(m, nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        logits = classifier.eval()(torch.from_numpy(np.ascontiguousarray(images, np.float32)))
    finally:
        hook.remove()
    return captured[0].flatten(1).double().numpy(), torch.softmax(logits, dim=1).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to the rows
    of `a` and `b`."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # The classifier's ReLU features include units that never fire on the digits, so the
    # covariances are singular and scipy warns about a result that is still right (a unit
    # test checks it against the eigenvalue route); a product with no finite root is
    # nudged instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # a singular product: nudge both, as the FID code does
        eps = 1e-6 * np.eye(len(cov_a))
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    root = root.real  # rounding leaves tiny imaginary parts
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * root))


def class_entropy(probabilities: np.ndarray, classes: int) -> float:
    """Entropy in bits of how often each class is predicted."""
    counts = np.bincount(probabilities.argmax(axis=1), minlength=classes)
    share = counts[counts > 0] / counts.sum()
    return float(-(share * np.log2(share)).sum())


def judge(
    classifier: nn.Module, reference_features: np.ndarray, images: np.ndarray
) -> dict[str, float]:
    """`fid` against the reference features, `mean_confidence` and `class_entropy`."""
    features, probabilities = classifier_features(classifier, images)
    return {
        "fid": frechet_distance(features, reference_features),
        "mean_confidence": float(probabilities.max(axis=1).mean()),
        "class_entropy": class_entropy(probabilities, probabilities.shape[1]),
    }
