"""The public API of ``kernels``: backend resolution, the error for Triton on CPU without the
interpreter, a light import, and every backend of every op agreeing with the reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kernels
from tests.conftest import REPO_ROOT


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env={**os.environ, **env},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_import_does_not_load_triton():
    result = _python("import sys, kernels; print('triton' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = "import torch, kernels; kernels.rms_norm(torch.ones(2, 8), torch.ones(8), backend='triton')"
    result = _python(code, TRITON_INTERPRET="0")
    assert result.returncode != 0
    assert "RuntimeError: backend='triton' on CPU needs TRITON_INTERPRET=1" in result.stderr


def test_resolve_backend():
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert kernels.resolve_backend("eager", torch.device("cpu")) == "eager"
    with pytest.raises(ValueError, match="kernels backend must be one of"):
        kernels.resolve_backend("fast", torch.device("cpu"))


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_every_backend_agrees(backend, device):
    gen = torch.Generator().manual_seed(0)
    x, residual = (
        torch.randn(2, 5, 64, generator=gen).to(device),
        torch.randn(2, 5, 64, generator=gen).to(device),
    )
    norm_weight = torch.rand(64, generator=gen).to(device)
    head = torch.randn(300, 64, generator=gen).to(device) / 8
    labels = torch.randint(0, 300, (2, 5), generator=gen).to(device)
    labels[0, 0] = -100
    close = {"atol": 1e-5, "rtol": 1e-5}

    y = kernels.rms_norm(x, norm_weight, 1e-6, backend=backend)
    torch.testing.assert_close(y, kernels.rms_norm(x, norm_weight, 1e-6, backend="eager"), **close)
    y, s = kernels.rms_norm_residual(x, residual, norm_weight, 1e-6, backend=backend)
    torch.testing.assert_close(s, x + residual)
    torch.testing.assert_close(y, kernels.rms_norm(x + residual, norm_weight, 1e-6, backend="eager"), **close)
    logits = x @ head.t()
    options = {"reduction": "mean", "label_smoothing": 0.1, "z_loss": 1e-4}
    loss = kernels.cross_entropy(logits, labels, backend=backend, **options)
    torch.testing.assert_close(
        loss, kernels.cross_entropy(logits, labels, backend="eager", **options), **close
    )
    loss = kernels.linear_cross_entropy(x, head, labels, chunk_size=4, backend=backend, **options)
    torch.testing.assert_close(
        loss, kernels.cross_entropy(logits, labels, backend="eager", **options), **close
    )
