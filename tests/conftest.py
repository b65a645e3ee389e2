"""Shared test configuration: the tests directory is importable (``reference``, ``cases``)."""

from __future__ import annotations

import os
import sys

import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

# The test problems are tiny: intra-op threads only add overhead (and contend with parallel jobs).
torch.set_num_threads(1)

settings.register_profile(
    "optbrain",
    deadline=None,
    max_examples=20,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "optbrain"))
