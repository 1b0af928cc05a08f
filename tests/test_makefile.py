"""What the Makefile replaces or removes is its own: never a path another tool exported, never a run."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ds_sft.paths import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")

# variable -> a target that replaces or removes what it names
PATH_VARIABLES = {
    "VENV": "clean",
    "GPU_CARRY": "wheelhouse",
    "CONSTRAINTS": "lock",
    "IMAGE_VENV": "test-image",
    "DEMO_OUT": "demo",
}


def planned(target: str, *assignments: str, env: dict | None = None) -> str:
    """The commands ``make TARGET`` would run (``make -n``), in this checkout."""
    done = subprocess.run(
        ["make", "-n", "-C", str(REPO_ROOT), target, *assignments],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(("variable", "target"), PATH_VARIABLES.items())
def test_a_path_variable_is_never_taken_from_the_environment(variable, target, tmp_path):
    """`VENV ?= .venv` took an exported VENV (another project's venv): `make clean` ran rm -rf on it."""
    elsewhere = tmp_path / "someone_elses"
    elsewhere.write_text("")  # CONSTRAINTS is a prerequisite: it must exist
    elsewhere = str(elsewhere)
    assert elsewhere not in planned(target, env={variable: elsewhere})
    assert elsewhere in planned(target, f"{variable}={elsewhere}")  # the command line still sets it


def test_make_clean_leaves_the_runs():
    """`make clean` removed runs/, where train and eval write by default: every trained checkpoint."""
    commands = planned("clean")
    assert "rm -rf" in commands and "runs" not in commands.split()
