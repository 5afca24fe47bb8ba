"""ONNX Runtime classifier: load an exported model and its card, predict batches.

No Ray here: the same class runs in a notebook, a test or a Serve replica. Inputs are
checked against the model card so a client mistake becomes an `InputError` naming the
field, never an onnxruntime stack trace.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any

import numpy as np

from serving.contracts import card_info, read_card
from serving.model_source import ModelFiles
from serving.preprocess import image_to_array
from serving.runtime import ort_session

MAX_IMAGE_PIXELS = 4096 * 4096
"""Larger images are refused before they are decoded."""


class InputError(ValueError):
    """A request the model cannot take; `field` names the offending part (e.g. `images[2]`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ClassifierPredictor:
    def __init__(self, files: ModelFiles, threads: int = 1, use_gpu: bool | None = None) -> None:

        self.files = files
        self.card = read_card(files, "classification", "a classifier")
        self.session = ort_session(files.onnx, threads, use_gpu)
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = tuple(self.card["input"]["shape"][1:])
        self.class_names: list[str] = self.card["class_names"]
        self.pixel_input = self.card["input"]["kind"] == "image"
        self.sequence_input = self.card["input"]["kind"] == "sequence"
        # Values per input: a sequence's depend on its length (`channels` per step).
        self.feature_count = 0 if self.sequence_input else math.prod(self.input_shape)
        # A sequence model's input is (time, channels), any length up to max_length.
        self.channels = self.input_shape[-1]
        self.max_length = self.card["preprocessing"].get("max_length", 0)
        self.input_field = "sequences" if self.sequence_input else "instances"

    def info(self) -> dict[str, Any]:
        return {
            **card_info(self.files, self.card, self.session),
            "input": self.card["input"],
            "class_names": self.class_names,
            "preprocessing": self.card["preprocessing"],
        }

    def features_to_array(self, instances: list[list[float]]) -> np.ndarray:
        """Feature vectors (flattened inputs, e.g. 64 pixels in [0, 1]) -> model input batch."""
        if self.sequence_input:
            raise InputError("instances", "this model takes time series (`sequences`)")
        for i, row in enumerate(instances):
            if len(row) != self.feature_count:
                raise InputError(
                    f"instances[{i}]",
                    f"expected {self.feature_count} values (input shape {list(self.input_shape)}), "
                    f"got {len(row)}",
                )
        # Checked as sent (float64), then narrowed: 1.00000001 is out of range although it
        # rounds to 1.0 in float32, and the OpenAPI document says so.
        array = np.asarray(instances, dtype=np.float64)
        # One or two reductions on the happy path (this runs for every request): pixels in
        # [0, 1] are also finite, and a NaN fails both comparisons. The ufuncs' own reduce,
        # not ndarray.min/max: their Python wrappers cost as much as the reduction here.
        if self.pixel_input:
            if array.size and not (
                np.minimum.reduce(array, axis=None) >= 0.0
                and np.maximum.reduce(array, axis=None) <= 1.0
            ):
                self._refuse_values(array)
        elif not np.isfinite(array).all():
            self._refuse_values(array)
        return array.astype(np.float32).reshape((len(instances), *self.input_shape))

    def _refuse_values(self, array: np.ndarray) -> None:
        """Raise the InputError naming the first row with a value the model cannot take."""
        finite = np.isfinite(array)
        if not finite.all():
            row = int(np.argwhere(~finite)[0][0])
            raise InputError(f"instances[{row}]", "values must be finite numbers")
        row = int(np.argwhere((array < 0.0) | (array > 1.0))[0][0])
        raise InputError(f"instances[{row}]", "pixel values must be in [0, 1] (pixels / 255)")

    def images_to_array(self, images: list[str]) -> np.ndarray:
        """Base64-encoded PNG/JPEG images -> model input batch, preprocessed like training."""
        from PIL import Image, UnidentifiedImageError

        if self.card["input"]["kind"] != "image":
            raise InputError("images", f"this model takes `{self.input_field}`, not images")
        prep = self.card["preprocessing"]
        arrays = []
        for i, encoded in enumerate(images):
            try:
                raw = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise InputError(f"images[{i}]", "not valid base64") from None
            try:
                with Image.open(io.BytesIO(raw)) as image:
                    # The header's size, before decoding: a few hundred bytes can claim a
                    # picture that takes gigabytes to decode (a decompression bomb).
                    if image.width * image.height > MAX_IMAGE_PIXELS:
                        raise InputError(
                            f"images[{i}]",
                            f"image dimensions too large ({image.width}x{image.height}; at "
                            f"most {MAX_IMAGE_PIXELS:,} pixels)",
                        )
                    image.load()
                    arrays.append(
                        image_to_array(image, tuple(prep["image_size"]), prep["grayscale"])
                    )
            except InputError:
                raise
            except Image.DecompressionBombError:
                raise InputError(f"images[{i}]", "image dimensions too large") from None
            except (UnidentifiedImageError, OSError, ValueError):
                raise InputError(f"images[{i}]", "not a readable PNG or JPEG image") from None
        return np.stack(arrays)

    def sequences_to_array(self, sequences: list[list[list[float]]]) -> np.ndarray:
        """Time series ([time][channel] values, any lengths up to max_length) -> one batch
        (n, T, C), each padded with NaN after its end to the longest one's length T (the
        graph reads each length from there; models/recurrent.py). The values are finite:
        the request schema refused NaN and infinity."""
        if not self.sequence_input:
            takes = "`instances` or `images`" if self.pixel_input else "`instances`"
            raise InputError("sequences", f"this model takes {takes}, not time series")
        for i, sequence in enumerate(sequences):
            if not sequence:
                raise InputError(f"sequences[{i}]", "empty: send at least one time step")
            if len(sequence) > self.max_length:
                raise InputError(
                    f"sequences[{i}]",
                    f"{len(sequence)} time steps; the model takes at most {self.max_length}",
                )
            for t, step in enumerate(sequence):
                if len(step) != self.channels:
                    raise InputError(
                        f"sequences[{i}][{t}]",
                        f"expected {self.channels} channel values, got {len(step)}",
                    )
        steps = max(len(sequence) for sequence in sequences)
        batch = np.full((len(sequences), steps, self.channels), np.nan, dtype=np.float32)
        for i, sequence in enumerate(sequences):
            batch[i, : len(sequence)] = sequence
        return batch

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    def classify(self, batch: np.ndarray) -> list[dict[str, Any]]:
        return self.predictions(self.predict_proba(batch))

    def classify_many(self, batches: list[np.ndarray]) -> list[list[dict[str, Any]] | InputError]:
        """Several requests' batches in one onnxruntime call (dynamic batching); each
        request gets its own predictions, or the InputError that only it caused."""
        return self.answers(self.probabilities_of(batches), [len(batch) for batch in batches])

    def probabilities_of(self, batches: list[np.ndarray]) -> np.ndarray:
        """The rows of all `batches`, in order, through one onnxruntime call."""
        if self.sequence_input:  # one length for all: pad each to the longest with NaN
            steps = max(batch.shape[1] for batch in batches)
            batches = [pad_time(batch, steps) for batch in batches]
        return self.predict_proba(np.concatenate(batches))

    def predictions(self, probabilities: np.ndarray) -> list[dict[str, Any]]:
        """One request's predictions; InputError if a row is not finite."""
        (answer,) = self.answers(probabilities, [len(probabilities)])
        if isinstance(answer, InputError):
            raise answer
        return answer

    def answers(
        self, probabilities: np.ndarray, sizes: list[int]
    ) -> list[list[dict[str, Any]] | InputError]:
        """The predictions of several requests whose rows are `probabilities` in order,
        `sizes[i]` rows each: each request's list, or the InputError naming its first row
        whose output is not finite (e.g. huge feature values overflowing). The numpy calls
        are made once for all the requests: per request, their fixed cost (~1-3 us each)
        was more than its Python rows."""
        finite = np.isfinite(probabilities).all(axis=1).tolist()
        best = probabilities.argmax(axis=1).tolist()
        rows = probabilities.tolist()
        names = self.class_names
        answers: list[list[dict[str, Any]] | InputError] = []
        start = 0
        for size in sizes:
            end = start + size
            if all(finite[start:end]):
                answers.append(
                    [
                        {
                            "label": names[i],
                            "class_index": i,
                            "confidence": row[i],
                            "probabilities": dict(zip(names, row)),
                        }
                        for i, row in zip(best[start:end], rows[start:end], strict=True)
                    ]
                )
            else:
                answers.append(
                    InputError(
                        f"{self.input_field}[{finite[start:end].index(False)}]",
                        "values out of range: the model's output is not finite",
                    )
                )
            start = end
        return answers


def pad_time(batch: np.ndarray, steps: int) -> np.ndarray:
    """A (n, T, C) batch of sequences padded with NaN to `steps` time steps."""
    if batch.shape[1] == steps:
        return batch
    padding = np.full((len(batch), steps - batch.shape[1], batch.shape[2]), np.nan, batch.dtype)
    return np.concatenate([batch, padding], axis=1)
