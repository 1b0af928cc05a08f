"""A real install: the built wheel, not the checkout, trains from a folder that knows nothing of ds-sft.

The wheel is built from this tree (``pip wheel --no-deps --no-build-isolation``) and installed with
``--no-deps --no-index`` into a fresh venv. The venv sees the project venv's third-party packages
(torch, deepspeed, ...) through one ``.pth`` line naming that site-packages folder: ``.pth`` files
*inside* a folder added that way are not processed, so the project venv's editable ds-sft stays
invisible, and nothing else points at the checkout (PYTHONPATH is dropped, the cwd is a temp folder).
The run must find its default DeepSpeed config as package data inside the installed wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.train.helpers import write_data_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_installs_and_trains_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
         str(REPO_ROOT)],
        check=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("ds_sft-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.check_output([python, "-c", purelib], text=True).strip())
    (site / "project_venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        # --ignore-installed: the project venv's editable ds-sft is visible as installed metadata, and
        # must be neither taken as "already satisfied" nor uninstalled
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
         "--ignore-installed", "-q", str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip

    work = tmp_path / "elsewhere"
    data = write_data_dir(work / "data", train_rows=8)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    where = subprocess.check_output(
        [python, "-c", "import ds_sft, ds_configs; print(ds_sft.__file__); print(ds_configs.__file__)"],
        cwd=work, env=env, text=True,
    ).split()  # fmt: skip
    assert all(Path(p).is_relative_to(site) for p in where), where  # the wheel's copy, not the checkout's

    result = subprocess.run(
        [env_dir / "bin" / "ds-sft", "train", "--data_dir", "data", "--model", "tiny", "--max_iters", "2",
         "--micro_batch_size", "2", "--grad_accum", "2", "--eval_iters", "1", "--fp8", "off",
         "--out_dir", "run"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"DeepSpeed config: {site / 'ds_configs' / 'sft_recipe.json'}" in result.stdout.splitlines()
    effective = json.loads((work / "run" / "effective_config.json").read_text())
    assert effective["gradient_clipping"] == 1.0 and effective["train_batch_size"] == 4
    assert (work / "run" / "final" / "model.safetensors").is_file()
    assert data.is_relative_to(work)


def top_level_names() -> set[str]:
    """The import names ds-sft puts at the top level: the packages its wheel installs (pyproject's
    ``packages.find``), and what a checkout makes importable when it is the working directory or on
    ``PYTHONPATH`` (folders with an ``__init__.py``, ``*.py`` files at its root), and the scripts of
    ``bench/`` and ``launch/``: ``python bench/NAME.py`` puts its own folder first on ``sys.path``."""
    import tomllib
    from setuptools import find_packages

    include = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    installed = {
        name.split(".")[0] for name in find_packages(str(REPO_ROOT), include=include["find"]["include"])
    }
    checkout = {path.stem for path in REPO_ROOT.glob("*.py")}
    checkout |= {path.parent.name for path in REPO_ROOT.glob("*/__init__.py")}
    checkout |= {path.stem for folder in ("bench", "launch") for path in (REPO_ROOT / folder).glob("*.py")}
    return installed | checkout


def test_no_top_level_name_of_ds_sft_is_another_installed_distributions():
    """ds-sft's Triton kernels were the top-level package ``kernels``, the import name of Hugging Face's
    kernels library, which transformers >= 5.25 depends on: transformers imported ds-sft's package in its
    place and every model import failed (ImportError: cannot import name 'CUDAProperties' from
    'kernels'), and a wheel install would have written over that library's files. ``bench/kernels.py``
    did the same to every bench script that loads a transformers model."""
    import importlib.metadata

    owners = importlib.metadata.packages_distributions()
    names = top_level_names()
    assert {"ds_sft", "ds_configs", "train_throughput"} <= names
    clashes = {name: owners[name] for name in names if set(owners.get(name, [])) - {"ds-sft"}}
    assert clashes == {}
