"""Refuse, before the engine is built, a run whose parts don't belong together.

A fresh run: the data's tokenizer must be the base model's own (when the base model carries one;
checked before its weights load), its ids must fit the embedding and its rows the model's positions
(:mod:`ds_sft.data.model_match`; before the weights load where the model's files say its config).

A resume: every checkpoint records :func:`run_identity`, the settings that fix what the next step
computes (seed, ZeRO stage, precision, fp8, micro-batch, global batch, lr schedule and clipping,
data, tokenizer, model, the gradients' communication dtype). On
``--resume`` the saved table is compared key by key with the one this run would write. A key in
:data:`RESUMABLE` may change and the run continues as if uninterrupted (exactly, up to summation
order, or within a stated tolerance where the arithmetic itself changes); a key the user names with
``--allow_change`` may change and the run goes on from the same step and the same position of the
data stream, but it is another run from there on; any other difference is refused in one line
naming the saved and the new value. The optimizer's settings (weight decay, betas, eps, decoupled or L2
decay, fused) are this run's, applied over the checkpoint's (:data:`OPTIMIZER_KEYS`). Every change let
through is printed and kept in the trainer state, ``metrics.jsonl`` and the report: nothing silent.

World size is not a key: at the same global batch it resumes exactly (the sampler's cursor counts
global samples, and ``checkpoint_load.needs_universal`` re-partitions the optimizer), so ``grad_accum``
is not one either, only the global batch it makes. For the same reason the micro-batch may change
when the global batch stays: each step reads the same rows, and the loss is normalized by the step's
trained tokens over all ranks, however they are split into micro-batches.
"""

from __future__ import annotations

from ds_sft.data.model_match import check_model_fits, check_tokenizer, data_tokenizer_identity, final_behind
from ds_sft.errors import UserError, first_line

# Keys that may differ between the checkpoint and the resumed run and still continue the uninterrupted
# run (exactly, or within the tolerance its tests state). Every other key of run_identity must be equal,
# unless --allow_change names it.
RESUMABLE: frozenset[str] = frozenset({"micro_batch_size", "zero_stage", "precision"})

# The flags of the "schedule" key: they set the lr and the clipping of every later step, as the
# optimizer's settings do, so a resume that changes them is not the run it continues. --max_iters is not
# one: training on past the end is what a resume is for (the cosine then ends later; said at resume).
SCHEDULE_FLAGS = ("learning_rate", "min_lr", "warmup_iters", "grad_clip")


def _pass_saved(flag: str):
    """The fix for a key set by one flag: pass the flag with the checkpoint's value."""
    return lambda saved, now: f"pass --{flag} {saved}"


def _pass_schedule(saved, now) -> str:
    """The schedule's flags that differ, with their saved values (``pass --warmup_iters 4``)."""
    saved, now = (v if isinstance(v, dict) else {} for v in (saved, now))
    differing = (flag for flag in SCHEDULE_FLAGS if saved.get(flag) != now.get(flag))
    return "pass " + " ".join(f"--{flag} {saved.get(flag)}" for flag in differing)


def _same_fp8_layout(saved, now) -> str:
    """``--fp8 auto`` resolves per machine and the JSON's recipe changes the numerics: say what was saved."""
    made = (
        f"{saved.get('layers')} projections in fp8 {saved.get('mode')}, recipe {saved.get('recipe')}"
        if isinstance(saved, dict)
        else "no projection in fp8"
    )
    return f'resume where --fp8 and the JSON\'s "fp8" recipe give what they gave ({made})'


def _say(text: str):
    """The fix for a key no single flag sets."""
    return lambda saved, now: text


