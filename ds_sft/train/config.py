"""One effective configuration from three layers: built-in defaults <- DeepSpeed JSON <- CLI flags.

A DeepSpeed JSON describes the engine (ZeRO stage, micro-batch, accumulation, clipping, optimizer,
bf16). ds-sft adds two sections of its own that DeepSpeed never sees:

* ``"ds_sft"``: any ``ds-sft train`` flag by its name (``"warmup_iters": 10, "min_lr": 1e-5``), so a
  recipe is one file and ``RUN/effective_config.json`` can be passed back as ``--deepspeed_config``;
* ``"fp8"``: the recipe handed to :func:`ds_sft.model.fp8.apply_fp8`.

Several flags are DeepSpeed keys under another name (``--grad_accum`` is
``gradient_accumulation_steps``; the tables are in :mod:`ds_sft.train.config_keys`). A flag given on
the command line wins and the override is printed. Everything is checked before a model or a shard is
loaded (:mod:`ds_sft.train.config_checks`), and every problem is one :class:`UserError` line that says
how to fix it: each setting has a declared domain, and the same domain object checks the flag (as
argparse's ``type=``) and the JSON value (:mod:`ds_sft.options`).

With no ``--deepspeed_config`` the run is the seed recipe (``ds_configs/sft_recipe.json``), and a run
is always ``rows per step = micro x accumulation x ranks``, all ranks together: an accumulation
nobody set is derived from the rows per step (:func:`rows_per_step`), so 256 stays 256 on any number
of ranks.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

from ds_sft.errors import UserError
from ds_sft.locations import expand_user
from ds_sft.machine import hardware_bf16
from ds_sft.safe_read import read_json_object, require_regular_file
from ds_sft.train.config_checks import (
    check_domain,
    check_inputs,
    check_keys,
    check_numbers,
    check_sections,
    get_path,
    set_path,
    validate,
)
from ds_sft.train.config_keys import (
    COMMAND_LINE_FLAGS,
    DEFAULT_CONFIG,
    DEFAULTS,
    DOMAINS,
    FLAG_TO_DS_KEY,
    OWN_SECTIONS,
    RECIPE_ADAM_PARAMS,
    ROWS_PER_STEP,
)
from ds_sft.train.distributed import launch_environment


def resolve_config_path(spec: str) -> Path:
    """A config path as given, else a config shipped in ``ds_configs`` (``zero2.json``,
    ``ds_configs/zero2.json``): package data, so the default works from any folder, installed or not."""
    from importlib.resources import files

    path = expand_user(spec)
    if path.is_file():
        return path
    shipped = files("ds_configs") / Path(spec).name
    if Path(spec).parent in (Path("."), Path("ds_configs")) and shipped.is_file():
        return Path(str(shipped))
    if path.is_symlink() or path.exists():  # there, but no file: say what it is (a FIFO, a folder...)
        require_regular_file(path, "DeepSpeed config")
    raise UserError(f"DeepSpeed config {spec!r} not found: pass an existing JSON file (see ds_configs/)")


def ds_value_to_flag(flag: str, value):
    if flag == "precision" and isinstance(value, bool):
        return "bf16" if value else "fp32"
    return value


def flag_value_to_ds(flag: str, value):
    return (value == "bf16") if flag == "precision" else value


def layer(args, ds_json: dict, source: str) -> tuple[dict, dict, list[str]]:
    """Merge defaults <- JSON <- CLI. Returns (DeepSpeed dict, ds-sft settings, lines to print)."""
    ds_config = copy.deepcopy({k: v for k, v in ds_json.items() if k not in OWN_SECTIONS})
    own = ds_json.get("ds_sft", {})
    if not isinstance(own, dict):
        raise UserError('the "ds_sft" section of the DeepSpeed config must be a JSON object of flag: value')
    check_keys('the "ds_sft" section', own, set(DEFAULTS))
    for flag in COMMAND_LINE_FLAGS:
        if own.get(flag) is not None:  # null is unset, as for every setting
            raise UserError(
                f'remove "ds_sft.{flag}" from {source} and pass --{flag} on the command line: a shared '
                "config does not choose what a run reads, where it writes or where its metrics go"
            )
    settings, notes = {}, []
    if "run" in ds_json:
        notes.append(f'note: the "run" section of {source} is a record of another run; not applied')
    for flag, default in DEFAULTS.items():
        from_cli = getattr(args, flag, None)
        if flag in FLAG_TO_DS_KEY:  # a DeepSpeed key; "ds_sft" may repeat it (effective_config.json does)
            from_json = get_path(ds_config, FLAG_TO_DS_KEY[flag])
            from_json = None if from_json is None else ds_value_to_flag(flag, from_json)
            where = ".".join(FLAG_TO_DS_KEY[flag])
            repeated = own.get(flag)
            if repeated is not None:
                check_domain(flag, repeated, DOMAINS[flag], source)
                if from_json is not None and repeated != from_json:
                    raise UserError(
                        f'"ds_sft.{flag}" ({repeated!r}) contradicts "{where}" ({from_json!r}) in {source}: '
                        "keep one"
                    )
                from_json = repeated
        else:
            from_json = own.get(flag)
            where = f"ds_sft.{flag}"
        value = default
        if from_json is not None:
            value = check_domain(flag, from_json, DOMAINS[flag], source)
        if from_cli is not None:  # argparse checked it against the same domain
            if from_json is not None and from_cli != from_json:
                notes.append(f"override {where}: {from_json} -> {from_cli} (--{flag})")
            value = from_cli
        if flag == "precision" and value == "auto":
            bf16, why = hardware_bf16()
            value = "bf16" if bf16 else "fp32"
            notes.append(f"precision auto -> {value} ({why})")
        settings[flag] = value
        if flag in FLAG_TO_DS_KEY and value is not None:
            set_path(ds_config, FLAG_TO_DS_KEY[flag], flag_value_to_ds(flag, value))
    warmup_given = args.warmup_iters is not None or own.get("warmup_iters") is not None  # null: not set
    if not warmup_given and settings["warmup_iters"] > settings["max_iters"]:
        # a short run (--max_iters 4) should not fail on a default it never asked for
        settings["warmup_iters"] = settings["max_iters"]
        notes.append(
            f"note: --warmup_iters default {DEFAULTS['warmup_iters']} capped at --max_iters "
            f"{settings['max_iters']}"
        )
    return ds_config, settings, notes


def _whole_part(rows: int, parts: int, refusal: str) -> int:
    """``rows // parts``: the factor of rows = micro x accum x ranks that was not given; refused with
    ``refusal`` (one line) unless ``parts`` divides ``rows``, at least once."""
    part, rest = divmod(rows, parts)
    if rest or part == 0:
        raise UserError(refusal)
    return part


def rows_per_step(ds_config: dict, s: dict, world: int, given: dict[str, str]) -> list[str]:
    """Settle micro x accumulation x ranks = rows per optimizer step (all ranks together) by DeepSpeed's
    rule, write it into ``ds_config`` and ``s`` and return the lines to print at start.

    ``given``: each of ``train_batch_size``, ``micro_batch_size``, ``grad_accum`` the user set, -> "json"
    or "flag". DeepSpeed's rule (``DeepSpeedConfig._set_batch_related_parameters``): any two determine the
    third, all three must agree, train_batch_size alone means accumulation 1. A flag replaces its key, and
    where the three are then over-determined the JSON's train_batch_size stays: --micro_batch_size alone
    makes the accumulation follow; --grad_accum sets rows = micro x accum x ranks. ds-sft's recipe fills
    what DeepSpeed would refuse or derive otherwise: with no train_batch_size and no accumulation, rows
    are the recipe's 256 (so they stay 256 on any number of ranks), and the micro-batch is 16 unless set."""
    rows = ds_config.get("train_batch_size") if "train_batch_size" in given else None
    micro = s["micro_batch_size"] if "micro_batch_size" in given else None
    accum = s["grad_accum"] if "grad_accum" in given else None
    if None not in (rows, micro, accum) and "flag" in given.values():  # over-determined by a flag
        if given["grad_accum"] == "flag":
            rows = None  # the accumulation asked for is kept: rows follow
        else:
            accum = None  # --micro_batch_size alone: the JSON's rows stay
    if rows is None and accum is None:  # the recipe's rows: DeepSpeed would take accumulation 1
        rows, micro = ROWS_PER_STEP, micro or DEFAULTS["micro_batch_size"]
    elif micro is None and accum is None:  # train_batch_size alone: DeepSpeed's accumulation 1
        accum = 1
    elif rows is None and micro is None:  # accumulation alone, which DeepSpeed refuses
        micro = DEFAULTS["micro_batch_size"]
    if rows is None:
        rows = micro * accum * world
    elif micro is None:
        micro = _whole_part(
            rows,
            accum * world,
            f"train_batch_size {rows} does not divide into {accum} accumulation step(s) on {world} "
            "rank(s): pass --micro_batch_size N, or a train_batch_size that is micro x accum x ranks",
        )
    elif accum is None:
        accum = _whole_part(
            rows,
            micro * world,
            f"{rows} rows per step do not divide into micro-batches of {micro} on {world} rank(s): "
            "pass --grad_accum N (rows per step = micro x accum x ranks) or a --micro_batch_size "
            f"that divides {rows // world if rows % world == 0 else rows}",
        )
    elif rows != micro * accum * world:
        raise UserError(
            f"train_batch_size {rows} != micro_batch_size {micro} x grad_accum {accum} x world size {world} "
            f"= {micro * accum * world}: drop one of the three from the DeepSpeed config or make them agree"
        )
    lines = []
    for key, flag, value in (
        ("train_batch_size", None, rows),
        ("train_micro_batch_size_per_gpu", "micro_batch_size", micro),
        ("gradient_accumulation_steps", "grad_accum", accum),
    ):
        before = ds_config.get(key) if given.get(flag or key) == "json" else None
        if before is not None and before != value:  # a flag's own override is printed by layer()
            lines.append(f"override {key}: {before} -> {value} (micro x accum x ranks)")
        ds_config[key] = value
    s["micro_batch_size"], s["grad_accum"] = micro, accum
    ranks = "rank" if world == 1 else "ranks"
    return [*lines, f"{rows} rows per step = {micro} micro x {accum} accum x {world} {ranks}"]


