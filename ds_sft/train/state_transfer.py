"""Resume with another ZeRO stage or precision: the training state by parameter name, carried across.

Each ZeRO stage and precision lays the same training state out differently: fp32 stage 0 keeps it
in the parameters and torch's AdamW; bf16 stage 0 (DeepSpeed's ``BF16_Optimizer``) and ZeRO 1-2 in
flat fp32 partitions, one per parameter group and rank; ZeRO 3 in flat partitions of its own. A
checkpoint is saved in its engine's layout, and DeepSpeed loads it only into an engine of the same
kind (another stage: AttributeError or AssertionError; another precision: FileNotFoundError, as the
bf16 files carry a ``bf16_`` prefix).

So the conversion never parses a layout. An engine of the checkpoint's own kind loads it, the way
every resume does (:func:`ds_sft.train.checkpoint_load.load`: same files, same weights-only unpickling,
the universal path when the world size changed too); :func:`read_state` asks it, parameter by
parameter, for the full fp32 master weight and Adam moments (DeepSpeed's ``safe_get_full_*``, which
gather the partitions) and for the step count; that engine is destroyed, and the new one is built
from a model holding those fp32 weights (so a bf16 engine rounds its bf16 copies from the masters,
as its own updates do) and given the masters, moments and step (:func:`write_state`). Nothing is
rounded or recomputed on the way: the new engine's state equals the saved one bit for bit, and the
continuation differs from an uninterrupted run only by the arithmetic of the new stage or precision
(fp32 stage changes: within 1e-6; a precision change: bf16's own rounding, see
tests/reliability/test_resume_stage.py).

Cost: the full fp32 state (weights and two moments, 12 bytes per parameter) is held in host memory
on every rank while the engines change, and the checkpoint's engine is built once more.

Written against DeepSpeed 0.19.8: ZeRO 1-2 link each parameter to its slices of the optimizer
state for the first parameter group only (:func:`_link_fragments` links them all); ZeRO 3's
``safe_set_full_*`` slices the last rank's padded partition out of range, so each rank writes its
own partition (``safe_set_local_*``).
"""

from __future__ import annotations

from ds_sft.train.compatibility import differences

MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's, the optimizer ds-sft configures
CONVERTED = ("zero_stage", "precision")  # the run-identity keys whose change this module carries over


def changes(saved: dict, now: dict) -> dict:
    """{key: (saved, now)} for the ZeRO stage and precision, where they differ (a checkpoint from
    before precision was recorded counts as this run's)."""
    return {key: pair for key, pair in differences(saved, now, allowed=()).items() if key in CONVERTED}


def describe(changed: dict) -> str:
    """The line a converted resume prints: ``ZeRO 2 -> 3, bf16 -> fp32: optimizer state converted``."""
    parts = []
    if "zero_stage" in changed:
        parts.append("ZeRO {} -> {}".format(*changed["zero_stage"]))
    if "precision" in changed:
        parts.append("{} -> {}".format(*changed["precision"]))
    return ", ".join(parts) + ": fp32 weights, Adam moments and step carried over (optimizer state converted)"


def engine_config(ds_config: dict, stage: int, precision: str) -> dict:
    """``ds_config`` for an engine of ``stage`` and ``precision``; offload kept only where that stage
    has it (optimizer offload from ZeRO 1, parameter offload at ZeRO 3)."""
    zero = {**ds_config.get("zero_optimization", {}), "stage": stage}
    if stage < 3:
        zero.pop("offload_param", None)
    if stage < 1:
        zero.pop("offload_optimizer", None)
    return {
        **ds_config,
        "zero_optimization": zero,
        "bf16": {**ds_config.get("bf16", {}), "enabled": precision == "bf16"},
    }


def inner_optimizer(engine):
    """The torch optimizer that holds the state: the engine's own at fp32 stage 0, else the one
    DeepSpeed's wrapper steps."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def _masters(engine) -> dict | None:
    """{id(parameter): the fp32 tensor AdamW updates for it} where there is one per parameter (fp32
    stage 0: the parameter itself; bf16 stage 0: DeepSpeed's ``FP16_UnfusedOptimizer`` keeps an fp32
    copy of each); None where ZeRO 1-3 keep flat partitions instead."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    optimizer = engine.optimizer
    if inner_optimizer(engine) is optimizer:
        return {id(p): p for p in engine.module.parameters()}
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        pairs = zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True)
        return {id(low): master for lows, fp32 in pairs for low, master in zip(lows, fp32, strict=True)}
    return None


