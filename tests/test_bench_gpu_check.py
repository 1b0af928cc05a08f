"""``bench/gpu_check.py``: the collectives probe, and the page that judges a GPU run.

The GPU run happens rarely and its minutes are scarce, so its verdict is tested here: every failed
step, every failed collective of the backend the trainer uses, a loss that does not fall and an fp8
run too far from bf16 must each turn the page to FAIL, and nothing else may.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_sft.command import main_for_script
from ds_sft.model.config import ModelConfig
from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def run_collectives(out) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "bench/gpu_check.py", "collectives", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_collective_runs_over_gloo_on_cpu(tmp_path):
    """Into a folder that does not exist yet (its rendezvous file there retried for 5 minutes, then a
    traceback), beside a user's file named like that file was (``--out`` with ``.store``: deleted)."""
    (tmp_path / "notes.store").write_text("mine")
    for out in (tmp_path / "later" / "collectives.json", tmp_path / "notes.json"):
        run = run_collectives(out)
        assert run.returncode == 0, run.stdout + run.stderr
        result = json.loads(out.read_text())
        assert result["device"] == "cpu" and "nccl" not in result
        assert result["gloo"] == dict.fromkeys(gpu_check.COLLECTIVES, "ok")
    assert (tmp_path / "notes.store").read_text() == "mine"


