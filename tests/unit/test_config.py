from pathlib import Path
from typing import Annotated

import pytest

from models.architecture import ArchitectureConfig
from models.augmentation import AugmentConfig
from pipelines.stagekit.config import (
    ExportConfig,
    Param,
    TrainConfig,
    config_to_dict,
    declared_keys,
    load_params,
    overlay_sections,
)
from pipelines.stagekit.errors import UserError
from pipelines.supervised.config import PrepareConfig
from pipelines.tuning.config import TuneConfig
from tests.helpers import REPO


def supervised_sections(
    prepare: Annotated[PrepareConfig, Param("prepare")],
    model: Annotated[ArchitectureConfig, Param("model")],
    train: Annotated[TrainConfig, Param("train")],
    export: Annotated[ExportConfig, Param("export")],
) -> None:
    """A stand-in stage that reads four whole sections."""


def reads_two_train_keys(
    train: Annotated[TrainConfig, Param("train", reads=("lr", "seed"))],
    tuned: Annotated[str, Param("tuned_params")] = "untuned.yaml",
) -> None:
    """A stand-in stage that reads two keys of `train` and a top-level value."""


def load_config(path: Path) -> dict:
    return load_params(supervised_sections, path)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repository_params_load_and_match_the_documented_defaults():
    config = load_config(REPO / "params.yaml")
    assert config["prepare"].image_size == (8, 8)
    assert config["model"].kind == "cnn" and config["train"].optimizer == "adam"


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == {
        "prepare": PrepareConfig(),
        "model": ArchitectureConfig(),
        "train": TrainConfig(),
        "export": ExportConfig(),
    }


def test_a_stage_gets_only_the_keys_it_declares(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.5\n  epochs: 3\ntuned_params: best.yaml\n")
    assert declared_keys(reads_two_train_keys) == ["train.lr", "train.seed", "tuned_params"]
    arguments = load_params(reads_two_train_keys, path)
    train = arguments["train"]
    assert train.lr == 0.5 and train.seed == 0 and arguments["tuned"] == "best.yaml"
    # An undeclared key raises instead of answering with the class default (40 epochs).
    with pytest.raises(AttributeError, match="TrainConfig.epochs: this stage does not declare"):
        _ = train.epochs
    assert config_to_dict(train) == {"lr": 0.5, "seed": 0}
    assert load_params(reads_two_train_keys, write(tmp_path, ""))["tuned"] == "untuned.yaml"


def test_a_declared_section_is_validated_whole(tmp_path):
    # A stage reading two keys still refuses a typo elsewhere in its section.
    with pytest.raises(UserError, match="unknown key train.epoch;"):
        load_params(reads_two_train_keys, write(tmp_path, "train:\n  epoch: 3\n"))


def test_tuned_settings_are_laid_over_and_validated(tmp_path):
    sections = {"model": ArchitectureConfig(), "train": TrainConfig()}
    tuned = tmp_path / "best.yaml"
    tuned.write_text("train:\n  lr: 0.05\nmodel:\n  dropout: 0.3\n")
    merged = overlay_sections(tuned, sections)
    assert merged["train"].lr == 0.05 and merged["train"].epochs == TrainConfig().epochs
    assert merged["model"].dropout == 0.3
    tuned.write_text("prepare:\n  seed: 1\n")
    with pytest.raises(UserError, match="prepare: only model, train can be set here"):
        overlay_sections(tuned, sections)
    tuned.write_text("train:\n  lr: -1\n")
    with pytest.raises(UserError, match="best.yaml: train.lr must be > 0"):
        overlay_sections(tuned, sections)
    with pytest.raises(UserError, match="not found"):
        overlay_sections(tmp_path / "missing.yaml", sections)


def test_a_tuned_nested_setting_keeps_the_rest_of_its_group(tmp_path):
    augment = AugmentConfig(enabled=True, rotation=10.0, horizontal_flip=True)
    sections = {"model": ArchitectureConfig(), "train": TrainConfig(augment=augment)}
    tuned = tmp_path / "best.yaml"
    tuned.write_text("train:\n  augment:\n    rotation: 5\n")
    merged = overlay_sections(tuned, sections)["train"].augment
    assert merged == AugmentConfig(enabled=True, rotation=5.0, horizontal_flip=True)


def test_a_search_refuses_a_group_of_settings_as_one_key():
    with pytest.raises(ValueError, match="space.train.augment: a group of settings"):
        TuneConfig(space={"train.augment": [0, 1]})


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("train:\n  lr_rate: 0.1\n", "unknown key train.lr_rate"),
        ("trian:\n  lr: 0.1\n", "unknown key trian"),
        ("train:\n  lr: fast\n", "train.lr: expected a number"),
        ("train:\n  lr: -1\n", "train.lr must be > 0"),
        ("train:\n  epochs: 2.5\n", "train.epochs: expected an integer"),
        ("train:\n  optimizer: sgdd\n", "train.optimizer 'sgdd' unknown"),
        ("model:\n  activation: swish\n", "model.activation 'swish'"),
        ("model:\n  pooling: median\n", "model.pooling: expected one of"),
        ("model:\n  channels: [32, x]\n", "model.channels[1]: expected an integer"),
        ("prepare:\n  image_size: [8]\n", "prepare.image_size: expected a list of 2 values"),
        ("prepare:\n  test_fraction: 0.9\n", "prepare.test_fraction must be between"),
        ("train: 3\n", "train: expected a mapping"),
        ("train:\n  amp: yes please\n", "train.amp: expected true or false"),
        ("train:\n  optimizer: nesterov\n  momentum: 0\n", "train.momentum must be > 0"),
        ("export:\n  alias: latest\n", "export.alias 'latest' is not allowed"),
        ("export:\n  parity_atol: 0\n", "export.parity_atol must be > 0"),
    ],
)
def test_bad_params_name_the_key(tmp_path, text, named):
    with pytest.raises(UserError) as caught:
        load_config(write(tmp_path, text))
    assert named in str(caught.value)
    assert "params.yaml" in str(caught.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(UserError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
