"""`ds-sft train` as a user runs it: config layering, one-line errors, and a whole run's outputs."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from ds_sft.cli import main
from ds_sft.errors import UserError
from ds_sft.train import config, config_checks
from ds_sft.train.cli import add_arguments
from tests.rendezvous import without_launcher_variables
from tests.train.helpers import REPO_ROOT, write_data_dir

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data_dir(tmp_path_factory.mktemp("data"))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def write_config(tmp_path, **entries) -> str:
    base = json.loads((REPO_ROOT / "ds_configs" / "zero2.json").read_text())
    base.update(entries)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(base))
    return str(path)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO_ROOT / "ds_configs").glob("*.json")))
def test_every_shipped_config_validates_and_explains_itself(name, data_dir):
    path = REPO_ROOT / "ds_configs" / f"{name}.json"
    assert "Launch:" in json.loads(path.read_text())["_comment"]
    ds_config, s, _ = config.resolve(
        parse("--data_dir", str(data_dir), "--model", "tiny", "--deepspeed_config", str(path))
    )
    assert ds_config["train_batch_size"] == s.micro_batch_size * s.grad_accum
    assert "ds_sft" not in ds_config and "fp8" not in ds_config  # ds-sft's own sections stay out
    params = ds_config["optimizer"]["params"]
    assert params.get("torch_adam") and params.get("fused")  # torch's fused AdamW, offloaded or not


SHIPPED = sorted(p.stem for p in (REPO_ROOT / "ds_configs").glob("*.json"))
# Shipped configs that differ from the recipe on purpose, each saying so in its _comment: name -> the
# setting that differs and its value.
NOT_THE_RECIPE = {"bf16": ("precision", "bf16")}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_runs_the_recipes_batch_and_precision(name, data_dir):
    """zero0-3 and the offload configs ran 4 rows per step in fp32 where the recipe runs 256 in bf16 (on
    hardware that has it): switching from the recipe to zero3.json changed the run 64x without a word."""
    recipe = config.resolve(parse("--data_dir", str(data_dir), "--model", "tiny"))
    shipped = config.resolve(
        parse("--data_dir", str(data_dir), "--model", "tiny", "--deepspeed_config", f"ds_configs/{name}.json")
    )
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    assert [shipped[0][key] for key in keys] == [recipe[0][key] for key in keys] == [256, 16, 16]
    setting, value = NOT_THE_RECIPE.get(name, ("precision", recipe[1].precision))
    assert getattr(shipped[1], setting) == value
    if name in NOT_THE_RECIPE:
        assert (
            "Unlike the recipe"
            in json.loads((REPO_ROOT / "ds_configs" / f"{name}.json").read_text())["_comment"]
        )


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_builds_torchs_fused_adamw_and_says_so_under_offload(name, data_dir, dist_env):
    """The offload configs said DeepSpeed's CPUAdam steps them while ds-sft's torch_adam made DeepSpeed
    build torch's AdamW: the optimizer the engine builds, and the note printed where it is offloaded."""
    from ds_sft.train.engine import build_engine
    from tests.train.helpers import tiny_model

    path = REPO_ROOT / "ds_configs" / f"{name}.json"
    small = ("--micro_batch_size", "1", "--grad_accum", "1")
    ds_config, s, notes = config.resolve(
        parse("--data_dir", str(data_dir), "--model", "tiny", "--deepspeed_config", str(path), *small)
    )
    engine, _ = build_engine(tiny_model(), ds_config, s.weight_decay)
    try:
        assert type(engine.basic_optimizer) is torch.optim.AdamW and engine.basic_optimizer.defaults["fused"]
    finally:
        engine.destroy()
    offloaded = "offload_optimizer" in ds_config["zero_optimization"]
    said = [note for note in notes if "torch's fused AdamW on the CPU, not DeepSpeed's CPUAdam" in note]
    assert len(said) == offloaded, notes
    assert ("steps torch's fused AdamW on the CPU" in json.loads(path.read_text())["_comment"]) == offloaded


SEED_TRAIN = "train --data_dir {data} --model tiny --learning_rate 7e-5 --max_iters 100 --eval_interval 10"


