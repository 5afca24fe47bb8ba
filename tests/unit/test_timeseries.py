"""Time series without Ray: the recurrent networks on NaN-padded sequences, their ONNX
export at any length, the .ts / long-form CSV readers and prepare_timeseries, and the
classifier's `sequences` input (onnxruntime, the real ASGI app in-process)."""

import json

import numpy as np
import onnx
import pytest
import torch
from starlette.testclient import TestClient

from models.architecture import ArchitectureConfig
from models.networks import build_network
from models.recurrent import reversal_index
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.model_bundle import build_model, inference_model
from pipelines.stagekit.onnx_export import check_parity, export_onnx, write_parity_sample
from pipelines.stagekit.sequences import pad_sequences, read_long_csv, sequence_lengths
from pipelines.supervised.ingest_timeseries import ingest_timeseries
from pipelines.supervised.prepare_timeseries import prepare_timeseries
from pipelines.supervised.timeseries_config import TimeseriesConfig
from serving.http_api import HttpApi, Limits
from serving.model_slots import LoadedModels
from serving.model_source import resolve_model
from serving.predictor import ClassifierPredictor, InputError

KINDS = ["rnn", "lstm", "gru"]


def padded_batch(lengths, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return pad_sequences([rng.normal(size=(n, channels)).astype(np.float32) for n in lengths])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_never_changes_a_sequences_answer(kind, bidirectional):
    torch.manual_seed(0)
    arch = ArchitectureConfig(
        kind=kind, recurrent_size=8, recurrent_layers=2, bidirectional=bidirectional
    )
    net = build_network(arch, (9, 3), num_outputs=4).eval()
    batch = torch.from_numpy(padded_batch([9, 4, 1, 6]))
    with torch.no_grad():
        together = net(batch)
        for i, length in enumerate([9, 4, 1, 6]):
            alone = net(batch[i : i + 1, :length])  # no padding at all
            assert torch.allclose(together[i], alone[0], atol=1e-5)
    net(batch).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_a_backward_direction_reads_each_sequence_from_its_own_end():
    index = reversal_index(torch.tensor([3, 5]), steps=5)
    assert index.tolist() == [[2, 1, 0, 3, 4], [4, 3, 2, 1, 0]]


def test_sequences_need_a_recurrent_kind_and_recurrent_kinds_need_sequences():
    with pytest.raises(ValueError, match="rnn, lstm or gru"):
        build_network(ArchitectureConfig(kind="mlp"), (9, 3), 2)
    with pytest.raises(ValueError, match="time, channels"):
        build_network(ArchitectureConfig(kind="lstm"), (1, 8, 8), 2)


@pytest.fixture(scope="module")
def vowels(tmp_path_factory):
    """aeon's bundled JapaneseVowels through ingest_timeseries and prepare_timeseries."""
    root = tmp_path_factory.mktemp("vowels")
    config = TimeseriesConfig(source=str(root / "raw"))
    ingest_timeseries(config, output=str(root / "raw"))
    manifest = prepare_timeseries(config, output=str(root / "prepared"))
    return root, manifest


@pytest.mark.parametrize("kind", KINDS)
def test_each_network_learns_japanese_vowels_in_a_few_epochs(kind, vowels):
    """Real data, a few epochs of plain torch: the training loss falls well below its start."""
    root, manifest = vowels
    x = torch.from_numpy(np.load(root / "prepared" / "x_train.npy"))
    y = torch.from_numpy(np.load(root / "prepared" / "y_train.npy"))
    torch.manual_seed(0)
    arch = ArchitectureConfig(kind=kind, recurrent_size=32, hidden_sizes=(32,), dropout=0.0)
    model = build_model(arch, manifest)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005)
    epoch_losses = []
    for _ in range(4):
        order, total = torch.randperm(len(x)), 0.0
        for start in range(0, len(x), 16):
            batch = order[start : start + 16]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        epoch_losses.append(total / len(x))
    assert epoch_losses[-1] < 0.5 * epoch_losses[0], epoch_losses


