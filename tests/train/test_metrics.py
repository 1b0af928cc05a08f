"""Alarms, MFU arithmetic, the metric sinks and the report, on hand-made records."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from types import SimpleNamespace

import hypothesis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds_sft.errors import UserError
from ds_sft.options import control_character
from ds_sft.train.config_keys import OPTIONS
from ds_sft.train.metrics import (
    MetricsSink,
    flops_per_token,
    format_duration,
    resolve_wandb_mode,
    resolve_wandb_project,
    start_wandb,
)
from ds_sft.train.report import parse_record, read_records, write_report
from ds_sft.train.run_log import Alarms
from tests.conftest import REPO_ROOT


def test_flops_per_token_counts_weights_and_attention():
    # 124M-style model, seq 1024: 6 * N for the weight matmuls + 12 * L * d * T for attention
    assert flops_per_token(124_000_000, 12, 768, 1024) == 6 * 124_000_000 + 12 * 12 * 768 * 1024


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False},
        {"tie_embeddings": False, "family": "qwen2", "attention_bias": True},
        {"family": "qwen3", "qk_norm": True},
        {"n_kv_heads": 4, "head_dim": 32},
    ],
)
def test_mfu_counts_the_weights_each_token_is_multiplied_by(overrides):
    """N of 6 N is every nn.Linear weight plus the LM head (the embedding when tied), counted off
    the built model; an untied input embedding (a lookup), norm gains and biases do no matmul work."""
    import torch

    from ds_sft.model.config import ModelConfig
    from ds_sft.model.llama import LlamaModel
    from ds_sft.train.run_log import StepMeter

    config = ModelConfig.preset("tiny", **overrides)
    model = LlamaModel(config)
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if config.tie_embeddings:
        matmul_weights += model.wte.weight.numel()
    seq_len = 32
    settings = SimpleNamespace(micro_batch_size=1, grad_accum=1, max_iters=1)
    meter = StepMeter(settings, {}, config, seq_len, world=1, first_step=0, say=lambda _: None)
    width = config.n_heads * config.head_dim
    assert meter.flops_token == 6 * matmul_weights + 12 * config.n_layers * width * seq_len
    assert config.matmul_parameters() == matmul_weights


@pytest.mark.parametrize(
    ("history", "train_loss", "expected"),
    [
        ([2.0, 1.9, 1.8, 1.7], 1.6, []),
        ([1.7, 1.8, 1.9, 2.0], 1.95, ["rose for 3 evals in a row (1.7000 -> 1.8000 -> 1.9000 -> 2.0000)"]),
        ([1.8, 1.9, 2.0], 1.95, []),  # only 2 rises
        ([2.0, 1.9, 1.8], 1.2, ["exceeds train loss 1.2000 by more than 0.5"]),
    ],
)
def test_alarms(history, train_loss, expected):
    messages = Alarms(rising_evals=3, max_gap=0.5).check(history, train_loss)
    assert len(messages) == len(expected)
    for message, fragment in zip(messages, expected, strict=True):
        assert fragment in message


def test_format_duration():
    assert format_duration(75) == "1:15" and format_duration(3 * 3600 + 62) == "3:01:02"


def records():
    train = [
        {
            "type": "train",
            "step": k,
            "loss": 3.0 - 0.1 * k,
            "lr": 1e-4,
            "grad_norm": 1.0 / k,
            "tokens_per_s": 500.0 + k,
            "mfu": 0.1,
            "elapsed_s": 2.0 * k,
            "eta_s": 0.0,
        }
        for k in range(1, 7)
    ]
    train[2].update(loss=math.nan, grad_norm=None, skipped=True)
    per_source = {
        "alpaca": {"loss": 2.6, "ppl": 13.5, "acc": 0.4, "tokens": 100},
        "gsm8k": {"loss": 2.2, "ppl": 9.0, "acc": 0.5, "tokens": 80},
    }
    evals = [
        {
            "type": "eval",
            "step": k,
            "val_loss": 2.5 - 0.01 * k,
            "val_ppl": 12.0,
            "val_acc": 0.45,
            "val_tokens": 180,
            "per_source": per_source,
            "train_loss": 2.6,
        }
        for k in (3, 6)
    ]
    return train + evals


def test_sink_writes_jsonl_and_an_offline_wandb_run(tmp_path):
    sink = MetricsSink(
        tmp_path, enabled=True, wandb_project="ds-sft-test", wandb_mode="offline", config={"max_iters": 6}
    )
    for record in records():
        sink.log(record)
    sink.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["per_source"]["gsm8k"]["acc"] == 0.5 and len(lines) == 8
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize(
    ("flag", "environ", "expected"),
    [
        ("disabled", {"WANDB_MODE": "online", "WANDB_API_KEY": "k"}, "disabled"),  # the flag wins
        (None, {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}, "disabled"),  # then $WANDB_MODE
        (None, {"WANDB_API_KEY": "k"}, "online"),  # a key: the user wants the server
        (None, {}, "offline"),
        (None, {"WANDB_API_KEY": ""}, "offline"),
    ],
)
def test_wandb_mode_comes_from_the_flag_then_the_environment(flag, environ, expected):
    assert resolve_wandb_mode(flag, environ) == expected


@given(st.text(max_size=12).filter(lambda mode: mode not in ("offline", "online", "disabled")))
def test_a_wandb_mode_variable_wandb_would_refuse_stops_in_one_line(mode):
    """wandb raised a pydantic traceback for WANDB_MODE=bogus at its first step, after the model loaded."""
    with pytest.raises(UserError, match="WANDB_MODE=") as refused:
        resolve_wandb_mode(None, {"WANDB_MODE": mode})
    assert "\n" not in str(refused.value)


def wandb_would_take(name: str) -> bool:
    """Whether a project name passes wandb's own check (its Settings) and ds-sft's rule for every flag
    and setting: no control character (options.control_character), which wandb would take."""
    from wandb.errors import UsageError
    from wandb.sdk.wandb_settings import Settings

    try:
        Settings(project=name)
    except UsageError:
        return False
    return control_character(name) is None


@given(st.text(min_size=1, max_size=140).filter(lambda name: name.strip() and "\0" not in name))
def test_the_project_name_domain_is_wandbs_own_rule(name):
    """--wandb_project is refused in the parser exactly when wandb would refuse it at the first step."""
    domain = OPTIONS["wandb_project"][1]
    try:
        domain.check(name)
        ours = True
    except ValueError:
        ours = False
    assert ours == wandb_would_take(name)


@hypothesis.settings(derandomize=True, max_examples=200)
@given(st.text(min_size=1, max_size=140).filter(lambda name: name.strip() and "\0" not in name))
def test_a_wandb_project_variable_is_refused_exactly_when_wandb_would(name):
    """$WANDB_PROJECT went to wandb unchecked: one it refuses stopped the run after the model loaded."""
    try:
        assert resolve_wandb_project(None, {"WANDB_PROJECT": name}) == name
        ours = True
    except UserError as refused:
        assert str(refused).startswith("WANDB_PROJECT must be") and "\n" not in str(refused)
        ours = False
    assert ours == wandb_would_take(name)
    assert resolve_wandb_project("flag", {"WANDB_PROJECT": name}) == "flag"  # the flag wins, unread


@pytest.mark.parametrize(
    ("project", "mode", "environ"),
    [
        ("a/b", "offline", {}),  # a name wandb refuses (the parser refuses it first; this is the net)
        ("ds-sft", "online", {"WANDB_API_KEY": "xyz"}),  # a key wandb rejects without asking its server
    ],
)
def test_wandb_refusing_to_start_is_one_line(tmp_path, monkeypatch, project, mode, environ):
    import wandb

    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match="wandb could not start the run") as refused:
        start_wandb(wandb, project, mode, tmp_path, {})
    assert "--wandb_mode offline" in str(refused.value)


def test_other_ranks_write_nothing(tmp_path):
    sink = MetricsSink(tmp_path, enabled=False, wandb_project=None, wandb_mode=None, config={})
    sink.log(records()[0])
    sink.close()
    assert list(tmp_path.iterdir()) == []


def test_report_has_metrics_table_plots_and_config(tmp_path):
    # a crash after step 4 and a resume from step 3: step 4 was logged twice, the report keeps the last
    lines = records()[:4] + [{**records()[3], "loss": 9.0}] + records()[4:]
    for k, record in enumerate(lines):  # speeds far apart: the upper middle was reported as the median
        record["tokens_per_s"] = 1000.0 * (k + 1) if record["type"] == "train" else record.get("tokens_per_s")
    lines.append({"type": "alarm", "step": 3, "message": "x"})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = {
        "status": "finished",
        "step": 6,
        "last_eval": records()[-1],
        "best_val": 2.44,
        "best_tag": "step_000006",
        "peak_flops_source": "test",
        "elapsed_s": 12.0,
    }
    text = write_report(tmp_path, {"zero_optimization": {"stage": 2}}, summary).read_text()
    assert "| gsm8k | 2.2000 | 9.00 | 0.500 | 80 |" in text and "- step 3: x" in text
    assert '"stage": 2' in text and "| train loss (first step) | 2.9000 |" in text
    speeds = [r["tokens_per_s"] for r in read_records(tmp_path)[0] if r.get("tokens_per_s") is not None]
    assert len(speeds) % 2 == 0  # the median of an even count is the mean of the middle two
    assert f"| tokens/s (median) | {statistics.median(speeds):,.0f} |" in text
    train = [r for r in read_records(tmp_path)[0] if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and train[3]["loss"] == 9.0
    for name in ("loss.png", "perplexity.png", "lr.png", "grad_norm.png", "tokens_per_s.png"):
        assert (tmp_path / name).stat().st_size > 1000 and f"![{name}]({name})" in text


@pytest.mark.parametrize(("variable", "value"), [("WANDB_CONSOLE", "bogus"), ("WANDB_INIT_TIMEOUT", "soon")])
def test_a_wandb_variable_wandb_refuses_is_one_line_naming_it(tmp_path, variable, value):
    """wandb's settings model refused it with a pydantic ValidationError, which came out as a traceback.
    In a fresh process: wandb reads the variables once, into a process-wide singleton."""
    code = (
        "import sys, wandb\n"
        "from pathlib import Path\n"
        "from ds_sft.errors import UserError\n"
        "from ds_sft.train.metrics import start_wandb\n"
        "try:\n"
        f"    start_wandb(wandb, None, 'offline', Path({str(tmp_path)!r}), {{}})\n"
        "except UserError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, variable: value, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    (line,) = result.stdout.splitlines()
    assert re.match(rf"wandb refused its settings \(.*\): check the WANDB_\* .*{variable}", line), line


def test_the_users_wandb_project_and_name_are_kept(tmp_path, monkeypatch):
    """The project was always ds-sft's and the name the run folder's: $WANDB_PROJECT was overridden."""
    calls = []
    fake = SimpleNamespace(
        init=lambda **kwargs: calls.append(kwargs), errors=SimpleNamespace(Error=RuntimeError)
    )
    start_wandb(fake, None, "offline", tmp_path, {})
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    monkeypatch.setenv("WANDB_NAME", "first try")
    start_wandb(fake, None, "offline", tmp_path, {})
    start_wandb(fake, "flag", "offline", tmp_path, {})
    assert [(c["project"], c["name"]) for c in calls] == [
        ("ds-sft", tmp_path.name),
        ("mine", "first try"),
        ("flag", "first try"),
    ]


SUMMARY = {
    "status": "finished",
    "step": 6,
    "last_eval": None,
    "peak_flops_source": "test",
    "elapsed_s": 1234.0,
}
# Lines of metrics.jsonl that are no record: cut off by a killed run, edited, or damaged.
NOT_RECORDS = [
    '{"type": "train", "step": 5, "lo',
    '{"step": 5, "loss": 1.0}',
    '{"type": "train", "loss": 1.0}',
    '{"type": "train", "step": "5"}',
    '{"type": "train", "step": true}',
    '{"type": 3, "step": 5}',
    "[1, 2]",
    '{"type": "train", "step": ' + "1" * 5000 + "}",
    "",
]


@pytest.mark.parametrize("line", NOT_RECORDS)
def test_a_line_that_is_no_record_is_skipped_and_counted_in_the_report(tmp_path, line):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(
        b"".join(json.dumps(r).encode() + b"\n" for r in records()) + line.encode() + b"\n\xff\n"
    )
    assert parse_record(line) is None
    read, unreadable = read_records(tmp_path)
    assert unreadable == 2  # the line, and one that is not UTF-8
    assert [(r["type"], r["step"]) for r in read] == sorted(
        ((r["type"], r["step"]) for r in records()), key=lambda k: k[1]
    )
    text = write_report(tmp_path, {}, SUMMARY).read_text()
    assert "2 line(s) of metrics.jsonl are not readable records and were skipped" in text


def test_the_report_s_time_covers_every_segment(tmp_path):
    """The last record's elapsed_s is the last segment's (0 s after a resume at the end); the
    trainer state's elapsed_s, which the summary carries, sums all segments."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    assert (
        "| time in train steps (all segments) | 1234 s |" in write_report(tmp_path, {}, SUMMARY).read_text()
    )