@pytest.mark.parametrize(
    ("world", "flags", "rule"),
    [
        (1, [], "256 rows per step = 16 micro x 16 accum x 1 rank"),
        (2, [], "256 rows per step = 16 micro x 8 accum x 2 ranks"),
        (16, [], "256 rows per step = 16 micro x 1 accum x 16 ranks"),
        (4, ["--micro_batch_size", "8"], "256 rows per step = 8 micro x 8 accum x 4 ranks"),
        (3, ["--grad_accum", "5"], "240 rows per step = 16 micro x 5 accum x 3 ranks"),
        (3, [], "256 rows per step do not divide into micro-batches of 16 on 3 rank(s): pass --grad_accum"),
        (32, [], "256 rows per step do not divide into micro-batches of 16 on 32 rank(s)"),
    ],
)
def test_the_recipe_is_256_rows_per_step_globally(world, flags, rule, data_dir, monkeypatch, capsys):
    """The seed's train command with no config: accumulation = 256 / (16 x ranks), printed as a rule."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = parse(*SEED_TRAIN.format(data=data_dir).split()[1:], *flags)
    try:
        ds_config, s, notes = config.resolve(args)
    except config.UserError as err:
        assert rule in str(err) and "\n" not in str(err)
        return
    assert rule in notes
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    assert ds_config["train_batch_size"] == micro * accum * world == int(rule.split()[0])


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
JSON_BATCH = dict(zip(BATCH_KEYS, (64, 8, 4), strict=True))  # agree on 2 ranks only
FLAG_BATCH = {"micro_batch_size": 4, "grad_accum": 2}


def deepspeeds_rule(rows, micro, accum, world: int) -> tuple[int, int, int]:
    """DeepSpeed's own batch rule (DeepSpeedConfig._configure_train_batch_size), on the keys given;
    AssertionError where DeepSpeed refuses them."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = object.__new__(DeepSpeedConfig)
    ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps = (
        rows,
        micro,
        accum,
    )
    ds.world_size = world
    ds._configure_train_batch_size()
    return ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("flags", [(), ("micro_batch_size",), ("grad_accum",), tuple(FLAG_BATCH)], ids=str)
