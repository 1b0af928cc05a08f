"""``launch/gpu_check.sh`` runs every test that needs or takes a CUDA device, found by pattern.

The reference reads each test file's syntax tree, independently of the script's glob and grep: a file
is a GPU test when a module-level mark is gated on ``DS_SFT_GPU_TESTS``, when one of its tests is
skipped without ``torch.cuda.is_available()``, or when (under ``tests/kernels/``, whose conftest puts
the ``device`` fixture on CUDA) one of its tests takes ``device``. A new file of any kind must be picked up
without editing the script, and the script must list nothing else.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from tests.conftest import REPO_ROOT


def takes_a_gpu(path: Path) -> bool:
    source = path.read_text()
    tree = ast.parse(source)
    tests = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    # a module-level mark on DS_SFT_GPU_TESTS: `pytestmark` for the whole file, or a named one its
    # GPU tests wear (tests/model/test_gpu_paths.py also runs its cases on the CPU path)
    gated = any(
        isinstance(node, ast.Assign) and "DS_SFT_GPU_TESTS" in ast.unparse(node.value) for node in tree.body
    )
    skipped_without_cuda = any(
        "cuda.is_available" in ast.unparse(decorator) for test in tests for decorator in test.decorator_list
    )
    on_device = path.parent.name == "kernels" and any(
        "device" in [a.arg for a in test.args.args] for test in tests
    )
    return gated or skipped_without_cuda or on_device


def test_every_gpu_test_file_is_run_and_nothing_else():
    listed = subprocess.run(
        ["bash", "launch/gpu_check.sh", "--list-tests"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    expected = sorted(
        str(path.relative_to(REPO_ROOT))
        for path in (REPO_ROOT / "tests").rglob("test_*.py")
        if takes_a_gpu(path)
    )
    assert sorted(listed) == expected
    assert "tests/model/test_gpu_paths.py" in listed and "tests/kernels/test_rmsnorm.py" in listed