@contextlib.contextmanager
def one_rank_group(folder: Path):
    """The default process group: the session's where a test made one, else a one-rank gloo group."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.FileStore(str(folder / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def collectives_called(work, monkeypatch) -> set[tuple]:
    """(operation, reduction, dtype) of each tensor collective ``work()`` calls through torch.distributed."""
    import torch.distributed as dist

    called = set()
    with monkeypatch.context() as patch:
        for name in gpu_check.COLLECTIVES:
            real = getattr(dist, name, None)
            if real is None:  # a variant of another (all_reduce_max)
                continue

            def call(*args, _name=name, _real=real, **kwargs):
                tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
                reduction = kwargs.get("op", dist.ReduceOp.SUM) if _name == "all_reduce" else None
                called.add((_name, str(reduction), None if tensor is None else tensor.dtype))
                return _real(*args, **kwargs)

            patch.setattr(dist, name, call)
        work()
    return called


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch 2.13 renames two of DeepSpeed's collectives
def test_the_probe_tries_every_collective_the_trainer_makes(tmp_path, monkeypatch):
    """Each collective of ds_sft.train.distributed (its operation, reduction and dtype) is one that
    ``collectives`` tries: StopSignal's all-reduce MAX of a float64 was not, and a NCCL without it
    would have failed at the end of the first step instead of in the check."""
    from ds_sft.train import distributed

    def trainer():
        distributed.all_reduce_sum([1.0, 2.0], "cpu")
        distributed.StopSignal("cpu").agreed(0)
        distributed.on_rank_zero(lambda: None, "cpu")

    with one_rank_group(tmp_path):
        made = collectives_called(trainer, monkeypatch)
        tried = collectives_called(lambda: gpu_check._each_collective(torch.device("cpu")), monkeypatch)
    assert ("all_reduce", str(torch.distributed.ReduceOp.MAX), torch.float64) in made
    assert made <= tried, made - tried


def collectives(device: str, **outcomes: dict) -> dict:
    return {
        "device": device,
        **{b: {**dict.fromkeys(gpu_check.COLLECTIVES, "ok"), **o} for b, o in outcomes.items()},
    }


def test_the_gemm_ceiling_is_timed_as_the_trainer_times_its_cpu_peak(monkeypatch):
    """The check's GEMM had a timer of its own (the mean of its repeats, where the trainer takes the
    best): the two ceilings MFU is divided by read one clock the same way."""
    import itertools
    import time

    import torch

    from ds_sft.train.metrics import measure_matmul_flops

    def scripted_clock():
        ticks = itertools.accumulate(itertools.cycle([1.0, 0.5, 2.0]))  # repeats of unequal length
        monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))

    scripted_clock()
    trainer = measure_matmul_flops(torch.bfloat16, 8, 4)
    scripted_clock()
    assert gpu_check.time_gemm(8, 4)["flops"] == trainer


@pytest.mark.parametrize("operation", gpu_check.COLLECTIVES)
def test_a_failed_collective_of_the_trainers_backend_fails_the_check(tmp_path, operation):
    error = "DistBackendError: NCCL error: unhandled system error"
    (tmp_path / "collectives.json").write_text(
        json.dumps(collectives("cuda:0", gloo={}, nccl={operation: error}))
    )
    lines, [(name, ok, detail)] = gpu_check.collectives_section(tmp_path)
    assert not ok and name == "collectives over nccl" and operation in detail
    assert any(error in line and line.startswith(f"| {operation} |") for line in lines)


@pytest.mark.parametrize(
    "result,passes",
    [
        (collectives("cpu", gloo={}), True),
        (collectives("cpu", gloo={"barrier": "RuntimeError: x"}), False),
        # gloo on CUDA tensors is informative only: the trainer uses NCCL there
        (collectives("cuda:0", gloo={"reduce_scatter_tensor": "RuntimeError: x"}, nccl={}), True),
        # NCCL's group could not even be made: only gloo's results exist
        ({**collectives("cuda:0", gloo={}), "nccl": {"new_group": "RuntimeError: x"}}, False),
        ({**collectives("cuda:0", gloo={})}, False),
    ],
)
def test_the_check_follows_the_trainers_backend(tmp_path, result, passes):
    (tmp_path / "collectives.json").write_text(json.dumps(result))
    _, [(_, ok, _)] = gpu_check.collectives_section(tmp_path)
    assert ok == passes


FP8_LAYOUT = {"mode": "torch", "layers": 14, "names": "0" * 64, "recipe": {"select": "all"}}


def write_run(
    work: Path,
    name: str,
    losses: list[float],
    data_dir: Path,
    computed: dict | None = None,
    grad_accum: int = 1,
    tokens_per_s: float = 1000.0,
) -> None:
    """A training's folder as `ds-sft train` leaves it; ``computed``: its checkpoint's record of
    precision and fp8 layout (default: what the run's name says; {}: no checkpoint)."""
    run = work / f"train_{name}"
    run.mkdir(parents=True)
    settings = {"data_dir": str(data_dir), "model": "tiny", "grad_accum": grad_accum}
    (run / "effective_config.json").write_text(json.dumps({"ds_sft": settings}))
    records = [
        {"type": "train", "step": i, "loss": loss, "tokens_per_s": tokens_per_s}
        for i, loss in enumerate(losses)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if computed is None:
        computed = {"precision": "bf16", "fp8_layout": FP8_LAYOUT if name == "fp8" else None}
    if computed:
        tag = run / "checkpoints" / f"step_{len(losses):06d}"
        tag.mkdir(parents=True)
        (tag / "trainer_state.json").write_text(json.dumps({"step": len(losses), "run": computed}))
        (run / "checkpoints" / "latest").write_text(tag.name)


def falling(start: float, end: float, steps: int = 12) -> list[float]:
    return [start + (end - start) * i / (steps - 1) for i in range(steps)]


def work_folder(
    tmp_path: Path, steps: list[tuple[str, str]], bf16: list[float], fp8: list[float], computed=(None, None)
) -> Path:
    work, data = tmp_path / "work", tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "index.json").write_text(json.dumps({"seq_len": 64}))
    work.mkdir()
    (work / "steps.tsv").write_text("".join(f"{name}\t{status}\t3\n" for name, status in steps))
    (work / "machine.txt").write_text("test machine\n")
    (work / "collectives.json").write_text(json.dumps(collectives("cpu", gloo={})))
    (work / "gemm.json").write_text(json.dumps({"device": "cpu", "n": 64, "seconds": 1.0, "flops": 1e12}))
    write_run(work, "bf16", bf16, data, computed[0])
    write_run(work, "fp8", fp8, data, computed[1])
    return work


PASSED = [("install", "pass"), ("train bf16", "pass"), ("gpu tests", "skipped: no CUDA")]


@pytest.mark.parametrize(
    "steps,bf16,fp8,failed",
    [
        (PASSED, falling(5.0, 3.0), falling(5.0, 3.05), None),
        (PASSED + [("kernels", "FAIL")], falling(5.0, 3.0), falling(5.0, 3.05), "kernels"),
        (PASSED, falling(5.0, 3.0), falling(5.0, 3.3), "fp8 end loss within 5% of bf16"),
        (PASSED, falling(5.0, 3.0), falling(3.0, 5.0), "fp8: loss falls"),
        (PASSED, falling(3.0, 3.0), falling(3.0, 3.0), "bf16: loss falls"),
    ],
)
def test_the_page_fails_exactly_when_a_step_or_check_fails(tmp_path, steps, bf16, fp8, failed):
    work = work_folder(tmp_path, steps, bf16, fp8)
    page = tmp_path / "SUMMARY.md"
    status = gpu_check.summary(work, page)
    text = page.read_text()
    assert status == (0 if failed is None else 1)
    last = text.strip().splitlines()[-1]
    assert last == "failed: none" if failed is None else failed in last
    assert "machine: test machine" in text and "| all_reduce | ok |" in text


BF16 = {"precision": "bf16", "fp8_layout": None}
FP8 = {"precision": "bf16", "fp8_layout": FP8_LAYOUT}


@pytest.mark.parametrize(
    "computed,failed",
    [
        ((BF16, FP8), []),
        # the first H200 run: --fp8 auto resolved to torch in the "bf16" run too
        ((FP8, FP8), ["bf16: computed in bf16 without fp8"]),
        ((BF16, BF16), ["fp8: computed in bf16 with fp8"]),
        (({**BF16, "precision": "fp32"}, FP8), ["bf16: computed in bf16 without fp8"]),
        (({}, FP8), ["bf16: computed in bf16 without fp8"]),  # no checkpoint: nothing says what ran
        ((BF16, {"precision": "bf16"}), ["fp8: computed in bf16 with fp8"]),  # a record without the key
    ],
)
def test_each_training_computed_in_what_its_name_says(tmp_path, computed, failed):
    """The losses and speeds of two runs compare precisions only when each ran in its own: read from
    the run's checkpoint record, not from the flags (``--fp8 auto`` decides by machine)."""
    work = work_folder(tmp_path, PASSED, falling(5.0, 3.0), falling(5.0, 3.0), computed)
    page = tmp_path / "SUMMARY.md"
    status = gpu_check.summary(work, page)
    text = page.read_text()
    assert status == (1 if failed else 0)
    assert text.strip().splitlines()[-1] == f"failed: {', '.join(failed) if failed else 'none'}"
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| b")}
    assert rows["bf16"].split(" | ")[1] == gpu_check.describe_computed(computed[0] or None)


def measured(mode: str, projections: int, vs_bf16: float) -> dict:
    """A measured row of bench/fp8.py (bf16 at 1000 tokens/s)."""
    return {
        "mode": mode,
        "fp8_projections": projections,
        "vs_bf16": vs_bf16,
        "tokens_per_s": 1000.0 * vs_bf16,
        "step_gib": 1.0,
    }


def write_targets_inputs(work: Path, tmp_path: Path, **figures) -> None:
    """A GPU run's files holding the given figures: mfu (ds-sft train), recipe_mfu (part c at 16
    micro-batches per update), memory_ratio, time_ratio, liger_speed (Liger ms / Triton ms), fp8
    speed-ups d768 and d2048."""
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "index.json").write_text(json.dumps({"seq_len": 64}))
    write_run(work, "bf16", falling(5.0, 3.0), data)
    per_token = gpu_check.train_run(work / "train_bf16")["flops_per_token"]
    # tokens/s is 1000 in write_run: the GEMM's FLOP/s that make the run's MFU the figure asked for
    gemm_flops = 1000.0 * per_token / figures["mfu"]
    (work / "gemm.json").write_text(json.dumps({"flops": gemm_flops, "n": 1}))
    # part c at the recipe's accumulation: its tokens/s against the same GEMM make the figure asked for
    recipe = {"tokens_per_s": figures["recipe_mfu"] * gemm_flops / 1e9, "flops_per_token": 1e9}
    (work / "throughput_d768_accum16_bf16.json").write_text(json.dumps({"c": recipe}))
    ops = [
        {"op": "rms_norm fwd+bwd 16384x768", "provider": "triton", "ms": 1.0},
        {"op": "rms_norm fwd+bwd 16384x768", "provider": "liger", "ms": figures["liger_speed"]},
    ]
    fused = {"memory_ratio": figures["memory_ratio"], "time_ratio": figures["time_ratio"]}
    (work / "kernels.json").write_text(json.dumps({"gpu": {"ops": ops, "linear_cross_entropy": fused}}))
    rows = []  # bench/fp8.py's: TE did not run, so the target reads torch's select-auto row
    for model, size in (("112m", "d768"), ("wide", "d2048")):
        width = [
            measured("bf16", 0, 1.0),
            {"mode": "te auto", "skipped": "--fp8 te needs transformer-engine"},
            measured("torch", 84, 0.5),
            measured("torch auto", 12, figures[size]),
        ]
        rows += [{"model": model, **row} for row in width]
    (work / "fp8.json").write_text(json.dumps({"gpu": rows}))


