"""The autoencoder side of segmentation: train it (or a VAE) on Ray Train, encode,
optionally refine.

Training goes through the same driver and worker adapter as every other stage (task
`AutoencoderTask`), with a seeded 10% of the rows held out for early stopping. IDEC
refinement afterwards is plain torch in the driver process: it needs the soft assignments
of all points each epoch, and the data (at most tens of thousands of short rows) fits.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch
import torch.nn.functional as F

from models.autoencoder import Autoencoder, AutoencoderConfig
from models.dec import soft_assignment, target_distribution
from models.vae import VAE, VaeConfig
from pipelines.stagekit.config import TrainConfig, config_to_dict
from pipelines.stagekit.tracking import RunLogger
from pipelines.training.driver import run_name, train_job
from pipelines.training.tasks import AutoencoderTask, VaeTask

log = logging.getLogger(__name__)

VALIDATION_SHARE = 0.1


def train_autoencoder(
    x: np.ndarray,
    config: AutoencoderConfig,
    train: TrainConfig,
    seed: int,
    logger: RunLogger | None,
    stage: str,
    image_shape: tuple[int, ...] | None = None,
    lr_key: str = "segment.train.lr",
) -> tuple[Autoencoder, list[dict]]:
    """(trained autoencoder with its best-validation weights, per-epoch history).
    `image_shape` (channels, height, width) of the rows of `x` when they are images;
    `lr_key` the params key a diverged run names."""
    x_train, x_val = held_out_split(x, seed)
    arrays = {"x_train": x_train, "x_val": x_val, "y_val": x_val}
    task = AutoencoderTask(config, x.shape[1], train.loss, train.huber_delta, image_shape)
    data_hash = data_fingerprint(x)
    name = run_name(stage, config_to_dict(config), config_to_dict(train), seed, data_hash)
    state = train_job(arrays, task, train, name, logger, lr_key=lr_key).state
    model = Autoencoder(config, x.shape[1], image_shape)
    model.load_state_dict(state["best_model"] or state["model"])
    return model.eval(), state["history"]


def held_out_split(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, a seeded VALIDATION_SHARE of the rows for early stopping)."""
    order = np.random.default_rng(seed).permutation(len(x))
    cut = max(1, int(len(x) * VALIDATION_SHARE))
    return x[order[cut:]], x[order[:cut]]


def train_vae(
    images: np.ndarray,
    config: VaeConfig,
    train: TrainConfig,
    seed: int,
    logger: RunLogger | None,
    stage: str,
    lr_key: str,
) -> VAE:
    """A VAE trained on `images` (N, C, H, W) in [0, 1], with its best-validation weights:
    its codes (the encoder's means) are a space to cluster in, smoothed by the KL term."""
    x_train, x_val = held_out_split(images, seed)
    no_labels = np.zeros(len(x_train), dtype=np.int64)  # the VAE reads the images only
    arrays = {"x_train": x_train, "y_train": no_labels, "x_val": x_val, "y_val": x_val}
    shape = tuple(images.shape[1:])
    name = run_name(
        stage, config_to_dict(config), config_to_dict(train), seed, data_fingerprint(images)
    )
    state = train_job(arrays, VaeTask(config, shape), train, name, logger, lr_key=lr_key).state
    model = VAE(config, shape)
    model.load_state_dict(state["best_model"] or state["model"])
    return model.eval()


def vae_codes(model: VAE, images: np.ndarray) -> np.ndarray:
    """Each image's code: the mean of its posterior (the draw would add noise)."""
    with torch.no_grad():
        return model.eval().encode(torch.from_numpy(images))[0].numpy()


def encode(model: Autoencoder, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval().encode(torch.from_numpy(x)).numpy()


def refine(
    model: Autoencoder,
    centroids: np.ndarray,
    x: np.ndarray,
    epochs: int,
    weight: float,
    lr: float,
    seed: int,
    batch_size: int = 64,
) -> tuple[Autoencoder, np.ndarray, np.ndarray, np.ndarray]:
    """IDEC: reconstruction + `weight` x KL(target || soft assignment), the target
    recomputed from all points every epoch. Returns the refined model, its centroids, the
    points' new codes and the segment of each (its nearest moved centroid)."""
    torch.manual_seed(seed)
    data = torch.from_numpy(x)
    mu = torch.nn.Parameter(torch.tensor(centroids, dtype=torch.float32))
    optimizer = torch.optim.Adam([*model.parameters(), mu], lr=lr)
    for epoch in range(epochs):
        model.eval()
        with torch.no_grad():
            target = target_distribution(soft_assignment(model.encode(data), mu))
        model.train()
        total = 0.0
        for batch in torch.randperm(len(data)).split(batch_size):
            points = data[batch]
            codes = model.encode(points)
            reconstruction = F.mse_loss(model.decoder(codes), points)
            clustering = F.kl_div(
                soft_assignment(codes, mu).log(), target[batch], reduction="batchmean"
            )
            loss = reconstruction + weight * clustering
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        log.info("refine epoch %d/%d: loss %.4f", epoch + 1, epochs, total / len(data))
    centroids = mu.detach().numpy()
    codes = encode(model, x)
    return model.eval(), centroids, codes, nearest_centroid(codes, centroids)


def nearest_centroid(codes: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The segment of each code: its nearest centroid."""
    return np.argmin(((codes[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)


def data_fingerprint(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]
