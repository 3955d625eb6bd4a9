"""Shared fixtures. torch is the oracle; its CPU kernels run single-threaded for repeatability."""

import os

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


from hypothesis import HealthCheck, settings  # noqa: E402

# `pytest` runs the quick profile (25 examples per property); `--hypothesis-profile=ci` 300 and
# `--hypothesis-profile=deep` 2,000.
settings.register_profile(
    "default",
    max_examples=25,
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