MET = {"mfu": 0.5, "recipe_mfu": 0.46, "memory_ratio": 0.05, "time_ratio": 0.9, "liger_speed": 1.2}
MET.update(d768=1.05, d2048=1.2)
MISSED = {"mfu": 0.4, "recipe_mfu": 0.44, "memory_ratio": 0.2, "time_ratio": 1.1, "liger_speed": 0.8}
MISSED.update(d768=0.95, d2048=1.1)
TARGET_ROWS = {
    "mfu": "ds-sft train bf16: MFU >= 45%",
    "recipe_mfu": "16 micro-batches per update: MFU >= 45%",
    "memory_ratio": "peak memory <= 0.1x",
    "time_ratio": "time <= 1.0x",
    "liger_speed": "Triton / Liger speed >= 1",
    "d768": "d768: fp8 select auto",
    "d2048": "d2048: fp8 select auto",
}


@pytest.mark.parametrize("missed", [None, *MISSED])
def test_each_target_is_met_or_missed_by_its_own_figure(tmp_path, missed):
    work = tmp_path / "work"
    work.mkdir()
    write_targets_inputs(work, tmp_path, **{**MET, **({missed: MISSED[missed]} if missed else {})})
    rows = [
        line for line in gpu_check.targets_section(work) if line.startswith("| ") and "figure" not in line
    ]
    assert len(rows) == len(TARGET_ROWS)
    for key, words in TARGET_ROWS.items():
        [row] = [r for r in rows if words in r]
        assert row.endswith("| MISSED |" if key == missed else "| met |"), row
        if key in ("d768", "d2048"):
            assert "(torch auto: 12 projections in fp8)" in row