@pytest.mark.parametrize("tail", ['{"type": "train", "step": 7, "lo', "{", "x" * 10000])
@pytest.mark.parametrize("earlier", [0, 3])
def test_a_resumed_sink_cuts_the_record_a_killed_run_was_writing(tmp_path, tail, earlier):
    """Appended after a cut-off line, the resumed run's first record was glued onto it and both lost;
    the original of a cp -al copy keeps its bytes."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records()[:earlier]) + tail)
    original = tmp_path / "original.jsonl"
    os.link(path, original)
    sink = MetricsSink(tmp_path, enabled=True, wandb_project=None, wandb_mode="disabled", config={})
    for record in records()[earlier:]:
        sink.log(record)
    sink.close()
    assert path.read_text().splitlines() == [json.dumps(r) for r in records()]
    assert original.read_text().endswith(tail)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([(2.0, 10), (4.0, 30)], 3.5),  # a mean of the step means would say 3.0
        ([(2.0, 10), (0.0, 0)], 2.0),  # a step without trained tokens is no perfect step (1.0)
        ([(2.0, 10), (None, 0)], 2.0),
        ([(2.0, 10), (9.0, 5, "skipped"), (5.0, 20)], 4.0),
        ([(None, 0)], None),
    ],
)
def test_the_eval_s_train_loss_pools_trained_tokens_like_the_val_loss(steps, expected, tmp_path):
    from ds_sft.train.run_log import RunLog

    s = SimpleNamespace(
        wandb_project=None,
        wandb_mode="disabled",
        alarm_rising_evals=3,
        alarm_gap=0.5,
        log_interval=100,
        max_iters=100,
    )
    log = RunLog(s, tmp_path, is_main=True, say=lambda _: None)
    with log.progress_bar(0):
        for number, (loss, tokens, *skipped) in enumerate(steps, start=1):
            log.step(
                {"step": number, "loss": loss, "trained_tokens": tokens, "lr": 1e-3, "skipped": bool(skipped)}
            )
        log.evaluation(
            len(steps), {"val_loss": 3.0, "val_ppl": 20.0, "val_acc": 0.5, "per_source": {}}, [3.0]
        )
    log.close()
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [record["train_loss"] for record in evals if record.get("type") == "eval"] == [expected]


@pytest.mark.parametrize("peak", [4.2e9, 3.1e11, 989e12])
def test_the_mfu_peak_line_shows_a_slow_peak_in_significant_digits(peak, monkeypatch):
    """A CPU's bf16 peak (a few GFLOP/s) was printed as "0.00 TFLOP/s", which says nothing."""
    from ds_sft.model.config import ModelConfig
    from ds_sft.train import run_log

    monkeypatch.setattr(run_log, "peak_flops", lambda bf16: (peak, "measured"))
    said = []
    settings = SimpleNamespace(micro_batch_size=1, grad_accum=1, max_iters=1)
    run_log.StepMeter(settings, {}, ModelConfig.preset("tiny"), 32, world=1, first_step=0, say=said.append)
    shown = float(said[0].split("MFU peak: ")[1].split(" TFLOP/s")[0])
    assert shown == pytest.approx(peak / 1e12, rel=5e-3)


