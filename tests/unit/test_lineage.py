"""From a served version back to the data, params and commit that made it, on a real MLflow
store: the tags a stage run gets under DVC, and `dlpipe lineage` / /v1/models reading them."""

import datetime
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from pipelines.stagekit import tracking
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.lineage import format_lineage, sha256_tree, stage_record
from serving.model_slots import LoadedModels
from serving.model_source import resolve_model
from tests.helpers import REPO
from tests.unit.test_predictor import export_dir  # noqa: F401  (the exported tiny model)

DVC_YAML = {
    "stages": {
        "train_tiny": {
            "cmd": "python train.py",
            "deps": ["data/prepared", "${overlay}", "train.py", "not_there.csv"],
            "params": ["train", "overlay", "started", {"extra.yaml": None}],
            "outs": ["model.bin"],
        },
        "export_tiny": {"cmd": "python export.py", "deps": ["model.bin"], "outs": ["export"]},
    }
}


@pytest.fixture()
def repo(tmp_path):
    """A repository as DVC sees it: dvc.yaml, params.yaml (with an interpolated dependency)
    and the files its stages read."""
    root = tmp_path / "repo"
    (root / "data/prepared").mkdir(parents=True)
    (root / "data/prepared/x.npy").write_bytes(b"\x00" * 64)
    (root / "train.py").write_text("print('train')\n")
    (root / "extra.yaml").write_text("train: {lr: 0.5}\n")
    (root / "model.bin").write_bytes(b"weights")
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    params = {
        "train": {"lr": 0.01, "optimizer": "adam", "sizes": [8, 4], "classes": list(range(2000))},
        "overlay": "extra.yaml",
        "started": datetime.date(2024, 1, 31),
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def as_dvc_runs(monkeypatch, repo, stage, experiment=None):
    """The environment `dvc repro` (or `dvc exp run`) gives a stage's command, in the
    repository's folder."""
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DVC_STAGE", stage)
    if experiment:
        monkeypatch.setenv("DVC_EXP_NAME", experiment)
        monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    else:
        monkeypatch.delenv("DVC_EXP_NAME", raising=False)


def test_a_folders_hash_changes_with_any_file_its_name_or_a_new_one(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    first = sha256_tree(tmp_path)
    (tmp_path / "a.txt").write_text("b")
    changed = sha256_tree(tmp_path)
    (tmp_path / "a.txt").rename(tmp_path / "c.txt")
    renamed = sha256_tree(tmp_path)
    (tmp_path / "d.txt").write_text("")
    assert len({first, changed, renamed, sha256_tree(tmp_path)}) == 4


def test_a_stage_run_by_dvc_records_each_dependency_and_params_value(repo, monkeypatch):
    as_dvc_runs(monkeypatch, repo, "train_tiny", experiment="brisk-lark")
    (repo / "data/prepared/__pycache__").mkdir()
    (repo / "data/prepared/__pycache__/x.pyc").write_bytes(b"differs on every machine")
    tags = stage_record()
    assert tags["dvc/dep/data/prepared"] == sha256_tree(repo / "data/prepared")
    assert tags["dvc/dep/extra.yaml"] == sha256_tree(repo / "extra.yaml")  # ${overlay}
    assert tags["dvc/dep/train.py"] == sha256_tree(repo / "train.py")
    assert json.loads(tags["dvc/param/train.lr"]) == 0.01
    assert json.loads(tags["dvc/param/train.sizes"]) == [8, 4]
    assert json.loads(tags["dvc/param/overlay"]) == "extra.yaml"
    assert tags["dvc_exp"] == "brisk-lark" and tags["dvc_exp_baseline"] == "abc123"
    assert tags["dvc/dep/not_there.csv"] == "missing"
    assert json.loads(tags["dvc/param/started"]) == "2024-01-31"  # a YAML date
    assert set(json.loads(tags["dvc/param/train.classes"])) == {"sha256"}  # too long to tag
    assert json.loads(tags["dvc/param/extra.yaml:train.lr"]) == 0.5  # `- extra.yaml:` (all)
    # the byte-code cache is not part of a folder's hash (it differs between machines)
    shutil.rmtree(repo / "data/prepared/__pycache__")
    assert tags["dvc/dep/data/prepared"] == sha256_tree(repo / "data/prepared")


def test_a_stage_function_called_outside_dvc_claims_no_dependencies(repo, monkeypatch):
    # Called directly, a stage reads whatever paths it was given, not dvc.yaml's.
    monkeypatch.chdir(repo)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert stage_record() == {}


def register_trained_and_exported(repo, monkeypatch, export_dir):  # noqa: F811
    """A training stage and an export stage as DVC runs them, into a real store."""
    as_dvc_runs(monkeypatch, repo, "train_tiny", experiment="brisk-lark")
    with tracking.stage_run("tiny", "train_tiny", tracking.stage_tags("train_tiny", "d1")) as run:
        tracking.tag_output(run, repo / "model.bin")
    as_dvc_runs(monkeypatch, repo, "export_tiny")
    version, _ = tracking.register_export(
        "export_tiny",
        "tiny",
        "d1",
        repo / "model.bin",
        export_dir / "model.onnx",
        export_dir / "model_card.json",
        "tiny-classifier",
        "champion",
        {"onnx_max_abs_diff": 1e-7},
        extra_files=(export_dir / "parity_sample.npz",),
    )
    return run.run_id, version


def test_lineage_goes_from_the_served_version_to_data_params_and_commit(
    repo,
    monkeypatch,
    stores,
    export_dir,  # noqa: F811
):
    uri = stores()
    train_run, version = register_trained_and_exported(repo, monkeypatch, export_dir)
    chain = tracking.registry_lineage("models:/tiny-classifier@champion")
    assert chain["registered_model"] == "tiny-classifier" and chain["version"] == version
    assert chain["aliases"] == ["champion"]
    assert chain["onnx_sha256"] == {"model.onnx": sha256_tree(export_dir / "model.onnx")}
    assert chain["run"]["id"] == train_run and chain["run"]["experiment"] == "tiny"
    assert chain["git_commit"] == tracking.git_commit()
    train, export = chain["stages"]
    assert train["stage"] == "train_tiny" and train["dvc_exp"] == "brisk-lark"
    assert train["deps"]["data/prepared"] == sha256_tree(repo / "data/prepared")
    assert train["params"]["train.optimizer"] == "adam"
    assert export["stage"] == "export_tiny"
    assert export["deps"] == {"model.bin": sha256_tree(repo / "model.bin")}
    # The `model`/`version` pair of an HTTP answer names the same version.
    assert tracking.registry_lineage("tiny-classifier", version) == chain

    printed = format_lineage(chain)
    assert f"tiny-classifier version {version} @champion" in printed
    assert f"data/prepared sha256 {train['deps']['data/prepared']}" in printed
    assert "train.lr = 0.01" in printed

    # A replica loading the version reports the same chain in /v1/models.
    files = resolve_model("models:/tiny-classifier@champion", uri)
    assert files.lineage == chain
    models = LoadedModels()
    models.load({"classifier": "models:/tiny-classifier@champion"}, {}, uri, 1, False)
    [info] = models.infos()
    assert info["lineage"] == chain


UNKNOWN = [
    ("models:/nope@champion", None, "no registered model 'nope' .registered: tiny-classifier"),
    ("models:/tiny-classifier@gold", None, "has no alias 'gold' .aliases: @champion"),
    ("tiny-classifier", "7", "has no version 7 .versions: 1"),
    ("tiny-classifier", None, "give a version"),
    ("models:/tiny-classifier", None, "expected models:/NAME@ALIAS"),
]


def test_an_unknown_model_alias_or_version_is_named(
    repo,
    monkeypatch,
    stores,
    export_dir,  # noqa: F811
):
    stores()
    register_trained_and_exported(repo, monkeypatch, export_dir)
    for reference, version, message in UNKNOWN:
        with pytest.raises(UserError, match=message):
            tracking.registry_lineage(reference, version)


def test_the_command_prints_one_line_and_exits_2_without_a_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "lineage", "models:/dlpipe-classifier@champion"],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "dlpipe lineage: error: no MLflow store at mlruns/mlflow.db (run the pipeline first, "
        "or set MLFLOW_TRACKING_URI to the team's server)"
    ]
    assert not (tmp_path / "mlruns").exists()  # nothing written
