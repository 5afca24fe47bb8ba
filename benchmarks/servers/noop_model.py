"""No-op models: export folders dlpipe serves like any other, whose graphs do no work.

Each is a copy of a real export (its model card, tokenizer) with the graph replaced by one
that answers a fixed output of the right shape whatever the input: the classifier's the
same probabilities for every image, the encoder's the same embedding for every text. Served
by `dlpipe serve`, it measures everything dlpipe does for a request except the model: the
HTTP server, the ASGI layer, parsing and validation, batching, tokenizing, the answer's
JSON, metrics. `noop` in benchmarks/serving_throughput.py.

    python -m benchmarks.servers.noop_model --classifier artifacts/supervised/export \\
        --encoder artifacts/mlm/export --output /tmp/noop
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np


def constant_graph(
    input_name: str, input_dims: list, output_name: str, row: np.ndarray, leading: int = 1
):
    """input (batch, ...) -> `row` repeated over the input's `leading` axes (1: every batch
    row; 2: every position of a (batch, sequence) input): Shape, Concat and Expand, nothing
    that grows with the input but the output itself. Token-id inputs (two named axes) are
    int64, others float32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    ids = input_dims == ["batch", "sequence"]
    elem_type = TensorProto.INT64 if ids else TensorProto.FLOAT
    constant = row.astype(np.float32).reshape((1,) * leading + row.shape)
    nodes = [
        helper.make_node("Shape", [input_name], ["shape"], end=leading),
        helper.make_node("Concat", ["shape", "row_shape"], ["out_shape"], axis=0),
        helper.make_node("Expand", ["row", "out_shape"], [output_name]),
    ]
    graph = helper.make_graph(
        nodes,
        "noop",
        [helper.make_tensor_value_info(input_name, elem_type, input_dims)],
        [
            helper.make_tensor_value_info(
                output_name, TensorProto.FLOAT, [*input_dims[:leading], *row.shape]
            )
        ],
        [
            numpy_helper.from_array(constant, "row"),
            numpy_helper.from_array(np.array(row.shape, dtype=np.int64), "row_shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what every supported onnxruntime reads
    onnx.checker.check_model(model)
    return model


def _finish(directory: Path, card: dict, graphs: dict) -> None:
    """Parity sample (the graphs' own fixed answers) and hashes, as an export writes them."""
    from pipelines.stagekit.dataset import sha256_file
    from pipelines.stagekit.onnx_export import write_parity_sample
    from serving.runtime import ort_session

    replay = {}
    for file, (input_name, sample) in graphs.items():
        session = ort_session(directory / file)
        output = session.get_outputs()[0].name
        replay[file] = (
            {input_name: sample},
            {output: session.run([output], {input_name: sample})[0]},
        )
    card["parity_sample"] = write_parity_sample(directory, replay, 1e-6)
    card["name"] = f"noop-{card['name']}"
    card["hashes"] = {  # named as the export stages name them
        "onnx_sha256" if f == "model.onnx" else f"{Path(f).stem}_onnx_sha256": sha256_file(
            directory / f
        )
        for f in graphs
    }
    (directory / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True))


def write_noop_classifier(export_dir: Path, output: Path) -> Path:
    """A classifier answering uniform probabilities over the real one's classes."""
    import onnx

    card = json.loads((export_dir / "model_card.json").read_text())
    output.mkdir(parents=True, exist_ok=True)
    spec = card["input"]
    classes = len(card["class_names"])
    graph = constant_graph(spec["name"], spec["shape"], "output", np.full(classes, 1.0 / classes))
    onnx.save(graph, output / "model.onnx")
    sample = np.zeros([2, *spec["shape"][1:]], dtype=np.float32)
    _finish(output, card, {"model.onnx": (spec["name"], sample)})
    return output


def write_noop_encoder(export_dir: Path, output: Path) -> Path:
    """An encoder answering one fixed unit vector for every text (and flat logits for
    fill-mask), tokenizing as the real one does."""
    import onnx

    card = json.loads((export_dir / "model_card.json").read_text())
    output.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(export_dir / card["tokenizer"], output / card["tokenizer"])
    graphs = {}
    for name, spec in card["graphs"].items():
        per_token = name == "fill_mask"
        size = spec["shape"][-1]
        row = np.zeros(size) if per_token else np.full(size, 1.0 / np.sqrt(size))
        graph = constant_graph(
            spec["input"], ["batch", "sequence"], spec["output"], row, 2 if per_token else 1
        )
        onnx.save(graph, output / spec["file"])
        graphs[spec["file"]] = (spec["input"], np.ones((2, 5), dtype=np.int64))
    _finish(output, card, graphs)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default="artifacts/supervised/export")
    parser.add_argument("--encoder", default="artifacts/mlm/export")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    out = Path(args.output)
    print(write_noop_classifier(Path(args.classifier), out / "classifier"))
    print(write_noop_encoder(Path(args.encoder), out / "encoder"))


if __name__ == "__main__":
    main()
