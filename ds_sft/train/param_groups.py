"""Which parameters AdamW decays, and the table that shows it.

AdamW's weight decay pulls weights towards zero. That is a useful prior for the projection matrices
(q/k/v/o, gate/up/down), and harmful for RMSNorm gains (their neutral value is 1, not 0; Qwen3's
per-head ``q_norm``/``k_norm`` too), biases (Qwen2's q/k/v: an offset, not a weight to keep small)
and token embeddings (rare tokens would shrink between their few updates); with tied weights the
lm_head *is* the embedding. So two groups: decay on projection weights, 0.0 on everything else.
Buffers such as a RoPE cache are not parameters at all.
"""

from __future__ import annotations

from ds_sft.model.llama import PROJECTIONS


def is_decayed(name: str) -> bool:
    """True for the weight matrix of an attention or MLP projection (``layers.3.attn.q_proj.weight``)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in PROJECTIONS


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