MANIFEST = {
    "task": "classification",
    "input_kind": "sequence",
    "input_shape": [9, 3],
    "class_names": ["a", "b", "c"],
    "normalization": {"mean": [0.0, 0.1, -0.1], "std": [1.0, 2.0, 0.5]},
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("layers", "bidirectional"), [(1, True), (2, True), (2, False)])
def test_export_takes_any_batch_and_length(tmp_path, kind, layers, bidirectional):
    """Each layer is one ONNX recurrent operator over both directions, fed each sequence's
    length: no reversal or summary gathers left in the graph, torch's answers at any
    length and batch."""
    torch.manual_seed(0)
    arch = ArchitectureConfig(
        kind=kind, recurrent_size=8, recurrent_layers=layers, bidirectional=bidirectional
    )
    model = inference_model(build_model(arch, MANIFEST), "classification")
    path = tmp_path / "m.onnx"
    export_onnx(
        model, torch.from_numpy(padded_batch([9, 4])), path, 18, dynamic_axes=("batch", "time")
    )
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count(kind.upper()) == layers and "GatherElements" not in ops
    for lengths in ([9, 4, 1, 6, 2], [3], [20, 17]):  # 20 steps: longer than any at export
        parity = check_parity(model, path, padded_batch(lengths, seed=len(lengths)))
        assert parity.holds(1e-5, classification=True), (lengths, parity)


def test_a_ts_folder_keeps_the_archives_split(vowels):
    root, manifest = vowels
    splits = {s: manifest["splits"][s]["size"] for s in ("train", "val", "test")}
    assert splits == {"train": 216, "val": 54, "test": 370}  # 270 train + 370 test files
    assert manifest["input_kind"] == "sequence" and manifest["input_shape"] == [29, 12]
    assert manifest["preprocessing"]["lengths"] == {"min": 7, "max": 29}
    lengths = sequence_lengths(np.load(root / "prepared" / "x_test.npy"))
    assert lengths.min() == 7 and lengths.max() == 29  # padded, never cut


def test_an_unknown_bundled_set_names_the_choices(tmp_path):
    with pytest.raises(UserError, match="timeseries.dataset.*GunPoint"):
        ingest_timeseries(TimeseriesConfig(dataset="Nope"), output=str(tmp_path / "raw"))


def long_csv(tmp_path, rows, header="series,step,x,y,label"):
    path = tmp_path / "series.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_a_long_csv_orders_steps_and_pads_ragged_series(tmp_path):
    rows = [
        f"s{s},{t},{s + t},{-t},{'up' if s % 2 else 'down'}" for s in range(20) for t in (2, 0, 1)
    ]
    rows += ["s99,0,1,1,up"]
    found = read_long_csv(long_csv(tmp_path, rows), "series", "step", "label", ())
    assert found.x.shape == (21, 3, 2) and found.channel_names == ("x", "y")
    assert found.x[1, :, 0].tolist() == [1.0, 2.0, 3.0]  # ordered by step
    assert np.isnan(found.x[-1, 1:]).all()  # a shorter series: NaN after its end
    config = TimeseriesConfig(source=str(tmp_path / "series.csv"), format="csv")
    manifest = prepare_timeseries(config, output=str(tmp_path / "prepared"))
    assert manifest["class_names"] == ["down", "up"]
    assert sum(manifest["splits"][s]["size"] for s in ("train", "val", "test")) == 21


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["a,0,1,2,up", "a,1,1,2,down"], "labeled both"),
        (["a,0,1,2,up", "a,0,3,4,up"], "same 'step' twice"),
        (["a,0,1,inf,up"], "not a finite number"),
        (["a,0,1,,up"], "is not a number"),
        (["a,0,1,2"], "fields"),
    ],
)
def test_a_bad_long_csv_names_the_row(tmp_path, rows, message):
    with pytest.raises(UserError, match=message):
        read_long_csv(long_csv(tmp_path, rows), "series", "step", "label", ())


def test_a_missing_column_names_the_choices(tmp_path):
    path = long_csv(tmp_path, ["a,0,1,2,up"])
    with pytest.raises(UserError, match="'when' not found; columns are: series"):
        read_long_csv(path, "series", "when", "label", ())


