"""One effective configuration from three layers: built-in defaults <- DeepSpeed JSON <- CLI flags.

A DeepSpeed JSON describes the engine (ZeRO stage, micro-batch, accumulation, clipping, optimizer,
bf16). ds-sft adds two sections of its own that DeepSpeed never sees:

* ``"ds_sft"``: any ``ds-sft train`` flag by its name (``"warmup_iters": 10, "min_lr": 1e-5``), so a
  recipe is one file and ``RUN/effective_config.json`` can be passed back as ``--deepspeed_config``;
* ``"fp8"``: the recipe handed to :func:`ds_sft.model.fp8.apply_fp8`.

Several flags are DeepSpeed keys under another name (``--grad_accum`` is
``gradient_accumulation_steps``); :data:`FLAG_TO_DS_KEY` is that table. A flag given on the command
line wins and the override is printed. Everything is checked here, before a model or a shard is
loaded, and every problem is one :class:`UserError` line that says how to fix it: each setting has
a declared domain (:data:`OPTIONS`, :data:`DS_DOMAINS`, DeepSpeed's own ZeRO bounds), and the same
domain object checks the flag (as argparse's ``type=``) and the JSON value (:mod:`ds_sft.options`).

With no ``--deepspeed_config`` the run is the seed recipe (``ds_configs/sft_recipe.json``), and a run
is always ``rows per step = micro x accumulation x ranks``, all ranks together: an accumulation
nobody set is derived from the rows per step (:func:`rows_per_step`), so 256 stays 256 on any number
of ranks.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from types import SimpleNamespace

from ds_sft.errors import UserError, first_line
from ds_sft.model.config import KERNEL_BACKENDS
from ds_sft.options import (
    INT32_MAX,
    INT64_MAX,
    SEED,
    Bool,
    Choice,
    Float,
    Int,
    Names,
    OutOfDomain,
    Pair,
    Text,
)
from ds_sft.paths import expand_user, read_json_object
from ds_sft.train.compatibility import IDENTITY_KEYS
from ds_sft.train.distributed import launch_environment
from ds_sft.train.metrics import WANDB_MODES, resolve_wandb_mode

# Every `ds-sft train` setting: (built-in default, domain). The defaults are the seed recipe: AdamW 7e-5
# betas 0.9/0.95, wd 0.05 on linear weights, clip 1.0, warmup 10, cosine to 1e-5, micro-batch 16 and
# ROWS_PER_STEP rows per optimizer step, ZeRO-2, bf16 where the hardware has it, fp8 where it pays.
# The domain checks a flag (as argparse's type=) and a JSON value alike (see ds_sft/options.py).
OPTIONS: dict[str, tuple] = {
    "data_dir": (None, Text()),
    "base_model": (None, Text()),
    "model": (None, Text()),
    "out_dir": ("runs/train", Text()),
    "fp8": ("auto", Choice("off", "auto", "torch", "te")),
    "kernels": ("auto", Choice(*KERNEL_BACKENDS)),
    "compile": (False, Bool()),
    "activation_checkpointing": (False, Bool()),
    "zero_stage": (2, Int(0, 3)),
    "precision": ("auto", Choice("auto", "bf16", "fp32")),
    "micro_batch_size": (16, Int(1, 2**16)),
    "grad_accum": (None, Int(1, 2**16)),  # None: ROWS_PER_STEP / (micro x ranks)
    "learning_rate": (7e-5, Float(0, 10, min_open=True)),
    "min_lr": (1e-5, Float(0, 10)),
    "warmup_iters": (10, Int(0, INT32_MAX)),
    "max_iters": (100, Int(1, INT32_MAX)),
    "weight_decay": (0.05, Float(0, 10)),
    "grad_clip": (1.0, Float(0, 1e6)),
    "seed": (1337, SEED),
    "dist_timeout": (600, Int(1, 7 * 24 * 3600)),  # a week; timedelta(seconds=1e20) overflows
    "eval_interval": (10, Int(1, INT32_MAX)),
    "eval_iters": (8, Int(1, INT32_MAX)),
    "log_interval": (1, Int(1, INT32_MAX)),
    "save_interval": (50, Int(1, INT32_MAX)),
    "keep_last": (2, Int(1, 10**6)),
    "resume": (None, Text()),
    "allow_change": (None, Names(*IDENTITY_KEYS)),  # run identity keys a resume may change
    "wandb_project": (None, Text(forbidden="/\\#?%:", max_length=128)),  # wandb's rule for project names
    "wandb_mode": (None, Choice(*WANDB_MODES)),
    "alarm_rising_evals": (3, Int(1, INT32_MAX)),
    "alarm_gap": (0.5, Float(0, 1e6)),
    "max_nan_steps": (5, Int(1, INT32_MAX)),
}
DEFAULTS: dict = {flag: default for flag, (default, _) in OPTIONS.items()}
DOMAINS = {flag: domain for flag, (_, domain) in OPTIONS.items()}

# The recipe's AdamW moments, for an optimizer section that leaves them out. Filled, not left to torch's
# defaults (betas 0.9, 0.999): every other setting a DeepSpeed JSON leaves out is the recipe's (lr and
# weight_decay come from OPTIONS), so a section written to change the lr meant the recipe with another lr,
# not a second-moment horizon 20x as long. Not refused either: a short section is a valid DeepSpeed one.
RECIPE_ADAM_PARAMS = {"betas": [0.9, 0.95], "eps": 1e-8}

# The recipe's global batch: rows per optimizer step over all ranks together. Accumulation is
# derived from it (ROWS_PER_STEP / (micro x ranks)) unless --grad_accum or the JSON sets it.
ROWS_PER_STEP = 256
DEFAULT_CONFIG = "sft_recipe.json"  # in ds_configs/ (package data: found without a checkout)

# Numbers DeepSpeed and torch take from the JSON as they are: their domains, so that a bad value is
# one line now instead of a traceback after the model is loaded. Bucket sizes are elements; 2**36 is
# 256 GiB of fp32, beyond any device. Any other number anywhere in the JSON must at least be finite
# and fit an int64; the other ZeRO keys get the bounds of DeepSpeed's own pydantic model (zero_domains).
BUCKET = Int(1, 2**36)
DS_DOMAINS: dict[tuple[str, ...], object] = {
    ("train_batch_size",): Int(1, INT32_MAX),
    ("steps_per_print",): Int(1, INT64_MAX),
    ("gradient_predivide_factor",): Float(0, 1e6, min_open=True),
    ("optimizer", "params", "eps"): Float(0, 1, min_open=True),
    ("optimizer", "params", "betas"): Pair(Float(0, 1, max_open=True)),
    # ZeRO 1-2 cut buckets at fp16 pairs: an odd size was an AssertionError once the model had loaded
    ("zero_optimization", "reduce_bucket_size"): Int(2, 2**36, multiple=2),
    ("zero_optimization", "allgather_bucket_size"): Int(2, 2**36, multiple=2),
    ("zero_optimization", "sub_group_size"): BUCKET,
    ("zero_optimization", "stage3_prefetch_bucket_size"): Int(0, 2**36),
    ("zero_optimization", "prefetch_bucket_size"): Int(0, 2**36),
    ("zero_optimization", "zero_hpz_partition_size"): Int(1, 2**16),
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

# "run" is where the run that wrote an effective_config.json read and wrote, and sent its metrics (its
# COMMAND_LINE_FLAGS): a record, never applied when the file is passed back.
OWN_SECTIONS = ("ds_sft", "fp8", "run")
SECTIONS = ("optimizer", "zero_optimization", "bf16", "fp16", *OWN_SECTIONS)  # must be JSON objects

# The flags that name what a run reads and where it writes come from the command line only. A DeepSpeed
# JSON is a recipe, shared between runs and people: one that chose the run folder or the resume point
# would send a run into someone else's folder (or resume it from there) without a word on the command
# line, so the "ds_sft" section refuses them.
PATH_FLAGS = ("data_dir", "base_model", "out_dir", "resume")
# Where a run's metrics go is the user's choice too: a recipe that set these decided whether the run's
# config, paths and metrics leave the machine, and to which wandb project, over the user's $WANDB_MODE.
# They come from the command line, else the environment ($WANDB_MODE, $WANDB_PROJECT; metrics.py).
DESTINATION_FLAGS = ("wandb_mode", "wandb_project")
COMMAND_LINE_FLAGS = (*PATH_FLAGS, *DESTINATION_FLAGS)

# DeepSpeed keys that name a place DeepSpeed itself writes (read from DeepSpeed 0.19.8's
# monitor/config.py, profiling/config.py, autotuning/config.py, runtime/zero/offload_config.py and
# runtime/data_pipeline/constants.py; comms_logger and dump_state only print, and nebula is refused by
# DeepSpeed itself). They are refused, not redirected into the run folder: the run folder holds only
# files ds-sft writes and knows, so --overwrite and resume account for every one, and rewriting a path
# the recipe named would silently change what it asked for. ds-sft records what the monitors would
# (metrics.jsonl, report.md, --wandb_project). NVMe offload's swap folder is emptied by DeepSpeed
# (shutil.rmtree in runtime/swap_tensor), so it may not point anywhere at all.
DS_WRITER_PATHS: dict[tuple[str, ...], str] = {
    ("flops_profiler", "output_file"): "leave it out: the profile is printed to the log",
    ("tensorboard", "output_path"): "ds-sft logs to metrics.jsonl and --wandb_project",
    ("csv_monitor", "output_path"): "ds-sft logs to metrics.jsonl",
    ("autotuning", "results_dir"): "ds-sft does not run DeepSpeed's autotuner",
    ("autotuning", "exps_dir"): "ds-sft does not run DeepSpeed's autotuner",
    ("autotuning", "metric_path"): "ds-sft does not run DeepSpeed's autotuner",
    ("autotuning", "model_info_path"): "ds-sft does not run DeepSpeed's autotuner",
    ("zero_optimization", "offload_optimizer", "nvme_path"): "DeepSpeed empties its swap folder there",
    ("zero_optimization", "offload_param", "nvme_path"): "DeepSpeed empties its swap folder there",
    ("data_efficiency", "data_sampling", "curriculum_learning", "data_cluster_path"): (
        "ds-sft batches its own data; DeepSpeed's sampler is not used"
    ),
}
# DeepSpeed writers that, enabled without a path, write into the working directory (wandb and comet
# through their own clients).
DS_WRITERS = {
    "tensorboard": "ds-sft logs to metrics.jsonl and --wandb_project",
    "csv_monitor": "ds-sft logs to metrics.jsonl",
    "wandb": "use --wandb_project (ds-sft's own wandb run)",
    "comet": "ds-sft logs to metrics.jsonl and --wandb_project",
    "autotuning": "ds-sft does not run DeepSpeed's autotuner",
}

# DeepSpeed keys that pass DeepSpeed's config reader yet conflict with what ds-sft sets, or that ds-sft's
# loop never drives (so a recipe would believe they act): path -> why, for the one-line refusal. Each was
# a traceback in deepspeed.initialize after the model had loaded, or a silent change of the run. A key
# counts as set unless it is null, false, {} or a section with "enabled": false (:func:`is_set`).
REFUSED_DS_KEYS: dict[tuple[str, ...], str] = {
    ("optimizer", "params", "foreach"): "ds-sft steps torch's fused AdamW, which torch refuses with foreach",
    ("optimizer", "params", "maximize"): "AdamW would ascend the loss ds-sft trains down",
    ("prescale_gradients",): "DeepSpeed's ZeRO reduce-scatter refuses it, once the model has loaded",
    ("checkpoint", "writer"): (
        "ds-sft hashes a checkpoint's files as soon as save_checkpoint returns, before a decoupled writer "
        "has written them"
    ),
    ("data_types", "grad_accum_dtype"): "--precision and ZeRO choose the gradient dtype, not the recipe",
    ("data_efficiency",): "ds-sft batches its own data; DeepSpeed's sampler and random-LTD never run",
    ("hybrid_engine",): "ds-sft has no generation loop for DeepSpeed's RLHF hybrid engine to drive",
    ("activation_checkpointing",): (
        "it configures deepspeed.checkpointing, which the model never calls; pass --activation_checkpointing "
        "(the model's layers then recompute through torch.utils.checkpoint)"
    ),
    ("dataloader_drop_last",): (
        "DeepSpeed's dataloader is not used: ds-sft reads every step's rows from one stream that runs on "
        "across epochs, so no batch is ever short and there is nothing to drop"
    ),
    ("compile",): (
        "it configures DeepSpeed's engine.compile, which runs only with --compile and then as torch.compile "
        "of the model; pass --compile"
    ),
    ("pipeline",): (
        "ds-sft has no pipeline parallelism: DeepSpeed reads this section only for a PipelineModule's "
        "engine, and every rank here holds the whole model (ZeRO shards it; --zero_stage 3)"
    ),
}

# DeepSpeed keys whose other values break an assumption of ds-sft's own loop: path -> (the one value ds-sft
# runs with, why). step.train_step backpropagates loss_sum x ranks / tokens because DeepSpeed *averages*
# the gradients over ranks; any other reduction leaves a gradient that is not the token-weighted mean over
# the global batch, and clipping then acts on the wrong norm. (gradient_predivide_factor is not here:
# DeepSpeed divides by it before the reduction and multiplies it back after, so the mean stays a mean.)
PINNED_DS_VALUES: dict[tuple[str, ...], tuple[object, str]] = {
    ("gradient_allreduce_op",): (
        "mean",
        "ds-sft's loss is a token-weighted mean over the global batch, which needs DeepSpeed to average the "
        "gradients over ranks; any other op scales every gradient by the number of ranks",
    ),
}

# ZeRO++'s quantized communication (DeepSpeed's zero/config.py): CUDA kernels only.
ZERO_PLUS_PLUS_QUANTIZED = (
    "zero_quantized_weights",
    "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients",
)

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


def zero_fields() -> dict:
    """DeepSpeed's ZeRO config fields by every name they answer to (aliases included)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    return {**fields, **{f.alias: f for f in fields.values() if f.alias}}