def batch_keys_given(args, ds_json: dict) -> dict[str, str]:
    """Which batch keys the user set (:func:`rows_per_step`): -> "flag", else "json" (the DeepSpeed key,
    or the flag's name in "ds_sft" as effective_config.json repeats it); null is unset."""
    given = {"train_batch_size": "json"} if ds_json.get("train_batch_size") is not None else {}
    for flag in ("micro_batch_size", "grad_accum"):
        if getattr(args, flag) is not None:
            given[flag] = "flag"
        elif (
            get_path(ds_json, FLAG_TO_DS_KEY[flag]) is not None
            or get_path(ds_json, ("ds_sft", flag)) is not None
        ):
            given[flag] = "json"
    return given


def resolve(args) -> tuple[dict, SimpleNamespace, list[str]]:
    """Read, layer and validate. Returns (DeepSpeed config, settings, lines to print at start)."""
    path = resolve_config_path(args.deepspeed_config or DEFAULT_CONFIG)
    source = f"the DeepSpeed config {path.name}"
    ds_json = read_json_object(path, "DeepSpeed config")
    check_sections(ds_json)
    # A config without an optimizer gets the recipe's AdamW: torch's fused one, because DeepSpeed's
    # FusedAdam JIT-compiles for half a minute, and torch's default per-tensor loop is ~9x slower on CPU.
    # A config of its own that does not say which AdamW gets torch's too: without torch_adam, DeepSpeed
    # JIT-compiles FusedAdam (6 minutes on CPU; on a GPU without nvcc, not at all), or with the optimizer
    # offloaded its CPUAdam (2.7 minutes on 2 busy cores, 2026-12), whose groups lack the settings a
    # resume puts back (compatibility.OPTIMIZER_KEYS: decoupled_weight_decay, fused).
    given = isinstance(ds_json.get("optimizer"), dict)
    ds_json.setdefault("optimizer", {"type": "AdamW"})
    chose_torch_adam, filled = False, {}
    if isinstance(ds_json["optimizer"], dict):
        params = ds_json["optimizer"].setdefault("params", {})
        if isinstance(params, dict) and "torch_adam" not in params:
            params.update(torch_adam=True, fused=params.get("fused", True))
            chose_torch_adam = True
        if isinstance(params, dict):
            filled = {key: value for key, value in RECIPE_ADAM_PARAMS.items() if params.get(key) is None}
            params.update(filled)
    ds_config, settings, notes = layer(args, ds_json, source)
    notes.insert(0, f"DeepSpeed config: {path}")
    if given and filled:
        import inspect

        import torch

        torch_defaults = inspect.signature(torch.optim.AdamW).parameters
        ours, torchs = (
            ", ".join(f"{key} {json.dumps(value)}" for key, value in values.items())
            for values in (filled, {key: torch_defaults[key].default for key in filled})
        )
        notes.append(
            f'note: "optimizer.params" of {source} sets no {" or ".join(filled)}: the recipe\'s {ours} '
            f"apply (torch's AdamW defaults: {torchs}); set them there to choose"
        )
    offloaded = get_path(ds_config, ("zero_optimization", "offload_optimizer", "device")) == "cpu"
    if chose_torch_adam and offloaded:
        notes.append(
            "note: offload_optimizer steps torch's fused AdamW on the CPU, not DeepSpeed's CPUAdam "
            '(set "optimizer.params.torch_adam": false for CPUAdam, JIT-built for minutes on first use)'
        )
    validate(ds_config, settings, source)
    world = launch_environment()[1]
    notes.extend(rows_per_step(ds_config, settings, world, batch_keys_given(args, ds_json)))
    check_inputs(settings)
    settings["deepspeed_config"] = str(path)
    settings["fp8_recipe"] = ds_json.get("fp8", {})
    if settings["fp8"] == "auto" and isinstance(settings["fp8_recipe"], dict):
        # auto leaves the choice to ds-sft, projection by projection too: fp8 only where the roofline
        # says it pays. With every projection (select all), --fp8 auto trained the 112m preset on an H200
        # at a third of bf16's tokens/s (torch._scaled_mm's casts: 1.9 ms per layer). A JSON that says
        # "select" keeps it; --fp8 torch / te asked for fp8 and get every projection unless it says auto.
        settings["fp8_recipe"] = {"select": "auto", **settings["fp8_recipe"]}
    if settings["fp8_recipe"]:
        from ds_sft.model.fp8 import Fp8Recipe

        check_numbers(settings["fp8_recipe"], source, ("fp8",))
        Fp8Recipe.from_dict(settings["fp8_recipe"])  # its own one-line errors for unknown keys
    if settings["fp8"] == "off" and settings["fp8_recipe"]:
        # nothing runs in fp8, so effective_config.json records no recipe: what ran, not what was switched off
        via = "--fp8 off" if args.fp8 is not None else '"ds_sft.fp8": "off"'
        notes.append(f"override fp8: {json.dumps(settings['fp8_recipe'])} -> off ({via})")
        settings["fp8_recipe"] = {}
    # ds-sft prints its own progress; DeepSpeed's every-10-steps line would interleave with the bar.
    ds_config.setdefault("steps_per_print", 2**31 - 1)
    return ds_config, SimpleNamespace(**settings), notes


def effective_config(ds_config: dict, settings: SimpleNamespace) -> dict:
    """What ``RUN/effective_config.json`` holds: the engine config plus ds-sft's own sections; the
    command-line-only flags go to "run", a record that passing the file back does not apply
    (:data:`COMMAND_LINE_FLAGS`)."""
    own = {k: v for k, v in vars(settings).items() if k in DEFAULTS and k not in COMMAND_LINE_FLAGS}
    run = {k: getattr(settings, k) for k in COMMAND_LINE_FLAGS}
    return {**ds_config, "ds_sft": own, "fp8": settings.fp8_recipe, "run": run}
