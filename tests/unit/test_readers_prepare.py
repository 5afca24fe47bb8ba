"""Users' own data through `prepare`: image folders and CSV tables, good and malformed."""

import json

import numpy as np
import pytest

from pipelines.stagekit.dataset import load_prepared, sha256_file
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.readers import read_csv_table, read_image_folder
from pipelines.supervised.config import PrepareConfig
from pipelines.supervised.prepare import prepare
from tests.helpers import write_csv, write_image_folder

SIZES = {"dark": [(10, 12), (30, 20), (16, 16)] * 3, "light": [(9, 9), (40, 25)] * 5}


def test_image_folder_any_size_is_resized(tmp_path):
    root = write_image_folder(tmp_path / "imgs", SIZES, rgb=True)
    raw = read_image_folder(root, (6, 5), grayscale=False)
    assert raw.features.shape == (19, 3, 6, 5)
    assert raw.class_names == ("dark", "light")
    assert 0.0 <= raw.features.min() and raw.features.max() <= 1.0
    dark = raw.features[raw.labels == 0].mean()
    assert dark < raw.features[raw.labels == 1].mean()


def test_prepare_images_writes_stratified_splits_and_a_verifiable_manifest(tmp_path):
    root = write_image_folder(tmp_path / "imgs", SIZES)
    config = PrepareConfig(source=str(root), image_size=(8, 8), val_fraction=0.2, test_fraction=0.2)
    manifest = prepare(config, str(root), str(tmp_path / "out"))
    data = load_prepared(tmp_path / "out")
    assert manifest["input_shape"] == [1, 8, 8]
    assert sum(manifest["splits"][s]["size"] for s in ("train", "val", "test")) == 19
    for split in ("train", "val", "test"):
        assert set(manifest["splits"][split]["class_counts"]) == {"dark", "light"}
        assert min(manifest["splits"][split]["class_counts"].values()) >= 1
        name = f"x_{split}.npy"
        assert manifest["arrays"][name]["sha256"] == sha256_file(tmp_path / "out" / name)
    assert data.x("train").dtype == np.float32 and data.y("train").dtype == np.int64
    assert len(manifest["normalization"]["mean"]) == 1  # one channel


def test_the_same_seed_gives_the_same_split(tmp_path):
    root = write_image_folder(tmp_path / "imgs", SIZES)
    config = PrepareConfig(source=str(root), val_fraction=0.2, test_fraction=0.2)
    a = prepare(config, str(root), str(tmp_path / "a"))
    b = prepare(config, str(root), str(tmp_path / "b"))
    assert a["arrays"] == b["arrays"]


def test_csv_classification_and_regression(tmp_path):
    rows = [[i, i * 0.5, "cat" if i % 2 else "dog", i * 2.0] for i in range(30)]
    path = write_csv(tmp_path / "t.csv", ["a", "b", "animal", "price"], rows)
    raw = read_csv_table(path, "animal", ("a", "b"), "classification")
    assert raw.features.shape == (30, 2) and raw.class_names == ("cat", "dog")
    reg = read_csv_table(path, "price", ("a", "b"), "regression")
    assert reg.labels.dtype == np.float32 and reg.labels[3] == 6.0
    config = PrepareConfig(
        source=str(path),
        format="csv",
        task="regression",
        label_column="price",
        feature_columns=("a", "b"),
    )
    manifest = prepare(config, str(path), str(tmp_path / "out"))
    assert manifest["task"] == "regression" and manifest["class_names"] is None
    assert manifest["feature_names"] == ["a", "b"]


@pytest.mark.parametrize(
    ("rows", "label", "features", "message"),
    [
        ([[1, 2, "x"]], "missing", (), "label column 'missing' not found; columns are: a, b, y"),
        ([[1, 2, "x"]], "y", ("a", "zz"), "feature column 'zz' not found"),
        ([[1, 2, "x"], [1, "abc", "y"]], "y", (), "row 3, column 'b': 'abc' is not a number"),
        ([[1, 2, "x"], [1, "", "y"]], "y", (), "row 3, column 'b': '' is not a number"),
        (
            [[1, 2, "x"], [1, "nan", "y"]],
            "y",
            (),
            "row 3, column 'b': 'nan' is not a finite number",
        ),
        ([[1, 2, "x"], [1, 2]], "y", (), "row 3 has 2 fields, the header has 3"),
        ([[1, 2, "x"], [3, 4, "x"]], "y", (), "single class"),
        ([], "y", (), "no data rows"),
    ],
)
def test_malformed_csv_names_the_row_and_column(tmp_path, rows, label, features, message):
    path = write_csv(tmp_path / "bad.csv", ["a", "b", "y"], rows)
    with pytest.raises(UserError) as caught:
        read_csv_table(path, label, features, "classification")
    assert message in str(caught.value) and "bad.csv" in str(caught.value)


def test_unreadable_image_and_empty_class_are_named(tmp_path):
    root = write_image_folder(tmp_path / "imgs", SIZES)
    broken = root / "light" / "broken.png"
    broken.write_bytes(b"definitely not a png")
    with pytest.raises(UserError, match=r"broken\.png: unreadable image"):
        read_image_folder(root, (8, 8), True)
    broken.unlink()
    (root / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: class folder has no \.png/\.jpg images"):
        read_image_folder(root, (8, 8), True)


def test_a_class_too_small_to_split_is_named(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"dark": [(8, 8)] * 9, "rare": [(8, 8)] * 2})
    config = PrepareConfig(source=str(root))
    with pytest.raises(UserError, match="class 'rare' has 2 example"):
        prepare(config, str(root), str(tmp_path / "out"))


def test_failed_prepare_keeps_the_previous_output_and_leaves_no_debris(tmp_path):
    root = write_image_folder(tmp_path / "imgs", SIZES)
    config = PrepareConfig(source=str(root), val_fraction=0.2, test_fraction=0.2)
    out = tmp_path / "out"
    prepare(config, str(root), str(out))
    before = json.loads((out / "manifest.json").read_text())
    (root / "light" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError):
        prepare(config, str(root), str(out))
    assert json.loads((out / "manifest.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out"]  # no temp folders


def test_tampered_array_is_detected(tmp_path):
    root = write_image_folder(tmp_path / "imgs", SIZES)
    prepare(
        PrepareConfig(source=str(root), val_fraction=0.2, test_fraction=0.2),
        str(root),
        str(tmp_path / "o"),
    )
    np.save(tmp_path / "o" / "y_test.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(UserError, match="y_test.npy: sha256 differs"):
        load_prepared(tmp_path / "o")


def test_csv_that_is_not_utf8_and_row_numbers_after_blank_lines(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("a,y\n1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        read_csv_table(latin, "y", (), "classification")
    gaps = tmp_path / "gaps.csv"
    gaps.write_text("a,y\n1,x\n\n\n2,\n")
    with pytest.raises(UserError, match="row 5, column 'y': empty label"):
        read_csv_table(gaps, "y", (), "classification")