def zero_domains() -> dict[tuple[str, ...], object]:
    """A domain for each scalar ZeRO key, from the pydantic model's own types and ``ge``/``gt`` bounds
    (which pydantic checks only when the engine is built, as a page of traceback); ours are tighter."""
    domains = {}
    for name, field in zero_fields().items():
        if field.annotation in (bool, bool | None):
            domains[("zero_optimization", name)] = Bool()
        elif field.annotation is int:
            low = -INT64_MAX
            for bound in field.metadata:
                low = getattr(bound, "ge", None) if getattr(bound, "ge", None) is not None else low
                low = bound.gt + 1 if getattr(bound, "gt", None) is not None else low
            domains[("zero_optimization", name)] = Int(low, INT64_MAX)
    domains[("zero_optimization", "stage")] = DOMAINS["zero_stage"]
    return {**domains, **{k: v for k, v in DS_DOMAINS.items() if k[0] == "zero_optimization"}}


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
    raise UserError(f"DeepSpeed config {spec!r} not found: pass an existing JSON file (see ds_configs/)")


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
    if flag == "precision" and isinstance(value, bool):
        return "bf16" if value else "fp32"
    return value


def flag_value_to_ds(flag: str, value):
    return (value == "bf16") if flag == "precision" else value


def hardware_bf16() -> tuple[bool, str]:
    """Whether this machine computes in bf16 natively, and why: a CUDA GPU that supports it (Ampere
    and later), or a CPU with AVX-512 BF16 or AMX (``/proc/cpuinfo`` flags; elsewhere bf16 is emulated
    and slower than fp32)."""
    import torch

    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name()} {'supports' if ok else 'lacks'} bf16"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    found = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if found or "AMX" in torch.backends.cpu.get_cpu_capability():
        return True, f"this CPU has {', '.join(found) or 'AMX'}"
    return False, "this CPU has neither avx512_bf16 nor amx_bf16"