@pytest.mark.parametrize(
    "keys", [tuple(k for i, k in enumerate(BATCH_KEYS) if mask >> i & 1) for mask in range(8)], ids=str
)
def test_batch_keys_follow_deepspeeds_rule(keys, flags, world, data_dir, tmp_path, monkeypatch):
    """Any two of train_batch_size, micro-batch and accumulation determine the third, as in DeepSpeed; a
    flag replaces its key and the JSON's train_batch_size stays where it can (--micro_batch_size: the
    accumulation follows; --grad_accum sets the rows). The recipe fills only what DeepSpeed cannot derive
    (no train_batch_size and no accumulation: 256 rows; a micro-batch of 16 unless set). A flag skipped
    the train_batch_size check, so 256/16/16 with --micro_batch_size 8 ran 128 rows; {train_batch_size
    32, accumulation 4} was refused naming a micro-batch of 16 nobody set; {train_batch_size 64} ran
    16 x 4."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    (tmp_path / "ds.json").write_text(json.dumps({key: JSON_BATCH[key] for key in keys}))
    argv = [arg for flag in flags for arg in (f"--{flag}", str(FLAG_BATCH[flag]))]
    rows, micro, accum = (JSON_BATCH[key] if key in keys else None for key in BATCH_KEYS)
    micro = FLAG_BATCH["micro_batch_size"] if "micro_batch_size" in flags else micro
    accum = FLAG_BATCH["grad_accum"] if "grad_accum" in flags else accum
    if None not in (rows, micro, accum) and flags:
        rows, accum = (None, accum) if "grad_accum" in flags else (rows, None)
    if rows is None and accum is None:
        rows, micro = 256, micro or 16
    elif rows is None and micro is None:
        micro = 16
    try:
        expected = deepspeeds_rule(rows, micro, accum, world)
    except AssertionError:
        expected = None
    try:
        ds_config, _, notes = config.resolve(
            parse(
                "--data_dir",
                str(data_dir),
                "--model",
                "tiny",
                "--deepspeed_config",
                str(tmp_path / "ds.json"),
                *argv,
            )
        )
    except config.UserError as err:
        assert expected is None, f"refused ({err}) where DeepSpeed runs {expected}"
        assert "\n" not in str(err) and ("train_batch_size" in str(err) or "rows per step" in str(err))
        return
    assert tuple(ds_config[key] for key in BATCH_KEYS) == expected
    declared = JSON_BATCH["train_batch_size"] if "train_batch_size" in keys else expected[0]
    changed = [note for note in notes if note.startswith("override train_batch_size:")]
    assert changed == ([f"override train_batch_size: {declared} -> {expected[0]} (micro x accum x ranks)"]
                       if declared != expected[0] else [])  # fmt: skip


def test_the_seed_command_as_written_resolves_to_the_recipe(data_dir):
    ds_config, s, notes = config.resolve(parse(*SEED_TRAIN.format(data=data_dir).split()[1:]))
    assert s.deepspeed_config.endswith("sft_recipe.json")
    assert (s.micro_batch_size, s.grad_accum, ds_config["train_batch_size"]) == (16, 16, 256)
    assert (s.warmup_iters, s.min_lr, s.grad_clip, s.weight_decay) == (10, 1e-5, 1.0, 0.05)
    assert (s.zero_stage, s.fp8) == (2, "auto") and ds_config["zero_optimization"]["stage"] == 2
    bf16, _ = config.hardware_bf16()
    assert s.precision == ("bf16" if bf16 else "fp32") and ds_config["bf16"]["enabled"] is bf16
    assert any(line.startswith("precision auto -> ") for line in notes)


def test_fp8_emulated_is_refused_naming_torch(data_dir, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--data_dir", str(data_dir), "--model", "tiny", "--fp8", "emulated"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "--fp8" in err[0] and "torch" in err[0], err


@pytest.mark.parametrize(
    ("flag", "section", "swapped"),
    [
        ("auto", None, 0),  # fp8 only where the roofline says it pays: nowhere at the tiny preset
        ("auto", {"amax_history_len": 16}, 0),  # a recipe that does not say select
        ("auto", {"select": "all"}, 14),  # one that does keeps it
        ("torch", None, 14),  # fp8 asked for by name: every projection
        ("torch", {"select": "auto"}, 0),
    ],
)
def test_fp8_auto_runs_fp8_only_where_it_pays(flag, section, swapped, data_dir, tmp_path, monkeypatch):
    """On an H200 without Transformer Engine --fp8 auto is torch; with every projection in fp8 the first
    GPU check trained the 112m preset at a third of bf16's tokens/s (estimated 0.23x per projection)."""
    from ds_sft.model import fp8
    from ds_sft.train.cli import build_model

    monkeypatch.setattr(fp8, "resolve_fp8_mode", lambda mode, device: "torch" if mode == "auto" else mode)
    monkeypatch.setattr(fp8, "_why_auto", lambda resolved, device: "--fp8 auto: torch (as on an H200)")
    config_path = write_config(tmp_path, **({} if section is None else {"fp8": section}))
    args = parse(
        "--data_dir", str(data_dir), "--model", "tiny", "--fp8", flag, "--deepspeed_config", config_path
    )
    _, s, _ = config.resolve(args)
    model = build_model(s, tokens_per_micro_batch=16 * 1024)
    assert sum(isinstance(m, fp8.Float8Linear) for m in model.modules()) == swapped
    # the run's effective_config.json says which rule chose (a JSON without "select" means all)
    assert config.effective_config({}, s)["fp8"].get("select", "all") == ("all" if swapped else "auto")


def test_seed_recipe_numbers(data_dir):
    ds_config, s, _ = config.resolve(
        parse(
            "--data_dir", str(data_dir), "--model", "tiny", "--deepspeed_config", "ds_configs/sft_recipe.json"
        )
    )
    assert (s.micro_batch_size, s.grad_accum, s.grad_clip) == (16, 16, 1.0)
    assert (s.learning_rate, s.weight_decay, s.warmup_iters, s.min_lr) == (7e-5, 0.05, 10, 1e-5)
    assert ds_config["optimizer"]["params"]["betas"] == [0.9, 0.95]


