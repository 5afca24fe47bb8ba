"""ONNX Runtime customer segmentation: feature records in, segment ids, names, distances out.

No Ray here. Each record is a mapping of feature name to value; the names and their order
come from the model card, so a missing or unknown field, a non-finite value or a negative
count/amount is an `InputError` naming `customers[i].field`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from serving.contracts import card_info, read_card
from serving.model_source import ModelFiles
from serving.predictor import InputError
from serving.runtime import ort_session


class SegmentPredictor:
    def __init__(self, files: ModelFiles, threads: int = 1, use_gpu: bool | None = None) -> None:

        self.files = files
        self.card = read_card(files, "segmentation", "a segmentation model")
        self.session = ort_session(files.onnx, threads, use_gpu)
        self.features: list[str] = self.card["input"]["feature_names"]
        self.non_negative = set(self.card["input"].get("non_negative", []))
        self.names = {s["segment"]: s["name"] for s in self.card["segments"]}

    def info(self) -> dict[str, Any]:
        return {
            **card_info(self.files, self.card, self.session),
            "model": self.card["model"],
            "input": {"feature_names": self.features},
            "segments": self.card["segments"],
        }

    def records_to_array(self, records: list[dict[str, float]]) -> np.ndarray:
        batch = np.zeros((len(records), len(self.features)), dtype=np.float32)
        for i, record in enumerate(records):
            unknown = sorted(set(record) - set(self.features))
            if unknown:
                raise InputError(
                    f"customers[{i}].{unknown[0]}",
                    f"unknown field; expected {', '.join(self.features)}",
                )
            for j, name in enumerate(self.features):
                if name not in record:
                    raise InputError(f"customers[{i}].{name}", "field required")
                value = record[name]
                if not math.isfinite(value):
                    raise InputError(f"customers[{i}].{name}", "must be a finite number")
                if name in self.non_negative and value < 0:
                    raise InputError(f"customers[{i}].{name}", "must be >= 0")
                batch[i, j] = value
        return batch

    def segment(self, batch: np.ndarray) -> list[dict[str, Any]]:
        ids, distances = self.session.run(["segment", "distances"], {"features": batch})
        return [
            {
                "segment": int(s),
                "name": self.names.get(int(s), str(int(s))),
                "distances": [float(d) for d in row],
            }
            for s, row in zip(ids, distances)
        ]