def check_domain(flag_or_path, value, domain, source: str):
    """``value`` if it lies in ``domain``, else one UserError line naming the key (and its flag)."""
    try:
        return domain.check(value)
    except OutOfDomain as err:
        if isinstance(flag_or_path, str):
            where = ".".join(FLAG_TO_DS_KEY.get(flag_or_path, ("ds_sft", flag_or_path)))
            raise UserError(f"--{flag_or_path} ({where} in {source}) {err}") from None
        raise UserError(f'"{".".join(flag_or_path)}" in {source} {err}') from None


def check_numbers(tree, source: str, path: tuple[str, ...] = ()) -> None:
    """The floor for every integer of the JSON, declared or not: within an int64 (Python's JSON reader
    takes integers of any length; DeepSpeed and torch do not). Every number is finite already: the
    reader (:mod:`ds_sft.json_input`) refuses NaN and Infinity, and flags are checked by their domains."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            check_numbers(value, source, (*path, str(key)))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            check_numbers(value, source, (*path, str(i)))
    elif isinstance(tree, int) and not isinstance(tree, bool) and abs(tree) > INT64_MAX:
        raise UserError(f'"{".".join(path)}" in {source} must be a finite number within int64, got {tree!r}')


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


def check_optimizer_params(params: dict) -> None:
    """AdamW's own arguments only (DeepSpeed passes them on to the optimizer after building the model)."""
    import inspect

    import torch

    known = set(inspect.signature(torch.optim.AdamW).parameters) - {"params"}
    check_keys('"optimizer.params"', params, known | {"torch_adam", "adam_w_mode", "bias_correction"})
    # DeepSpeed hands these params to the optimizer's constructor as keyword arguments, so a
    # "_comment" (fine in every other section) ends in a TypeError once the model is loaded.
    comments = [key for key in params if key.startswith("_")]
    if comments:
        raise UserError(
            f'remove "optimizer.params.{comments[0]}" from the DeepSpeed config: DeepSpeed passes every '
            "optimizer param to AdamW, which takes no such argument (comment elsewhere in the file)"
        )
    if params.get("torch_adam") and "bias_correction" in params:
        raise UserError(
            '"optimizer.params.bias_correction" is DeepSpeed\'s FusedAdam\'s, and "torch_adam" is true: '
            "torch's AdamW always corrects its bias; remove bias_correction (or set torch_adam false)"
        )
    for name in ("capturable", "differentiable"):  # both fail at the first step under DeepSpeed
        if params.get(name) is True:
            raise UserError(
                f'"optimizer.params.{name}" is true in the DeepSpeed config: ds-sft steps AdamW outside CUDA '
                "graphs and autograd; remove it"
            )