def test_flags_override_the_json_and_say_so(data_dir):
    ds_config, s, overrides = config.resolve(
        parse(
            "--data_dir",
            str(data_dir),
            "--model",
            "tiny",
            "--deepspeed_config",
            "ds_configs/sft_recipe.json",
            "--micro_batch_size",
            "2",
            "--grad_accum",
            "2",
            "--learning_rate",
            "1e-4",
            "--precision",
            "fp32",
            "--warmup_iters",
            "3",
        )
    )
    assert ds_config["train_micro_batch_size_per_gpu"] == 2 and ds_config["gradient_accumulation_steps"] == 2
    assert ds_config["optimizer"]["params"]["lr"] == 1e-4 and ds_config["bf16"]["enabled"] is False
    assert ds_config["train_batch_size"] == 4 and s.warmup_iters == 3 and s.min_lr == 1e-5
    assert "override train_micro_batch_size_per_gpu: 16 -> 2 (--micro_batch_size)" in overrides
    assert "4 rows per step = 2 micro x 2 accum x 1 rank" in overrides  # the recipe's 256 gives way
    assert "override train_batch_size: 256 -> 4 (micro x accum x ranks)" in overrides
    assert len(overrides) == 5 and overrides[0].endswith("sft_recipe.json")


@pytest.mark.parametrize(
    ("entries", "flags", "message"),
    [
        (
            {"train_batch_size": 64, "gradient_accumulation_steps": 1},
            [],
            "train_batch_size 64 != micro_batch_size 16 x grad_accum 1 x world size 1",
        ),
        ({"gradient_acumulation_steps": 4}, [], "did you mean 'gradient_accumulation_steps'"),
        ({"zero_optimization": {"stage": 2, "overlap_com": True}}, [], "did you mean 'overlap_comm'"),
        ({"ds_sft": {"warmup_iter": 5}}, [], "did you mean 'warmup_iters'"),
        ({"scheduler": {"type": "WarmupLR"}}, [], "ds-sft owns the lr schedule"),
        (
            {},
            ["--warmup_iters", "500"],
            "--warmup_iters (at most --max_iters) must be an integer from 0 to 100, got 500",
        ),
        ({}, ["--base_model", "smollm2-135m-instruct"], "pass exactly one of --base_model"),
        ({}, ["--resume", "/nonexistent/ckpt"], "--resume /nonexistent/ckpt does not exist"),
    ],
)
def test_contradictions_are_one_line_errors(entries, flags, message, data_dir, tmp_path, capsys):
    code = main(
        [
            "train",
            "--data_dir",
            str(data_dir),
            "--model",
            "tiny",
            "--out_dir",
            str(tmp_path / "run"),
            "--deepspeed_config",
            write_config(tmp_path, **entries),
            *flags,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # nothing was started


# A DeepSpeed section of each kind that holds JSON objects, set as a run may set it: read key by key
# (checkpoint, autotuning), by a pydantic model (timers, zero_optimization), checked by ds-sft (optimizer)
NESTED = {
    "checkpoint": {"tag_validation": "WARN", "parallel_write": {"pipeline_stage": False}},
    "autotuning": {
        "enabled": False,
        "arg_mappings": {"train_micro_batch_size_per_gpu": "--mbs"},
        "model_info": {"num_params": 10, "hidden_size": 64, "num_layers": 2, "profile": False},
    },
    "timers": {"throughput": {"enabled": True, "synchronized": False}},
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu"},
    },
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True, "fused": True}},
}
# objects whose keys are the user's own names, which no reader can check
USERS_NAMES = {("autotuning", "arg_mappings")}
DEPTH_2 = [
    (section, inner, key)
    for section, value in NESTED.items()
    for inner, held in value.items()
    if isinstance(held, dict) and (section, inner) not in USERS_NAMES
    for key in held
]


def misspelt(section: str, inner: str, key: str) -> dict:
    """:data:`NESTED` with ``section.inner.key`` misspelt (its last letter doubled)."""
    entries = json.loads(json.dumps(NESTED))
    held = entries[section][inner]
    held[key + key[-1]] = held.pop(key)
    return entries


def test_every_nested_object_holds_keys_some_reader_checks(data_dir, tmp_path):
    """The sections of NESTED load as they are, and DeepSpeed's reader walks some of their objects key by
    key: those ignored a misspelt key (the cells of the matrix below that ds-sft refuses itself)."""
    path = write_config(tmp_path, **NESTED)
    config.resolve(parse("--data_dir", str(data_dir), "--model", "tiny", "--deepspeed_config", path))
    asked_by_path = config_checks.read_with_deepspeed(NESTED)
    walked = {path for path, asked in asked_by_path.items() if len(path) == 2 and asked}
    assert {("checkpoint", "parallel_write"), ("autotuning", "model_info")} <= walked