def test_targets_without_their_files_are_not_measured(tmp_path):
    rows = [line for line in gpu_check.targets_section(tmp_path) if line.endswith("|")][2:]
    assert rows and all(row.endswith("| - | not measured |") for row in rows)


@pytest.mark.parametrize("te_ran,expected", [(False, "torch auto"), (True, "te auto")])
def test_the_fp8_target_reads_the_path_auto_takes_and_the_page_lists_every_mode(tmp_path, te_ran, expected):
    """--fp8 auto is TE where it imports, else torch: the target reads that path's select-auto row."""
    write_targets_inputs(tmp_path, tmp_path, **MET)
    result = json.loads((tmp_path / "fp8.json").read_text())
    if te_ran:
        for row in result["gpu"]:
            if row["mode"] == "te auto":
                row.pop("skipped")
                row.update(measured("te auto", 56, 1.3))
        (tmp_path / "fp8.json").write_text(json.dumps(result))
    assert gpu_check.auto_row(result["gpu"], "wide")["mode"] == expected
    page = "\n".join(gpu_check.fp8_section(tmp_path))
    assert "| wide | torch auto | 12 |" in page and "| 112m | torch | 84 |" in page
    assert ("| wide | te auto | 56 |" in page) == te_ran
    assert ("skipped: --fp8 te needs transformer-engine" in page) != te_ran


