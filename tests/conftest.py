"""Shared fixtures. torch is the oracle; its CPU kernels run single-threaded for repeatability."""

import os

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# tests/multidevice needs 8 devices: tests/test_sharding.py runs it in a process of its own with
# XLA_FLAGS=--xla_force_host_platform_device_count=8 (JAX reads it once, at start-up)
if "xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
    collect_ignore = ["multidevice"]


# the longest tests start first, so that no worker of pytest-xdist (-n auto) ends the run alone
# on one of them
LONGEST_FIRST = (
    "tests/test_sharding.py::test_multidevice_suite_on_8_fake_cpu_devices",
    "tests/test_sharding.py::test_multidevice_scale_tests_on_8_fake_cpu_devices",
    "tests/test_fuzz.py::test_float64_under_x64",
    "tests/test_bench.py::test_command_end_to_end_writes_json_and_png",
    "tests/test_docs.py::test_page_blocks_run_in_order[guides/collections.md]",
)


def pytest_collection_modifyitems(config, items):
    rank = {nodeid: k for k, nodeid in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid, len(rank)))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


from hypothesis import HealthCheck, settings  # noqa: E402

# `pytest` runs the quick profile (15 examples per property, sized to keep the README's test
# command within 10 minutes on 2 cores); `--hypothesis-profile=ci` 300 and
# `--hypothesis-profile=deep` 2,000.
settings.register_profile(
    "default",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("default")
