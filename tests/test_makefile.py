"""What the Makefile replaces or removes is its own: never a path another tool exported, never a run."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ds_sft.locations import REPO_ROOT

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


# A space splits a path into two words in the recipes' shell (and, in VENV, in make's target names);
# the others ran as shell code there or changed the path.
NOT_ONE_WORD = ["a b", "a\tb", "", "a;touch pwned", "$$(touch pwned)", "a`touch pwned`", "it's", 'a"b',
                "a|b", "a&b", "a>b", "a<b", "(a)", "runs/*", "a?", "a[1]", "x{1,2}", "a!b", "a#b", "a\\b",
                "a^b"]  # fmt: skip


@pytest.mark.parametrize("variable", PATH_VARIABLES)
@pytest.mark.parametrize("value", NOT_ONE_WORD)
def test_a_path_the_shell_would_not_read_as_one_word_is_refused_in_one_line(variable, value, tmp_path):
    """`make demo DEMO_OUT="a b"` wrote the demo to a and gave it b as another word."""
    done = subprocess.run(
        ["make", "-n", "-C", str(REPO_ROOT), PATH_VARIABLES[variable], f"{variable}={value}"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout.count("ds_sft") == 0, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if "***" in line]
    assert len(lines) == 1 and f"{variable}=" in lines[0] and "use letters, digits" in lines[0], done.stderr
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("value", ["runs/demo-2", "/tmp/a_b.c/d+e@f:g,h=i", "~/runs/demo"])
def test_a_path_of_one_word_reaches_the_recipe_as_it_is(value):
    assert f"-m ds_sft.demo --out {value} " in planned("demo", f"DEMO_OUT={value}")