def check_ds_numbers(ds_config: dict, source: str) -> None:
    """Every DeepSpeed key with a declared domain, then the floor for all other numbers."""
    domains = {**DS_DOMAINS, **zero_domains()}
    for name in ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "torch_adam",
                 "adam_w_mode", "bias_correction"):  # fmt: skip
        domains[("optimizer", "params", name)] = Bool()
    for path, domain in domains.items():
        value = get_path(ds_config, path)
        if value is not None:
            check_domain(path, value, domain, source)
    check_numbers(ds_config, source)


def check_writers(ds_config: dict, source: str) -> None:
    """No DeepSpeed key may make DeepSpeed write outside the run folder (:data:`DS_WRITER_PATHS`)."""
    for path, instead in DS_WRITER_PATHS.items():
        if get_path(ds_config, path) not in (None, ""):
            raise UserError(
                f'remove "{".".join(path)}" from {source}: DeepSpeed would write there, outside the run '
                f"folder ({instead})"
            )
    for section, instead in DS_WRITERS.items():
        if get_path(ds_config, (section, "enabled")):
            raise UserError(
                f'set "{section}.enabled" to false in {source}: DeepSpeed would write its files into the '
                f"working directory, outside the run folder ({instead})"
            )


def is_set(value) -> bool:
    """Whether a DeepSpeed key asks for something: not null, false, {} or a section switched off."""
    if value is None or value is False or value == {}:
        return False
    return not (isinstance(value, dict) and value.get("enabled") is False)


