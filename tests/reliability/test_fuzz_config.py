"""Config fuzzing: a wrong DeepSpeed JSON or flag is one line naming the key, before anything heavy.

``ds-sft train`` layers built-in defaults <- the DeepSpeed JSON <- flags (:mod:`ds_sft.train.config`).
A mistake found only after the model is loaded and the shards are mapped costs minutes on a big run
(hours in a queue); a mistake DeepSpeed finds prints a page of pydantic traceback. So every
invalid value must stop the command with exit code 2 and one line that names the key, and must do
so before the process group, the data or the model is touched.

How "before anything heavy" is checked: the first heavy call of ``ds_sft.train.cli.run`` (joining
the process group) is replaced by a tripwire, and ``--data_dir`` points at a directory that does not
exist. A valid configuration therefore ends with the data-dir error (the last check), and an
invalid one must end earlier, with its own message.

The oracle is written here, per key: which values are valid (e.g. a micro-batch is an int >= 1,
not ``true``, not ``"4"``). Hypothesis draws values of every JSON type for a random key, and the
command must accept exactly the valid ones.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from ds_sft.cli import main
from ds_sft.train.config_keys import KNOWN_DS_KEYS

MISSING_DATA = "/nonexistent/ds-sft-fuzz/data"
REPO_ROOT = Path(__file__).resolve().parents[2]


class Tripwire(Exception):
    """Raised by the first heavy step: the configuration was accepted."""


@pytest.fixture(autouse=True)
def tripwire(monkeypatch):
    import ds_sft.train.distributed

    def heavy(*args, **kwargs):
        raise Tripwire

    monkeypatch.setattr(ds_sft.train.distributed, "init_distributed", heavy)


BASE = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.05, "torch_adam": True}},
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": False},
    "ds_sft": {"max_iters": 20, "warmup_iters": 2, "min_lr": 1e-5},
}


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_in(low: int, high: int):
    """An integer setting's documented range (ds_sft/train/config.py states the same bounds)."""
    return lambda value: _int(value) and low <= value <= high


INT32_MAX = 2**31 - 1


# key path -> (is the value valid, everything else as in BASE?, names the message may use). A null
# setting counts as unset (the default applies); a null section is invalid.
BF16_FIELDS = {"enabled", "immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads",
               "bf16_optimizer_states"}  # fmt: skip
ORACLE = {
    ("train_micro_batch_size_per_gpu",): (int_in(1, 2**16), ["micro_batch_size"]),  # also in the JSON key
    ("gradient_accumulation_steps",): (int_in(1, 2**16), ["gradient_accumulation_steps", "grad_accum"]),
    ("gradient_clipping",): (lambda v: _number(v) and 0 <= v <= 1e6, ["gradient_clipping", "grad_clip"]),
    ("zero_optimization", "stage"): (lambda v: _int(v) and v in (0, 1, 2, 3), ["stage", "zero_stage"]),
    ("optimizer", "params", "lr"): (lambda v: _number(v) and 1e-5 <= v <= 10, ["lr", "learning_rate"]),
    ("optimizer", "params", "eps"): (lambda v: _number(v) and 0 < v <= 1, ["eps"]),
    ("optimizer", "params", "betas"): (
        lambda v: isinstance(v, list) and len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v),
        ["betas"],
    ),
    ("optimizer", "params", "fused"): (lambda v: isinstance(v, bool), ["fused"]),
    ("zero_optimization", "reduce_bucket_size"): (
        lambda v: _int(v) and 1 <= v <= 2**36,
        ["reduce_bucket_size"],
    ),
    ("zero_optimization", "allgather_bucket_size"): (
        lambda v: _int(v) and 1 <= v <= 2**36,
        ["allgather_bucket_size"],
    ),
    ("zero_optimization", "stage3_max_live_parameters"): (
        lambda v: _int(v) and 0 <= v < 2**63,
        ["stage3_max_live_parameters"],
    ),
    ("zero_optimization", "overlap_comm"): (lambda v: isinstance(v, bool), ["overlap_comm"]),
    ("train_batch_size",): (lambda v: v == 2, ["train_batch_size"]),  # = micro 2 x accum 1 x 1 rank
    ("optimizer", "params", "weight_decay"): (lambda v: _number(v) and 0 <= v <= 10, ["weight_decay"]),
    ("optimizer", "type"): (lambda v: isinstance(v, str) and v.lower() in ("adamw", "adam"), ["optimizer"]),
    ("bf16", "enabled"): (lambda v: isinstance(v, bool), ["bf16", "precision"]),
    ("ds_sft", "max_iters"): (int_in(2, INT32_MAX), ["max_iters", "warmup_iters"]),
    ("ds_sft", "warmup_iters"): (lambda v: _int(v) and 0 <= v <= 20, ["warmup_iters"]),
    ("ds_sft", "min_lr"): (lambda v: _number(v) and 0 <= v <= 1e-3, ["min_lr"]),  # <= BASE's lr
    ("ds_sft", "seed"): (lambda v: _int(v) and 0 <= v < 2**32, ["seed"]),
    ("ds_sft", "dist_timeout"): (lambda v: _int(v) and 1 <= v <= 7 * 24 * 3600, ["dist_timeout"]),
    # DeepSpeed keys repeated in "ds_sft" (as effective_config.json does) must agree with BASE's
    ("ds_sft", "grad_clip"): (lambda v: _number(v) and v == 1.0, ["grad_clip"]),
    ("ds_sft", "precision"): (lambda v: v == "fp32", ["precision"]),
    ("ds_sft", "eval_interval"): (int_in(1, INT32_MAX), ["eval_interval"]),
    ("ds_sft", "eval_iters"): (int_in(1, INT32_MAX), ["eval_iters"]),
    ("ds_sft", "save_interval"): (int_in(1, INT32_MAX), ["save_interval"]),
    ("ds_sft", "keep_last"): (int_in(1, 10**6), ["keep_last"]),
    ("ds_sft", "max_nan_steps"): (int_in(1, INT32_MAX), ["max_nan_steps"]),
    ("ds_sft", "alarm_gap"): (lambda v: _number(v) and 0 <= v <= 1e6, ["alarm_gap"]),
    ("ds_sft", "out_dir"): (lambda v: False, ["out_dir"]),  # a path: flags only
    ("ds_sft", "fp8"): (lambda v: v in ("off", "auto", "torch", "te"), ["fp8"]),
    ("ds_sft", "kernels"): (lambda v: v in ("auto", "triton", "torch", "eager"), ["kernels"]),
    ("ds_sft", "compile"): (lambda v: isinstance(v, bool), ["compile"]),
    ("ds_sft", "wandb_mode"): (lambda v: v is None, ["wandb_mode"]),  # where metrics go: flags and env only
    # whole sections: random dicts hold unknown keys, so only these few are valid
    ("zero_optimization",): (lambda v: v in ({}, *({"stage": s} for s in range(4))), ["zero_optimization"]),
    ("optimizer",): (lambda v: False, ["optimizer"]),  # no AdamW type in a random value
    ("optimizer", "params"): (lambda v: v == {}, ["params", "optimizer"]),
    ("bf16",): (  # DeepSpeed's own fields only: it refuses others when the engine is built
        lambda v: isinstance(v, dict) and isinstance(v.get("enabled", False), bool) and set(v) <= BF16_FIELDS,
        ["bf16"],
    ),
    ("ds_sft",): (lambda v: v == {}, ["ds_sft"]),
}

