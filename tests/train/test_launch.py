"""The launch scripts' --dry-run prints the exact command: the right launcher around `-m ds_sft.train`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.train.helpers import REPO_ROOT


@pytest.mark.parametrize(
    ("script", "options", "expected"),
    [
        ("torchrun.sh", ["--nproc", "2", "--"], "torchrun --standalone --nproc_per_node 2 -m ds_sft.train"),
        (
            "torchrun.sh",
            ["--nproc", "8", "--nnodes", "2", "--rdzv", "10.0.0.1:29400", "--"],
            "--nnodes 2 --rdzv_backend c10d --rdzv_endpoint 10.0.0.1:29400",
        ),
        (
            "deepspeed_multinode.sh",
            ["--hostfile", "launch/hostfile.example", "--master_addr", "node-01", "--"],
            "deepspeed --hostfile launch/hostfile.example --master_addr node-01 --master_port 29500 --module "
            "ds_sft.train",
        ),
        ("deepspeed_multinode.sh", ["--no_ssh", "--node_rank", "1", "--"], "--no_ssh --node_rank 1 --module"),
        ("slurm.sbatch", [], "srun --kill-on-bad-exit=1 torchrun --nnodes 1"),
    ],
)
def test_dry_run_prints_the_command(script, options, expected):
    train_flags = ["--data_dir", "data dir", "--model", "tiny"]
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "launch" / script), "--dry-run", *options, *train_flags],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
    assert done.stdout.rstrip().endswith(r"--data_dir data\ dir --model tiny")  # flags passed through, quoted
    if script == "slurm.sbatch":
        assert "-m ds_sft.train --resume" in done.stdout  # a requeued job continues


@pytest.mark.parametrize("job_id", ["12345", "7", "987654321", ""])
def test_slurm_rendezvous_port_is_derived_from_the_job_id(job_id):
    """Every node of one job computes the same port, and jobs sharing a head node get different ones
    (the srun rule, ``slurm_master_port``), not a fixed 29500."""
    from ds_sft.train.distributed import slurm_master_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"SLURM_JOB_ID": job_id}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # this test's python3
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "launch" / "slurm.sbatch"), "--dry-run", "--model", "tiny"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"--rdzv_endpoint localhost:{slurm_master_port(job_id)} " in done.stdout
