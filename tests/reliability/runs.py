"""Launching ``ds-sft train`` as a subprocess (through :mod:`faulty_train`) and reading what it left.

Shared by the chaos-resume and checkpoint-fault tests: the tiny model on the synthetic data of
:func:`conftest.write_tiny_data_dir`, fp32, ZeRO-2, one process, a checkpoint every 20 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.rendezvous import without_launcher_variables

from .conftest import REPO_ROOT

SAVE_EVERY = 20
FAULTY_TRAIN = REPO_ROOT / "tests" / "reliability" / "faulty_train.py"


def train_flags(data_dir: Path, out_dir: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--data_dir", str(data_dir), "--out_dir", str(out_dir),
        "--max_iters", str(max_steps), "--save_interval", str(SAVE_EVERY), "--keep_last", "2",
        "--eval_interval", str(max_steps), "--eval_iters", "1", "--log_interval", "100",
        "--micro_batch_size", "2", "--grad_accum", "1", "--learning_rate", "1e-3", "--min_lr", "1e-4",
        "--warmup_iters", "5", "--wandb_mode", "disabled", "--precision", "fp32", "--resume", *extra,
    ]  # fmt: skip


def launch(flags: list[str], env: dict, fault: str | None = None) -> subprocess.Popen:
    """Start the trainer; ``fault`` is a :mod:`faulty_train` point such as ``save@40``."""
    # One thread: the runs compared bit for bit then sum in the same order whatever the machine's load.
    env = {**env, "DS_SFT_FAULT": fault or "", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(FAULTY_TRAIN), *flags], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def run(flags: list[str], env: dict, fault: str | None = None, timeout: float = 900):
    """Run the trainer to its end; a CompletedProcess with stdout and stderr apart."""
    proc = launch(flags, env, fault)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train_two_ranks(argv: list[str]) -> None:
    """``ds-sft train`` as two gloo ranks under torchrun (``--standalone``: its store binds a free port)."""
    env = without_launcher_variables()
    env.update(
        OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ds_sft.train", *argv]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def train_records(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    # a line without its newline is a record the trainer is still writing
    records = map(json.loads, filter(None, path.read_text().split("\n")[:-1]))
    return [r for r in records if r.get("type") == "train"]


def trajectory(out_dir: Path) -> dict[int, float]:
    """step -> loss; a step recomputed after a resume keeps its last value."""
    return {r["step"]: r["loss"] for r in train_records(out_dir)}


def final_weights(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out_dir / "final" / "model.safetensors"))


def assert_same_weights(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and bool((actual[name] == tensor).all()), f"{name} differs"
