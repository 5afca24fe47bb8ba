"""Bad input through the stage commands as DVC runs them: each malformed params value,
unknown key, corrupt image, ragged CSV, empty data set or non-UTF-8 text ends the stage
with exit code 2 and one line on stderr naming the key, file or row, never a traceback,
and the earlier output stays."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.selfsupervised.ingest_corpus import ingest_corpus
from pipelines.stagekit.stage import stage_command
from pipelines.supervised.prepare import prepare
from tests.helpers import write_csv, write_image_folder

SIZES = {"dark": [(8, 8)] * 10, "light": [(8, 8)] * 10}


def image_folder(tmp: Path) -> Path:
    return write_image_folder(tmp / "images", SIZES)


def corrupt_image(tmp: Path) -> Path:
    root = image_folder(tmp)
    (root / "light" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def empty_class(tmp: Path) -> Path:
    root = image_folder(tmp)
    (root / "birds").mkdir()
    return root


def no_classes(tmp: Path) -> Path:
    (tmp / "nothing").mkdir()
    return tmp / "nothing"


def table(tmp: Path, rows: list[list[object]], name: str = "table.csv") -> Path:
    return write_csv(tmp / name, ["a", "b", "label"], rows)


def ragged_csv(tmp: Path) -> Path:
    return table(tmp, [[1, 2, "x"], [3, "y"], [5, 6, "y"]] * 4)


def header_only_csv(tmp: Path) -> Path:
    return table(tmp, [])


def latin1_csv(tmp: Path) -> Path:
    path = table(tmp, [[1, 2, "x"], [3, 4, "y"]] * 6)
    path.write_bytes(path.read_bytes() + "7,8,caf\xe9\n".encode("latin-1"))
    return path


def non_number_csv(tmp: Path) -> Path:
    return table(tmp, [[1, 2, "x"], [3, "four", "y"]] * 6)


def csv_params(text: str) -> str:
    return "prepare:\n  format: csv\n  label_column: label\n" + text


# (what is wrong, how to make the data, params.yaml text, what the one line must name)
PREPARE_CASES: list[tuple[str, Callable[[Path], Path], str, str]] = [
    ("corrupt image", corrupt_image, "", "broken.png: unreadable image"),
    ("a class folder without images", empty_class, "", "birds: class folder has no"),
    ("no class folders", no_classes, "", "nothing"),
    ("ragged CSV row", ragged_csv, csv_params(""), "row 3"),
    ("CSV with a header only", header_only_csv, csv_params(""), "no data rows"),
    ("CSV not UTF-8", latin1_csv, csv_params(""), "UTF-8"),
    ("a text in a number column", non_number_csv, csv_params(""), "row 3"),
    ("unknown params key", image_folder, "prepare:\n  imag_size: [8, 8]\n", "prepare.imag_size"),
    ("params value of the wrong type", image_folder, "prepare:\n  seed: zero\n", "prepare.seed"),
    ("params out of range", image_folder, "prepare:\n  val_fraction: 1.5\n", "val_fraction"),
    ("params not YAML", image_folder, "prepare: [\n", "not valid YAML"),
]


def run_stage(function: Callable, argv: list[str], capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as ended:
        stage_command(function, argv, name=function.__name__)
    err = capsys.readouterr().err.strip().splitlines()
    return ended.value.code, err


@pytest.mark.parametrize(
    ("make", "params", "named"),
    [case[1:] for case in PREPARE_CASES],
    ids=[case[0] for case in PREPARE_CASES],
)
def test_prepare_refuses_in_one_line_naming_what_is_wrong(tmp_path, capsys, make, params, named):
    out = tmp_path / "prepared"
    good = image_folder(tmp_path / "good")
    (tmp_path / "good.yaml").write_text("")
    stage_command(
        prepare,
        ["--params", str(tmp_path / "good.yaml"), "--source", str(good), "--output", str(out)],
    )
    before = (out / "manifest.json").read_text()

    source = make(tmp_path)
    (tmp_path / "params.yaml").write_text(params)
    code, err = run_stage(
        prepare,
        ["--params", str(tmp_path / "params.yaml"), "--source", str(source), "--output", str(out)],
        capsys,
    )
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("prepare: error: ") and named in err[0], err[0]
    assert (out / "manifest.json").read_text() == before  # the earlier output stays


def test_a_corpus_file_that_is_not_utf8_is_named(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "good.txt").write_text("a plain sentence about functions.\n" * 50)
    (folder / "bad.txt").write_bytes("r\xe9sum\xe9 in latin-1\n".encode("latin-1"))
    (tmp_path / "params.yaml").write_text(json.dumps({"mlm": {"source": str(folder)}}))
    code, err = run_stage(
        ingest_corpus,
        ["--params", str(tmp_path / "params.yaml"), "--output", str(tmp_path / "corpus")],
        capsys,
    )
    assert code == 2 and len(err) == 1, err
    assert "bad.txt" in err[0] and "UTF-8" in err[0], err[0]
