"""The classify answer both baseline servers build, shaped like dlpipe's /v1/classify."""

from __future__ import annotations

from typing import Any


def predictions(class_names: list[str], probabilities: Any) -> list[dict[str, Any]]:
    """One prediction per row of `probabilities` (a numpy array or a torch tensor)."""
    results = []
    for row in probabilities:
        best = int(row.argmax())
        results.append(
            {
                "label": class_names[best],
                "class_index": best,
                "confidence": float(row[best]),
                "probabilities": dict(zip(class_names, row.tolist())),
            }
        )
    return results
