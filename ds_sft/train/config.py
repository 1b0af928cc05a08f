"""One effective configuration from three layers: built-in defaults <- DeepSpeed JSON <- CLI flags.

A DeepSpeed JSON describes the engine (ZeRO stage, micro-batch, accumulation, clipping, optimizer,
bf16). ds-sft adds two sections of its own that DeepSpeed never sees:

* ``"ds_sft"``: any ``ds-sft train`` flag by its name (``"warmup_iters": 10, "min_lr": 1e-5``), so a
  recipe is one file and ``RUN/effective_config.json`` can be passed back as ``--deepspeed_config``;
* ``"fp8"``: the recipe handed to :func:`ds_sft.model.fp8.apply_fp8`.

Several flags are DeepSpeed keys under another name (``--grad_accum`` is
``gradient_accumulation_steps``); :data:`FLAG_TO_DS_KEY` is that table. A flag given on the command
line wins and the override is printed. Everything is checked here, before a model or a shard is
loaded, and every problem is one :class:`UserError` line that says how to fix it.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

from ds_sft.errors import UserError
from ds_sft.paths import REPO_ROOT

# Used when neither the JSON nor the command line sets a value. The optimizer numbers are the seed
# recipe's (AdamW 7e-5, betas 0.9/0.95, wd 0.05, clip 1.0, warmup 10, cosine to 1e-5).
DEFAULTS: dict = {
    "data_dir": None,
    "base_model": None,
    "model": None,
    "out_dir": "runs/train",
    "fp8": "off",
    "kernels": "auto",
    "compile": False,
    "activation_checkpointing": False,
    "zero_stage": 2,
    "precision": "fp32",
    "micro_batch_size": 4,
    "grad_accum": 1,
    "learning_rate": 7e-5,
    "min_lr": 1e-5,
    "warmup_iters": 10,
    "max_iters": 100,
    "weight_decay": 0.05,
    "grad_clip": 1.0,
    "seed": 1337,
    "dist_timeout": 600,
    "eval_interval": 10,
    "eval_iters": 8,
    "log_interval": 1,
    "save_interval": 50,
    "keep_last": 2,
    "resume": None,
    "wandb_project": None,
    "wandb_mode": None,
    "alarm_rising_evals": 3,
    "alarm_gap": 0.5,
    "max_nan_steps": 5,
}

# flag -> its place in the DeepSpeed JSON.
FLAG_TO_DS_KEY: dict[str, tuple[str, ...]] = {
    "micro_batch_size": ("train_micro_batch_size_per_gpu",),
    "grad_accum": ("gradient_accumulation_steps",),
    "grad_clip": ("gradient_clipping",),
    "learning_rate": ("optimizer", "params", "lr"),
    "weight_decay": ("optimizer", "params", "weight_decay"),
    "zero_stage": ("zero_optimization", "stage"),
    "precision": ("bf16", "enabled"),  # "bf16" <-> true
}

OWN_SECTIONS = ("ds_sft", "fp8")
SECTIONS = ("optimizer", "zero_optimization", "bf16", "fp16", *OWN_SECTIONS)  # must be JSON objects

# DeepSpeed's top-level keys (deepspeed/runtime/constants.py and the config docs) that a run may set.
KNOWN_DS_KEYS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "fp16",
    "bf16",
    "amp",
    "torch_autocast",
    "gradient_clipping",
    "prescale_gradients",
    "gradient_predivide_factor",
    "sparse_gradients",
    "zero_optimization",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "steps_per_print",
    "wall_clock_breakdown",
    "dump_state",
    "memory_breakdown",
    "flops_profiler",
    "activation_checkpointing",
    "aio",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "comms_logger",
    "elasticity",
    "data_efficiency",
    "curriculum_learning",
    "communication_data_type",
    "seq_parallel_communication_data_type",
    "checkpoint",
    "data_types",
    "compression_training",
    "autotuning",
    "pipeline",
    "compile",
    "timers",
    "nebula",
    "disable_allgather",
    "dataloader_drop_last",
    "eigenvalue",
    "progressive_layer_drop",
    "sparse_attention",
    "hybrid_engine",
    "use_data_before_expert_parallelism",
    "graph_harvesting",
    "gradient_allreduce_op",
    "disable_python_gc",
}
KNOWN_OPTIMIZER_KEYS = {"type", "params"}
SUPPORTED_OPTIMIZERS = {"adamw", "adam"}


def did_you_mean(key: str, known) -> str:
    match = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_keys(where: str, keys, known) -> None:
    """Reject the first key of ``keys`` not in ``known`` (``_comment``-style keys are always fine)."""
    for key in keys:
        if not key.startswith("_") and key not in known:
            raise UserError(f"unknown key {key!r} in {where}{did_you_mean(key, known)}")


def zero_keys() -> set[str]:
    """Every key DeepSpeed's ZeRO config accepts, aliases included (read from its pydantic model)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    return set(fields) | {f.alias for f in fields.values() if f.alias}