def check_refused_keys(ds_config: dict, source: str) -> None:
    """No key of :data:`REFUSED_DS_KEYS` may be set, and each of :data:`PINNED_DS_VALUES` is absent or
    has its one value."""
    for path, why in REFUSED_DS_KEYS.items():
        if is_set(get_path(ds_config, path)):
            raise UserError(f'remove "{".".join(path)}" from {source}: {why}')
    for path, (pinned, why) in PINNED_DS_VALUES.items():
        value = get_path(ds_config, path)
        if value is not None and value != pinned:
            raise UserError(
                f'"{".".join(path)}" is {json.dumps(value)} in {source}: {why}; remove it or set '
                f"{json.dumps(pinned)}"
            )


def validate(ds_config: dict, s: dict, source: str) -> None:
    """Every contradiction a run could trip over later, caught before anything heavy is loaded."""
    misplaced = next((key for key in ds_config if key in DEFAULTS and key not in KNOWN_DS_KEYS), None)
    if misplaced in COMMAND_LINE_FLAGS:
        raise UserError(f"unknown key {misplaced!r} in {source}: it is a ds-sft flag; pass --{misplaced}")
    if misplaced:
        raise UserError(
            f'unknown key {misplaced!r} in {source}: it is a ds-sft setting; put it in the "ds_sft" section '
            f'({{"ds_sft": {{"{misplaced}": ...}}}}) or pass --{misplaced}'
        )
    check_keys("the DeepSpeed config", ds_config, KNOWN_DS_KEYS)
    check_writers(ds_config, source)
    check_keys('"zero_optimization"', ds_config.get("zero_optimization", {}), set(zero_fields()))
    check_keys('"optimizer"', ds_config.get("optimizer", {}), KNOWN_OPTIMIZER_KEYS)
    check_optimizer_params(ds_config.get("optimizer", {}).get("params", {}))
    check_ds_numbers(ds_config, source)
    check_refused_keys(ds_config, source)
    zero = ds_config.get("zero_optimization", {})
    predivide = ds_config.get("gradient_predivide_factor", 1)
    if predivide != 1 and zero.get("stage", 0) >= 1 and zero.get("reduce_scatter", True):
        raise UserError(  # the same assert as prescale_gradients in ZeRO's reduce-scatter, after loading
            f'"gradient_predivide_factor" is {predivide} in {source}: DeepSpeed\'s ZeRO reduce-scatter '
            "supports only 1; remove it"
        )
    if get_path(ds_config, ("checkpoint", "load_universal")):
        raise UserError(
            'remove "checkpoint.load_universal" from the DeepSpeed config: ds-sft loads a checkpoint saved '
            "on another number of ranks through a universal one of its own making, when it needs one"
        )
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
    if optimizer_type == "adamw" and get_path(ds_config, ("optimizer", "params", "adam_w_mode")) is False:
        raise UserError(  # DeepSpeed runs "AdamW" decoupled whatever adam_w_mode says
            '"optimizer.params.adam_w_mode" is false but the type is "AdamW", which DeepSpeed runs with '
            'decoupled weight decay anyway; remove adam_w_mode, or use "type": "Adam" for L2 decay'
        )
    if ds_config.get("fp16", {}).get("enabled"):  # DeepSpeed's loss-scaled fp16: not a precision of ds-sft
        raise UserError(
            '"fp16" is enabled in the DeepSpeed config: ds-sft trains in bf16 or fp32 (--precision); '
            'remove "fp16" or set its "enabled" to false'
        )
    for offload in ("offload_optimizer", "offload_param"):
        section = ds_config.get("zero_optimization", {}).get(offload)
        if isinstance(section, dict) and section.get("device") == "nvme":  # its nvme_path is refused above
            raise UserError(
                f'"zero_optimization.{offload}.device" is "nvme": NVMe offload swaps into a folder '
                'DeepSpeed empties (nvme_path), which ds-sft does not hand out; use "cpu" or "none"'
            )
    import torch

    quantized = [key for key in ZERO_PLUS_PLUS_QUANTIZED if get_path(ds_config, ("zero_optimization", key))]
    if quantized and not torch.cuda.is_available():  # DeepSpeed's CPU backend has no quantizer kernels
        raise UserError(
            f'"zero_optimization.{quantized[0]}" needs a CUDA GPU: ZeRO++ quantizes with DeepSpeed\'s CUDA '
            "kernels (QuantizerBuilder), which its CPU backend lacks; set it to false on this machine"
        )
    # Triton runs on CPU only through its interpreter (ds_sft.kernels._launch.check_launchable), which it
    # chooses when the kernels are imported: without it the first forward, after the model loaded, failed.
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if s["kernels"] == "triton" and not torch.cuda.is_available() and not interpreted:
        raise UserError(
            "--kernels triton needs a CUDA GPU (or TRITON_INTERPRET=1 in the environment, tests only: ~1000x "
            "slower); use --kernels torch or auto on this machine"
        )
    autocast = ds_config.get("torch_autocast", {})
    if not isinstance(autocast, dict) or autocast.get("enabled"):  # it computed in bf16, recorded as fp32
        raise UserError(
            '"torch_autocast" is enabled in the DeepSpeed config: ds-sft sets the compute precision itself '
            '(--precision bf16 autocasts the forward); remove "torch_autocast"'
        )
    if not 0 <= s["warmup_iters"] <= s["max_iters"]:
        raise UserError(
            f"--warmup_iters ({s['warmup_iters']}) must be between 0 and --max_iters ({s['max_iters']})"
        )
    if not 0 <= s["min_lr"] <= s["learning_rate"]:
        raise UserError(
            f"--min_lr ({s['min_lr']}) must be between 0 and --learning_rate ({s['learning_rate']})"
        )
    resolve_wandb_mode(s["wandb_mode"])  # checks $WANDB_MODE now, not when wandb starts after the model loads
    check_with_deepspeed(ds_config, source)


