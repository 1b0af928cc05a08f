"""Will a micro-batch fit? A lower bound on its activation memory, checked before anything is allocated.

A prepared ``--seq_len`` of a million tokens, or a micro-batch of thousands of rows, is a valid number
that no machine can train: the step would be killed by the OOM killer (CPU) or die in a CUDA
out-of-memory traceback, minutes after start. Backward needs, per token and per layer, at least what
autograd saves of a block: the residual stream at both norms, the attention output, q, k and v, and
the SwiGLU gate, up and product; with activation checkpointing only the block inputs stay, plus one
block recomputed at a time. That lower bound (weights, gradients, optimizer state, logits and
workspace come on top) is compared with the memory available now; above it, the run stops in one line.
"""

from __future__ import annotations

from pathlib import Path

from ds_sft.errors import UserError


def activation_bytes(config, seq_len: int, micro_batch: int, bf16: bool, checkpointing: bool) -> int:
    """Lower bound on the bytes one micro-batch's saved activations take (see the module docstring)."""
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    per_layer = 2 * config.d_model + 2 * q + 2 * kv + 3 * config.ffn_hidden  # values per token
    kept = config.n_layers * config.d_model + per_layer if checkpointing else config.n_layers * per_layer
    return micro_batch * seq_len * kept * (2 if bf16 else 4)


def available_bytes() -> tuple[int | None, str]:
    """Free memory of the device this rank trains on: the GPU's, else the machine's MemAvailable.

    The GPU is the current device, which ``init_distributed`` set: not ``LOCAL_RANK`` itself, which
    names no device where each rank sees only its own GPU (Slurm's ``--gpus-per-task``)."""
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        return torch.cuda.mem_get_info(device)[0], f"free on cuda:{device}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available on this machine"
    except OSError:
        pass
    return None, "unknown"


def check_fits(config, seq_len: int, micro_batch: int, bf16: bool, checkpointing: bool) -> None:
    """One UserError line when a micro-batch cannot fit, before the engine allocates anything."""
    need = activation_bytes(config, seq_len, micro_batch, bf16, checkpointing)
    free, where = available_bytes()
    if free is not None and need > free:
        hint = "" if checkpointing else ", --activation_checkpointing"
        raise UserError(
            f"a micro-batch of {micro_batch} x {seq_len:,} tokens needs at least {need / 2**30:,.1f} GiB of "
            f"activations ({config.n_layers} layers, d_model {config.d_model}), {free / 2**30:,.1f} GiB "
            f"is {where}: pass a smaller --micro_batch_size{hint}, or prepare with a smaller --seq_len"
        )