@pytest.mark.parametrize(("section", "inner", "key"), DEPTH_2, ids=[".".join(cell) for cell in DEPTH_2])
def test_a_misspelt_key_inside_a_section_is_one_line_error(section, inner, key, data_dir, tmp_path):
    """``"checkpoint": {"parallel_write": {"pipeline_stagee": true}}`` ran as if absent: DeepSpeed reads
    that object key by key and ignores a key it never asks for."""
    path = write_config(tmp_path, **misspelt(section, inner, key))
    with pytest.raises(UserError) as refused:
        config.resolve(parse("--data_dir", str(data_dir), "--model", "tiny", "--deepspeed_config", path))
    said = str(refused.value)
    assert key + key[-1] in said and "\n" not in said, said
    if (section, inner) in {p for p, asked in config_checks.read_with_deepspeed(NESTED).items() if asked}:
        assert f'in "{section}.{inner}" of' in said and f"did you mean {key!r}?" in said


def test_missing_files_are_one_line_errors(data_dir, tmp_path, capsys):
    assert main(["train", "--data_dir", str(tmp_path), "--model", "tiny"]) == 2
    assert "has no manifest.json: run `ds-sft prepare`" in capsys.readouterr().err
    assert (
        main(["train", "--data_dir", str(data_dir), "--model", "tiny", "--deepspeed_config", "nope.json"])
        == 2
    )
    assert "DeepSpeed config 'nope.json' not found" in capsys.readouterr().err


# What may stand at a --deepspeed_config path without being a file: each was "not found", which sent
# the user looking for a typo in a path that exists.
NOT_A_CONFIG_FILE = {
    "a FIFO": "a FIFO (named pipe)",
    "a folder": "a directory",
    "a device": "a character device",
    "a symlink to a FIFO": "a FIFO (named pipe)",
    "a dangling symlink": "a symlink to a missing file",
}


@pytest.mark.parametrize("kind", NOT_A_CONFIG_FILE)
def test_a_config_path_that_is_not_a_file_is_named_for_what_it_is(kind, data_dir, tmp_path, capsys):
    config_path = tmp_path / "zero2.json"  # a shipped config's name: the one in the folder is meant
    if kind in ("a FIFO", "a symlink to a FIFO"):
        os.mkfifo(tmp_path / "pipe")
    if kind == "a FIFO":
        config_path = tmp_path / "pipe"
    elif kind == "a folder":
        config_path.mkdir()
    else:
        target = {"a device": "/dev/zero", "a symlink to a FIFO": tmp_path / "pipe"}.get(
            kind, tmp_path / "gone"
        )
        config_path.symlink_to(target)
    argv = ["train", "--data_dir", str(data_dir), "--model", "tiny", "--deepspeed_config", str(config_path)]
    assert main(argv) == 2
    said = capsys.readouterr().err.strip()
    assert said.count("\n") == 0 and f"{config_path}: " in said and NOT_A_CONFIG_FILE[kind] in said, said
    assert "not found" not in said


@pytest.mark.parametrize("project", ["team/project", "a:b", "x#1", "100%", "p" * 129])
def test_a_wandb_project_variable_wandb_refuses_stops_before_any_work(project, data_dir, tmp_path, capsys):
    """wandb refused it when the run started: after the folder was claimed and the model loaded."""
    run_dir = tmp_path / "run"
    argv = ["train", "--data_dir", str(data_dir), "--model", "tiny", "--out_dir", str(run_dir),
            "--wandb_mode", "offline", "--max_iters", "1", "--micro_batch_size", "1"]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_PROJECT", project)
        code = main(argv)
    assert code == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.startswith("ds-sft train: error: WANDB_PROJECT must be"), said
    assert not run_dir.exists()  # refused before the folder was claimed or the model loaded