def test_too_long_a_series_is_refused_at_prepare(vowels, tmp_path):
    config = TimeseriesConfig(source=str(vowels[0] / "raw"), max_length=20)
    with pytest.raises(UserError, match="29 steps, more than timeseries.max_length 20"):
        prepare_timeseries(config, output=str(tmp_path / "prepared"))
    assert not (tmp_path / "prepared").exists()


@pytest.fixture(scope="module")
def sequence_export(tmp_path_factory):
    """An untrained GRU over 3 channels, exported with its card like export_timeseries."""
    directory = tmp_path_factory.mktemp("sequence_export")
    torch.manual_seed(0)
    arch = ArchitectureConfig(kind="gru", recurrent_size=8)
    servable = inference_model(build_model(arch, MANIFEST), "classification")
    export_onnx(
        servable,
        torch.from_numpy(padded_batch([9, 4])),
        directory / "model.onnx",
        18,
        dynamic_axes=("batch", "time"),
    )
    sample = padded_batch([9, 3, 5, 1])
    with torch.no_grad():
        expected = servable(torch.from_numpy(sample)).numpy()
    parity_sample = write_parity_sample(
        directory, {"model.onnx": ({"input": sample}, {"output": expected})}, 1e-5
    )
    card = {
        "name": "tiny-sequences",
        "task": "classification",
        "class_names": MANIFEST["class_names"],
        "input": {"name": "input", "shape": ["batch", "time", 3], "kind": "sequence"},
        "preprocessing": {"channels": ["x", "y", "z"], "max_length": 50},
        "metrics": {},
        "hashes": {"onnx_sha256": parity_sample["graphs"]["model.onnx"]},
        "parity_sample": parity_sample,
    }
    (directory / "model_card.json").write_text(json.dumps(card))
    return directory, servable


def test_served_sequences_of_different_lengths_match_torch(sequence_export):
    directory, servable = sequence_export
    predictor = ClassifierPredictor(resolve_model(str(directory)))
    sequences = [[[0.1 * t, 1.0, -0.5]] * 1 * (t + 1) for t in range(4)]  # lengths 1-4
    batch = predictor.sequences_to_array(sequences)
    assert batch.shape == (4, 4, 3) and np.isnan(batch[0, 1:]).all()
    with torch.no_grad():
        expected = servable(torch.from_numpy(batch)).numpy()
    answers = predictor.classify(batch)
    assert np.allclose([a["probabilities"]["a"] for a in answers], expected[:, 0], atol=1e-5)
    # Requests of different lengths batched together answer as they do alone.
    together = predictor.classify_many([batch[:1, :1], batch[1:]])
    assert together[0][0]["probabilities"] == pytest.approx(answers[0]["probabilities"], abs=1e-5)


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (
            {"sequences": [[[1.0, 2.0, 3.0]], [[1.0, 2.0]]]},
            '"sequences","1","0"',
            "3 channel values",
        ),
        ({"sequences": [[[1.0, 2.0, 3.0]], []]}, '"sequences","1"]', "empty"),
        ({"sequences": [[[1.0, 2.0, 3.0]] * 51]}, '"sequences","0"]', "at most 50"),
        ({"sequences": []}, "sequences", "empty"),
        ({"sequences": [[["1", 2.0, 3.0]]]}, "sequences", "number"),
        ({"instances": [[0.5] * 27]}, "instances", "sequences"),
        ({"sequences": [[[1.0, 2.0, 3.0]]], "instances": [[1.0]]}, "exactly one", ""),
    ],
)
def test_bad_sequences_are_a_422_naming_the_field(sequence_export, body, field, message):
    directory, _ = sequence_export
    models = LoadedModels(classifier=ClassifierPredictor(resolve_model(str(directory))))
    http = TestClient(HttpApi(models, Limits()))
    response = http.post("/v1/classify", json=body)
    assert response.status_code == 422, response.text
    assert field in response.text and message in response.text
    nan = http.post("/v1/classify", content=b'{"sequences": [[[NaN, 1.0, 2.0]]]}')
    assert nan.status_code == 422 and "finite" in nan.text
    good = http.post("/v1/classify", json={"sequences": [[[1.0, 2.0, 3.0]] * 7, [[0.0] * 3]]})
    assert good.status_code == 200 and len(good.json()["predictions"]) == 2


