"""The devices the device-parametrised tests run on: the CPU always, CUDA where there is one
(skipped otherwise), so the GPU path is exercised the moment a machine has a GPU."""

from __future__ import annotations

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]
