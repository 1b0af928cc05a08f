"""``launch/gpu_check.sh`` runs every test that needs or takes a CUDA device, found by pattern.

The reference reads each test file's syntax tree, independently of the script's glob and grep: a file
is a GPU test when a module-level mark is gated on ``DS_SFT_GPU_TESTS``, when one of its tests is
skipped without ``torch.cuda.is_available()``, or when (under ``tests/kernels/``, whose conftest puts
the ``device`` fixture on CUDA) one of its tests takes ``device``. A new file of any kind must be picked up
without editing the script, and the script must list nothing else.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def run_gpu_check(
    tmp_path: Path, *options: str, out: Path | None = None, **env: str
) -> subprocess.CompletedProcess:
    """``gpu_check.sh --cpu`` with a stand-in carry (one empty wheel, a manifest): enough to reach its
    folders, never its steps (each case below stops at a folder). Should a case not stop, it still
    touches nothing outside ``tmp_path``: its own venv folder, and pip without an index."""
    carry = tmp_path / "carry"
    (carry / "wheelhouse").mkdir(parents=True)
    (carry / "wheelhouse" / "stand_in-1.0-py3-none-any.whl").write_bytes(b"")
    (carry / "data").mkdir()
    (carry / "data" / "manifest.json").write_text("{}")
    variables = {
        "GPU_CARRY": str(carry),
        "GPU_CHECK_WORK": str(tmp_path / "work"),
        "GPU_CHECK_VENV": str(tmp_path / "venv"),
        "GPU_CHECK_TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
        "IMAGE_PYTHON": sys.executable,
        "PIP_NO_INDEX": "1",
        **env,
    }
    command = ["bash", "launch/gpu_check.sh", "--cpu", *options, "--out", str(out or tmp_path / "out")]
    return subprocess.run(
        command, cwd=REPO_ROOT, env={**os.environ, **variables}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("variable", ["GPU_CHECK_WORK", "GPU_CHECK_VENV"])
@pytest.mark.parametrize("content", ["notes.txt", "bin/python", ".image.bak"])
def test_a_folder_gpu_check_did_not_make_is_never_removed(tmp_path, variable, content):
    """Both folders the script replaces are user-settable: pointed at someone's files (a project, a
    venv), it refuses in one line and leaves them as they were."""
    theirs = tmp_path / "theirs"
    (theirs / content).parent.mkdir(parents=True, exist_ok=True)
    (theirs / content).write_text("keep me")
    result = run_gpu_check(tmp_path, **{variable: str(theirs)})
    assert result.returncode == 2
    assert f"{theirs} is not empty and gpu_check did not make it" in result.stderr
    assert f"set {variable} to a new or empty folder" in result.stderr
    assert (theirs / content).read_text() == "keep me"
    assert {f.relative_to(theirs).as_posix() for f in theirs.rglob("*") if f.is_file()} == {content}


def test_its_own_work_folder_is_replaced(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / ".gpu_check_work").touch()
    (work / "old.log").write_text("an earlier check")
    # stops at the venv: GPU_CHECK_VENV names a folder it did not make
    venv = tmp_path / "venv"
    (venv / "keep").mkdir(parents=True)
    result = run_gpu_check(tmp_path, GPU_CHECK_WORK=str(work), GPU_CHECK_VENV=str(venv))
    assert result.returncode == 2 and "GPU_CHECK_VENV" in result.stderr
    assert not (work / "old.log").exists() and (work / ".gpu_check_work").exists()


@pytest.mark.parametrize(
    "theirs", [["SUMMARY.md"], ["logs.tar.gz", "notes.txt"], ["fp8_roofline.json"], ["project/setup.py"]]
)
def test_an_out_folder_gpu_check_did_not_make_is_never_written_over(tmp_path, theirs):
    """`--out ~` (or any folder of someone's files) had its SUMMARY.md, logs.tar.gz and
    fp8_roofline.json written over: it refuses in one line, before the work folder is made."""
    out = tmp_path / "home"
    for name in theirs:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("keep me")
    result = run_gpu_check(tmp_path, out=out)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{out} is not empty and gpu_check did not make it" in result.stderr
    assert "set --out to a new or empty folder" in result.stderr
    assert {f.relative_to(out).as_posix() for f in out.rglob("*") if f.is_file()} == set(theirs)
    assert all((out / name).read_text() == "keep me" for name in theirs)
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("earlier", [None, [], [".gpu_check_out", "SUMMARY.md", "logs.tar.gz"]])
def test_a_new_empty_or_earlier_out_folder_is_taken_and_marked(tmp_path, earlier):
    """A new folder, an empty one, or one an earlier gpu_check wrote (its mark) is written into."""
    out = tmp_path / "out"
    if earlier is not None:
        out.mkdir()
        for name in earlier:
            (out / name).write_text("an earlier check")
    venv = tmp_path / "venv"  # stops at the venv, after the folders: a folder it did not make
    (venv / "keep").mkdir(parents=True)
    result = run_gpu_check(tmp_path, out=out, GPU_CHECK_VENV=str(venv))
    assert result.returncode == 2 and "GPU_CHECK_VENV" in result.stderr and "--out" not in result.stderr
    assert (out / ".gpu_check_out").exists()


@pytest.mark.parametrize("options", [["--out"], ["--out", "--cpu"], ["--out", ""], ["--out", " "]])
def test_an_option_without_its_value_is_one_line(options):
    """`--out` last was bash's "$2: unbound variable"; `--out "$DIR"` with DIR unset wrote to the default."""
    done = subprocess.run(
        ["bash", "launch/gpu_check.sh", *options], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert done.stderr.startswith("launch/gpu_check.sh: --out") and done.stderr.count("\n") == 1, done.stderr


def test_continue_needs_an_earlier_check_in_its_work_folder(tmp_path):
    result = run_gpu_check(tmp_path, "--continue")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--continue: no earlier check in" in result.stderr and "run without --continue" in result.stderr


def test_continue_keeps_the_earlier_work_and_forgets_only_the_steps_that_had_no_time(tmp_path):
    """A cold first run on a fresh GPU can spend its budget before the benchmarks; --continue runs
    what it did not reach, so the work folder (installed wheels, logs, results) must survive."""
    work = tmp_path / "work"
    work.mkdir()
    (work / ".gpu_check_work").touch()
    (work / "gemm.json").write_text("{}")
    earlier = [
        "install\tpass\t12",
        "gpu tests\tFAIL\t150",
        "gpu tests: collect\tskipped: no CUDA\t0",
        "kernels\tskipped: out of time\t0",
        "step d2048 bf16\tskipped: out of time (stopped after 8s)\t8",
    ]
    (work / "steps.tsv").write_text("\n".join(earlier) + "\n")
    venv = tmp_path / "venv"  # stops at the venv, after the folders: a folder it did not make
    (venv / "keep").mkdir(parents=True)
    result = run_gpu_check(tmp_path, "--continue", GPU_CHECK_WORK=str(work), GPU_CHECK_VENV=str(venv))
    assert result.returncode == 2 and "GPU_CHECK_VENV" in result.stderr, result.stderr
    assert (work / "gemm.json").exists()
    assert (work / "steps.tsv").read_text().splitlines() == earlier[:3]


def gpu_check_steps() -> list[str]:
    """The step names the script knows (it lists them when --only names another)."""
    done = subprocess.run(
        ["bash", "launch/gpu_check.sh", "--only", "no such step"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--only: no step is named 'no such step'; steps: " in done.stderr
    return done.stderr.strip().split("; steps: ")[1].split(",")


def test_only_knows_every_step_the_script_runs_and_no_other():
    """A step added to the script without its name in the list could not be chosen by --only; a name
    left in the list after its step went would be accepted and run nothing."""
    script = (REPO_ROOT / "launch" / "gpu_check.sh").read_text()
    literal = set(re.findall(r'^\s*(?:step|skip) "([^"$]+)"', script, flags=re.MULTILINE))
    sizes = re.search(r"^for size in ([\w ]+); do$", script, flags=re.MULTILINE).group(1).split()
    in_loop = {f"step {size} bf16" for size in sizes}  # the loop's `step "step $size bf16"`
    steps = gpu_check_steps()
    assert len(steps) == len(set(steps)) and set(steps) == literal | in_loop


@pytest.mark.parametrize("only", ["kernals", "gemm,kernals", "gemm,", ""])
def test_only_refuses_a_name_that_is_no_step_before_any_work(tmp_path, only):
    result = run_gpu_check(tmp_path, "--only", only)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(("gpu_check: --only: no step is named", "launch/gpu_check.sh: --only"))
    assert not (tmp_path / "work").exists()


def test_only_and_continue_do_not_go_together(tmp_path):
    result = run_gpu_check(tmp_path, "--only", "kernels", "--continue")
    assert result.returncode == 2 and "--only and --continue do not go together" in result.stderr
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    "budget", ["x[$(touch {pwned})]", "HOME[$(touch {pwned})]", "8m", "0", "-5", "1e3", "99999999999"]
)
def test_a_budget_that_is_not_a_number_of_seconds_is_one_line_and_runs_nothing(tmp_path, budget):
    """BUDGET_S was read by bash arithmetic, which evaluates a variable's text: an array index ran the
    command inside it, and "8m" printed a screen of errors before a failing summary."""
    pwned = tmp_path / "pwned"
    result = run_gpu_check(tmp_path, BUDGET_S=budget.format(pwned=pwned))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "BUDGET_S must be a whole number from 1 to 86400" in result.stderr
    assert not pwned.exists() and not (tmp_path / "work").exists()


def stand_in_venv(venv: Path, mark: str) -> Path:
    """A rehearsal venv whose python records each call and fails (the check goes no further than its
    first step that needs the interpreter), marked ``mark``, the mark written long ago."""
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho called >> "{venv}/calls"\nexit 1\n')
    python.chmod(0o755)
    (venv / ".image").write_text(mark + "\n")
    os.utime(venv / ".image", (0, 0))  # older than every file of the checkout, as in a fresh clone
    return venv


def image_mark(python_version: str | None = None, requirements: bytes | None = None) -> str:
    """The mark of a venv built from ``requirements`` (default: launch/gpu_image.txt as it is) with this
    Python (default: the interpreter the tests give gpu_check as the image's)."""
    import hashlib
    import platform

    if requirements is None:
        requirements = (REPO_ROOT / "launch" / "gpu_image.txt").read_bytes()
    return f"{python_version or platform.python_version()} {hashlib.sha256(requirements).hexdigest()}"


def test_a_venv_built_from_the_same_image_list_is_kept_however_old_its_mark(tmp_path):
    """The venv was stale when launch/gpu_image.txt was newer than its mark: in a fresh clone every file
    is new, so a venv kept outside the checkout (GPU_CHECK_VENV) was rebuilt, 4.6 GB, on every run."""
    venv = stand_in_venv(tmp_path / "venv", image_mark())
    result = run_gpu_check(tmp_path, GPU_CHECK_VENV=str(venv))
    assert (venv / "calls").exists(), result.stdout + result.stderr  # its python ran the check's steps
    assert (venv / ".image").read_text() == image_mark() + "\n"


@pytest.mark.parametrize(
    "mark",
    [
        image_mark(requirements=b"torch==2.10.0\n"),  # launch/gpu_image.txt changed since
        image_mark(python_version="3.9.0"),  # another Python
        "3.12.1",  # a mark of the earlier format: the Python version alone
        "",  # marked before its install finished (interrupted)
    ],
)
def test_a_venv_built_from_another_image_list_or_python_is_rebuilt(tmp_path, mark):
    venv = stand_in_venv(tmp_path / "venv", mark)
    result = run_gpu_check(tmp_path, GPU_CHECK_VENV=str(venv))
    # rebuilt: a new venv replaced the stand-in (then, offline, its install found no index and stopped)
    assert result.returncode == 2 and not (venv / "calls").exists(), result.stdout + result.stderr
    assert (venv / "pyvenv.cfg").exists()
