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
