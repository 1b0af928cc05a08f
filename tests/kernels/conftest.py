"""The device the Triton kernel tests run on: the CPU interpreter by default, CUDA with DS_SFT_GPU_TESTS=1."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    if os.environ.get("DS_SFT_GPU_TESTS"):
        if not torch.cuda.is_available():
            pytest.fail("DS_SFT_GPU_TESTS is set but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")