# Batch keys: ds-sft sets them for the world size the run has (rows_per_step), not this check's.
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class AskedKeys(dict):
    """A JSON object of the config that records which keys DeepSpeed's reader asks it for by name. The
    objects it holds are AskedKeys too, so that a subsection the reader walks key by key records its own."""

    def __init__(self, items: dict):
        super().__init__({key: AskedKeys(v) if isinstance(v, dict) else v for key, v in items.items()})
        self.asked: set[str] = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)

    def asked_by_path(self, path: tuple[str, ...]) -> dict[tuple[str, ...], set[str]]:
        """The keys asked of this object (at ``path``) and of each object inside it, by their paths."""
        found = {path: self.asked}
        for key, value in dict.items(self):
            if isinstance(value, AskedKeys):
                found.update(value.asked_by_path((*path, key)))
        return found


def read_with_deepspeed(config: dict, track: bool = True) -> dict[tuple[str, ...], set[str]]:
    """Run DeepSpeed's own config reader over ``config`` (batch keys left out) and return, for each JSON
    object in it (a section, and the objects inside sections, by path), the keys the reader asked it for
    by name (``track``; else nothing is tracked and the reader sees plain dicts, as its messages then
    show). Raises what the reader raises."""
    from deepspeed.runtime.config import DeepSpeedConfig

    config = {key: value for key, value in copy.deepcopy(config).items() if key not in BATCH_KEYS}
    objects = {key: value for key, value in config.items() if isinstance(value, dict)}
    sections = {key: AskedKeys(value) for key, value in objects.items()} if track else {}
    batch = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    DeepSpeedConfig({**config, **sections, **batch})
    return {
        path: asked
        for key, section in sections.items()
        for path, asked in section.asked_by_path((key,)).items()
    }


def deepspeed_refusal(config: dict) -> str | None:
    """What DeepSpeed's own config reader says is wrong with ``config`` (batch keys left out), or None.

    Whatever the reader raises is a refusal of the user's config, not only its own config errors: it
    reads many keys without checking their kind, so an object where it expects a string ends in an
    AttributeError (``val.lower()``), a string where it expects an object in another. Those carry their
    exception's name, since their message alone ("no attribute 'lower'") does not say it is a refusal."""
    from deepspeed.runtime.config import DeepSpeedConfigError

    try:
        read_with_deepspeed(config, track=False)
    except (DeepSpeedConfigError, ValueError, AssertionError) as err:
        return first_line(err)  # pydantic's ValidationError is a ValueError
    except Exception as err:  # any failure of the reader on this config is its refusal
        return f"{type(err).__name__}: {first_line(err)}"
    return None


def check_with_deepspeed(ds_config: dict, source: str) -> None:
    """DeepSpeed's own reading of the config, now rather than in ``deepspeed.initialize`` after the
    model has loaded, where a value of a wrong kind (an ``offload_optimizer`` of ``"cpu"``, a
    ``communication_data_type`` of ``"garbage"``, a block DeepSpeed has removed such as ``"amp"``)
    ended in a traceback. The refusal names the section: DeepSpeed's own message may not.

    A section DeepSpeed reads key by key (``checkpoint``, ``data_types``, ``flops_profiler``, ``aio``,
    ``torch_autocast``...) ignores a key it never asks for, so a typo there (``"tag_validaton"``) ran as
    if absent: such a section may hold only the keys the reader asked for. So may an object inside a
    section that the reader walks key by key (``checkpoint.parallel_write``, ``autotuning.model_info``
    in DeepSpeed 0.19.8). An object whose pydantic model refuses an unknown key itself
    (``zero_optimization`` and its offload sections, ``bf16``, the monitors, ``timers.throughput``) is
    left to it: the reader may ask it for a few keys by name before the model reads the rest. One the
    reader never asks by name is passed on whole (``autotuning.arg_mappings``, whose keys are the
    user's; ``optimizer.params``, which ds-sft checks against AdamW's arguments) and is not checked here."""
    problem = deepspeed_refusal(ds_config)
    if problem is not None:
        section = next((key for key, value in ds_config.items() if deepspeed_refusal({key: value})), None)
        where = f'"{section}"' if section else "it"
        raise UserError(f"{source}: DeepSpeed refuses {where} ({problem}); fix or remove that value")
    for path, asked in read_with_deepspeed(ds_config).items():
        value = get_path(ds_config, path)
        if not asked or not set(value) - asked:  # read whole (pydantic reads "bf16"), or each key asked
            continue
        probe = copy.deepcopy(ds_config[path[0]])  # the section, an unknown key added where the object is
        set_path(probe, (*path[1:], "ds_sft_unknown_key"), None)
        if deepspeed_refusal({path[0]: probe}) is None:  # the reader ignores a key it does not ask for
            check_keys(f'"{".".join(path)}" of {source}', value, asked)


def check_inputs(s: dict) -> None:
    """The model and the data exist (checked last: a config mistake is reported before a path one)."""
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
