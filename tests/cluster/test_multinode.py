"""A real two-node Ray cluster on this machine (Ray's own `ray.cluster_utils.Cluster`: a
head and a worker node, separate raylets, 1 CPU each) that loses its worker node, once
during training and once while serving. The scenario is benchmarks/cluster.py's; this test
asserts on its figures (`python -m benchmarks.cluster` writes them to the results table)."""

from __future__ import annotations

import pytest

from benchmarks.cluster import EPOCHS, run_scenario

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_scenario(tmp_path_factory.mktemp("cluster"))


def test_training_places_one_worker_on_each_node(results):
    for run in ("undisturbed_worker_nodes", "node_loss_worker_nodes"):
        nodes = results["placement"][run]
        assert len(nodes) == 2 and len(set(nodes)) == 2, (run, nodes)


def test_training_survives_losing_a_node_within_one_point(results):
    assert results["node_loss_survived"], results
    assert results["resumed_from_epoch"] >= 1  # from a checkpoint, not from scratch
    assert results["epochs_lost"] <= 1  # a checkpoint every epoch
    assert results["recovery_s"] is not None and results["recovery_s"] > 0
    assert abs(results["accuracy_delta"]) <= 0.01, results
    assert results["undisturbed_test_accuracy"] > 0.9


def test_two_replicas_on_two_nodes_and_serving_goes_on_after_one_is_lost(results):
    placement = results["placement"]
    assert len(set(placement["serve_replica_nodes"])) == 2
    assert placement["serve_replicas_answering"] == 2
    assert results["serve_requests"] > 100
    # Only requests in flight on the lost replica may fail; the survivor takes the rest.
    assert results["serve_failed_requests"] <= 0.05 * results["serve_requests"], results
    assert results["serve_replicas_back_s"] is not None


def test_the_scenario_ran_every_epoch(results):
    assert results["epochs"] == EPOCHS