def _link_fragments(engine) -> None:
    """ZeRO 1-2: point each parameter at its slices of the optimizer state, for ``safe_*_optimizer_state``.

    DeepSpeed 0.19.8 links them once, after the optimizer's first step of the *first* parameter group
    (``_optimizer_step`` steps one group at a time and calls ``_lazy_init_hp_params_optimizer_state``
    after each; the flag it sets stops the later calls): the parameters of every other group are
    never linked, and their moments cannot be read. Linking again is harmless (views of the same
    tensors), so the flag is cleared first."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def read_state(engine, moments: bool = True) -> dict:
    """{"step": Adam's step count, "params": {name: {"fp32", "exp_avg", "exp_avg_sq"}}}, full fp32
    tensors on the CPU, the same on every rank (a collective at ZeRO 1-3: every rank calls it).
    ``moments=False``: the fp32 master weights only (the final weights of a run)."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    inner = inner_optimizer(engine)
    steps = {float(state["step"]) for state in inner.state.values() if "step" in state}
    if len(steps) > 1:
        raise RuntimeError(f"the optimizer's parameter groups are at different steps ({sorted(steps)})")
    masters = _masters(engine)
    if masters is None:
        _link_fragments(engine)

    def host(tensor):
        return tensor.detach().to(device="cpu", dtype=torch.float32).clone()

    params = {}
    for name, param in engine.module.named_parameters():
        if masters is not None:
            master = masters[id(param)]
            entry = {"fp32": host(master)}
            entry.update({key: host(inner.state[master][key]) for key in MOMENTS if steps and moments})
        else:
            entry = {"fp32": host(safe_get_full_fp32_param(param))}
            entry.update(
                {key: host(safe_get_full_optimizer_state(param, key)) for key in MOMENTS if steps and moments}
            )
        params[name] = entry
    return {"step": int(steps.pop()) if steps else 0, "params": params}


def load_weights(model, state: dict) -> None:
    """The fp32 master weights into ``model`` before its engine is built (which casts and partitions)."""
    model.load_state_dict({name: entry["fp32"] for name, entry in state["params"].items()}, strict=False)


def write_state(engine, state: dict) -> None:
    """Give a freshly built engine the masters, moments and step of ``state`` (:func:`read_state`'s).

    The engine was built from a model holding the same fp32 weights (:func:`load_weights`), so its
    bf16 or partitioned copies are already right, and so are fp32 masters copied from fp32 weights;
    a bf16 engine made its masters from the bf16 copies, so they are written. Torch's AdamW creates
    its moments and step count at its first step: they are created here as it would, holding the
    saved values."""
    import torch

    inner = inner_optimizer(engine)
    named = dict(engine.module.named_parameters())
    step = state["step"]
    masters = _masters(engine)
    if masters is not None:  # torch's own load_state_dict, by the tensors AdamW updates
        by_master = {}
        for name, entry in state["params"].items():
            master = masters[id(named[name])]
            master.data.copy_(entry["fp32"])
            by_master[id(master)] = entry
        if step > 0:
            updated = [p for group in inner.param_groups for p in group["params"]]
            created = {  # copies: AdamW updates its moments in place
                i: {"step": torch.tensor(float(step)), **{k: by_master[id(p)][k].clone() for k in MOMENTS}}
                for i, p in enumerate(updated)
            }
            inner.load_state_dict({"state": created, "param_groups": inner.state_dict()["param_groups"]})
        return
    if step > 0:
        # Adam's state per flat partition, as AdamW's first step makes it (the step on the partition's
        # device where the update is fused or capturable, as torch's load_state_dict puts it)
        on_device = inner.defaults.get("fused") or inner.defaults.get("capturable")
        for flat in _flat_partitions(engine.optimizer):
            count = torch.tensor(float(step))
            inner.state[flat] = {"step": count.to(flat.device) if on_device else count}
            inner.state[flat].update({key: torch.zeros_like(flat) for key in MOMENTS})
        _link_fragments(engine)
    for name, entry in state["params"].items():
        param = named[name]
        for key in (None, *MOMENTS) if step > 0 else (None,):
            _set_full(param, entry["fp32" if key is None else key].to(param.device), key)


def _flat_partitions(optimizer) -> list:
    """The flat fp32 partitions DeepSpeed's ZeRO 3 or ZeRO 1-2 optimizer steps."""
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        if hasattr(optimizer, attr):
            return list(getattr(optimizer, attr))
    raise RuntimeError(f"{type(optimizer).__name__} keeps its fp32 partitions where ds-sft does not look")


def load_saved_kind(model, ds_config: dict, weight_decay: float, tag_dir, kind: dict, universal_in):
    """Load ``tag_dir`` into a throwaway engine of the checkpoint's own ``kind`` ({"zero_stage",
    "precision"}) built on a copy of ``model``, converted to the universal format in ``universal_in``
    first when not None (:func:`checkpoint_load.load`); returns (state, trainer state, restored RNG state)."""
    import copy

    from ds_sft.train import checkpoint_load, checkpointing
    from ds_sft.train.engine import build_engine

    config = engine_config(ds_config, kind["zero_stage"], kind["precision"])
    if universal_in is not None:
        config = checkpoint_load.with_universal_load(config)
    engine, _ = build_engine(copy.deepcopy(model), config, weight_decay)
    trainer = checkpoint_load.load(engine, tag_dir, universal_in)
    rng = checkpointing.rng_state()  # restored by load; set again once the new engine exists
    state = read_state(engine)
    engine.destroy()
    return state, trainer, rng


def _set_full(param, value, key) -> None:
    """One parameter's full fp32 master (``key`` None) or moment into the engine's partitions."""
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    if hasattr(param, "ds_id"):  # ZeRO 3: this rank's partition, padded at the end as ZeRO pads it
        import torch.nn.functional as F

        size = param.ds_tensor.numel()
        start = size * param._z3_optimizer._get_param_partition_rank(param)
        flat = F.pad(value.flatten(), (0, max(0, start + size - value.numel())))
        local = flat.narrow(0, start, size)
        if key is None:
            safe_set_local_fp32_param(param, local)
        else:
            safe_set_local_optimizer_state(param, local, key)
    elif key is None:
        safe_set_full_fp32_param(param, value)
    else:
        safe_set_full_optimizer_state(param, value, key)