# How to resume when a key differs: (saved value, this run's value) -> what puts the saved one back.
HOW_TO_RESUME = {
    "seed": _pass_saved("seed"),
    "zero_stage": _pass_saved("zero_stage"),
    "precision": _pass_saved("precision"),
    "fp8": _pass_saved("fp8"),
    "fp8_layout": _same_fp8_layout,
    "micro_batch_size": _pass_saved("micro_batch_size"),
    "global_batch": lambda saved, now: f"keep micro_batch_size x grad_accum x ranks = {saved} rows",
    "schedule": _pass_schedule,
    "data": _say("pass the --data_dir the run was started with"),
    "seq_len": _say("pass the --data_dir the run was started with"),
    "tokenizer": _say("pass data prepared with the run's tokenizer"),
    "model": _say("pass the --model or --base_model the run was started with"),
    "base_weights": _say("pass the --base_model the run was started with"),
    "communication_data_type": lambda saved, now: (
        f'set "communication_data_type": "{saved}" in the DeepSpeed JSON'
        if saved is not None
        else 'leave "communication_data_type" out of the DeepSpeed JSON'
    ),
}

# The keys of run_identity, in its order: what --allow_change accepts.
IDENTITY_KEYS = tuple(HOW_TO_RESUME)

# AdamW's settings per parameter group that this run's flags and JSON decide (--weight_decay, the
# JSON's betas and eps; decoupled_weight_decay, what "type" and adam_w_mode choose: AdamW's decay or
# Adam's L2; fused, which kernel steps). A resume trains with this run's: DeepSpeed's load_checkpoint
# puts the saved param_groups back over the ones the engine was built with (a resume with L2 decay kept
# the saved run's decoupled decay), so the loop puts these back after it (:func:`optimizer_changes`)
# and records each change like an allowed one. torch's Adam and AdamW keep the same moments, which
# carry over as they are. The lr is not among them: the schedule sets it before every step.
OPTIMIZER_KEYS = ("weight_decay", "betas", "eps", "decoupled_weight_decay", "fused")
# Settings whose change AdamW's saved state cannot follow (amsgrad keeps a third moment): refused.
FIXED_OPTIMIZER_KEYS = ("amsgrad", "maximize")

# The init does not change what a resumed step computes (a checkpoint's weights replace it); the run
# settings (kernels, activation checkpointing) are not part of the model's architecture at all.
NOT_COMPARED_FIELDS = ("init_std",)


def check_base_model(s) -> str | None:
    """Before the base model's weights load (seconds to minutes): the data's tokenizer is the model's
    own. Returns a note for rank 0 to print when the model is a run's final/ that its checkpoints went
    past (or back from), else None."""
    if s.base_model is None:
        return None
    check_tokenizer(s.base_model, s.data_dir)
    return final_behind(s.base_model)


def check_fresh(s, model, train_set) -> None:
    """The data fits the built base model: ids within its embedding, rows within its positions. For a
    base model whose files do not say its config without unpickling them (a torch file): every other
    model's config, as the load builds it, was checked before the weights loaded
    (``preflight.check_data_fits_model``, by the same check)."""
    if s.base_model is not None:
        check_model_fits(s.base_model, model.config, s.data_dir, train_set.seq_len)


