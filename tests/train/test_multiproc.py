"""Two real processes on CPU (gloo): torchrun and the deepspeed launcher, then a 2 -> 1 rank resume.

Each launch runs the ``python -m ds_sft.train`` entry point as a user would and must exit 0 (DeepSpeed
on CPU sometimes aborts at interpreter exit after a multi-process run; ds-sft leaves through
``os._exit(0)`` once everything is flushed). The losses must equal a plain-PyTorch loop over the same
global batches: the sampler's global order, each step's rows split over the two ranks; under torchrun
the gradient norms too (each rank norms its own partition at ZeRO 1/2: the global norm needs them all).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ds_sft.data.sampler import ResumableSampler
from ds_sft.data.shards import PackedDataset
from ds_sft.train.distributed import slurm_master_port
from tests.rendezvous import rendezvous, without_launcher_variables
from tests.train.helpers import REPO_ROOT, reference_losses, settings, write_data_dir

pytestmark = [pytest.mark.multiproc, pytest.mark.filterwarnings("ignore::FutureWarning")]

S = settings(
    micro_batch_size=2, grad_accum=2, max_iters=6, learning_rate=3e-3, warmup_iters=2, min_lr=3e-4, seed=0
)
FLAGS = [
    "--precision",  # the reference losses are fp32; the default is bf16 where the CPU has it
    "fp32",
    "--model",
    "tiny",
    "--micro_batch_size",
    "2",
    "--max_iters",
    "6",
    "--learning_rate",
    "3e-3",
    "--warmup_iters",
    "2",
    "--min_lr",
    "3e-4",
    "--seed",
    "0",
    "--eval_interval",
    "3",
    "--eval_iters",
    "2",
    "--save_interval",
    "3",
    "--wandb_mode",
    "disabled",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data_dir(tmp_path_factory.mktemp("data"), train_rows=6 * 8)  # one epoch of 2 x 2 x 2


@pytest.fixture(scope="module")
def reference(data_dir):
    """The plain loop's (losses, pre-clip gradient norms) per step."""
    dataset = PackedDataset(data_dir, "train")
    order = ResumableSampler(len(dataset), seed=0).global_indices(0, len(dataset))
    return reference_losses(S, dataset, order, world_size=2, seed=0)[:2]


@pytest.fixture(scope="module")
def expected(reference):
    return reference[0]


def launch(command: list[str], store: dict[str, str] | None = None) -> None:
    """Run a launcher ``command``; ``store``: the variables of a :func:`rendezvous` it meets at."""
    env = without_launcher_variables()
    env.update(store or {})
    env.update(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(REPO_ROOT / ".cache" / "torch_extensions"))
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def train_args(data_dir: Path, run_dir: Path, zero_stage: int, grad_accum: int) -> list[str]:
    """``ds_sft.train``'s flags for one run of this file's shared setup."""
    return [
        "--data_dir", str(data_dir), "--out_dir", str(run_dir), "--zero_stage", str(zero_stage),
        "--grad_accum", str(grad_accum), *FLAGS,
    ]  # fmt: skip


