"""Every range check answers a bad value the same way: one line, ``NAME must be <domain>, got <value>``.

The checks made outside argparse go through ``ds_sft.options.checked`` (a model config's fields and its
rope_scaling, ``generate``'s settings, ``--gsm8k_limit``, a harness task's generation keys,
``bench/kernel_speed.py --case``, the DeepSpeed JSON's int64 floor, its ``enabled`` switches and
``train``'s flags read from it, ``--warmup_iters`` / ``--min_lr`` against the flags that bound them);
the command line's numbers go through the same domains as argparse types. Before, six of those sites
worded their refusals six ways, and some answered a string or a NaN with a TypeError traceback.

The matrix: hostile values (zero, -1, NaN, the infinities, 1e400, the string "1e3", booleans, integers
past int64, past 2**70 and past ``repr()``'s digit limit, strings, a list) against every site. A cell is
either a value the site accepts (listed by hand) or refused in exactly that form; a valid value is
accepted at every site. Anything else (another wording, two lines, an exception) fails the cell.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ds_sft.errors import UserError
from ds_sft.options import Float, Int

NAN, INF = float("nan"), float("inf")
HUGE = 10**5000  # more digits than repr() writes (Python's int_max_str_digits, 4,300)
HOSTILE = {
    "0": 0,
    "-1": -1,
    "nan": NAN,
    "inf": INF,
    "-inf": -INF,
    "1e400": float("1e400"),
    "'1e3'": "1e3",
    "True": True,
    "False": False,
    "2**63": 2**63,
    "2**70": 2**70,
    "10**5000": HUGE,
    "'abc'": "abc",
    "''": "",
    "[1]": [1],
}


@dataclass
class Site:
    """Where a value is checked: ``run(value, tmp_path)`` returns the refusal's line, or None when the
    value was accepted. ``name`` is a regular expression for the NAME the line must open with;
    ``accepts`` the labels of :data:`HOSTILE` that the site takes; ``good`` a value it takes."""

    name: str
    run: Callable
    good: object
    accepts: tuple[str, ...] = ()
    values: dict = field(default_factory=lambda: HOSTILE)


def refusal(call: Callable) -> str | None:
    """The message of the UserError ``call()`` raises, or None when it returns (anything else raises)."""
    try:
        call()
    except UserError as err:
        return str(err)
    return None


# --------------------------------------------------------------------------- the model's config

TINY_VALUES = {"n_kv_heads": 2, "head_dim": 16, "sliding_window": 8, "tie_embeddings": True}
MODEL_NUMBERS = ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden",
                 "max_seq_len", "sliding_window", "rope_theta", "norm_eps", "init_std"]  # fmt: skip
MODEL_SWITCHES = ["tie_embeddings", "activation_checkpointing", "attention_bias", "qk_norm"]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}  # fmt: skip


def _model_field(name: str) -> Site:
    from ds_sft.model.config import ModelConfig, check_field

    good = TINY_VALUES.get(name, getattr(ModelConfig.preset("tiny"), name))
    accepts = ("True", "False") if name in MODEL_SWITCHES else ()
    return Site(re.escape(name), lambda v, _: refusal(lambda: check_field(name, v)), good, accepts)


def _rope_key(key: str) -> Site:
    from ds_sft.model.config import ModelConfig

    def run(value, _):
        return refusal(lambda: ModelConfig.preset("tiny", rope_scaling={**LLAMA3, key: value}))

    return Site(re.escape(f"rope_scaling.{key}"), run, LLAMA3[key])


# --------------------------------------------------------------------------- generate, GSM8K, harness


@functools.cache
def _tiny_model():
    import torch

    from ds_sft.model.config import ModelConfig
    from ds_sft.model.llama import LlamaModel

    torch.manual_seed(0)
    return LlamaModel(ModelConfig.preset("tiny", kernels="eager")).eval()


def _generate(setting: str) -> Site:
    from ds_sft.model.generate import generate

    def run(value, _):
        settings = {"max_new_tokens": 2, setting: value}
        return refusal(lambda: generate(_tiny_model(), [[1, 2, 3]], **settings))

    good, accepts = (2, ("0",)) if setting == "max_new_tokens" else (1.2, ())
    return Site(setting, run, good, accepts)


def _gsm8k_limit() -> Site:
    from ds_sft.eval.gsm8k import select_indices

    return Site("--gsm8k_limit", lambda v, _: refusal(lambda: select_indices(10, v, seed=0)), 3)


HARNESS_KEYS = {"generation_kwargs.max_gen_toks": (16, ()), "repeats": (1, ()), "num_fewshot": (0, ("0",))}


def _harness(key: str) -> Site:
    def run(value, tmp_path):
        pytest.importorskip("lm_eval", reason="the harness is the optional extra ds-sft[eval]")
        from ds_sft.eval import harness

        data = tmp_path / "mine.jsonl"
        data.write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
        config = {**harness.gsm8k_task_config(str(data), 32), "task": "mine"}
        if key == "generation_kwargs.max_gen_toks":
            config["generation_kwargs"] = {"until": ["Q:"], "max_gen_toks": value}
        else:
            config[key] = value
        return refusal(lambda: harness.checked_task_config("mine.yaml", config))

    good, accepts = HARNESS_KEYS[key]
    return Site(re.escape(f"--harness mine.yaml: {key}"), run, good, accepts)


# --------------------------------------------------------------------------- bench/kernel_speed.py --case

CASE_ARGUMENTS = {"tokens": 4, "hidden": 8, "vocab": 16, "chunk_size": 4, "repeats": 1}


@functools.cache
def _kernel_speed():
    import importlib.util

    from tests.conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("kernel_speed", REPO_ROOT / "bench" / "kernel_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _json_text(value) -> str:
    """``value`` as JSON text (Python's writer: NaN, Infinity; an integer past repr()'s limit by digits)."""
    return "1" + "0" * 5000 if value is HUGE else json.dumps(value)


def _kernel_case(parameter: str) -> Site:
    def run(value, _):
        arguments = [_json_text(a) for a in {**CASE_ARGUMENTS, parameter: value}.values()]
        text = f'["run_timing_case", "float32", {", ".join(arguments)}]'
        return refusal(lambda: _kernel_speed().run_case(text))

    # an integer of 5,001 digits is past what json.loads reads: the list is refused whole, in one line
    values = {label: v for label, v in HOSTILE.items() if v is not HUGE}
    return Site(re.escape(f"--case run_timing_case: {parameter}"), run, CASE_ARGUMENTS[parameter], (), values)


# --------------------------------------------------------------------------- train's DeepSpeed JSON


def _int64_floor() -> Site:
    from ds_sft.train.config_checks import check_numbers

    def run(value, _):
        return refusal(lambda: check_numbers({"zero_optimization": {"x": value}}, "ds.json"))

    # a floor for integers only: every other value is some other check's (or the JSON reader's)
    accepts = tuple(label for label in HOSTILE if label not in ("2**63", "2**70", "10**5000"))
    return Site(re.escape('"zero_optimization.x" in ds.json'), run, 5, accepts)


def _enabled(section: str) -> Site:
    from ds_sft.train.config_checks import check_sections

    def run(value, _):
        return refusal(lambda: check_sections({section: {"enabled": value}}))

    return Site(re.escape(f'"{section}.enabled" in the DeepSpeed config'), run, False, ("True", "False"))


def _no_process_group(*args, **kwargs):
    raise AssertionError("train went past its checks with a --data_dir that does not exist")


MISSING_DATA = "/nonexistent/d"


def run_train(tmp_path: Path, config_text: str, *flags: str) -> str | None:
    """``ds-sft train`` in this process on a DeepSpeed JSON: its one line (the prefix cut), or None
    when the config was accepted (the missing --data_dir is then what stops it, the last check)."""
    import ds_sft.train.distributed
    from ds_sft.cli import main

    path = tmp_path / "ds.json"
    path.write_text(config_text)
    argv = ["train", "--deepspeed_config", str(path), "--model", "tiny", "--data_dir", MISSING_DATA, *flags]
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(io.StringIO()) as err:
        patch.setattr(ds_sft.train.distributed, "init_distributed", _no_process_group)
        code = main(argv)
    lines = err.getvalue().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ds-sft train: error: "), (code, lines)
    line = lines[0].removeprefix("ds-sft train: error: ")
    return None if f"{MISSING_DATA} has no manifest.json" in line else line


# The train flags with a numeric domain, and the good value of each (the defaults, where there is one)
TRAIN_NUMBERS = {"zero_stage": 2, "micro_batch_size": 16, "grad_accum": 1, "learning_rate": 7e-5,
                 "min_lr": 1e-5, "warmup_iters": 10, "max_iters": 100, "weight_decay": 0.05,
                 "grad_clip": 1.0, "seed": 1337, "dist_timeout": 600, "eval_interval": 10, "eval_iters": 8,
                 "log_interval": 1, "save_interval": 50, "keep_last": 2, "alarm_rising_evals": 3,
                 "alarm_gap": 0.5, "max_nan_steps": 5}  # fmt: skip
TAKES_ZERO = {"zero_stage", "min_lr", "warmup_iters", "weight_decay", "grad_clip", "seed", "alarm_gap"}
# Values JSON cannot carry: the reader refuses them before any domain sees them (ds_sft.json_input)
NOT_JSON = ("nan", "inf", "-inf", "1e400", "10**5000")


def _json_path(flag: str) -> tuple[str, ...]:
    from ds_sft.train.config_keys import FLAG_TO_DS_KEY

    return FLAG_TO_DS_KEY.get(flag, ("ds_sft", flag))


def _run_train_json(flag: str, value, tmp_path: Path) -> str | None:
    """``train`` on a DeepSpeed JSON holding ``value`` where ``flag`` lives in it (an optimizer section
    names its type: DeepSpeed's JSON has no default one)."""
    path, text = _json_path(flag), _json_text(value)
    for depth in reversed(range(len(path))):
        beside = '"type": "AdamW", ' if path[:depth] == ("optimizer",) else ""
        text = f'{{{beside}"{path[depth]}": {text}}}'
    return run_train(tmp_path, text)


def _train_json(flag: str) -> Site:
    def run(value, tmp_path):
        return _run_train_json(flag, value, tmp_path)

    accepts = ("0",) if flag in TAKES_ZERO else ()
    values = {label: value for label, value in HOSTILE.items() if label not in NOT_JSON}
    where = re.escape(".".join(_json_path(flag)))
    name = rf"--{flag} \({where} in the DeepSpeed config ds\.json\)"
    return Site(name, run, TRAIN_NUMBERS[flag], accepts, values)


def _bounded_by(flag: str, bound: str, bound_value) -> Site:
    """``--warmup_iters`` at most ``--max_iters``, ``--min_lr`` at most ``--learning_rate``: values each
    in its own flag's domain, refused past the other flag's."""

    def run(value, tmp_path):
        return run_train(tmp_path, "{}", f"--{bound}={bound_value}", f"--{flag}={value}")

    good = {"warmup_iters": 100, "min_lr": 1e-3}[flag]
    values = (
        {"0": 0, "101": 101, "2**31-1": 2**31 - 1}
        if flag == "warmup_iters"
        else {"0": 0, "0.5": 0.5, "10": 10}
    )
    return Site(re.escape(f"--{flag} (at most --{bound})"), run, good, ("0",), values)


# --------------------------------------------------------------------------- the command line


def _flag(command: str, flag: str, domain) -> Site:
    """A numeric flag of ``command``: argparse's type is the flag's domain."""
    from ds_sft.cli import build_parser

    def run(value, _):
        argv = [command, *COMMAND_LINES[command], f"--{flag}={value}"]
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                build_parser().parse_args(argv)
            except SystemExit as stop:
                lines = err.getvalue().splitlines()
                assert stop.code == 2 and len(lines) == 1, lines
                return lines[0].removeprefix(f"ds-sft {command}: error: ").removesuffix(" (see --help)")
        return None

    texts = {label: "1" + "0" * 5000 if v is HUGE else str(v) for label, v in HOSTILE.items()}
    texts = {label: text for label, text in texts.items() if text and label != "[1]"}  # "" is its own refusal
    accepts = ("0",) if domain.min == 0 and not getattr(domain, "min_open", False) else ()
    if isinstance(domain, Float):  # a number argparse reads as 1000.0
        accepts += ("'1e3'",) if domain.max >= 1000 else ()
    return Site(re.escape(f"argument --{flag}:"), run, str(max(1, domain.min)), accepts, texts)


def _numeric_flags(command: str) -> list[tuple[str, object]]:
    from ds_sft.cli import build_parser, command_parsers

    parser = command_parsers(build_parser())[command]
    return [(a.dest, a.type) for a in parser._actions if isinstance(a.type, Int | Float)]


GENERATE_SETTINGS = ("max_new_tokens", "repetition_penalty")
# each command line with the flags it needs besides the one tested (eval's --seed draws a --gsm8k_limit)
COMMAND_LINES = {"train": [], "eval": ["--data_dir", "d", "--model", "m", "--gsm8k_limit", "5"]}
SITES = {
    **{f"model {name}": functools.partial(_model_field, name) for name in MODEL_NUMBERS + MODEL_SWITCHES},
    **{f"rope_scaling {key}": functools.partial(_rope_key, key) for key in LLAMA3 if key != "rope_type"},
    **{f"generate {name}": functools.partial(_generate, name) for name in GENERATE_SETTINGS},
    "gsm8k select_indices": _gsm8k_limit,
    **{f"harness {key}": functools.partial(_harness, key) for key in HARNESS_KEYS},
    **{f"kernel_speed {name}": functools.partial(_kernel_case, name) for name in CASE_ARGUMENTS},
    "DeepSpeed JSON int64 floor": _int64_floor,
    **{f"DeepSpeed JSON {s}.enabled": functools.partial(_enabled, s) for s in ("bf16", "fp16")},
    **{f"train JSON {flag}": functools.partial(_train_json, flag) for flag in TRAIN_NUMBERS},
    "train --warmup_iters <= --max_iters": functools.partial(_bounded_by, "warmup_iters", "max_iters", 100),
    "train --min_lr <= --learning_rate": functools.partial(_bounded_by, "min_lr", "learning_rate", 1e-3),
    **{f"{c} --{f}": functools.partial(_flag, c, f, d) for c in COMMAND_LINES for f, d in _numeric_flags(c)},
}  # fmt: skip


def _cells():
    for site_id, make in SITES.items():
        site = make()
        for label in site.values:
            yield pytest.param(site_id, label, id=f"{site_id}-{label}")


@pytest.mark.parametrize(("site_id", "label"), list(_cells()))
def test_each_hostile_value_is_accepted_as_listed_or_refused_in_one_line_of_one_form(
    site_id, label, tmp_path
):
    site = SITES[site_id]()
    line = site.run(site.values[label], tmp_path)
    if label in site.accepts:
        assert line is None, line
        return
    assert line is not None, f"{site_id} took {label}"
    assert "\n" not in line and re.fullmatch(rf"{site.name} must be \S.*, got \S.*", line), line


@pytest.mark.parametrize("site_id", list(SITES))
def test_a_valid_value_is_accepted_at_every_site(site_id, tmp_path):
    site = SITES[site_id]()
    assert site.run(site.good, tmp_path) is None


@pytest.mark.parametrize("label", NOT_JSON)
@pytest.mark.parametrize("flag", sorted(TRAIN_NUMBERS))
def test_a_value_json_cannot_carry_is_refused_by_the_reader_naming_the_key(flag, label, tmp_path):
    """NaN, the infinities, 1e400 and a 5,001-digit integer in the DeepSpeed JSON: Python's reader takes
    them, ds-sft's refuses them in one line naming the key, before any domain sees them."""
    line = _run_train_json(flag, HOSTILE[label], tmp_path)
    assert line is not None and f'"{".".join(_json_path(flag))}"' in line, line


def test_the_matrix_covers_every_numeric_flag_of_train():
    """A train flag with a numeric domain that the matrix leaves out is a site it does not test."""
    from ds_sft.train.config_keys import DOMAINS

    assert sorted(flag for flag, domain in DOMAINS.items() if isinstance(domain, Int | Float)) == sorted(
        TRAIN_NUMBERS
    )


@pytest.mark.parametrize("digits", [40, 41, 100, 308, 309, 1000, 4300, 4301, 5001, 20_000])
def test_an_integer_too_long_to_show_is_named_by_its_exact_count_of_digits(digits):
    """A domain shows an integer past 128 bits by its digits, in json_input's words for one past
    ``int()``'s limit (one wording): exactly, for the largest and the smallest of that many digits,
    where a count from the bit length alone is one off at some of them."""
    from ds_sft.json_input import long_integer

    for value in (10 ** (digits - 1), 10**digits - 1, -(10**digits - 1)):
        said = str(Int(0, 10).refuse(value))
        assert said == f"must be an integer from 0 to 10, got {long_integer(digits)}", said