def resolve_config_path(spec: str) -> Path:
    """A config path as given, or relative to the project root (so the default works from anywhere)."""
    for candidate in (Path(spec).expanduser(), REPO_ROOT / spec):
        if candidate.is_file():
            return candidate
    raise UserError(f"DeepSpeed config {spec!r} not found: pass an existing JSON file (see ds_configs/)")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 ({err.reason} at byte {err.start}): save it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object at the top level")
    return data


def get_path(tree: dict, keys: tuple[str, ...]):
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def set_path(tree: dict, keys: tuple[str, ...], value) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def ds_value_to_flag(flag: str, value):
    return ("bf16" if value else "fp32") if flag == "precision" else value


def flag_value_to_ds(flag: str, value):
    return (value == "bf16") if flag == "precision" else value


def layer(args, ds_json: dict) -> tuple[dict, dict, list[str]]:
    """Merge defaults <- JSON <- CLI. Returns (DeepSpeed dict, ds-sft settings, override lines)."""
    ds_config = copy.deepcopy({k: v for k, v in ds_json.items() if k not in OWN_SECTIONS})
    own = ds_json.get("ds_sft", {})
    if not isinstance(own, dict):
        raise UserError('the "ds_sft" section of the DeepSpeed config must be a JSON object of flag: value')
    check_keys('the "ds_sft" section', own, set(DEFAULTS))
    settings, overrides = {}, []
    for flag, default in DEFAULTS.items():
        from_cli = getattr(args, flag, None)
        if flag in FLAG_TO_DS_KEY:
            from_json = get_path(ds_config, FLAG_TO_DS_KEY[flag])
            from_json = None if from_json is None else ds_value_to_flag(flag, from_json)
            where = ".".join(FLAG_TO_DS_KEY[flag])
        else:
            from_json = own.get(flag)
            where = f"ds_sft.{flag}"
        value = default
        if from_json is not None:
            value = from_json
        if from_cli is not None:
            if from_json is not None and from_cli != from_json:
                overrides.append(f"override {where}: {from_json} -> {from_cli} (--{flag})")
            value = from_cli
        settings[flag] = value
        if flag in FLAG_TO_DS_KEY:
            set_path(ds_config, FLAG_TO_DS_KEY[flag], flag_value_to_ds(flag, value))
    warmup_given = args.warmup_iters is not None or "warmup_iters" in own
    if not warmup_given and settings["warmup_iters"] > settings["max_iters"]:
        # a short run (--max_iters 4) should not fail on a default it never asked for
        settings["warmup_iters"] = settings["max_iters"]
        overrides.append(
            f"note: --warmup_iters default {DEFAULTS['warmup_iters']} capped at --max_iters "
            f"{settings['max_iters']}"
        )
    return ds_config, settings, overrides


def check_sections(ds_json: dict) -> None:
    """The sections ds-sft and DeepSpeed read into must be JSON objects (checked before layering)."""
    sections = {key: ds_json[key] for key in SECTIONS if key in ds_json}
    if isinstance(ds_json.get("optimizer"), dict) and "params" in ds_json["optimizer"]:
        sections["optimizer.params"] = ds_json["optimizer"]["params"]
    for where, section in sections.items():
        if not isinstance(section, dict):
            shown = json.dumps(section)
            raise UserError(f'"{where}" in the DeepSpeed config must be a JSON object, not {shown}')
    for key in ("bf16", "fp16"):
        enabled = get_path(ds_json, (key, "enabled"))
        if enabled is not None and not isinstance(enabled, bool):
            raise UserError(f'"{key}.enabled" in the DeepSpeed config must be true or false, got {enabled!r}')


