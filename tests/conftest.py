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