def test_whole_run_writes_every_artifact(data_dir, tmp_path, dist_env):
    from ds_sft.model.checkpoint import load_model

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--data_dir",
            str(data_dir),
            "--model",
            "tiny",
            "--out_dir",
            str(out),
            "--deepspeed_config",
            "ds_configs/zero2.json",
            "--micro_batch_size",
            "2",
            "--grad_accum",
            "2",
            "--max_iters",
            "4",
            "--eval_interval",
            "2",
            "--eval_iters",
            "2",
            "--save_interval",
            "2",
            "--keep_last",
            "1",
            "--wandb_mode",
            "disabled",
            "--learning_rate",
            "3e-3",
            "--precision",  # the checkpoint's module weights are then the final fp32 ones, bit for bit
            "fp32",
        ]
    )
    assert code == 0
    effective = json.loads((out / "effective_config.json").read_text())
    assert effective["gradient_accumulation_steps"] == 2 and effective["ds_sft"]["max_iters"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4] and set(evals[-1]["per_source"]) <= {
        "alpaca",
        "dolly",
        "gsm8k",
    }
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000004"
    kept = sorted(p.name for p in ckpts.iterdir() if p.is_dir())
    assert kept == sorted({"step_000004", (ckpts / "best").read_text()})  # keep_last 1 + the best
    assert (out / "report.md").read_text().count("![") >= 4 and (out / "loss.png").is_file()
    # final weights load back through the model package and match the last checkpoint's weights
    final = load_model(out / "final")
    engine_state = torch.load(ckpts / "step_000004" / "mp_rank_00_model_states.pt", weights_only=False)[
        "module"
    ]
    for name, tensor in final.state_dict().items():
        assert torch.equal(tensor, engine_state[name].float()), name


def test_data_tokenized_for_a_larger_vocabulary_is_refused(tmp_path, capsys, dist_env):
    data = write_data_dir(tmp_path / "data", train_rows=8)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": {"vocab_size": 50257}}))
    argv = ["train", "--data_dir", str(data), "--model", "tiny", "--out_dir", str(tmp_path / "run")]
    assert main([*argv, "--micro_batch_size", "2"]) == 2
    assert (
        "tokenized with a 50,257-token vocabulary but the model has 256 embeddings" in capsys.readouterr().err
    )


def test_chunked_kernels_train_like_the_eager_reference(data_dir, tmp_path, dist_env):
    """``--kernels torch`` (chunked loss, logits never whole) follows ``--kernels eager`` step by step."""

    def losses(kernels: str) -> list[float]:
        out = tmp_path / kernels
        flags = ["--data_dir", str(data_dir), "--model", "tiny", "--out_dir", str(out), "--kernels", kernels]
        flags += ["--micro_batch_size", "2", "--grad_accum", "2", "--max_iters", "30", "--precision", "fp32"]
        flags += ["--eval_interval", "30"]
        flags += ["--eval_iters", "1", "--save_interval", "1000", "--wandb_mode", "disabled"]
        assert main(["train", *flags, "--learning_rate", "3e-3", "--zero_stage", "0"]) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r["type"] == "train"]

    eager, chunked = losses("eager"), losses("torch")
    assert len(eager) == 30 and eager[-1] < eager[0]
    assert chunked == pytest.approx(eager, abs=1e-5)