def check_types(s: dict) -> None:
    """Every setting has its default's type, whichever layer gave it: JSON writes ``"4"`` or ``true``
    where an int belongs, and NaN or infinity where a number does; none of them may reach the run."""
    for flag, default in DEFAULTS.items():
        value = s[flag]
        if value is None and default is None:
            continue
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            kind = "a finite number"
        else:
            ok, kind = isinstance(value, str) and value.strip() != "", "a non-empty string"
        if not ok:
            where = ".".join(FLAG_TO_DS_KEY.get(flag, ("ds_sft", flag)))
            raise UserError(f"--{flag} ({where} in the DeepSpeed config) must be {kind}, got {value!r}")
    for flag in ("weight_decay", "grad_clip", "alarm_gap", "seed"):
        if s[flag] < 0:
            raise UserError(f"--{flag} must be >= 0, got {s[flag]}")


def check_optimizer_params(params: dict) -> None:
    """AdamW's own arguments only (DeepSpeed passes them on to the optimizer after building the model)."""
    import inspect

    import torch

    known = set(inspect.signature(torch.optim.AdamW).parameters) - {"params"}
    check_keys('"optimizer.params"', params, known | {"torch_adam", "adam_w_mode", "bias_correction"})
    betas = params.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, int | float) for b in betas)
            and all(0 <= b < 1 for b in betas)):  # fmt: skip
        raise UserError(f'"optimizer.params.betas" must be two numbers in [0, 1), got {json.dumps(betas)}')


