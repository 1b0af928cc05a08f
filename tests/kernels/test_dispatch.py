"""The public API of ``ds_sft.kernels``: backend resolution, the error for Triton on CPU without the
interpreter, a light import, and every backend of every op agreeing with the reference."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

import ds_sft.kernels._launch as launching
from ds_sft import kernels
from tests.conftest import REPO_ROOT

KERNELS = REPO_ROOT / "ds_sft" / "kernels"


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env={**os.environ, **env},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_import_does_not_load_triton():
    result = _python("import sys, ds_sft.kernels; print('triton' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch; from ds_sft import kernels; "
        "kernels.rms_norm(torch.ones(2, 8), torch.ones(8), backend='triton')"
    )
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
    x = torch.randn(2, 5, 64, generator=gen).to(device)
    norm_weight = torch.rand(64, generator=gen).to(device)
    head = torch.randn(300, 64, generator=gen).to(device) / 8
    labels = torch.randint(0, 300, (2, 5), generator=gen).to(device)
    labels[0, 0] = -100
    close = {"atol": 1e-5, "rtol": 1e-5}

    y = kernels.rms_norm(x, norm_weight, 1e-6, backend=backend)
    torch.testing.assert_close(y, kernels.rms_norm(x, norm_weight, 1e-6, backend="eager"), **close)
    logits = x @ head.t()
    for reduction in ("sum", "mean"):
        loss = kernels.cross_entropy(logits, labels, reduction=reduction, backend=backend)
        expected = kernels.cross_entropy(logits, labels, reduction=reduction, backend="eager")
        torch.testing.assert_close(loss, expected, **close)
    loss = kernels.linear_cross_entropy(x, head, labels, chunk_size=4, backend=backend)
    torch.testing.assert_close(loss, kernels.cross_entropy(logits, labels, backend="eager"), **close)


def kernel_launches(path) -> list[int]:
    """Lines of ``path`` that launch a Triton kernel the Triton way: ``kernel[grid](...)``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    calls = (node for node in ast.walk(tree) if isinstance(node, ast.Call))
    return [call.lineno for call in calls if isinstance(call.func, ast.Subscript)]


def test_every_kernel_launches_through_launch():
    """A direct ``kernel[grid](...)`` runs on whichever GPU is current, not on its tensors' GPU."""
    sources = sorted(KERNELS.glob("*.py"))
    direct = {path.name: kernel_launches(path) for path in sources if path.name != "_launch.py"}
    assert {name: lines for name, lines in direct.items() if lines} == {}
    assert kernel_launches(
        REPO_ROOT / "ds_sft" / "kernels" / "_launch.py"
    )  # the one launch, so the scan sees them


class RecordingDevice:
    """Stands in for ``torch.cuda.device`` on a machine without CUDA: tracks the current device."""

    current: list = [torch.device("cuda", 0)]

    def __init__(self, device) -> None:
        self.device = device

    def __enter__(self):
        RecordingDevice.current.append(self.device)

    def __exit__(self, *exc):
        RecordingDevice.current.pop()


class RecordingKernel:
    """``kernel[grid](*args)`` that records the grid, the arguments and the device current at launch."""

    def __init__(self) -> None:
        self.launches: list[tuple] = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((grid, args, meta, RecordingDevice.current[-1]))


@pytest.mark.parametrize("index", [0, 1, 3])
def test_a_launch_runs_on_the_gpu_of_its_tensors(monkeypatch, index):
    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    kernel, device = RecordingKernel(), torch.device("cuda", index)
    launching.launch(kernel, (7,), device, "x", "y", BLOCK=64)
    assert kernel.launches == [((7,), ("x", "y"), {"BLOCK": 64}, device)]
    assert RecordingDevice.current == [torch.device("cuda", 0)]  # and puts the current one back


def test_a_cpu_launch_does_not_touch_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", None)  # any use of it raises
    monkeypatch.setattr(launching, "check_launchable", lambda kernel, device: None)
    kernel = RecordingKernel()
    launching.launch(kernel, (2,), torch.device("cpu"), 1)
    assert [launch[:3] for launch in kernel.launches] == [((2,), (1,), {})]


@pytest.mark.skipif(
    not os.environ.get("DS_SFT_GPU_TESTS") or torch.cuda.device_count() < 2,
    reason="GPU test: needs DS_SFT_GPU_TESTS=1 and two CUDA devices",
)
def test_kernels_run_on_a_gpu_other_than_the_current_one():
    second = torch.device("cuda", 1)
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(33, 96, generator=gen).to(second), torch.rand(96, generator=gen).to(second)
    logits, labels = torch.randn(33, 500, generator=gen).to(second), torch.randint(0, 500, (33,)).to(second)
    x.requires_grad_(True)
    assert torch.cuda.current_device() == 0
    y = kernels.rms_norm(x, weight, 1e-6, backend="triton")
    y.sum().backward()
    expected = kernels.rms_norm(x.detach().requires_grad_(True), weight, 1e-6, backend="eager")
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        kernels.cross_entropy(logits, labels, backend="triton"),
        kernels.cross_entropy(logits, labels, backend="eager"),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip
