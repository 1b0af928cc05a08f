"""Every check of a layered train config, before a model or a shard is loaded; each is one UserError.

DeepSpeed's keys against the tables of :mod:`ds_sft.train.config_keys` (known, refused, pinned, the
writers that would write outside the run folder), every number in its domain (:mod:`ds_sft.options`;
any other integer within int64), AdamW's own arguments, ds-sft's rules between flags, then DeepSpeed's
own config reader, run now (:func:`check_with_deepspeed`) instead of in ``deepspeed.initialize``
after the model has loaded. The inputs (model, data) come last (:func:`check_inputs`): a config
mistake is reported before a path one.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path

from ds_sft.errors import UserError, first_line
from ds_sft.options import INT64_MAX, Bool, Float, Int, checked
from ds_sft.train.config_keys import (
    COMMAND_LINE_FLAGS,
    DEFAULTS,
    DOMAINS,
    DS_DOMAINS,
    DS_WRITER_PATHS,
    DS_WRITERS,
    FLAG_TO_DS_KEY,
    KNOWN_DS_KEYS,
    KNOWN_OPTIMIZER_KEYS,
    PINNED_DS_VALUES,
    REFUSED_DS_KEYS,
    SECTIONS,
    SUPPORTED_OPTIMIZERS,
    ZERO_PLUS_PLUS_QUANTIZED,
)
from ds_sft.train.metrics import resolve_wandb_mode, resolve_wandb_project


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


def check_domain(flag_or_path, value, domain, source: str):
    """``value`` if it lies in ``domain``, else one UserError line naming the key (and its flag)."""
    if isinstance(flag_or_path, str):
        where = ".".join(FLAG_TO_DS_KEY.get(flag_or_path, ("ds_sft", flag_or_path)))
        return checked(f"--{flag_or_path} ({where} in {source})", value, domain)
    return checked(f'"{".".join(flag_or_path)}" in {source}', value, domain)


ANY_INT64 = Int(-INT64_MAX, INT64_MAX)  # what DeepSpeed and torch can hold of an integer JSON reads


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
    elif isinstance(tree, int) and not isinstance(tree, bool):
        checked(f'"{".".join(path)}" in {source}', tree, ANY_INT64)


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
        if enabled is not None:
            checked(f'"{key}.enabled" in the DeepSpeed config', enabled, Bool())


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
    checked("--warmup_iters (at most --max_iters)", s["warmup_iters"], Int(0, s["max_iters"]))
    checked("--min_lr (at most --learning_rate)", s["min_lr"], Float(0, s["learning_rate"]))
    # $WANDB_MODE and $WANDB_PROJECT checked now, not when wandb starts after the model has loaded
    if resolve_wandb_mode(s["wandb_mode"]) != "disabled":
        resolve_wandb_project(s["wandb_project"])
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
        from ds_sft.model_source import resolve_model_path

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
