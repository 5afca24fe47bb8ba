"""Stage `ingest_digits`: write scikit-learn's bundled 8x8 digits as an image folder.

The images ship inside scikit-learn (no download). Writing them as `<class>/<n>.png` puts
them under DVC's version control and sends them through the same image-folder reader that
users' own data takes.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from pipelines.stagekit.atomic import output_directory
from pipelines.stagekit.stage import stage_command

log = logging.getLogger(__name__)

DIGITS_MAX_VALUE = 16  # load_digits pixels are counts 0..16 of a 4x4 block


def ingest_digits(
    output: str = "data/raw/digits",
) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / DIGITS_MAX_VALUE)).clip(0, 255).astype(np.uint8)
    with output_directory(output) as staging:
        for index, (image, label) in enumerate(zip(pixels, digits.target)):
            class_dir = staging / str(label)
            class_dir.mkdir(exist_ok=True)
            Image.fromarray(image).save(class_dir / f"{index:04d}.png")
    log.info("wrote %d digit images (10 classes) to %s", len(pixels), output)


if __name__ == "__main__":
    stage_command(ingest_digits)
