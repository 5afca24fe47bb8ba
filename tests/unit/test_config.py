from pathlib import Path

import pytest

from pipelines.stagekit.config import PipelineConfig, load_config
from pipelines.stagekit.errors import UserError
from tests.helpers import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repository_params_load_and_match_the_documented_defaults():
    config = load_config(REPO / "params.yaml")
    assert isinstance(config, PipelineConfig)
    assert config.prepare.image_size == (8, 8)
    assert config.model.kind == "cnn" and config.train.optimizer == "adam"


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == PipelineConfig()


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