def weights_fingerprint(model) -> str:
    """A digest of the weights a run starts from: names, shapes and a strided sample of each tensor
    (about 4096 values). The checkpoint's weights replace them on resume, but the run is the
    fine-tune of its base model: another base of the same shape (a fine-tune of it, another seed)
    would be recorded as the run's base without a word. A sample, not every byte: any two trained
    models differ throughout, and hashing a large model on every start would cost seconds."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            flat = weight.detach().flatten()
            # rounded to bf16: the same digest for the weights in fp32 or cast to bf16
            sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.bfloat16).float()
            digest.update(f"{name}{tuple(weight.shape)}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def run_identity(s, model, train_set, world_size: int, ds_config: dict) -> dict:
    """What a checkpoint records about the run that wrote it (compared on resume). ``base_weights``:
    :func:`weights_fingerprint` of a --base_model (a preset's random init is not compared).
    ``communication_data_type``: the dtype the JSON has DeepSpeed reduce gradients in across ranks
    (None: the gradients' own); bf16 sums lose bits that fp32 sums keep."""
    from ds_sft.model.fp8 import fp8_layout

    manifest = getattr(train_set, "manifest", {})
    config = {k: v for k, v in model.config.architecture().items() if k not in NOT_COMPARED_FIELDS}
    return {
        "seed": s.seed,
        "zero_stage": s.zero_stage,
        "precision": s.precision,
        "fp8": s.fp8,
        "fp8_layout": fp8_layout(model, s.fp8_recipe),
        "micro_batch_size": s.micro_batch_size,
        "global_batch": s.micro_batch_size * s.grad_accum * world_size,
        "schedule": {flag: getattr(s, flag) for flag in SCHEDULE_FLAGS},
        "data": manifest.get("key"),
        "seq_len": train_set.seq_len,
        "tokenizer": data_tokenizer_identity(str(s.data_dir)) if s.data_dir is not None else None,
        "model": config,
        "base_weights": weights_fingerprint(model) if s.base_model is not None else None,
        "communication_data_type": ds_config.get("communication_data_type"),
    }


def saved_identity(trainer_state: dict) -> dict:
    """The checkpoint's table; the ZeRO stage is also read where older checkpoints kept it."""
    return {"zero_stage": trainer_state.get("zero_stage"), **trainer_state.get("run", {})}


def differences(saved: dict, now: dict, allowed=RESUMABLE) -> dict:
    """{key: (saved, now)} for every recorded key that differs and may not."""
    return {
        key: (saved[key], value)
        for key, value in now.items()
        if key in saved and saved[key] != value and key not in allowed
    }


def show(key: str, saved, now) -> str:
    """One difference as text: model configs by the fields that differ, hashes shortened."""

    def short(value):
        return value[:12] if isinstance(value, str) and len(value) == 64 else value

    if isinstance(saved, dict) or isinstance(now, dict):  # None: a table not recorded, e.g. fp8 off
        saved, now = (v if isinstance(v, dict) else {} for v in (saved, now))
        fields = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        return f"{key} " + ", ".join(f"{k} {short(saved.get(k))} -> {short(now.get(k))}" for k in fields)
    return f"{key} {short(saved)} -> {short(now)}"


def check_resume(tag_dir, trainer_state: dict, now: dict, allow=(), model=None) -> list[dict]:
    """Refuse to resume ``tag_dir`` when the run differs from the one that saved it (one line), except
    in :data:`RESUMABLE` keys and the keys of ``allow`` (``--allow_change``).

    Returns the changes let through, each ``{"key", "saved", "now", "how"}`` with ``how``
    "resumable" (:data:`RESUMABLE`) or "allowed". ``model``: this run's model, whose weights must have the
    checkpoint's names and shapes for an allowed model change (the engine loads them as they are)."""
    saved = saved_identity(trainer_state)
    changed = differences(saved, now, RESUMABLE | set(allow))
    if changed:
        what = "; ".join(show(key, *values) for key, values in changed.items())
        fixes = (HOW_TO_RESUME[key](*values) for key, values in changed.items())
        how = "; ".join(dict.fromkeys(fixes))  # data and seq_len share a fix: say it once
        raise UserError(
            f"--resume {tag_dir}: this run differs from the checkpoint's (saved -> now: {what}); to resume, "
            f"{how}; or continue with the change by --allow_change {','.join(changed)} (not exact: recorded "
            "in the run's report); or start a new run with another --out_dir"
        )
    changes = [
        {"key": key, "saved": saved[key], "now": value, "how": "resumable" if key in RESUMABLE else "allowed"}
        for key, value in now.items()
        if key in saved and saved[key] != value
    ]
    if model is not None and any(change["key"] == "model" for change in changes):
        check_same_weights(tag_dir, saved["model"], model)
    return changes


def check_same_weights(tag_dir, saved_config: dict, model) -> None:
    """An allowed model change must keep every weight's name and shape (rope_theta, max_seq_len, ...):
    the checkpoint's tensors are loaded as they are."""
    import torch

    from ds_sft.model.config import ModelConfig
    from ds_sft.model.llama import LlamaModel

    try:
        with torch.device("meta"):  # shapes only: no memory, no init
            before = LlamaModel(ModelConfig.from_dict(saved_config))
    except (TypeError, ValueError) as err:
        message = (
            f"the model config saved in {tag_dir} is malformed ({first_line(err)}): pass another checkpoint"
        )
        raise UserError(message) from None
    # parameters, not buffers: fp8 scaling state and RoPE tables are not weights
    shapes = [{name: tuple(p.shape) for name, p in m.named_parameters()} for m in (before, model)]
    if shapes[0] != shapes[1]:
        name = next(
            n for n in sorted(shapes[0].keys() | shapes[1].keys()) if shapes[0].get(n) != shapes[1].get(n)
        )
        raise UserError(
            f"--allow_change model: the weights of {tag_dir} do not fit this model ({name}: "
            f"{shapes[0].get(name, 'absent')} saved, {shapes[1].get(name, 'absent')} now); only a change "
            "that keeps every weight's shape can continue a run: start a new run with --base_model instead"
        )


def optimizer_settings(param_groups) -> dict:
    """{key: [its value in each parameter group]} for :data:`OPTIMIZER_KEYS` and
    :data:`FIXED_OPTIMIZER_KEYS`, as JSON holds them (betas as a list)."""
    keys = (*OPTIMIZER_KEYS, *FIXED_OPTIMIZER_KEYS)
    return {
        key: [list(group[key]) if isinstance(group[key], tuple) else group[key] for group in param_groups]
        for key in keys
        if all(key in group for group in param_groups)
    }


def apply_optimizer_settings(param_groups, settings: dict) -> None:
    """Write :func:`optimizer_settings`' values of :data:`OPTIMIZER_KEYS` into ``param_groups``."""
    for key in OPTIMIZER_KEYS:
        for group, value in zip(param_groups, settings[key], strict=True):
            group[key] = tuple(value) if isinstance(value, list) else value


def optimizer_changes(tag_dir, saved: dict, now: dict) -> list[dict]:
    """The optimizer settings this resume changes (``how`` "optimizer": this run's apply), as
    :func:`check_resume`'s changes; one line for a setting AdamW's saved state cannot follow."""
    for key in FIXED_OPTIMIZER_KEYS:
        if saved.get(key) != now.get(key):
            raise UserError(
                f"--resume {tag_dir}: the optimizer's {key} was {saved.get(key)} and is {now.get(key)} now; "
                f"AdamW's saved state cannot follow that change: keep {key} as it was, or start a new run "
                "with another --out_dir"
            )
    return [
        {"key": key, "saved": saved[key], "now": now[key], "how": "optimizer"}
        for key in OPTIMIZER_KEYS
        if key in saved and saved[key] != now[key]
    ]


def describe(change: dict) -> str:
    """The line printed at resume (and kept in the report) for one change let through."""
    if change["how"] == "resumable":
        why = "resumable: the checkpoint's state carries over, no flag needed"
    elif change["how"] == "optimizer":
        why = "this run's optimizer setting, per parameter group; the moments carry over"
    else:
        why = "allowed by --allow_change: the run goes on from the same step and data position, not exactly"
    return f"{show(change['key'], change['saved'], change['now'])} ({why})"


def recorded_changes(trainer_state: dict, tag_dir) -> list[dict]:
    """The changes earlier resumes recorded in a trainer state (none in older checkpoints), checked
    before they are carried on: ``[{"step", "key", "saved", "now", "how"}]``."""
    changes = trainer_state.get("changes", [])
    fine = isinstance(changes, list) and all(
        isinstance(c, dict)
        and set(c) == {"step", "key", "saved", "now", "how"}
        and isinstance(c["step"], int)
        and (c["key"], c["how"])
        in {(key, "optimizer") for key in OPTIMIZER_KEYS}
        | {(key, how) for key in IDENTITY_KEYS for how in ("resumable", "allowed")}
        for c in changes
    )
    if not fine:
        raise UserError(
            f"the trainer state saved in {tag_dir} has malformed changes: pass another checkpoint"
        )
    return changes
