"""The launch scripts' --dry-run prints the exact command: the right launcher around `-m ds_sft.train`."""

from __future__ import annotations

import os
import shlex
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


BAD_OPTIONS = [
    ("torchrun.sh", ["--nproc", "0"]),
    ("torchrun.sh", ["--nproc", "-3"]),
    ("torchrun.sh", ["--nproc", "abc"]),
    ("torchrun.sh", ["--nproc", "2.5"]),
    ("torchrun.sh", ["--nproc", "99999999999999999999"]),
    ("torchrun.sh", ["--nproc", ""]),
    ("torchrun.sh", ["--nproc"]),
    ("torchrun.sh", ["--nproc", "--"]),
    ("torchrun.sh", ["--nnodes", "x"]),
    ("torchrun.sh", ["--nnodes", "0"]),
    ("torchrun.sh", ["--rdzv", "node-01"]),
    ("torchrun.sh", ["--rdzv", "node-01:0"]),
    ("torchrun.sh", ["--rdzv", "node-01:65536"]),
    ("torchrun.sh", ["--rdzv", "node 01:29400"]),
    ("torchrun.sh", ["--rdzv", "a;touch x:29400"]),
    ("torchrun.sh", ["--rdzv", ":29400"]),
    ("torchrun.sh", ["--bogus"]),
    ("deepspeed_multinode.sh", ["--master_port", "0"]),
    ("deepspeed_multinode.sh", ["--master_port", "70000"]),
    ("deepspeed_multinode.sh", ["--master_port", "port"]),
    ("deepspeed_multinode.sh", ["--master_addr"]),
    ("deepspeed_multinode.sh", ["--master_addr", "a b"]),
    ("deepspeed_multinode.sh", ["--master_addr", "$(reboot)"]),
    ("deepspeed_multinode.sh", ["--node_rank", "-1"]),
    ("deepspeed_multinode.sh", ["--node_rank", "one"]),
    ("deepspeed_multinode.sh", ["--hostfile"]),
    ("deepspeed_multinode.sh", ["--bogus"]),
]


def _dry_run(script: str, options: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO_ROOT / "launch" / script), "--dry-run", *options, "--", "--model", "tiny"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip


@pytest.mark.parametrize(("script", "options"), BAD_OPTIONS)
def test_a_wrong_launcher_option_stops_in_one_line_before_any_launcher(script, options):
    """Unchecked, these reached torchrun (a bare AssertionError traceback for --nproc 0) or bash's
    "unbound variable"; now the script names the option and starts nothing."""
    done = _dry_run(script, options)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""  # no command printed: nothing would have started
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"launch/{script}: "), done.stderr
    assert options[0] in lines[0]


@pytest.mark.parametrize(
    ("script", "option", "low", "high"),
    [
        ("torchrun.sh", "--nproc", 1, 4096),
        ("torchrun.sh", "--nnodes", 1, 65536),
        ("deepspeed_multinode.sh", "--master_port", 1, 65535),
        ("deepspeed_multinode.sh", "--node_rank", 0, 65535),
    ],
)
def test_launcher_counts_are_accepted_exactly_inside_their_range(script, option, low, high):
    for value in (low - 1, low, low + 1, high - 1, high, high + 1, 10 * high):
        done = _dry_run(script, [option, str(value)])
        inside = low <= value <= high
        assert (done.returncode == 0) == inside, (value, done.stderr)
        if inside and (option, value) != ("--nnodes", 1):  # one node runs --standalone
            assert f" {value} " in done.stdout


def _readme_launcher_lines() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    return [line for line in readme.splitlines() if line.startswith("launch/")]


@pytest.mark.parametrize("line", _readme_launcher_lines())
def test_the_readme_launcher_commands_are_accepted(line):
    """The README once showed torchrun.sh options it never had (--node_rank, --master_addr)."""
    script, *words = shlex.split(line)
    done = subprocess.run(
        ["bash", str(REPO_ROOT / script), "--dry-run", *words],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_the_readme_shows_every_launcher():
    shown = {shlex.split(line)[0] for line in _readme_launcher_lines()}
    assert shown == {"launch/torchrun.sh", "launch/deepspeed_multinode.sh"}