def test_the_page_says_where_the_112m_steps_time_goes(tmp_path):
    assert gpu_check.profile_section(tmp_path)[-1] == "not profiled"
    top = [
        {"op": "sm90_xmma_gemm_bf16bf16_bf16f32", "calls_per_step": 252.0, "ms_per_step": 30.0, "share": 0.6},
        {"op": "triton_rms|norm", "calls_per_step": 50.0, "ms_per_step": 5.0, "share": 0.1},
    ]
    profile = {"steps": 3, "clock": "device", "wall_ms_per_step": 80.0, "busy_ms_per_step": 50.0}
    profile.update(top=top, other_ms_per_step=15.0)
    (tmp_path / "throughput_d768_bf16.json").write_text(json.dumps({"c": {"profile": profile}}))
    page = gpu_check.profile_section(tmp_path)
    assert "80.0 ms per step, 50.0 ms of it in the device time of its kernels" in page[2]
    assert "| 60.0% | 30.000 | 252.0 | `sm90_xmma_gemm_bf16bf16_bf16f32` |" in page
    assert "| 10.0% | 5.000 | 50.0 | `triton_rms/norm` |" in page  # a | would split the table's row
    assert page[-1] == "| | 15.000 | | the rest |"
    profile["phases"] = {
        "attention mask": {"host_ms": 8.04, "done_ms": 8.11, "per_update": 1},
        "forward": {"host_ms": 28.83, "done_ms": 31.23, "per_update": 1},
    }
    (tmp_path / "throughput_d768_bf16.json").write_text(json.dumps({"c": {"profile": profile}}))
    page = gpu_check.profile_section(tmp_path)
    assert page[-2:] == ["| attention mask | 8.04 | 8.11 | 1 |", "| forward | 28.83 | 31.23 | 1 |"]
    assert not any("host's side" in line for line in page)  # results from before the host's ranking
    host = [{"op": "cudaLaunchKernel", "calls_per_step": 900.0, "ms_per_step": 22.0, "share": 0.4}]
    profile.update(host_top=host, host_other_ms_per_step=33.0, host_busy_ms_per_step=55.0)
    (tmp_path / "throughput_d768_bf16.json").write_text(json.dumps({"c": {"profile": profile}}))
    page = gpu_check.profile_section(tmp_path)
    start = next(i for i, line in enumerate(page) if line.startswith("The host's side: 55.0 ms per step"))
    assert page[start + 4] == "| 40.0% | 22.000 | 900.0 | `cudaLaunchKernel` |"
    assert page[start + 5] == "| | 33.000 | | the rest |"


def test_the_throughput_table_shows_the_accumulation_and_what_one_reduction_per_update_saved(tmp_path):
    row = {"fp8_projections": "none", "tokens_per_s": 200000.0, "fraction_of_gemm": 0.25, "mfu": None}
    runs = {
        "d768_bf16": {**row, "grad_accum": 1, "speedup_vs_reduction_per_micro_batch": None},
        "d768_accum16_bf16": {**row, "grad_accum": 16, "speedup_vs_reduction_per_micro_batch": 1.3},
    }
    for name, c in runs.items():
        (tmp_path / f"throughput_{name}.json").write_text(json.dumps({"model_parameters": 112085760, "c": c}))
    (tmp_path / "throughput_d2048_bf16.json").write_text("{}")  # a step that wrote no result
    page = gpu_check.throughput_section(tmp_path)
    assert "| d768_bf16 | 112,085,760 | none | 1 | 200,000 | 25.0% | - | - |" in page
    assert "| d768_accum16_bf16 | 112,085,760 | none | 16 | 200,000 | 25.0% | - | 1.30x |" in page
    assert "| throughput_d2048_bf16 | - | - | - | no result | - | - | - |" in page
    widths = {line.count("|") for line in page if line.startswith("|")}
    assert widths == {9}  # every row as wide as the header


