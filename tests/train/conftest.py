"""Fixtures for the trainer tests: a one-rank process group shared by the whole session."""

from __future__ import annotations

import os

import pytest

import tests.train.helpers  # noqa: F401  (sets TORCH_EXTENSIONS_DIR before DeepSpeed loads)


@pytest.fixture(scope="session")
def dist_env():
    """A one-rank gloo process group for the whole session (DeepSpeed needs one; tests share it)."""
    from ds_sft.train.distributed import init_distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.setdefault(key, "0" if key != "WORLD_SIZE" else "1")
    return init_distributed()