def train_losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """``key`` (the loss, or ``grad_norm``) of each training step in the run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if r["type"] == "train"}


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_torchrun_two_ranks_then_resume_on_one(zero_stage, data_dir, reference, tmp_path, dist_env):
    from ds_sft.cli import main

    run_dir = tmp_path / "two"
    launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # its store binds a free port itself
            "--nproc_per_node",
            "2",
            "-m",
            "ds_sft.train",
            *train_args(data_dir, run_dir, zero_stage, grad_accum=2),
        ]
    )
    two = train_losses(run_dir)
    expected_losses, expected_norms = reference
    assert list(two.values()) == pytest.approx(expected_losses, abs=1e-5)
    assert list(train_losses(run_dir, "grad_norm").values()) == pytest.approx(expected_norms, rel=1e-5)
    assert (run_dir / "final" / "model.safetensors").is_file()

    # The 2-rank run "crashed" after step 3; continue it in this single process. ZeRO 1-3 shard the
    # optimizer state by rank, so ds-sft goes through DeepSpeed's universal checkpoint. Step 4's loss
    # only checks the weights; steps 5 and 6 check the Adam moments and step counts too (at ZeRO 3,
    # DeepSpeed's shared Adam step counter made them drift by 2.4e-3 and 5.0e-3 until ds-sft repaired
    # it; what is left is 1 rank summing in another order than 2: <= 4e-7 measured).
    resumed_dir = tmp_path / "one"
    shutil.copytree(run_dir / "checkpoints", resumed_dir / "checkpoints")
    shutil.rmtree(resumed_dir / "checkpoints" / "step_000006")
    (resumed_dir / "checkpoints" / "latest").write_text("step_000003")
    assert (
        main(["train", "--resume", *train_args(data_dir, resumed_dir, zero_stage, grad_accum=4)]) == 0
    )  # 1 rank x accum 4: the same 8 rows
    one = train_losses(resumed_dir)
    assert sorted(one) == [4, 5, 6]
    assert [one[k] for k in (4, 5, 6)] == pytest.approx([two[k] for k in (4, 5, 6)], abs=1e-5)


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks_zero3(data_dir, expected, tmp_path):
    """The deepspeed launcher hands its ranks the environment it gets: they meet at a held store."""
    run_dir = tmp_path / "ds"
    with rendezvous() as store:
        launch(
            [
                str(Path(sys.executable).with_name("deepspeed")),
                "--num_gpus",
                "2",
                "--master_port",
                store["MASTER_PORT"],
                "--module",
                "ds_sft.train",
                *train_args(data_dir, run_dir, zero_stage=3, grad_accum=2),
            ],
            store,
        )
    assert list(train_losses(run_dir).values()) == pytest.approx(expected, abs=1e-5)
    assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "report.md").is_file()


def slurm_job_with_a_held_port(held: contextlib.ExitStack) -> str:
    """A Slurm job id whose derived MASTER_PORT this process listens on, through a :func:`rendezvous`
    store kept until ``held`` closes: the port cannot be taken before the ranks connect to it."""
    for job_id in range(os.getpid(), os.getpid() + 1000):
        try:
            held.enter_context(rendezvous(port=slurm_master_port(str(job_id))))
        except RuntimeError:  # torch's DistNetworkError: that port is in use
            continue
        return str(job_id)
    raise RuntimeError("no job id in 1000 whose port is free")


def test_srun_without_torchrun(data_dir, expected, tmp_path):
    """``srun python -m ds_sft.train``: two processes that know only Slurm's variables (no RANK,
    WORLD_SIZE or MASTER_*) form one group on the port they derive from the job id, and train as
    torchrun's two ranks do. This test holds the store on that port; the ranks connect to it."""
    run_dir = tmp_path / "srun"
    env = {k: v for k, v in without_launcher_variables().items() if not k.startswith("SLURM_")}
    env.update(
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=str(REPO_ROOT / ".cache" / "torch_extensions"),
        SLURM_NTASKS="2",
        SLURM_JOB_NODELIST="localhost",
        TORCHELASTIC_USE_AGENT_STORE="True",  # every rank a client of the held store
    )
    command = [
        sys.executable,
        "-m",
        "ds_sft.train",
        *train_args(data_dir, run_dir, zero_stage=2, grad_accum=2),
    ]
    command += ["--dist_timeout", "300"]  # a rank left alone fails before communicate gives up, never sooner
    with contextlib.ExitStack() as held:
        env["SLURM_JOB_ID"] = slurm_job_with_a_held_port(held)
        ranks = [
            subprocess.Popen(
                command,
                env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in range(2)
        ]
        outputs = [rank.communicate(timeout=400)[0] for rank in ranks]
    for rank, output in zip(ranks, outputs, strict=True):
        assert rank.returncode == 0, f"exit {rank.returncode}\n{output[-3000:]}"
    assert list(train_losses(run_dir).values()) == pytest.approx(expected, abs=1e-5)