def test_predictor_refuses_what_the_schema_cannot_see(sequence_export):
    directory, _ = sequence_export
    predictor = ClassifierPredictor(resolve_model(str(directory)))
    with pytest.raises(InputError, match=r"sequences\[0\]\[2\]"):
        predictor.sequences_to_array([[[1.0, 2.0, 3.0]] * 2 + [[1.0]]])


def test_tune_searches_recurrent_kinds_and_sizes_and_refuses_a_kind_that_cannot_read_sequences():
    from pipelines.stagekit.config import TrainConfig
    from pipelines.tuning.config import TuneConfig
    from pipelines.tuning.space import LR_SCALE, trial_settings
    from pipelines.tuning.tune import check_space_fits

    base = ArchitectureConfig(kind="lstm", recurrent_size=16)
    tune = TuneConfig(
        optimizers=("adam", "rmsprop"),
        space={"model.kind": ["lstm", "gru", "rnn"], "model.recurrent_size": [16, 64]},
    )
    check_space_fits(base, TrainConfig(), tune, MANIFEST)
    sample = {
        "optimizer": "rmsprop",
        LR_SCALE: 0.5,
        "model.kind": "gru",
        "model.recurrent_size": 64,
    }
    model, train = trial_settings(base, TrainConfig(), tune, sample)
    assert (model.kind, model.recurrent_size, train.optimizer) == ("gru", 64, "rmsprop")
    wrong = TuneConfig(optimizers=("adam",), space={"model.kind": ["lstm", "cnn"]})
    with pytest.raises(UserError, match="tune.space.model.kind: 'cnn': sequence inputs"):
        check_space_fits(base, TrainConfig(), wrong, MANIFEST)


def test_a_tune_space_takes_names_and_flags_and_names_a_wrong_one(tmp_path):
    from pipelines.stagekit.config import TrainConfig
    from pipelines.tuning.config import TuneConfig
    from pipelines.tuning.space import LR_SCALE, check_space, trial_settings
    from pipelines.tuning.tune import tune_search

    params = tmp_path / "params.yaml"
    params.write_text(
        "tune:\n  space:\n    model.kind: [lstm, gru]\n    model.bidirectional: [true, false]\n"
        "    model.recurrent_size: [32, 64]\n"
    )
    from pipelines.stagekit.config import load_params

    tune = load_params(tune_search, str(params))["tune"]
    assert tune.space["model.kind"] == ("lstm", "gru")
    assert tune.space["model.bidirectional"] == (True, False)
    base = ArchitectureConfig(kind="lstm")
    check_space(base, TrainConfig(), tune)
    sample = {"optimizer": "adam", LR_SCALE: 0.0, "model.bidirectional": False}
    assert trial_settings(base, TrainConfig(), tune, sample)[0].bidirectional is False
    for key, value, message in (
        ("model.kind", "lsmt", "must be one of mlp, cnn, resnet, rnn, lstm, gru"),
        ("model.recurrent_size", "big", "must be a whole number"),
        ("train.weight_decay", "none", "must be a number"),
    ):
        wrong = TuneConfig(optimizers=("adam",), space={key: (value,)})
        with pytest.raises(UserError, match=f"tune.space.{key}: {value!r} is not a valid value"):
            check_space(base, TrainConfig(), wrong)
        with pytest.raises(UserError, match=message):
            trial_settings(
                base, TrainConfig(), wrong, {"optimizer": "adam", LR_SCALE: 0.0, key: value}
            )


def test_a_small_time_series_split_names_the_timeseries_key():
    from pipelines.stagekit.metrics import small_split_warnings

    splits = {"val": {"size": 12, "class_counts": {"a": 6, "b": 6}}, "test": {"size": 300}}
    [warning] = small_split_warnings(splits, "sequence")
    assert "raise timeseries.val_fraction or label more data" in warning
    assert "prepare." not in warning and "evaluate.folds" not in warning


def test_a_long_csv_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "series.csv"
    path.write_bytes("series,step,x,label\nä,0,1,up\n".encode("latin-1"))
    with pytest.raises(UserError, match="series.csv: not UTF-8 text"):
        read_long_csv(path, "series", "step", "label", ())