def validate(ds_config: dict, s: dict, world_size: int) -> None:
    """Every contradiction a run could trip over later, caught before anything heavy is loaded."""
    check_keys("the DeepSpeed config", ds_config, KNOWN_DS_KEYS)
    check_keys('"zero_optimization"', ds_config.get("zero_optimization", {}), zero_keys())
    check_keys('"optimizer"', ds_config.get("optimizer", {}), KNOWN_OPTIMIZER_KEYS)
    check_optimizer_params(ds_config.get("optimizer", {}).get("params", {}))
    check_types(s)
    if "scheduler" in ds_config:
        raise UserError(
            'remove "scheduler" from the DeepSpeed config: ds-sft owns the lr schedule '
            "(--learning_rate, --warmup_iters, --min_lr, --max_iters)"
        )
    optimizer_type = str(ds_config.get("optimizer", {}).get("type", "")).lower()
    if optimizer_type not in SUPPORTED_OPTIMIZERS:
        raise UserError(
            f'optimizer type {optimizer_type!r} is not supported: use "AdamW" (the parameter '
            "groups and schedule are built for it)"
        )
    if ds_config.get("fp16", {}).get("enabled") and ds_config.get("bf16", {}).get("enabled"):
        raise UserError('both "fp16" and "bf16" are enabled in the DeepSpeed config: enable one')
    if s["zero_stage"] not in (0, 1, 2, 3):
        raise UserError(f"ZeRO stage must be 0, 1, 2 or 3, got {s['zero_stage']}")
    if s["precision"] not in ("fp32", "bf16"):
        raise UserError(f"--precision must be fp32 or bf16, got {s['precision']!r}")
    for flag in (
        "micro_batch_size",
        "grad_accum",
        "max_iters",
        "eval_interval",
        "eval_iters",
        "log_interval",
        "save_interval",
        "keep_last",
        "max_nan_steps",
        "alarm_rising_evals",
        "dist_timeout",
    ):
        if not isinstance(s[flag], int) or s[flag] < 1:
            raise UserError(f"--{flag} must be a positive integer, got {s[flag]!r}")
    if not 0 <= s["warmup_iters"] <= s["max_iters"]:
        raise UserError(
            f"--warmup_iters ({s['warmup_iters']}) must be between 0 and --max_iters ({s['max_iters']})"
        )
    if not 0 <= s["min_lr"] <= s["learning_rate"]:
        raise UserError(
            f"--min_lr ({s['min_lr']}) must be between 0 and --learning_rate ({s['learning_rate']})"
        )
    expected = s["micro_batch_size"] * s["grad_accum"] * world_size
    declared = ds_config.get("train_batch_size")
    if declared is not None and declared != expected:
        raise UserError(
            f"train_batch_size {declared} != micro_batch_size {s['micro_batch_size']} x grad_accum "
            f"{s['grad_accum']} x world size {world_size} = {expected}: drop train_batch_size from the "
            "DeepSpeed config or make the three agree"
        )
    ds_config["train_batch_size"] = expected
    if s["fp8"] not in ("off", "emulated", "te"):
        raise UserError(f"--fp8 must be off, emulated or te, got {s['fp8']!r}")
    if s["kernels"] not in ("auto", "triton", "torch", "eager"):
        raise UserError(f"--kernels must be auto, triton, torch or eager, got {s['kernels']!r}")
    if s["wandb_mode"] not in (None, "offline", "online", "disabled"):
        raise UserError(f"--wandb_mode must be offline, online or disabled, got {s['wandb_mode']!r}")
    if (s["base_model"] is None) == (s["model"] is None):
        raise UserError("pass exactly one of --base_model (load weights) or --model PRESET (random init)")
    if s["data_dir"] is None:
        raise UserError("--data_dir is required: a directory written by `ds-sft prepare`")
    if not (Path(s["data_dir"]) / "manifest.json").is_file():
        raise UserError(f"--data_dir {s['data_dir']} has no manifest.json: run `ds-sft prepare` to make one")
    if s["base_model"] is not None:
        from ds_sft.paths import resolve_model_path

        resolve_model_path(s["base_model"])
    if s["model"] is not None:
        from ds_sft.model.config import ModelConfig

        try:
            ModelConfig.preset(s["model"])
        except (KeyError, ValueError) as err:
            raise UserError(f"--model {s['model']!r} is not a preset: {err}") from None
    if s["resume"] not in (None, "auto") and not Path(s["resume"]).exists():
        raise UserError(
            f"--resume {s['resume']} does not exist: pass a checkpoint directory, or --resume alone "
            "to continue from OUT_DIR/checkpoints/latest"
        )


def resolve(args) -> tuple[dict, SimpleNamespace, list[str]]:
    """Read, layer and validate. Returns (DeepSpeed config, settings, override lines)."""
    path = resolve_config_path(args.deepspeed_config or "ds_configs/zero2.json")
    ds_json = read_json(path)
    check_sections(ds_json)
    # A config without an optimizer gets the recipe's AdamW: torch's fused one, because DeepSpeed's
    # FusedAdam JIT-compiles for half a minute, and torch's default per-tensor loop is ~9x slower on CPU.
    ds_json.setdefault(
        "optimizer", {"type": "AdamW", "params": {"betas": [0.9, 0.95], "torch_adam": True, "fused": True}}
    )
    ds_config, settings, overrides = layer(args, ds_json)
    validate(ds_config, settings, int(os.environ.get("WORLD_SIZE", "1")))
    settings["deepspeed_config"] = str(path)
    settings["fp8_recipe"] = ds_json.get("fp8", {})
    if settings["fp8_recipe"]:
        from ds_sft.model.fp8 import Fp8Recipe

        Fp8Recipe.from_dict(settings["fp8_recipe"])  # its own one-line errors for unknown keys
    # ds-sft prints its own progress; DeepSpeed's every-10-steps line would interleave with the bar.
    ds_config.setdefault("steps_per_print", 2**31 - 1)
    return ds_config, SimpleNamespace(**settings), overrides


def effective_config(ds_config: dict, settings: SimpleNamespace) -> dict:
    """What ``RUN/effective_config.json`` holds: the engine config plus ds-sft's own sections."""
    own = {k: v for k, v in vars(settings).items() if k in DEFAULTS}
    return {**ds_config, "ds_sft": own, "fp8": settings.fp8_recipe}
