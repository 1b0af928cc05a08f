"""Fixtures for the reliability tests: isolated single-process DeepSpeed environments on CPU."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
EXTENSIONS_DIR = REPO_ROOT / ".cache" / "torch_extensions"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ds_env() -> dict[str, str]:
    """Environment for a subprocess that is a whole DeepSpeed world on its own (rank 0 of 1).

    Without RANK / WORLD_SIZE / MASTER_* DeepSpeed falls back to MPI discovery and fails; the JIT
    cache lives in the project so its ~16 s shm_comm build happens once.
    """
    return {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR)),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
