"""The pipeline report refuses, in one line, to be written before the stages it shows ran."""

import shutil
import subprocess
import sys

from tests.helpers import REPO


def test_a_report_before_the_stages_ran_names_them_and_writes_nothing(tmp_path):
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "mlm.json").write_text("{}")  # one stage has run
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.review.report", "--root", str(tmp_path),
         "--output", str(tmp_path / "reports")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        "report: error: not run yet: train_supervised (metrics/train_supervised.json)"
    )
    for stage in ("export", "tune", "segment", "generate", "train_timeseries"):
        assert f" {stage} (" in line
    assert "pretrain_mlm (metrics/mlm.json)" not in line  # it ran
    assert "run `dvc repro train_supervised export" in line
    assert not (tmp_path / "reports").exists()


def test_outside_a_pipeline_repository_it_says_so(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.review.report", "--root", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"report: error: no dvc.yaml in {tmp_path}: run the report in the pipeline's repository"
    )
