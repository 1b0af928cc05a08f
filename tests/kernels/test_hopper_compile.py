"""Every Triton kernel launch ds-sft makes compiles for Hopper (sm_90), checked on a CPU machine.

The kernel tests run the kernels through Triton's interpreter, which executes the Python body with
NumPy and accepts code that the compiler refuses: a loop-carried value whose type changes (``d = 0``
then a float), a constexpr branch that only compiles for some dtypes, a block too wide for the
warps. On a GPU that is a CompilationError at the first step. Here the public API runs in the
interpreter with a recorder in ``launch``: each distinct launch (kernel, argument types, constexprs,
warps) the wrappers make for the trainer's shapes and options is then compiled for sm_90 in a
process without the interpreter (``hopper_compile.py``), as the GPU's first call would.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_sft import kernels
from tests.conftest import REPO_ROOT

triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(
    not PTXAS.is_file() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton's NVIDIA backend (its ptxas) and the interpreter for the recording run",
)

POINTEE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64"}


def argument_type(value) -> str:
    """Triton's signature entry for a launch argument (None is passed as a constexpr)."""
    if isinstance(value, torch.Tensor):
        return "*" + POINTEE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def record_launches(monkeypatch) -> dict:
    """Patch the kernels' ``launch`` to record each launch's key, then run it as before."""
    from ds_sft.kernels import _launch, cross_entropy_kernel, rmsnorm

    launches = {}

    def recording(kernel, grid, device, *args, **meta):
        names = list(inspect.signature(kernel.fn).parameters)
        num_warps = meta.pop("num_warps", 4)
        values = dict(zip(names, args, strict=False)) | meta
        constant = {n for n in names if n in meta or values[n] is None}
        signature = {n: "constexpr" if n in constant else argument_type(values[n]) for n in names}
        constexprs = {n: values[n] for n in names if signature[n] == "constexpr"}
        entry = [kernel.fn.__module__, kernel.fn.__name__, signature, constexprs, num_warps]
        launches[json.dumps(entry, sort_keys=True)] = entry
        _launch.launch(kernel, grid, device, *args, num_warps=num_warps, **meta)

    for module in (rmsnorm, cross_entropy_kernel):
        monkeypatch.setattr(module, "launch", recording)
    return launches


def run_the_kernels(dtype: torch.dtype) -> None:
    """Forward and backward of every op, with each option the wrappers turn into a constexpr, at
    widths that pick 4, 8 and 16 warps (RMSNorm) and the widest vocabulary block (cross-entropy)."""
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()

    for width in (768, 2048, 5000):
        kernels.rms_norm(leaf(3, width), leaf(width), backend="triton").sum().backward()
    vocab = 50304
    labels = torch.tensor([3, -100, 0])
    for reduction in ("sum", "mean"):
        kernels.cross_entropy(leaf(3, vocab), labels, reduction=reduction, backend="triton").backward()
    hidden, head = leaf(3, 16), leaf(vocab, 16)
    kernels.linear_cross_entropy(hidden, head, labels, backend="triton").backward()
    with torch.no_grad():  # losses only (COMPUTE_GRAD off)
        kernels.linear_cross_entropy(hidden, head, labels, backend="triton")


def test_every_kernel_launch_compiles_for_hopper(monkeypatch, tmp_path):
    launches = record_launches(monkeypatch)
    for dtype in (torch.float32, torch.bfloat16):
        run_the_kernels(dtype)
    kernel_names = {entry[1] for entry in launches.values()}
    assert kernel_names == {"_rms_norm_forward_kernel", "_rms_norm_backward_kernel", "_cross_entropy_kernel"}
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": path}
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("hopper_compile.py"))],
        input=json.dumps(list(launches.values())), capture_output=True, text=True, env=env, cwd=REPO_ROOT,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    failures = [f"{name} {constexprs}:\n{error}" for name, constexprs, error in report["failed"]]
    assert not failures, "\n\n".join(failures)
    assert report["compiled"] == len(launches)