@pytest.mark.slow  # ~60 s on 2 busy cores: 2 steps of 256 rows
def test_the_seed_train_command_runs_the_recipe_with_no_config_flag(data_dir, tmp_path, dist_env, capsys):
    """The done-when of the recipe: the README's train command, tiny model, CPU, two steps."""
    out = tmp_path / "run"
    argv = SEED_TRAIN.format(data=data_dir).split() + ["--max_iters", "2", "--out_dir", str(out)]
    assert main(argv) == 0
    log = capsys.readouterr().out
    effective = json.loads((out / "effective_config.json").read_text())
    assert effective["train_batch_size"] == 256
    assert (effective["train_micro_batch_size_per_gpu"], effective["gradient_accumulation_steps"]) == (16, 16)
    assert "256 rows per step = 16 micro x 16 accum x 1 rank" in log
    assert effective["gradient_clipping"] == 1.0 and effective["zero_optimization"]["stage"] == 2
    own = effective["ds_sft"]
    assert (own["min_lr"], own["learning_rate"], own["weight_decay"]) == (1e-5, 7e-5, 0.05)
    # the recipe's warmup is 10 steps; a two-step run caps it and says so
    assert own["warmup_iters"] == 2 and "--warmup_iters default 10 capped at --max_iters 2" in log
    assert "ETA " in log.split("step      1/2")[0]  # measured on the second micro-step, before step 1 ends
    table = log.split("parameter groups:\n")[1].split("\n")
    decay = next(row for row in table if row.startswith("decay "))
    no_decay = next(row for row in table if row.startswith("no_decay "))
    assert all(f"{p}.weight" in decay for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"))
    assert " 0.05 " in decay and "wte.weight" in no_decay and "norm" in no_decay and "lm_head" not in decay
    assert "untied lm_head is an output embedding" in log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and train[0]["lr"] == pytest.approx(7e-5 / 2)


@pytest.mark.parametrize("trained", [(), (5,)])
def test_val_rows_without_trained_tokens_are_never_the_val_sample(trained, tmp_path, capsys, dist_env):
    """A val split whose rows are all prompt has no val loss: one line before the first step (it was a
    ValueError traceback at the step-0 eval). With one row of 8 trained, the sample of 2 drew two
    all-prompt rows (0 and 2), the same traceback; rows without trained tokens are never drawn now."""
    data = write_data_dir(tmp_path / "data", train_rows=8, val_trained_rows=trained)
    out = tmp_path / "run"
    argv = ["train", "--data_dir", str(data), "--model", "tiny", "--out_dir", str(out), "--max_iters", "1"]
    argv += ["--micro_batch_size", "2", "--grad_accum", "1", "--eval_iters", "1", "--wandb_mode", "disabled"]
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if not trained:
        assert code == 2 and f"{data}: no val row has a trained token" in captured.err
        assert not (out / "checkpoints").exists()
        return
    assert code == 0 and "val sample: 1 of 8 val rows" in captured.out
    evals = [
        r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"
    ]
    assert len(evals) == 2 and all(r["val_tokens"] > 0 for r in evals)


def test_every_line_printed_under_the_progress_bar_gets_a_line_of_its_own(data_dir, tmp_path):
    """Saves, evals and notes printed while the bar is open start a line of their own on a terminal
    (stdout and stderr interleaved unbuffered, as a terminal shows them); a plain print used to land
    at the end of the bar's line ("train: 50%|...| 1/2 [...]saved checkpoint ...")."""
    env = {**without_launcher_variables(), "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    argv = ["--data_dir", str(data_dir), "--model", "tiny", "--max_iters", "3", "--micro_batch_size", "2",
            "--grad_accum", "1", "--eval_interval", "1", "--eval_iters", "1", "--save_interval", "1",
            "--log_interval", "1", "--wandb_mode", "disabled", "--out_dir", str(tmp_path / "r")]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "ds_sft.train", *argv],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    segments = re.split(r"[\r\n]", done.stdout)
    said = [seg for seg in segments if re.search(r"saved checkpoint|eval step \d|step +\d+/3 \|", seg)]
    assert len(said) >= 9, done.stdout[-3000:]  # 3 saves, 4 evals, 3 step lines
    for segment in said:
        assert re.match(r"(saved checkpoint|eval step \d|step +\d+/3 \|)", segment), segment


@pytest.mark.parametrize("where", ["GPU", "CPU"])
def test_a_step_that_runs_out_of_memory_ends_in_one_line(
    where, data_dir, tmp_path, dist_env, monkeypatch, capsys
):
    """The second micro-batch's forward runs out of memory (on the GPU: torch's OutOfMemoryError; on
    the CPU: its allocator refuses for real): `ds-sft train` ends in one line naming the flags that
    need less, exit 2, no traceback."""
    from ds_sft.model.llama import LlamaModel

    forward, calls = LlamaModel.forward, []

    def running_out(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if where == "GPU":
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 3.07 GiB. GPU 0 has a total capacity of 79.10 GiB "
                    "of which 1.25 GiB is free. Of the allocated memory 75.00 GiB is allocated by PyTorch"
                )
            torch.empty(2**60, dtype=torch.uint8)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward", running_out)
    argv = ["train", "--data_dir", str(data_dir), "--model", "tiny", "--out_dir", str(tmp_path / "run")]
    assert main([*argv, "--micro_batch_size", "2", "--grad_accum", "2", "--max_iters", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"ds-sft train: error: out of memory on the {where} (asked for ")
    assert last.endswith("--resume continues from the last checkpoint") and "--micro_batch_size" in last