# no default to fall back to: a null here is an error
REQUIRED = {("zero_optimization",), ("optimizer",), ("optimizer", "params"), ("optimizer", "type"), ("bf16",),
            ("ds_sft",)}  # fmt: skip

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.sampled_from([0, 1, 2, 3, 5, -1, 20, 21, 1e-3, 1e-5, 0.5, 2.5, -0.1]),
        st.floats(allow_nan=False, allow_infinity=False),  # JSON cannot carry NaN/inf portably
        st.text(max_size=8),
        st.sampled_from(["4", "2", "AdamW", "sgd", "off", "te", "fp4", "", "1e-3", "runs/x"]),
    ),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=5), inner, max_size=2),
    max_leaves=3,
)


def set_path(tree: dict, path: tuple[str, ...], value) -> dict:
    tree = json.loads(json.dumps(tree))
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return tree


def run_train(capsys, tmp_path, config: dict | bytes, *flags: str):
    """Run ``ds-sft train`` in this process; returns (exit code or "accepted", stderr lines)."""
    path = tmp_path / "ds.json"
    path.write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    argv = ["train", "--deepspeed_config", str(path), "--model", "tiny", "--data_dir", MISSING_DATA, *flags]
    return run_cli(capsys, argv)


def run_cli(capsys, argv: list[str]):
    """``ds-sft ARGV`` in this process: (exit code, or "accepted" at the tripwire; stderr lines)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except Tripwire:
        code = "accepted"
    except SystemExit as stop:  # argparse refused a flag
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


def assert_refused(code, lines, names, context):
    assert code == 2, f"{context}: expected exit 2, got {code!r}; stderr: {lines}"
    assert len(lines) == 1, f"{context}: the error must be one line, got {lines}"
    assert lines[0].startswith("ds-sft train: error:"), (context, lines)
    assert "data_dir" not in lines[0] or "data_dir" in names, f"{context}: a later check fired: {lines[0]}"
    assert any(name in lines[0] for name in names), f"{context}: the message names none of {names}: {lines}"


def test_the_base_config_is_valid_and_the_missing_data_dir_is_what_stops_it(capsys, tmp_path):
    code, lines = run_train(capsys, tmp_path, BASE)
    assert_refused(code, lines, ["data_dir"], "base config")
    assert "manifest.json" in lines[0]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(path=st.sampled_from(sorted(ORACLE)), value=json_values)
# found by `make fuzz` (the oracle had no upper bounds), and the other bounds beside them
@example(path=("gradient_accumulation_steps",), value=65537)
@example(path=("gradient_accumulation_steps",), value=65536)
@example(path=("train_micro_batch_size_per_gpu",), value=65537)
@example(path=("ds_sft", "keep_last"), value=10**6 + 1)
@example(path=("ds_sft", "eval_interval"), value=2**31)
def test_every_json_value_is_accepted_or_refused_by_name(capsys, tmp_path, path, value):
    valid, names = ORACLE[path]
    code, lines = run_train(capsys, tmp_path, set_path(BASE, path, value))
    context = f"{'.'.join(path)} = {value!r}"
    unset = value is None and path not in REQUIRED  # a null setting means "not set here": the default applies
    if unset or valid(value):
        event("valid value")
        assert code == 2 and len(lines) == 1 and "manifest.json" in lines[0], f"{context} refused: {lines}"
    else:
        event("invalid value")
        assert_refused(code, lines, names, context)


CONTRADICTIONS = {
    "unknown top-level key (typo)": ({"gradient_acumulation_steps": 2}, [], ["gradient_acumulation_steps"]),
    "unknown ZeRO key": ({"zero_optimization": {"stage": 2, "overlap_com": True}}, [], ["overlap_com"]),
    "unknown optimizer key": ({"optimizer": {"type": "AdamW", "param": {}}}, [], ["param"]),
    "unknown ds_sft flag": ({"ds_sft": {"max_iter": 5}}, [], ["max_iter"]),
    # sections DeepSpeed reads key by key ignored a typo: each ran as if the key were absent
    "unknown checkpoint key": (
        {"checkpoint": {"tag_validaton": "FAIL"}},
        [],
        ["'tag_validaton' in \"checkpoint\"", "'tag_validation'?"],
    ),
    "unknown flops_profiler key": ({"flops_profiler": {"enabeld": True}}, [], ["(did you mean 'enabled'?)"]),
    "unknown data_types key": ({"data_types": {"grad_acum_dtype": "fp32"}}, [], ["'grad_accum_dtype'?"]),
    "unknown aio key": ({"aio": {"block_sise": 1048576}}, [], ["(did you mean 'block_size'?)"]),
    "unknown torch_autocast key": ({"torch_autocast": {"enabeld": False}}, [], ["'enabled'?"]),
    "a ds-sft setting at the top level": ({"seed": 42}, [], ['put it in the "ds_sft" section']),
    "a ds-sft path flag at the top level": (
        {"out_dir": "runs/x"},
        [],
        ["it is a ds-sft flag; pass --out_dir"],
    ),
    # ds-sft converts a checkpoint to DeepSpeed's universal format itself, on a new world size; asked
    # for in the JSON, DeepSpeed looked for a universal checkpoint that was never made (AssertionError)
    "load_universal": ({"checkpoint": {"load_universal": True}}, [], ["checkpoint.load_universal"]),
    "train_batch_size disagrees": ({"train_batch_size": 7}, [], ["train_batch_size"]),
    "fp16 and bf16": ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, [], ["fp16"]),
    "a DeepSpeed scheduler": ({"scheduler": {"type": "WarmupLR"}}, [], ["scheduler"]),
    "SGD": ({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}, [], ["SGD", "sgd", "optimizer"]),
    "unknown optimizer param": (
        {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betaz": [0.9, 0.9]}}},
        [],
        ["betaz"],
    ),  # fmt: skip
    "optimizer betas not a pair": (
        {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": 0.9}}},
        [],
        ["betas"],
    ),  # fmt: skip
    # DeepSpeed hands the optimizer params to AdamW as keyword arguments: a TypeError after loading
    "a comment among the optimizer params": (
        {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "_comment": "x"}}},
        [],
        ["optimizer.params._comment"],
    ),  # fmt: skip
    "FusedAdam's bias_correction for torch's AdamW": (
        {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "bias_correction": False}}},
        [],
        ["bias_correction"],
    ),  # fmt: skip
    "adam_w_mode false under AdamW (silently decoupled)": (
        {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "adam_w_mode": False}}},
        [],
        ["adam_w_mode"],
    ),  # fmt: skip
    "warmup longer than the run": ({}, ["--warmup_iters", "50", "--max_iters", "10"], ["warmup_iters"]),
    "min_lr above the peak": ({}, ["--min_lr", "1", "--learning_rate", "0.1"], ["min_lr"]),
    "zero micro-batch": ({}, ["--micro_batch_size", "0"], ["micro_batch_size"]),
    "negative accumulation": ({}, ["--grad_accum", "-1"], ["grad_accum"]),
    "ZeRO stage 4": ({}, ["--zero_stage", "4"], ["zero_stage", "stage"]),
    "infinite learning rate": ({}, ["--learning_rate", "inf"], ["learning_rate"]),
    "NaN learning rate": ({}, ["--learning_rate", "nan"], ["learning_rate", "min_lr"]),
    "NaN weight decay": ({}, ["--weight_decay", "nan"], ["weight_decay"]),
    "negative grad clip": ({}, ["--grad_clip", "-1"], ["grad_clip"]),
    "model and base_model": ({}, ["--base_model", "/nonexistent/model.pt"], ["base_model"]),
    "zero save interval": ({}, ["--save_interval", "0"], ["save_interval"]),
}


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_contradictions_are_one_line_naming_the_key(capsys, tmp_path, case):
    changes, flags, names = CONTRADICTIONS[case]
    config = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        config[key] = {**config[key], **value} if key == "ds_sft" else value
    code, lines = run_train(capsys, tmp_path, config, *flags)
    assert_refused(code, lines, names, case)


BROKEN_FILES = {
    "not JSON": b"{ 'single': quotes }",
    "truncated": json.dumps(BASE).encode()[:40],
    "a list": b"[1, 2]",
    "empty": b"",
    "invalid UTF-8": b'{"_comment": "caf\xe9"}',  # Latin-1 from an old editor
    "NaN literal": b'{"train_micro_batch_size_per_gpu": NaN}',
    # Python's int() refuses more than 4,300 digits with a ValueError that is not a JSONDecodeError
    "a 5,000-digit integer": b'{"steps_per_print": ' + b"1" * 5000 + b"}",
    "a 5,000-digit integer in ds_sft": b'{"ds_sft": {"seed": -' + b"9" * 5000 + b"}}",
    "a 5,000-digit integer in a list": b'{"optimizer": {"params": {"betas": [' + b"1" * 5000 + b", 0]}}}",
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_broken_config_files_are_one_line_naming_the_file(capsys, tmp_path, case):
    code, lines = run_train(capsys, tmp_path, BROKEN_FILES[case])
    names = ["ds.json", "micro_batch_size"] if case == "NaN literal" else ["ds.json"]
    assert_refused(code, lines, names, case)


def test_config_error_wins_over_missing_model_and_data_in_a_real_process(tmp_path):
    """End to end through the console script: exit 2, one line, no model or data touched."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({**BASE, "zero_optimization": {"stage": 2, "overlap_com": True}}))
    result = subprocess.run(
        [sys.executable, "-m", "ds_sft.train", "--deepspeed_config", str(config), "--base_model",
         "/nonexistent/model.pt", "--data_dir", MISSING_DATA, "--out_dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert lines[-1].startswith("ds-sft train: error:") and "overlap_com" in lines[-1], lines
    assert not (tmp_path / "run").exists(), "the run directory was created before the config was checked"


# --- every numeric, choice and name flag of every command, by its declared domain --------------------
#
# The flags are found by walking the real parsers, so a flag added later is covered without a line
# here. The oracle is written independently of ds_sft/options.py: an integer flag takes exactly the
# decimal integers within its bounds, a number flag exactly the finite numbers within them. The
# scripts in bench/ are commands too: `python bench/attention.py --tile 0` was a ZeroDivisionError.


def bench_parsers() -> dict[str, tuple[object, list[str], object]]:
    """prog -> (parser to call, argv before the flags, parser holding the flags) of every script in
    bench/, each subcommand of one (``bench/gpu_check.py gemm``) as its own."""
    import argparse
    import importlib.util

    from ds_sft.bench import available_scripts

    parsers = {}
    for path in available_scripts([]):  # the scripts `ds-sft bench` runs, not their _helpers
        spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        parser = module.build_parser()
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for name, sub in subparsers[0].choices.items() if subparsers else [(None, parser)]:
            parsers[sub.prog] = (parser, [name] if name else [], sub)
    return parsers


def command_parsers() -> dict[str, object]:
    """Command -> the parser holding its flags: ds-sft's commands, then bench/'s scripts."""
    from ds_sft.cli import build_parser

    commands = dict(next(a for a in build_parser()._actions if a.dest == "command").choices)
    return {**commands, **{prog: flags for prog, (_, _, flags) in BENCH.items()}}


def declared_flags() -> list[tuple[str, str, object]]:
    """(command, --flag, domain) for every flag of every command whose type= is a declared domain."""
    from ds_sft.options import Domain

    flags = []
    for command, parser in command_parsers().items():
        for action in parser._actions:
            if action.option_strings and isinstance(action.type, Domain):
                flags.append((command, action.option_strings[0], action.type))
    return flags


def parse_flags(capsys, command: str, argv: list[str]):
    """(exit code, or the parsed namespace; stderr lines) of ``command``'s parser alone on ``argv``:
    parsing is where a flag's domain is checked, and running would be real work."""
    if command not in BENCH:
        from ds_sft.cli import build_parser

        parser, argv = build_parser(), [command, *argv]
    else:
        parser, prefix, _ = BENCH[command]
        argv = [*prefix, *argv]
    capsys.readouterr()
    try:
        outcome = parser.parse_args(argv)
    except SystemExit as stop:
        outcome = stop.code
    return outcome, capsys.readouterr().err.strip().splitlines()


def test_no_flag_takes_a_bare_int_or_float():
    """A numeric flag without a declared domain would accept -5, nan and 2**70 again."""
    bare = [
        f"{command} {action.option_strings[0]}"
        for command, parser in command_parsers().items()
        for action in parser._actions
        if action.type in (int, float) and action.dest != "help"
    ]
    assert bare == [], f"flags without a declared domain: {bare}"
    names = {(command, flag) for command, flag, _ in declared_flags()}
    for expected in [("prepare", "--max_examples"), ("prepare", "--mix"), ("prepare", "--seq_len"),
                     ("train", "--seed"), ("train", "--dist_timeout"), ("eval", "--max_new_tokens"),
                     ("bench", "--timeout"), ("prepare", "--decontam_threshold"),
                     ("bench/attention.py", "--tile"), ("bench/gpu_check.py gemm", "--n"),
                     ("bench/train_throughput.py", "--parts")]:  # fmt: skip
        assert expected in names


def test_every_value_flag_of_a_bench_script_has_a_domain():
    """A bench script's flag read as a bare string failed later, as a traceback: --preset nope
    (KeyError), --kernels x, --device mps, --dtypes fp16, --fp8 fp9."""
    from ds_sft.options import Domain

    untyped = [
        f"{prog} {action.option_strings[0]}"
        for prog, (_, _, parser) in BENCH.items()
        for action in parser._actions
        if action.option_strings and action.nargs != 0 and not isinstance(action.type, Domain)
    ]
    assert untyped == [], f"bench flags without a declared domain: {untyped}"


BENCH = bench_parsers()
FLAGS = declared_flags()
REQUIRED_ARGS = {  # the least each command needs besides the flag under test, so parsing can finish
    "eval": ["--model", "m", "--data_dir", "d"],
    "export": ["--base_model", "m", "--hf", "out"],
    "bench/gpu_check.py collectives": ["--out", "o"],
    "bench/gpu_check.py gemm": ["--out", "o"],
    "bench/gpu_check.py summary": ["--out", "o", "--work", "w"],
    "bench/gpu_check.py train": ["--out", "o"],
}
# Flags that take effect only beside another (their ds_sft.options.Ignored rules): fuzzed with it, so
# that a value in their domain is accepted (test_every_fuzzed_flag_takes_effect checks the list).
FLAG_CONTEXT = {("eval", "--seed"): ["--gsm8k_limit", "5"]}
ODD_TEXT = ["nan", "NaN", "inf", "-inf", "1e400", "", " ", "abc", "1.5", "0x10", "2**70", "1e3", "-0.0"]


def valid_text(domain, text: str) -> bool:
    """The independent oracle: is ``text`` a value of ``domain``?"""
    from ds_sft.options import Choice, Device, Float, Int, Names, Text, Weights

    if not text.strip():
        return False  # an empty value is an unset shell variable, for every flag
    if any(unicodedata.category(char) == "Cc" for char in text):
        return False  # a control character (a newline, an escape) would break the lines quoting it
    if isinstance(domain, Device):
        name = text.strip()
        index = name.removeprefix("cuda:")
        return name in ("cpu", "cuda") or (
            index != name and index.isascii() and index.isdigit() and len(index) <= 4
        )
    if isinstance(domain, Names):
        return all(name.strip() in domain.values for name in text.split(",") if name.strip())
    if isinstance(domain, Int):
        stripped = text.strip()
        digits = stripped.lstrip("+-")
        return (
            digits.isdigit()
            and digits.isascii()
            and domain.min <= int(stripped) <= domain.max
            and int(stripped) % domain.multiple == 0
        )
    if isinstance(domain, Float):
        try:
            x = float(text)
        except ValueError:
            return False
        low_ok = x > domain.min if domain.min_open else x >= domain.min
        high_ok = x < domain.max if domain.max_open else x <= domain.max
        return math.isfinite(x) and low_ok and high_ok
    if isinstance(domain, Choice):
        return text in domain.values
    if isinstance(domain, Weights):
        pairs = [p for p in text.split(",") if p]
        return all(
            "=" in p and p.partition("=")[0].strip() and valid_text(domain.item, p.partition("=")[2])
            for p in pairs
        )
    if isinstance(domain, Text):
        too_long = domain.max_length is not None and len(text) > domain.max_length
        return not set(domain.forbidden) & set(text) and not too_long
    raise AssertionError(f"no oracle for {domain!r}")


def texts_for(domain):
    """Values on both sides of the domain's edges, overflow, NaN/inf, and strings of every kind."""
    from ds_sft.options import Choice, Device, Float, Int, Names, Text, Weights

    edges: list = []
    if isinstance(domain, Int):
        edges = [domain.min, domain.max, domain.min - 1, domain.max + 1, -5, 0, 2**63, 2**70, 10**20]
    elif isinstance(domain, Float):
        edges = [domain.min, domain.max, domain.min - 0.5, domain.max * 2 + 1, -1e-9, 0.5, 1e300]
    elif isinstance(domain, Choice):
        edges = [*domain.values, "emulated", "AUTO"]
    elif isinstance(domain, Device):
        edges = [
            "cpu",
            "cuda",
            "cuda:0",
            " cuda:7 ",
            "cuda:9999",
            "cuda:10000",
            "cuda:",
            "mps",
            "CPU",
            "cuda:x",
        ]
    elif isinstance(domain, Text) and domain.max_length is not None:
        edges = [
            "x" * domain.max_length,
            "x" * (domain.max_length + 1),
            *(f"a{c}b" for c in domain.forbidden),
        ]
    elif isinstance(domain, Names):
        edges = [*domain.values, ",".join(domain.values), f"{domain.values[0]},,x", " , ", "SEED", "a,b"]
    elif isinstance(domain, Weights):
        return st.sampled_from(["a=1", "a=nan", "a=-1", "a=inf", "a=1,b=2", "a=1e400", "=1", "a", "a=x",
                                "a=0", "a=2000", "a=1000"])  # fmt: skip
    return st.one_of(
        st.sampled_from([str(e) for e in edges] + ODD_TEXT),
        st.integers(-(2**80), 2**80).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.text(max_size=6),
    )


def context_for(command: str, flag: str) -> list[str]:
    return [*REQUIRED_ARGS.get(command, []), *FLAG_CONTEXT.get((command, flag), [])]


@pytest.mark.parametrize(("command", "flag"), sorted({(c, f) for c, f, _ in FLAGS}), ids=str)
def test_every_fuzzed_flag_takes_effect(capsys, command, flag):
    """No Ignored rule of the flag holds on the arguments it is fuzzed with. Otherwise every value in
    its domain is refused ("has no effect") and the fuzz test below passes only while its draws miss
    the flag: ``eval --seed`` (which needs --gsm8k_limit) did, until a new bench script's flags shifted
    the derandomized draws onto it."""
    outcome, lines = parse_flags(capsys, command, context_for(command, flag))
    assert not isinstance(outcome, int | None), lines
    rules = getattr(command_parsers()[command], "ignored_rules", ())
    holding = [rule.because for rule in rules if rule.flag == flag and rule.when(outcome)]
    assert holding == [], f"{command} {flag} has no effect {holding[0] if holding else ''}"


@settings(
    max_examples=400,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_every_flag_accepts_exactly_its_domain_in_one_line(capsys, data):
    command, flag, domain = data.draw(st.sampled_from(FLAGS), label="flag")
    text = data.draw(texts_for(domain), label="value")
    if text.startswith("-") and not text[1:2].isdigit() and text[1:2] != ".":
        text = " " + text  # argparse would read "-inf" or "-x" as an option, not a value
    outcome, lines = parse_flags(capsys, command, [*context_for(command, flag), f"{flag}={text}"])
    context = f"{command} {flag}={text!r}"
    if valid_text(domain, text):
        event("in domain")
        assert not isinstance(outcome, int | None), f"{context}: refused ({lines})"
        assert getattr(outcome, flag.lstrip("-").replace("-", "_")) is not None, context
    else:
        event("out of domain")
        prog = command if command in BENCH else f"ds-sft {command}"
        assert outcome == 2, f"{context}: expected exit 2, got {outcome!r}; stderr: {lines}"
        assert len(lines) == 1, f"{context}: the error must be one line, got {lines}"
        assert lines[0].startswith(f"{prog}: error: argument {flag}"), (context, lines)


@pytest.mark.parametrize(
    ("command", "flag"), [(c, f) for c, f, d in FLAGS if type(d).__name__ == "Text"], ids=lambda x: str(x)
)
@pytest.mark.parametrize("text", ["\0", "runs/a\0b"])
def test_a_nul_byte_in_a_text_flag_is_one_line(capsys, command, flag, text):
    """Found by `make fuzz`: the oracle took "\\0" for a valid path; the validator rightly refuses it."""
    code, lines = parse_flags(capsys, command, [*context_for(command, flag), f"{flag}={text}"])
    assert code == 2 and len(lines) == 1, lines
    prog = command if command in BENCH else f"ds-sft {command}"
    assert lines[0].startswith(f"{prog}: error: argument {flag}"), lines


# --- numbers a JSON can hold that no flag can: NaN, Infinity, integers beyond int64 ------------------


def numeric_json_keys() -> dict[tuple[str, ...], object]:
    """Every numeric key the train config declares, DeepSpeed's and the "ds_sft" section's: its domain."""
    from ds_sft.options import Float, Int
    from ds_sft.train.config_checks import zero_domains
    from ds_sft.train.config_keys import DS_DOMAINS, FLAG_TO_DS_KEY, OPTIONS

    keys = {k: d for k, d in {**DS_DOMAINS, **zero_domains()}.items() if isinstance(d, Int | Float)}
    for flag, (_, domain) in OPTIONS.items():
        if isinstance(domain, Int | Float):
            keys[FLAG_TO_DS_KEY.get(flag, ("ds_sft", flag))] = domain
    return keys


NUMERIC_KEYS = numeric_json_keys()


@settings(
    max_examples=200,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(
    path=st.sampled_from(sorted(NUMERIC_KEYS)),
    literal=st.sampled_from(
        [
            "NaN",
            "Infinity",
            "-Infinity",
            "-1",
            "-1e-3",
            str(2**63),
            str(2**70),
            "1e400",
            "-9223372036854775809",
            '"12"',
            "true",
            "[1]",
        ]
    ),  # fmt: skip
)
def test_out_of_range_json_numbers_are_one_line_naming_the_key(capsys, tmp_path, path, literal):
    if NUMERIC_KEYS[path].min <= -1 and literal in ("-1", "-1e-3"):
        return  # the few keys whose domain includes negatives (DeepSpeed's own bound)
    marker = 918273645
    text = json.dumps(set_path(BASE, path, marker)).replace(str(marker), literal)
    code, lines = run_train(capsys, tmp_path, text.encode())
    names = [path[-1], ".".join(path)]
    if path == ("zero_optimization", "stage"):
        names.append("zero_stage")
    assert_refused(code, lines, names, f"{'.'.join(path)} = {literal}")


@pytest.mark.parametrize(
    "flag, key, value",
    [("--seed", ("ds_sft", "seed"), 2**40), ("--dist_timeout", ("ds_sft", "dist_timeout"), 10**20),
     ("--grad_clip", ("gradient_clipping",), -1), ("--learning_rate", ("optimizer", "params", "lr"), 0),
     ("--micro_batch_size", ("train_micro_batch_size_per_gpu",), 0)],
)  # fmt: skip
def test_a_flag_and_its_json_key_get_the_same_check_and_words(capsys, tmp_path, flag, key, value):
    by_flag = run_train(capsys, tmp_path, BASE, f"{flag}={value}")
    by_json = run_train(capsys, tmp_path, set_path(BASE, key, value))
    assert by_flag[0] == by_json[0] == 2, (by_flag, by_json)
    rule = by_flag[1][0].split(f"argument {flag}: ")[1].split(", got")[0]  # the value prints as typed
    assert rule in by_json[1][0], (by_flag, by_json)


# Every DeepSpeed 0.19.8 key that names a place DeepSpeed writes (read from its config code:
# profiling/config.py, monitor/config.py, autotuning/config.py, runtime/zero/offload_config.py,
# runtime/data_pipeline/data_sampling/data_sampler.py). A recipe may not make DeepSpeed write outside
# the run folder: the flops profiler's output_file overwrote any file the user could write.
DS_WRITER_KEYS = [
    ("flops_profiler", "output_file"),
    ("tensorboard", "output_path"),
    ("csv_monitor", "output_path"),
    ("autotuning", "results_dir"),
    ("autotuning", "exps_dir"),
    ("autotuning", "metric_path"),
    ("autotuning", "model_info_path"),
    ("zero_optimization", "offload_optimizer", "nvme_path"),
    ("zero_optimization", "offload_param", "nvme_path"),
    ("data_efficiency", "data_sampling", "curriculum_learning", "data_cluster_path"),
]
# paths DeepSpeed only reads (the outputs of its offline data analyzer)
DS_READ_KEYS = {"index_to_metric_path", "index_to_sample_path", "metrics_path", "data_cluster_paths"}
# monitors that write into the working directory when enabled without a path
DS_WRITERS = ["tensorboard", "csv_monitor", "wandb", "comet", "autotuning"]


def nested(path: tuple[str, ...], value) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


def merged(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


@pytest.mark.parametrize("path", DS_WRITER_KEYS, ids=".".join)
@pytest.mark.parametrize("target", ["victim.txt", "/tmp/ds-sft-victim/x", "."])
@pytest.mark.parametrize("enabled", [True, False])
def test_a_deepspeed_key_that_writes_a_path_is_refused(capsys, tmp_path, path, target, enabled):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    value = str(tmp_path / target) if target == "victim.txt" else target
    config = merged(BASE, nested(path, value))
    if path[0] != "zero_optimization":
        config = merged(config, {path[0]: {"enabled": enabled}})
    code, lines = run_train(capsys, tmp_path, config)
    assert_refused(code, lines, [".".join(path)], path)
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("section", DS_WRITERS)
@pytest.mark.parametrize("enabled", [True, False])
def test_an_enabled_deepspeed_monitor_is_refused(capsys, tmp_path, section, enabled):
    code, lines = run_train(capsys, tmp_path, merged(BASE, {section: {"enabled": enabled}}))
    if enabled:
        assert_refused(code, lines, [f"{section}.enabled"], section)
    else:  # disabled, it writes nothing: the run goes on to the missing data dir
        assert_refused(code, lines, ["data_dir"], section)


def test_every_path_valued_deepspeed_key_is_refused_or_only_read():
    """DeepSpeed's own declarations of path keys (constants named *_PATH/*_DIR/*_FILE, pydantic fields
    named *_path/*_file/*_dir): each is in the refused list above or is read-only. A DeepSpeed upgrade
    that adds a writer fails here until it is looked at."""
    import re
    from pathlib import Path

    import deepspeed
    from deepspeed.monitor import config as monitor
    from deepspeed.runtime.zero import offload_config

    root = Path(deepspeed.__file__).parent
    names = set()
    for constants in root.rglob("constants.py"):
        declared = r"^[A-Z_]+_(?:PATHS?|DIR|FILE)\s*=\s*['\"](\w+)['\"]"
        names |= set(re.findall(declared, constants.read_text(), re.M))
    for module in (monitor, offload_config):
        for model in vars(module).values():
            for field in getattr(model, "model_fields", {}):
                if re.search(r"_(path|file|dir)$", field):
                    names.add(field)
    assert "output_file" in names and "nvme_path" in names  # the scan sees the known ones
    refused = {path[-1] for path in DS_WRITER_KEYS}
    assert names - refused - DS_READ_KEYS == set()


@pytest.mark.parametrize("flag", ["out_dir", "resume", "data_dir", "base_model"])
@pytest.mark.parametrize("value", ["/tmp/someone-else", "auto", "runs/x"])
def test_the_json_does_not_choose_what_a_run_reads_or_where_it_writes(capsys, tmp_path, flag, value):
    code, lines = run_train(capsys, tmp_path, merged(BASE, {"ds_sft": {flag: value}}))
    assert_refused(code, lines, [flag], flag)
    assert f'"ds_sft.{flag}"' in lines[0] and f"--{flag}" in lines[0]


@pytest.mark.parametrize(
    ("flag", "value"),
    [("wandb_mode", "offline"), ("wandb_mode", "online"), ("wandb_mode", "disabled"),
     ("wandb_project", "attacker"), ("wandb_project", "ds-sft")],
)  # fmt: skip
def test_the_json_does_not_choose_where_a_runs_metrics_go(capsys, tmp_path, monkeypatch, flag, value):
    """A shared recipe's "ds_sft": {"wandb_mode": "offline", "wandb_project": "attacker"} started wandb
    under that project although the user's environment said WANDB_MODE=disabled."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    code, lines = run_train(capsys, tmp_path, merged(BASE, {"ds_sft": {flag: value}}))
    assert_refused(code, lines, [f'"ds_sft.{flag}"'], flag)
    assert f"--{flag}" in lines[0]
    code, lines = run_train(capsys, tmp_path, BASE, f"--{flag}", value)  # the flag itself is the user's
    assert_refused(code, lines, ["data_dir"], f"--{flag}")


DUPLICATES = {
    "top level": ('{"gradient_clipping": 1.0, "gradient_clipping": 0}', "gradient_clipping"),
    "optimizer params": (
        '{"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.05, "weight_decay": 3.0}}}',
        "optimizer.params.weight_decay",
    ),
    "ds_sft": ('{"ds_sft": {"learning_rate": 1e-4, "learning_rate": 5.0}}', "ds_sft.learning_rate"),
    "in a list": ('{"x": [{"a": 1}, {"b": 1, "b": 1}]}', "x.1.b"),
    "same value": ('{"zero_optimization": {"stage": 2, "stage": 2}}', "zero_optimization.stage"),
    "three times": ('{"bf16": {"enabled": false, "enabled": true, "enabled": false}}', "bf16.enabled"),
}


@pytest.mark.parametrize("case", DUPLICATES)
def test_a_key_given_twice_is_refused_naming_it(capsys, tmp_path, case):
    text, name = DUPLICATES[case]
    code, lines = run_train(capsys, tmp_path, text.encode())
    assert_refused(code, lines, [f'"{name}" twice'], case)


KEYS = st.sampled_from(["a", "b", "ds_sft", "bf16"])


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(path=st.lists(KEYS, min_size=1, max_size=4), value=json_values)
def test_a_repeated_key_at_any_depth_is_refused(capsys, tmp_path, path, value):
    inner = json.dumps(value)
    text = f'{{"{path[-1]}": {inner}, "{path[-1]}": {inner}}}'
    for key in reversed(path[:-1]):
        text = f'{{"{key}": {text}}}'
    code, lines = run_train(capsys, tmp_path, text.encode())
    assert_refused(code, lines, [f'"{".".join(path)}" twice'], path)


def test_effective_config_records_the_paths_and_passes_back_without_them(capsys, tmp_path):
    """RUN/effective_config.json keeps the path flags in "run" (a record), so the file still works as
    another run's --deepspeed_config and does not send that run into the first run's folder."""
    from types import SimpleNamespace

    from ds_sft.train.config import effective_config
    from ds_sft.train.config_keys import DEFAULTS

    own = {"micro_batch_size": 2, "grad_accum": 1, "grad_clip": 1.0, "learning_rate": 1e-3, "zero_stage": 2,
           "precision": "fp32", **BASE["ds_sft"]}  # fmt: skip
    paths = {"out_dir": str(tmp_path / "first"), "resume": "auto", "data_dir": "/d", "base_model": None,
             "wandb_mode": "offline", "wandb_project": "mine"}  # fmt: skip
    settings = SimpleNamespace(**{**DEFAULTS, **own, **paths, "model": "tiny", "fp8_recipe": {}})
    engine = {k: v for k, v in BASE.items() if k != "ds_sft"}
    written = json.loads(json.dumps(effective_config(engine, settings)))
    assert written["run"] == paths and not set(paths) & set(written["ds_sft"])
    code, lines = run_train(capsys, tmp_path, written)
    assert_refused(code, lines, ["data_dir"], "effective config passed back")  # accepted up to the data
    assert MISSING_DATA in lines[0]


ZERO = ("zero_optimization",)
# Values ds-sft's own checks let through and DeepSpeed refused in deepspeed.initialize, after the
# model had loaded, with a traceback: (the path set, its value, the section the refusal names).
DEEPSPEED_REFUSES = {
    "offload as a string": (ZERO, {"stage": 2, "offload_optimizer": "cpu"}, "zero_optimization"),
    "offload to a gpu": (ZERO, {"stage": 2, "offload_optimizer": {"device": "gpu"}}, "zero_optimization"),
    "communication dtype": (("communication_data_type",), "garbage", "communication_data_type"),
    "allreduce op": (("gradient_allreduce_op",), "bogus", "gradient_allreduce_op"),
    "tag validation": (("checkpoint",), {"tag_validation": "bogus"}, "checkpoint"),
    "wall clock a string": (("wall_clock_breakdown",), "x", "wall_clock_breakdown"),
    "timer switch a string": (("timers",), {"throughput": {"enabled": "x"}}, "timers"),
    "bf16 unknown key": (("bf16",), {"enabled": False, "bogus_key": 1}, "bf16"),
    "compile backend": (("compile",), {"enabled": True, "backend": 5}, "compile"),
    "removed amp": (("amp",), {"enabled": True}, "amp"),
    "removed elasticity": (("elasticity",), {"enabled": True}, "elasticity"),
    "removed layer drop": (("progressive_layer_drop",), {"enabled": True}, "progressive_layer_drop"),
    "removed sparse gradients": (("sparse_gradients",), True, "sparse_gradients"),
    "fp16": (("fp16",), {"enabled": True}, "fp16"),
    # it computed the forward in bf16 while the run, its report and its checkpoints said fp32
    "torch_autocast": (("torch_autocast",), {"enabled": True, "dtype": "torch.bfloat16"}, "torch_autocast"),
    "torch_autocast not a section": (("torch_autocast",), True, "torch_autocast"),
    # ZeRO cuts its buckets at fp16 pairs: an odd size was an AssertionError after the model loaded
    "odd allgather bucket": (("zero_optimization", "allgather_bucket_size"), 1, "allgather_bucket_size"),
    "odd reduce bucket": (("zero_optimization", "reduce_bucket_size"), 500_000_001, "reduce_bucket_size"),
    # NVMe offload needs an nvme_path (refused: DeepSpeed empties it): an AssertionError after loading
    "nvme offload": (("zero_optimization", "offload_optimizer"), {"device": "nvme"}, "offload_optimizer"),
    "capturable AdamW": (("optimizer", "params", "capturable"), True, "capturable"),
    "differentiable AdamW": (("optimizer", "params", "differentiable"), True, "differentiable"),
}  # fmt: skip


@pytest.mark.parametrize("case", DEEPSPEED_REFUSES)
def test_what_deepspeed_refuses_is_one_line_before_the_model_loads(capsys, tmp_path, case):
    path, value, section = DEEPSPEED_REFUSES[case]
    code, lines = run_train(capsys, tmp_path, set_path(BASE, path, value))
    assert_refused(code, lines, [f'"{section}"', section], case)


def resolved(tmp_path, config: dict, *flags: str):
    """``config.resolve`` of ``config`` and ``flags`` (with data that exists): (DeepSpeed config,
    settings, notes)."""
    from ds_sft.options import OneLineParser
    from ds_sft.train.cli import add_arguments
    from ds_sft.train.config import resolve

    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "manifest.json").write_text("{}")
    (tmp_path / "ds.json").write_text(json.dumps(config))
    parser = OneLineParser()
    add_arguments(parser)
    return resolve(parser.parse_args(["--deepspeed_config", str(tmp_path / "ds.json"), "--model", "tiny",
                                      "--data_dir", str(tmp_path / "data"), *flags]))  # fmt: skip


def test_an_optimizer_section_that_does_not_name_its_adamw_gets_torchs(tmp_path):
    """Without torch_adam DeepSpeed JIT-compiles its FusedAdam: 6 minutes on CPU, and on a GPU
    machine without nvcc not at all. A section that names neither gets torch's fused AdamW."""
    chosen = {}
    for choice in ({}, {"torch_adam": False}, {"fused": False}):
        config = set_path(BASE, ("optimizer",), {"type": "AdamW", "params": {"lr": 1e-3, **choice}})
        params = resolved(tmp_path, config)[0]["optimizer"]["params"]
        chosen[tuple(choice)] = (params.get("torch_adam"), params.get("fused"))
    assert chosen == {(): (True, True), ("torch_adam",): (False, None), ("fused",): (True, False)}


@pytest.mark.parametrize("betas", [None, "absent", [0.8, 0.9]])
@pytest.mark.parametrize("eps", [None, "absent", 1e-6])
def test_an_optimizer_section_without_betas_or_eps_trains_with_the_recipes_and_says_so(tmp_path, betas, eps):
    """{"params": {"lr": 7e-5}} trained with torch's betas (0.9, 0.999): the recipe's (0.9, 0.95) applied
    only when the whole optimizer section was missing. Null is unset, as for every setting."""
    given = {key: value for key, value in (("betas", betas), ("eps", eps)) if value != "absent"}
    config = set_path(BASE, ("optimizer", "params"), {"lr": 7e-5, **given})
    ds_config, _, notes = resolved(tmp_path, config)
    params = ds_config["optimizer"]["params"]
    missing = [key for key in ("betas", "eps") if given.get(key) is None]
    recipe = {"betas": [0.9, 0.95], "eps": 1e-8}
    assert (params["betas"], params["eps"]) == tuple(
        given.get(key) or recipe[key] for key in ("betas", "eps")
    )
    said = [note for note in notes if note.startswith('note: "optimizer.params"')]
    assert len(said) == bool(missing), notes
    if missing:
        assert f"sets no {' or '.join(missing)}: the recipe's " in said[0]
        assert all(f"{key} {json.dumps(recipe[key])}" in said[0] for key in missing)
    without_section = {key: value for key, value in BASE.items() if key != "optimizer"}
    ds_config, _, notes = resolved(tmp_path, without_section)  # the recipe's whole: nothing to say
    assert ds_config["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert not any(note.startswith('note: "optimizer.params"') for note in notes)


@pytest.mark.parametrize("where", ["flag", "json"])
def test_fp8_off_over_a_json_recipe_is_printed_and_records_no_recipe(tmp_path, where):
    """--fp8 off dropped the JSON's "fp8" recipe without an override line, and effective_config.json
    still recorded it as if it had run."""
    from ds_sft.train.config import effective_config

    recipe = {"select": "all", "margin": 0}
    config = {**BASE, "fp8": recipe}
    if where == "json":
        config = set_path(config, ("ds_sft", "fp8"), "off")
    flags = ["--fp8", "off"] if where == "flag" else []
    ds_config, settings, notes = resolved(tmp_path, config, *flags)
    via = "--fp8 off" if where == "flag" else '"ds_sft.fp8": "off"'
    assert f"override fp8: {json.dumps(recipe)} -> off ({via})" in notes
    assert effective_config(ds_config, settings)["fp8"] == {}
    ds_config, settings, notes = resolved(tmp_path, {**BASE, "fp8": recipe}, "--fp8", "torch")
    assert effective_config(ds_config, settings)["fp8"] == recipe  # it runs: recorded, no override
    assert not any(note.startswith("override fp8") for note in notes)


def test_a_null_warmup_is_not_set_so_its_default_is_capped_by_a_short_run(capsys, tmp_path):
    """\\"warmup_iters\\": null counted as given: --max_iters 4 was refused against the default of 10."""
    code, lines = run_train(
        capsys, tmp_path, set_path(BASE, ("ds_sft", "warmup_iters"), None), "--max_iters", "4"
    )
    assert code == 2 and len(lines) == 1 and "manifest.json" in lines[0], lines


@pytest.mark.parametrize("key", ["zero_quantized_weights", "zero_quantized_nontrainable_weights",
                                 "zero_quantized_gradients"])  # fmt: skip
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_plus_plus_quantization_without_cuda_is_one_line_before_the_model_loads(
    capsys, tmp_path, monkeypatch, key, stage
):
    """Each passed every check, and a CPU run ended in a traceback once the model had loaded: DeepSpeed's
    CPU backend has no quantizer (checked here against DeepSpeed itself)."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    with pytest.raises(ValueError, match="not been implemented on CPU"):
        CPU_Accelerator().create_op_builder("QuantizerBuilder").load()
    monkeypatch.setattr(
        torch.cuda, "is_available", lambda: False
    )  # a machine without CUDA, wherever this runs
    config = set_path(BASE, ("zero_optimization",), {"stage": stage, key: True})
    code, lines = run_train(capsys, tmp_path, config)
    assert_refused(code, lines, [f'"zero_optimization.{key}"'], key)
    assert "needs a CUDA GPU" in lines[0] and "set it to false" in lines[0]


@pytest.mark.parametrize("source", ["flag", "json"])
@pytest.mark.parametrize("interpret", [None, "0", "1"])
def test_triton_kernels_without_cuda_are_one_line_before_the_model_loads(
    capsys, tmp_path, monkeypatch, source, interpret
):
    """--kernels triton on a CPU-only machine was a traceback at the step-0 eval, after the model loaded
    and metrics.jsonl was created: Triton runs on CPU only through TRITON_INTERPRET=1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/conftest.py sets it
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    config, flags = BASE, ["--kernels", "triton"]
    if source == "json":
        config, flags = set_path(BASE, ("ds_sft", "kernels"), "triton"), []
    code, lines = run_train(capsys, tmp_path, config, *flags)
    if interpret == "1":  # the interpreter runs the kernels: accepted up to the missing data dir
        assert_refused(code, lines, ["data_dir"], "TRITON_INTERPRET=1")
    else:
        assert_refused(code, lines, ["--kernels triton needs a CUDA GPU"], interpret)


# Each key of REFUSED_DS_KEYS: (a value that asks for it, one that does not). Each set value passed every
# check and then was a traceback in deepspeed.initialize after the model loaded (foreach: torch refused it
# with the fused AdamW ds-sft adds; prescale_gradients: ZeRO-2's assert; checkpoint.writer: KeyError
# 'CROSS_SIZE'), or was accepted and changed the run silently or not at all (the rest; of them
# activation_checkpointing, dataloader_drop_last, compile and pipeline ran as if absent, compile unless
# --compile).
REFUSED_VALUES = {
    ("optimizer", "params", "foreach"): (True, False),
    ("optimizer", "params", "maximize"): (True, False),
    ("prescale_gradients",): (True, False),
    ("checkpoint", "writer"): ({"type": "fast", "io_buffer_size": 1048576}, None),
    ("data_types", "grad_accum_dtype"): ("fp16", None),
    ("data_efficiency",): (
        {"enabled": True, "data_routing": {"enabled": True, "random_ltd": {"enabled": True}}},
        {"enabled": False},
    ),
    ("hybrid_engine",): ({"enabled": True}, {"enabled": False}),
    ("activation_checkpointing",): ({"partition_activations": True}, {}),
    ("dataloader_drop_last",): (True, False),
    ("compile",): ({"deepcompile": True}, {}),
    ("pipeline",): ({"stages": 2, "activation_checkpoint_interval": 1}, {}),
}


def test_every_refused_deepspeed_key_is_tested():
    from ds_sft.train.config_keys import REFUSED_DS_KEYS

    assert set(REFUSED_VALUES) == set(REFUSED_DS_KEYS)


@pytest.mark.parametrize("path", REFUSED_VALUES, ids=".".join)
@pytest.mark.parametrize("asks", [True, False], ids=["set", "unset"])
def test_a_deepspeed_key_ds_sft_does_not_drive_is_one_line_before_the_model_loads(
    capsys, tmp_path, path, asks
):
    from ds_sft.train.config_keys import REFUSED_DS_KEYS

    config = merged(BASE, nested(path, REFUSED_VALUES[path][0 if asks else 1]))
    code, lines = run_train(capsys, tmp_path, config)
    if asks:
        assert_refused(code, lines, [f'remove "{".".join(path)}"'], path)
        assert REFUSED_DS_KEYS[path] in lines[0]
    else:  # switched off, it asks for nothing: accepted up to the missing data dir
        assert_refused(code, lines, ["data_dir"], path)


# Each key of PINNED_DS_VALUES: values DeepSpeed honours and ds-sft's loop cannot. gradient_allreduce_op
# "sum" ran on 2 ranks with every gradient doubled (grad norm 1.209 -> 2.418, clipping changed), no word.
PINNED_OTHER_VALUES = {("gradient_allreduce_op",): ["sum", "bogus"]}


def test_every_pinned_deepspeed_key_is_tested():
    from ds_sft.train.config_keys import PINNED_DS_VALUES

    assert set(PINNED_OTHER_VALUES) == set(PINNED_DS_VALUES)


@pytest.mark.parametrize("path", PINNED_OTHER_VALUES, ids=".".join)
def test_a_deepspeed_key_that_breaks_the_loops_gradient_mean_is_one_line(capsys, tmp_path, path):
    from ds_sft.train.config_keys import PINNED_DS_VALUES

    pinned, why = PINNED_DS_VALUES[path]
    for value in PINNED_OTHER_VALUES[path]:
        code, lines = run_train(capsys, tmp_path, merged(BASE, nested(path, value)))
        assert_refused(code, lines, [f'"{".".join(path)}" is {json.dumps(value)}'], value)
        assert why in lines[0] and f"set {json.dumps(pinned)}" in lines[0]
    code, lines = run_train(capsys, tmp_path, merged(BASE, nested(path, pinned)))
    assert_refused(code, lines, ["data_dir"], pinned)  # its one value: accepted up to the missing data dir


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_gradient_predivide_factor_zero_refuses_is_one_line_before_the_model_loads(capsys, tmp_path, stage):
    """ZeRO's reduce-scatter asserts gradient_predivide_factor == 1 in deepspeed.initialize."""
    config = set_path(
        set_path(BASE, ("zero_optimization",), {"stage": stage}), ("gradient_predivide_factor",), 2.0
    )
    code, lines = run_train(capsys, tmp_path, config)
    assert_refused(code, lines, ['"gradient_predivide_factor"'], stage)
    accepted = set_path(config, ("zero_optimization",), {"stage": stage, "reduce_scatter": False})
    assert_refused(
        *run_train(capsys, tmp_path, accepted), ["data_dir"], f"stage {stage} without reduce_scatter"
    )


# One value of each JSON kind. A value of the wrong kind for a top-level DeepSpeed key could get past
# every check and make DeepSpeed's reader raise something other than its own config errors (an object
# as "communication_data_type": AttributeError 'dict' object has no attribute 'lower'), a traceback.
WRONG_KINDS = [{"ds_sft_probe": 1}, [1], "x", 3, 2.5, True, None]


@pytest.mark.parametrize("key", sorted(KNOWN_DS_KEYS))
def test_a_value_of_any_kind_for_any_deepspeed_key_is_one_line(capsys, tmp_path, key):
    for value in WRONG_KINDS:
        code, lines = run_train(capsys, tmp_path, {**BASE, key: value})
        if code == 2 and len(lines) == 1 and "manifest.json" in lines[0]:
            continue  # accepted up to the missing data dir
        assert_refused(code, lines, [key], f"{key} = {value!r}")
