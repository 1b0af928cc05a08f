"""Elastic resume: a run stopped on one shape and resumed on another continues the uninterrupted run.

A *shape* is how a step is computed: ranks (1, 2, 3 or 4), ZeRO stage, precision and the micro-batch
(the accumulation follows: the global batch is always :data:`GLOBAL_BATCH` rows). Every cell trains
the tiny preset on synthetic data as ``python -m ds_sft.train`` (torchrun for 2-3 ranks; 4 ranks as
2 processes on each of two network-namespace nodes, see :mod:`netns`, or 4 local processes where
namespaces cannot be made), saves at step :data:`CHANGE_AT`, and resumes that checkpoint on another
shape for the 10 steps after it. The uninterrupted run on the first shape is the reference:

- fp32: every resumed step's loss within :data:`FP32_LOSS_TOL` of the reference's, the final fp32
  weights within :data:`FP32_WEIGHT_TOL` (what is left is summation order: another split of the same
  rows over ranks and micro-batches adds the same numbers in another order).
- bf16: within :data:`BF16_LOSS_TOL` / :data:`BF16_WEIGHT_TOL`, measured (see the constants).

The default run holds a representative subset (every kind of change once, a 4-rank cell among
them); the rest of the matrix and the 4 -> 2 -> 1 -> 3 sequences are ``matrix`` (``make test-matrix``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ds_sft.train.compatibility import RESUMABLE
from tests.rendezvous import without_launcher_variables

from .conftest import single_rank_env, write_tiny_data_dir
from .netns import NamespacesUnavailable, run_two_nodes, two_namespaces
from .runs import final_weights, trajectory

pytestmark = [pytest.mark.multiproc, pytest.mark.filterwarnings("ignore::FutureWarning")]

GLOBAL_BATCH = 12  # rows per optimizer step: divides into 1, 2, 3 and 4 ranks
CHANGE_AT = 3  # the step whose checkpoint is resumed on the new shape
STEPS = CHANGE_AT + 10  # 10 steps compared after the change
FP32_LOSS_TOL = 1e-6
FP32_WEIGHT_TOL = 1e-6
# bf16: a resume on the same shape is bit-exact (measured: 0, a cell below); another split of the same
# rows (ranks or micro-batches) rounds the bf16 gradients differently, and two *uninterrupted* bf16
# runs on two shapes differ by more (test_bf16_tolerance_is_what_a_shape_costs_without_any_resume:
# 1.2e-4 loss, 1.5e-3 weights). Measured over the matrix and the sequences on the tiny preset
# (2026-12-01): <= 1.2e-4 in the loss and in the weights after 10 steps (a precision change,
# fp32 <-> bf16: 1.5e-4, 1.6e-4); the tolerance leaves a factor of ~6 for other machines' kernels.
BF16_LOSS_TOL = 1e-3
BF16_WEIGHT_TOL = 1e-3


@dataclass(frozen=True)
class Shape:
    ranks: int
    zero_stage: int
    precision: str
    micro: int  # rows per rank per micro-step; accumulation = GLOBAL_BATCH / (micro x ranks)
    fp8: str = "off"

    @property
    def accum(self) -> int:
        accum, rest = divmod(GLOBAL_BATCH, self.micro * self.ranks)
        assert rest == 0 and accum > 0, self
        return accum

    def flags(self) -> list[str]:
        return ["--zero_stage", str(self.zero_stage), "--precision", self.precision,
                "--micro_batch_size", str(self.micro), "--grad_accum", str(self.accum),
                "--fp8", self.fp8]  # fmt: skip

    def __str__(self) -> str:
        fp8 = "" if self.fp8 == "off" else f"-fp8{self.fp8}"
        return f"{self.ranks}r-z{self.zero_stage}-{self.precision}-{self.micro}x{self.accum}{fp8}"


def common_flags(data_dir: Path, out_dir: Path, save_interval: int) -> list[str]:
    return [
        "--model", "tiny", "--data_dir", str(data_dir), "--out_dir", str(out_dir),
        "--max_iters", str(STEPS), "--save_interval", str(save_interval), "--keep_last", "100",
        "--eval_interval", str(STEPS), "--eval_iters", "1", "--log_interval", "100", "--seed", "0",
        "--learning_rate", "1e-3", "--min_lr", "1e-4", "--warmup_iters", "2", "--wandb_mode", "disabled",
    ]  # fmt: skip


def namespaces_work() -> bool:
    try:
        with two_namespaces():
            return True
    except NamespacesUnavailable:
        return False


def launch(shape: Shape, flags: list[str]) -> str:
    """Run ``python -m ds_sft.train FLAGS`` on ``shape.ranks`` processes; return their output."""
    env = {**single_rank_env(), "OMP_NUM_THREADS": "1"}  # one thread: the same sums on a busy machine
    module = ["-m", "ds_sft.train", *flags]
    if shape.ranks == 4 and namespaces_work():  # 2 nodes x 2 processes over a veth link
        keep = ("TORCH_EXTENSIONS_DIR", "PYTHONPATH", "OMP_NUM_THREADS")
        results = run_two_nodes(["--module", *module[1:]], timeout=900, slots=2,
                                env={key: env[key] for key in keep})  # fmt: skip
        for rank, result in enumerate(results):
            output = result.stdout + result.stderr
            assert result.returncode == 0, f"node {rank} failed:\n{output[-4000:]}"
            assert f"nnodes=2, num_local_procs=2, node_rank={rank}" in output
        return "".join(result.stdout + result.stderr for result in results)
    if shape.ranks > 1:  # torchrun's store binds a free port itself
        env = without_launcher_variables(env)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(shape.ranks), *module]  # fmt: skip
    else:
        command = [sys.executable, *module]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def train(
    shape: Shape, data_dir: Path, out_dir: Path, resume: Path | None = None, save_interval: int = 1
) -> str:
    """Train ``shape`` to :data:`STEPS` in ``out_dir``; from the checkpoint ``resume`` (a tag folder,
    copied in alone, as a new job would find it) when given."""
    flags = common_flags(data_dir, out_dir, save_interval) + shape.flags()
    if resume is not None:
        shutil.copytree(resume, out_dir / "checkpoints" / resume.name)
        (out_dir / "checkpoints" / "latest").write_text(resume.name)
        flags.append("--resume")
    return launch(shape, flags)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_data_dir(tmp_path_factory.mktemp("elastic") / "data")


class References:
    """The uninterrupted run of each first shape, trained once per module."""

    def __init__(self, root: Path, data_dir: Path):
        self.root, self.data_dir, self.runs = root, data_dir, {}

    def __call__(self, shape: Shape) -> Path:
        if shape not in self.runs:
            out = self.root / f"reference-{shape}"
            train(shape, self.data_dir, out)
            self.runs[shape] = out
        return self.runs[shape]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    return References(tmp_path_factory.mktemp("references"), data_dir)


def tag(step: int) -> str:
    return f"step_{step:06d}"


def max_differences(expected: Path, actual: Path, steps) -> tuple[float, float]:
    """(largest loss difference over ``steps``, largest final weight difference) of two runs."""
    want, got = trajectory(expected), trajectory(actual)
    assert set(steps) <= set(got), f"steps {sorted(got)} trained, {list(steps)} expected"
    loss = max(abs(got[s] - want[s]) for s in steps)
    a, b = final_weights(expected), final_weights(actual)
    assert a.keys() == b.keys()
    weight = max(float((a[name] - b[name]).abs().max()) for name in a)
    return loss, weight


def tolerances(*shapes: Shape) -> tuple[float, float]:
    if all(shape.precision == "fp32" for shape in shapes):
        return FP32_LOSS_TOL, FP32_WEIGHT_TOL
    return BF16_LOSS_TOL, BF16_WEIGHT_TOL


def record(name: str, loss: float, weight: float) -> None:
    print(f"elastic {name}: max loss difference {loss:.3g}, max weight difference {weight:.3g}")


def check_resumed(
    reference_run: Path, first: Shape, then: Shape, out: Path, data_dir: Path
) -> tuple[float, float]:
    output = train(then, data_dir, out, reference_run / "checkpoints" / tag(CHANGE_AT), save_interval=STEPS)
    assert f"resumed from {out / 'checkpoints' / tag(CHANGE_AT)} at step {CHANGE_AT}" in output
    loss, weight = max_differences(reference_run, out, range(CHANGE_AT + 1, STEPS + 1))
    record(f"{first} -> {then}", loss, weight)
    loss_tol, weight_tol = tolerances(first, then)
    assert loss <= loss_tol and weight <= weight_tol, (loss, weight)
    return loss, weight


def S(ranks, stage, precision="fp32", micro=1, fp8="off") -> Shape:
    return Shape(ranks, stage, precision, micro, fp8)


matrix = pytest.mark.matrix
# A ZeRO stage or precision change resumes where those keys are RESUMABLE (the "stage" work); until
# then the trainer refuses it in one line, as tests/train/test_compatibility.py checks.
needs_stage = pytest.mark.skipif(
    not {"zero_stage", "precision"} <= RESUMABLE,
    reason="zero_stage and precision are not in compatibility.RESUMABLE: such a resume is refused",
)
# (first shape, resumed shape): every kind of change once by default (three of them resume the same
# uninterrupted run, trained once), the rest under the matrix marker.
CELLS = [
    # world size, at each stage
    (S(2, 0), S(1, 0, micro=4)),
    pytest.param(S(2, 1), S(1, 1, micro=6), marks=matrix),
    pytest.param(S(1, 2, micro=4), S(2, 2), marks=matrix),
    (S(2, 3), S(1, 3, micro=3)),
    pytest.param(S(4, 2), S(1, 2, micro=6), marks=matrix),
    pytest.param(S(1, 3), S(4, 3), marks=matrix),
    pytest.param(S(4, 1), S(3, 1, micro=2), marks=matrix),
    # bf16 world size (and, for scale, a bf16 resume on the same shape)
    pytest.param(S(1, 2, "bf16", micro=4), S(1, 2, "bf16", micro=4), marks=matrix),
    (S(2, 2, "bf16"), S(1, 2, "bf16", micro=6)),
    pytest.param(S(1, 0, "bf16"), S(2, 0, "bf16"), marks=matrix),
    pytest.param(S(1, 1, "bf16"), S(4, 1, "bf16"), marks=matrix),
    pytest.param(S(2, 3, "bf16"), S(1, 3, "bf16", micro=3), marks=matrix),
    # micro-batch x accumulation at the same global batch (and ranks)
    pytest.param(S(1, 2, micro=2), S(1, 2, micro=12), marks=matrix),
    pytest.param(S(2, 0, micro=6), S(2, 0, micro=1), marks=matrix),
    (S(2, 3, micro=1), S(2, 3, micro=3)),
    pytest.param(S(1, 1, "bf16", micro=3), S(1, 1, "bf16", micro=4), marks=matrix),
    # all at once
    pytest.param(S(4, 3, micro=3), S(1, 3, micro=2), marks=matrix),
    # ZeRO stage and precision: with world size and split too
    pytest.param(S(1, 2, micro=4), S(1, 3, micro=4), marks=[matrix, needs_stage]),
    pytest.param(S(2, 3), S(1, 0, micro=2), marks=needs_stage),
    pytest.param(S(1, 0, micro=4), S(2, 1), marks=[matrix, needs_stage]),
    pytest.param(S(1, 2, micro=4), S(1, 2, "bf16", micro=4), marks=[matrix, needs_stage]),
    pytest.param(S(2, 2, "bf16"), S(1, 3, micro=4), marks=[matrix, needs_stage]),
]


@pytest.mark.parametrize(("first", "then"), CELLS, ids=lambda shape: str(shape))
def test_resume_on_another_shape_continues_the_uninterrupted_run(first, then, reference, data_dir, tmp_path):
    check_resumed(reference(first), first, then, tmp_path / "resumed", data_dir)


def test_a_two_rank_fp8_resume_is_exact(reference, data_dir, tmp_path):
    """--fp8 torch on two ranks: each rank records its own amaxes, and a checkpoint keeps rank 0's
    scaling state, which every rank resumed with (rank 1 then scaled otherwise than it would have).
    Reduced over the ranks after every step, the state is every rank's, and a resume on the same
    shape continues the uninterrupted run bit for bit (accumulating 3 micro-batches a step)."""
    shape = S(2, 2, micro=2, fp8="torch")
    run, out = reference(shape), tmp_path / "resumed"
    train(shape, data_dir, out, run / "checkpoints" / tag(CHANGE_AT), save_interval=STEPS)
    assert max_differences(run, out, range(CHANGE_AT + 1, STEPS + 1)) == (0.0, 0.0)


# 4 -> 2 -> 1 -> 3 ranks: a resume at steps 3, 5 and 7, each from the checkpoint the previous shape wrote.
SEQUENCE = (4, 2, 1, 3)
SWITCH_AT = (3, 5, 7)


@pytest.mark.parametrize(
    ("stage", "precision"),
    [(2, "fp32")] + [pytest.param(*cell, marks=matrix) for cell in [(0, "fp32"), (1, "fp32"), (3, "fp32"),
                                                                   (0, "bf16"), (2, "bf16"), (3, "bf16")]],
)  # fmt: skip
def test_a_sequence_of_world_sizes_continues_the_uninterrupted_run(
    stage, precision, reference, data_dir, tmp_path
):
    shapes = [Shape(ranks, stage, precision, GLOBAL_BATCH // (ranks * 3) or 1) for ranks in SEQUENCE]
    runs = [reference(shapes[0])]
    for shape, step in zip(shapes[1:], SWITCH_AT, strict=True):
        runs.append(tmp_path / f"{len(runs)}-{shape}")
        train(shape, data_dir, runs[-1], runs[-2] / "checkpoints" / tag(step))
    # the steps each segment trained before the next one took over, the last one's weights
    ends = (*SWITCH_AT[1:], STEPS)
    want = trajectory(runs[0])
    got = {s: trajectory(run)[s] for run, start, end in zip(runs[1:], SWITCH_AT, ends, strict=True)
           for s in range(start + 1, end + 1)}  # fmt: skip
    assert sorted(got) == list(range(SWITCH_AT[0] + 1, STEPS + 1))
    loss = max(abs(got[s] - want[s]) for s in got)
    a, b = final_weights(runs[0]), final_weights(runs[-1])
    weight = max(float((a[name] - b[name]).abs().max()) for name in a)
    record(" -> ".join(map(str, shapes)), loss, weight)
    loss_tol, weight_tol = tolerances(*shapes)
    assert loss <= loss_tol and weight <= weight_tol, (loss, weight)


@matrix
def test_bf16_tolerance_is_what_a_shape_costs_without_any_resume(reference, data_dir, tmp_path):
    """Where the bf16 tolerance comes from: an *uninterrupted* bf16 run on the new shape differs from the
    reference at least as much as the resumed one does (bf16 rounds another split of the same rows
    differently; the resume itself adds nothing: on the same shape it is bit-exact, a cell above).
    Measured: uninterrupted 1.2e-4 (loss) and 1.5e-3 (weights), resumed 9.9e-5 and 1.0e-4."""
    first, then = S(2, 2, "bf16"), S(1, 2, "bf16", micro=6)
    alone = tmp_path / "uninterrupted"
    train(then, data_dir, alone, save_interval=STEPS)
    resumed = check_resumed(reference(first), first, then, tmp_path / "resumed", data_dir)
    uninterrupted = max_differences(reference(first), alone, range(CHANGE_AT + 1, STEPS + 1))
    record(f"uninterrupted {first} vs {then}", *uninterrupted)
    assert resumed[0] <= 2 * uninterrupted[0] and resumed[1] <= 2 * uninterrupted[1], (resumed, uninterrupted)
