"""The DeepSpeed engine and the three things ds-sft decides for it.

1. **Which parameters decay.** AdamW's weight decay pulls weights towards zero. That is a useful
   prior for the projection matrices (q/k/v/o, gate/up/down), and harmful for RMSNorm gains (their
   neutral value is 1, not 0) and token embeddings (rare tokens would shrink between their few
   updates); with tied weights the lm_head *is* the embedding. So two groups: decay on projection
   weights, 0.0 on everything else. Buffers such as a RoPE cache are not parameters at all.
2. **The learning rate at every step.** Linear warmup to the peak, then half a cosine down to
   ``min_lr`` at the last step. A pure function of the step (:func:`lr_at`), written into the
   optimizer's groups before each update, so resuming needs nothing but the step counter.
3. **How gradients are scaled** (see :mod:`ds_sft.train.loop`).

At ZeRO 3 it also tells the engine that the model's own forward reads the LM-head weight
(:func:`register_lm_head`), which ``--compile`` needs.

The process group is :mod:`ds_sft.train.distributed`'s. Everything else (ZeRO partitioning,
accumulation, clipping, the optimizer step, checkpoints) is the engine's job, configured by the JSON.
"""

from __future__ import annotations

import functools
import math

DECAYED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_decayed(name: str) -> bool:
    """True for the weight matrix of an attention or MLP projection (``layers.3.attn.q_proj.weight``)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in DECAYED_PROJECTIONS


def parameter_groups(model, weight_decay: float) -> tuple[list[dict], list[dict]]:
    """AdamW groups for ``model`` and a table describing them (group, decay, tensors, parameters, names).

    ``named_parameters`` lists a tied weight once, under the name it was registered first (the
    embedding), so a tied lm_head lands in the no-decay group with it.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if is_decayed(name) else no_decay).append((name, param))
    groups, table = [], []
    for label, members, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
        if not members:
            continue
        groups.append({"params": [p for _, p in members], "weight_decay": wd})
        table.append(
            {
                "group": label,
                "weight_decay": wd,
                "tensors": len(members),
                "parameters": sum(p.numel() for _, p in members),
                "names": [n for n, _ in members],
            }
        )
    return groups, table


def format_group_table(table: list[dict]) -> str:
    """The group table as aligned text, with a short summary of the member names."""

    def summary(names: list[str]) -> str:
        kinds = sorted({".".join(p for p in n.split(".") if not p.isdigit()) for n in names})
        return ", ".join(kinds)

    lines = [f"{'group':<9} {'wd':>6} {'tensors':>8} {'parameters':>13}  members"]
    for row in table:
        lines.append(
            f"{row['group']:<9} {row['weight_decay']:>6g} {row['tensors']:>8} "
            f"{row['parameters']:>13,}  {summary(row['names'])}"
        )
    lines.append(
        "decay on the q/k/v/o and gate/up/down weights only; an untied lm_head is an output embedding "
        "(a row per token, rare rows would shrink between updates), so it gets none, as wte does"
    )
    return "\n".join(lines)


def lr_at(step: int, peak: float, min_lr: float, warmup_iters: int, max_iters: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warmup: ``peak * (step + 1) / warmup_iters``, so step ``warmup_iters - 1`` reaches the peak and
    step 0 already moves. Then cosine from the peak at ``warmup_iters`` to ``min_lr`` at the last
    step, ``max_iters - 1``.
    """
    if step < warmup_iters:
        return peak * (step + 1) / warmup_iters
    decay_steps = max(1, max_iters - 1 - warmup_iters)
    progress = min(1.0, (step - warmup_iters) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - min_lr)


def set_lr(engine, lr: float) -> None:
    """Write ``lr`` into every optimizer group (ZeRO wrappers expose the inner optimizer's groups)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def enable_activation_checkpointing(model) -> None:
    """Recompute each transformer block in the backward pass instead of storing its activations."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def build_engine(model, ds_config: dict, weight_decay: float):
    """``deepspeed.initialize`` with ds-sft's parameter groups. Returns (engine, group table)."""
    import deepspeed

    groups, table = parameter_groups(model, weight_decay)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    if engine.zero_optimization_stage() == 3:
        register_lm_head(engine.module)
    return engine, table


def register_lm_head(model) -> None:
    """Tell ZeRO 3 that the model's own forward reads the LM-head weight (the embedding when tied).

    ZeRO 3 gathers a parameter around the forward of the module that owns it; the loss reads the
    weight directly, outside ``wte``'s (or ``lm_head``'s) forward. Eager code gets it anyway, fetched
    on access through ZeRO's parameter dict, but under ``torch.compile`` that access is traced as a
    plain read of the empty partition. Registered on the model, the weight is gathered around the
    model's own forward and backward in both modes."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    register_external_parameter(model, model.lm_head_weight)