def test_the_training_table_says_how_many_micro_batches_each_run_updated_on(tmp_path):
    """The compiled run accumulates 2 micro-batches (ZeRO 2's one reduction per update under
    --compile), the eager ones 1: the table and the speed line say so."""
    work, data = tmp_path / "work", tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "index.json").write_text(json.dumps({"seq_len": 64}))
    write_run(work, "bf16", falling(5.0, 3.0), data)
    write_run(work, "bf16_compile", falling(5.0, 3.0), data, grad_accum=2, tokens_per_s=1500.0)
    lines, _ = gpu_check.training_section(work, None)
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines if line.startswith("| bf16")}
    assert rows["bf16"][3] == "1" and rows["bf16_compile"][3] == "2"
    assert "\n--compile / eager bf16 tokens/s: 1.50x (2 and 1 micro-batches per update)" in lines


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("trained_share", [0.25, 0.5, 1.0])
def test_the_training_table_also_charges_the_lm_head_to_trained_tokens_only(tmp_path, trained_share, ranks):
    """MFU by PaLM's count charges the head's 6 V d to every position; the fused loss runs it on the
    trained tokens only: the last column counts those FLOPs (equal to MFU when every token trains).
    A record's trained tokens are every rank's, and so are the positions they are a share of."""
    work, data = tmp_path / "work", tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "index.json").write_text(json.dumps({"seq_len": 64}))
    write_run(work, "bf16", falling(5.0, 3.0), data)
    run = work / "train_bf16"
    settings = {"data_dir": str(data), "model": "tiny", "grad_accum": 2, "micro_batch_size": 4}
    effective = {"train_batch_size": 4 * 2 * ranks, "ds_sft": settings}
    (run / "effective_config.json").write_text(json.dumps(effective))
    trained = int(trained_share * 4 * 2 * ranks * 64)
    records = [json.loads(line) | {"trained_tokens": trained} for line in (run / "metrics.jsonl").open()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    gemm = {"flops": 1e9, "n": 1, "device": "test"}
    lines, _ = gpu_check.training_section(work, gemm)
    (row,) = [line.split(" | ") for line in lines if line.startswith("| bf16 ")]

    config = ModelConfig.preset("tiny")
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * 64
    body = 6 * (config.matmul_parameters() - config.vocab_size * config.d_model)
    head = 6 * config.vocab_size * config.d_model
    palm, ran = body + head + attention, body + head * trained_share + attention
    assert row[6] == f"{1000.0 * palm / 1e9:.1%}" and row[7] == f"{1000.0 * ran / 1e9:.1%} |"


def test_the_compiled_trainings_graph_breaks_are_counted_and_on_the_page(tmp_path, monkeypatch):
    """``train`` runs ds-sft train in its process (here a stand-in whose compiled step breaks its
    graph) and counts the graph breaks dynamo met, each with its reason: a break leaves the compiled
    step in pieces run eager between them (one at every Triton RMSNorm launch would be 25 per 112m
    forward). The page says how many, and why."""
    import ds_sft.cli

    def step(x):
        x = x * 2
        torch._dynamo.graph_break()
        return x + 1

    compiled = torch.compile(step, backend="eager")

    def train(argv):
        assert argv == ["train", "--data_dir", "d", "--compile"]
        for _ in range(3):
            compiled(torch.ones(4))
        return 0

    monkeypatch.setattr(ds_sft.cli, "main", train)
    work, data = tmp_path / "work", tmp_path / "data"
    flags = ["train", "--out", str(work / "graph_breaks.json"), "--", "--data_dir", "d", "--compile"]
    assert main_for_script(gpu_check, flags) == 0
    counted = json.loads((work / "graph_breaks.json").read_text())
    assert counted["graph_breaks"] == sum(counted["reasons"].values()) >= 1
    assert counted["graphs"] >= 2 and any(re.search("graph.break", r, re.I) for r in counted["reasons"])
    assert not any(" at 0x" in reason for reason in counted["reasons"])  # the same break, one line

    (data / "train").mkdir(parents=True)
    (data / "train" / "index.json").write_text(json.dumps({"seq_len": 64}))
    write_run(work, "bf16_compile", falling(5.0, 3.0), data)
    lines, _ = gpu_check.training_section(work, None)
    said = f"--compile: {counted['graph_breaks']} graph breaks, {counted['graphs']} graphs compiled"
    assert said in lines


# A child running ``gpu_check.py train`` with a stand-in trainer that compiles a step with a graph break
# and is then killed: by SIGKILL alone (the OOM killer), or as ``timeout -k 10`` ends a run over its
# time limit: SIGTERM, which the trainer's loop takes as "stop after this step and save", then SIGKILL
# while the compiled step and the checkpoint are still running.
KILLED_TRAINER = """
import os, signal, sys
import torch
import ds_sft.cli
from ds_sft.command import main_for_script
from ds_sft.train.distributed import preemption_flag
sys.path.insert(0, "bench")
import gpu_check

def step(x):
    x = x * 2
    torch._dynamo.graph_break()
    return x + 1

def train(argv):
    with preemption_flag() as flag:
        torch.compile(step, backend="eager")(torch.ones(4))
        if ENDING == "time limit":
            os.kill(os.getpid(), signal.SIGTERM)
            assert flag["stop"] == signal.SIGTERM  # heard: the loop would save after its step
        os.kill(os.getpid(), signal.SIGKILL)

ds_sft.cli.main = train
main_for_script(gpu_check, ["train", "--out", OUT, "--", "--compile"])
"""


@pytest.mark.parametrize("ending", ["time limit", "SIGKILL"])
def test_the_graph_breaks_outlive_a_run_killed_before_its_end(ending, tmp_path):
    """graph_breaks.json was written when the trainer returned: a run over gpu_check.sh's time limit
    (SIGTERM, then SIGKILL 10 s later while the compiled step and its checkpoint ran on) left none, and
    the page said "not counted". The counts are written after each compile too."""
    from tests.signals import as_from_a_terminal

    out = tmp_path / "work" / "graph_breaks.json"
    code = f"ENDING = {ending!r}; OUT = {str(out)!r}\n" + KILLED_TRAINER
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.run(  # noqa: PLW1509  (preexec_fn: the signals at a terminal's defaults)
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=300, preexec_fn=as_from_a_terminal(),
    )  # fmt: skip
    assert child.returncode == -9, child.stderr[-3000:]
    assert out.is_file(), child.stderr[-3000:]
    counted = json.loads(out.read_text())
    assert counted["until"] == "the last compile" and counted["graphs"] >= 2
    assert counted["graph_breaks"] == sum(counted["reasons"].values()) >= 1
    assert any(re.search("graph.break", reason, re.I) for reason in counted["reasons"])
    said = gpu_check.graph_breaks_lines(out.parent)[1]
    assert said.startswith(f"--compile: {counted['graph_breaks']} graph breaks") and "killed" in said


@pytest.mark.parametrize(("gap", "ok"), [(None, None), (0.0, True), (3e-3, True), (0.05, False)])
def test_one_reduction_per_update_must_train_as_one_per_micro_batch(tmp_path, gap, ok):
    """Part c at 16 micro-batches ran both reductions from the same weights: a loss gap past 1% fails
    the check (a missed speed target would not); no figure, no check."""
    c = {"loss_gap_vs_reduction_per_micro_batch": gap}
    (tmp_path / "throughput_d768_accum16_bf16.json").write_text(json.dumps({"c": c}))
    checks = gpu_check.coalescing_checks(tmp_path)
    assert [check[1] for check in checks] == ([] if ok is None else [ok])