# torch.cuda.get_device_name() of each card -> its dense bf16 peak on NVIDIA's datasheet (TFLOP/s)
DEVICE_BF16_PEAKS = {
    "NVIDIA H100 80GB HBM3": 989,  # SXM
    "NVIDIA H100 PCIe": 756,
    "NVIDIA H100 NVL": 835,
    "NVIDIA H200": 989,
    "NVIDIA H200 NVL": 835,
    "NVIDIA GH200 480GB": 989,  # holds "H200": read as a word, that fragment is not in it
    "NVIDIA H800": 989,
    "NVIDIA H800 PCIe": 756,
    "NVIDIA A100-SXM4-80GB": 312,
    "NVIDIA A100 80GB PCIe": 312,
    "NVIDIA L40S": 362,
    "NVIDIA L40": 181,
    "NVIDIA L4": 121,
}


@pytest.fixture
def cuda_named(monkeypatch):
    """Makes torch report one CUDA device of the given name; the trainer's cached peak is forgotten
    before and after."""
    import torch

    from ds_sft.train.metrics import peak_flops

    def name_it(name: str) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        peak_flops.cache_clear()

    yield name_it
    peak_flops.cache_clear()


@pytest.mark.parametrize(("name", "tflops"), DEVICE_BF16_PEAKS.items())
def test_the_trainer_and_the_bench_read_one_datasheet_peak_for_each_gpu(cuda_named, name, tflops):
    """The trainer matched "H100" in "NVIDIA H100 PCIe" and divided by 989 TFLOP/s, reporting MFU
    24% low; the bench kept a table of its own that knew the PCIe card. The more specific name wins,
    and both read the one table."""
    import importlib.util

    import torch

    from ds_sft.bench import BENCH_DIR
    from ds_sft.train.metrics import peak_flops

    spec = importlib.util.spec_from_file_location("train_throughput", BENCH_DIR / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cuda_named(name)
    assert peak_flops(bf16=True) == (tflops * 1e12, f"{name} datasheet")
    assert bench.gpu_peak(torch.device("cuda")) == (name, tflops * 1e12)


# fp32 without tensor cores (TF32 is off: torch's default, and ds-sft never turns it on), TFLOP/s
DEVICE_FP32_PEAKS = {
    "NVIDIA H100 80GB HBM3": 67,
    "NVIDIA H100 PCIe": 51,
    "NVIDIA H200": 67,
    "NVIDIA A100-SXM4-80GB": 19.5,
    "NVIDIA L40S": 91.6,
    "NVIDIA L4": 30.3,
}


@pytest.mark.parametrize(("name", "tflops"), DEVICE_FP32_PEAKS.items())
def test_an_fp32_run_s_mfu_divides_by_the_fp32_peak_not_tf32_s(cuda_named, name, tflops):
    """An fp32 run's matmuls run without TF32, so its MFU divides by the fp32 peak; the table held the
    TF32 tensor-core figures (494 TFLOP/s on an H100), 7x too high."""
    from ds_sft.train.metrics import peak_flops

    cuda_named(name)
    assert peak_flops(bf16=False) == (tflops * 1e12, f"{name} datasheet")


@pytest.mark.parametrize("bf16", [True, False])
def test_a_gpu_not_in_the_table_is_assumed_an_a100_of_the_run_s_precision(cuda_named, bf16):
    from ds_sft.train.metrics import datasheet_peak, peak_flops

    cuda_named("NVIDIA Hypothetical X9")
    peak, source = peak_flops(bf16=bf16)
    assert peak == datasheet_peak("NVIDIA A100", bf16)
    assert source == f"NVIDIA Hypothetical X9 unknown: assumed A100 {'bf16' if bf16 else 'fp32'} peak"


@pytest.mark.parametrize("order", [1, -1], ids=["as written", "reversed"])
def test_each_datasheet_entry_is_read_for_its_name_whatever_the_table_s_order(cuda_named, monkeypatch, order):
    """A device named by an entry gets that entry's peaks, though a shorter entry ("H100" in
    "H100 PCIe", "L4" in "L40S") is in its name too: no order of the table can hide one."""
    from ds_sft.train import metrics

    table = dict(list(metrics.GPU_PEAK_FLOPS.items())[::order])
    monkeypatch.setattr(metrics, "GPU_PEAK_FLOPS", table)
    for fragment, peaks in table.items():
        read = []
        for bf16 in (True, False):
            cuda_named(f"NVIDIA {fragment}")
            read.append(metrics.peak_flops(bf16)[0])
        assert tuple(read) == peaks, fragment


def _edited_records() -> list[tuple[str, dict]]:
    """A well-formed record of each kind with one field the report reads given the wrong kind of
    value, or taken out where the report needs it."""
    train, evaluation = records()[0], next(r for r in records() if r["type"] == "eval")
    alarm = {"type": "alarm", "step": 3, "message": "val loss rose"}
    change = {"type": "change", "step": 3, "message": "lr 1e-4 -> 2e-4"}
    wrong = ["n/a", [1.0], {"v": 1.0}, True]
    cases = []
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        cases += [(f"train {name}={v!r}", {**train, name: v}) for v in wrong]
    cases.append(("train measured without mfu", {k: v for k, v in train.items() if k != "mfu"}))
    for name in ("val_loss", "val_ppl", "val_acc", "val_tokens"):
        cases += [(f"eval {name}={v!r}", {**evaluation, name: v}) for v in wrong]
    cases += [(f"eval per_source={v!r}", {**evaluation, "per_source": v}) for v in [*wrong[:2], None]]
    cases.append(("eval without per_source", {k: v for k, v in evaluation.items() if k != "per_source"}))
    for name in ("loss", "ppl", "acc", "tokens"):
        alpaca = evaluation["per_source"]["alpaca"]
        cases += [
            (f"eval alpaca {name}={v!r}", {**evaluation, "per_source": {"alpaca": {**alpaca, name: v}}})
            for v in wrong
        ]  # fmt: skip
    for record in (alarm, change):
        cases += [(f"{record['type']} message={v!r}", {**record, "message": v}) for v in [*wrong[1:], None]]
        cases.append(
            (f"{record['type']} without message", {k: v for k, v in record.items() if k != "message"})
        )
    return cases


EDITED = _edited_records()


@pytest.mark.parametrize("edited", [record for _, record in EDITED], ids=[name for name, _ in EDITED])
def test_an_edited_record_whose_fields_the_report_reads_is_skipped_and_counted(tmp_path, edited):
    """Valid JSON with a type and a step, but a loss of "n/a" or an alarm without its message: the
    run trained to the end and then died in write_report (TypeError, KeyError)."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*records(), edited]))
    assert parse_record(json.dumps(edited)) is None
    text = write_report(tmp_path, {}, SUMMARY).read_text()
    assert "1 line(s) of metrics.jsonl are not readable records and were skipped" in text
    assert "| train loss (first step) |" in text  # the good records still make the report


def test_the_records_the_trainer_writes_parse_as_records():
    alarm = {"type": "alarm", "step": 3, "message": "val loss rose"}
    unmeasured = {**records()[0], "loss": None, "tokens_per_s": None, "mfu": None}  # a step without tokens
    for record in [*records(), alarm, unmeasured]:
        line = json.dumps(record)
        assert json.dumps(parse_record(line)) == line  # compared as text: a skipped step's loss is NaN


@pytest.mark.parametrize("is_main", [True, False], ids=["rank 0", "another rank"])
def test_a_line_printed_under_the_progress_bar_reaches_the_console_on_every_rank(is_main, tmp_path, capsys):
    """Every rank but the first has a disabled bar, without a stream: a print there (the SIGTERM
    handler's line, a library's own) raised AttributeError mid-step, which stopped that rank and, in a
    collective, the job, without the checkpoint the signal asked for."""
    from ds_sft.train.run_log import RunLog

    s = SimpleNamespace(wandb_project=None, wandb_mode="disabled", alarm_rising_evals=3, alarm_gap=0.5,
                        log_interval=100, max_iters=100)  # fmt: skip
    log = RunLog(s, tmp_path, is_main=is_main, say=print)
    with log.progress_bar(0):
        print("received SIGTERM: saving a checkpoint after this step, then exiting")
    log.close()
    assert "received SIGTERM: saving a checkpoint" in capsys.readouterr().out
