"""The quick faults of benchmarks/chaos.py (`make chaos` runs them all and records the
figures), on the session's cluster: each must meet its target."""

from __future__ import annotations

import os

import pytest

from benchmarks.chaos import small_pipeline
from benchmarks.faults import data
from benchmarks.workspace import copy_repository

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ray_cluster):
    ws = copy_repository(tmp_path_factory.mktemp("chaos"), ray_cluster)
    ws.edit_params(small_pipeline)
    return ws


def test_an_array_altered_after_prepare_is_refused_naming_the_file(workspace):
    outcome = data.prepared_array_altered(workspace)
    assert outcome["met"], outcome


def test_a_stage_killed_mid_write_leaves_no_partial_output(workspace):
    outcome = data.stage_killed_mid_write(workspace, kills=4)
    assert outcome["met"], outcome
    assert outcome["outputs_complete"] + outcome["outputs_absent"] == 4


@pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting the small tmpfs needs root (CI runs as root)"
)
def test_a_full_output_disk_is_one_clear_error_and_keeps_the_earlier_output(workspace):
    outcome = data.output_dir_full(workspace)
    assert outcome["met"], outcome
