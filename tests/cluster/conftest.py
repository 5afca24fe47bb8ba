"""Tests that start Ray clusters of their own (declared GPUs, several nodes). pytest runs
this folder before tests/integration, whose session cluster starts on first use: one Ray
per process at a time (`ray.init()` would otherwise join the running one)."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def no_other_ray():
    import ray

    if ray.is_initialized():
        pytest.fail(
            "a Ray instance is already running in this process; run tests/cluster before "
            "tests/integration or in a pytest process of its own"
        )
