"""Will a micro-batch fit? A lower bound on its activation memory, checked before anything is allocated.

A prepared ``--seq_len`` of a million tokens, or a micro-batch of thousands of rows, is a valid number
that no machine can train: the step would be killed by the OOM killer (CPU) or die in a CUDA
out-of-memory traceback, minutes after start. The bound counts only tensors that backward cannot do
without, whatever kernel computes them:

- per token and layer: the residual stream and the normed input at both norms (the norms' and the
  projections' backward read them), the input of ``o_proj``, and SwiGLU's four ``ffn_hidden`` wide
  tensors (gate and up for their products' backward, silu(gate) for the product's, the product for
  ``down_proj``'s);
- attention, per layer. On CUDA (flex attention) q, k and v, k and v at their own head count. On CPU
  the tiled :func:`~ds_sft.model.attention.document_attention` keeps, of each row's first tile alone
  (every packed row starts with a document; a row shorter than a tile is padded to one), the gathered
  q, k and v at the query head count (k and v are repeated per query head) and the softmax of a
  ``tile x tile`` block per head;
- on top, at the peak of backward: the gradient flowing into the last block and the gradient of its
  SwiGLU product, both alive while every saved tensor still is. (At the end of forward: the final
  norm's input and output instead, when that is more.)

With activation checkpointing only the block inputs stay, plus one block recomputed at a time. Linears
run in fp8 save their inputs in one byte. Weights, gradients, optimizer state, the loss's chunk of
logits and workspace come on top: this is a bound the run cannot beat, compared with the memory
available now; above it, the run stops in one line. tests/train/test_memory.py checks it against what
autograd saves and against the peak resident memory of real steps.
"""

from __future__ import annotations

from ds_sft.errors import UserError
from ds_sft.machine import free_memory


def saved_activation_bytes(
    config, seq_len: int, micro_batch: int, bf16: bool, checkpointing: bool, cuda: bool, fp8: bool = False
) -> int:
    """Lower bound on the bytes autograd saves for backward of one micro-batch (module docstring).

    ``cuda``: the attention path (flex attention on CUDA, tiled document attention on CPU); ``fp8``:
    the projections' inputs are saved in fp8."""
    from ds_sft.model.attention import TILE

    size = 2 if bf16 else 4
    linear_input = 1 if fp8 else size
    d, q, kv, ffn = (
        config.d_model,
        config.n_heads * config.head_dim,
        config.n_kv_heads * config.head_dim,
        config.ffn_hidden,
    )
    per_token = 2 * d * size + (2 * d + q + ffn) * linear_input + 3 * ffn * size  # norms, o_proj, SwiGLU
    layer = micro_batch * seq_len * per_token
    if cuda:
        layer += micro_batch * seq_len * (q + 2 * kv) * size
    else:
        layer += micro_batch * TILE * (3 * q + config.n_heads * TILE) * size  # a short row is padded
    if checkpointing:  # every block's input, and one block recomputed in backward (its input is one of them)
        return micro_batch * seq_len * (config.n_layers - 1) * d * size + layer
    return config.n_layers * layer


def activation_bytes(
    config, seq_len: int, micro_batch: int, bf16: bool, checkpointing: bool, cuda: bool, fp8: bool = False
) -> int:
    """Lower bound on the peak activation memory of one micro-batch: what autograd saves, plus what is
    alive beside it at the peak (module docstring)."""
    size = 2 if bf16 else 4
    beside = max(2 * config.d_model, config.d_model + config.ffn_hidden)
    saved = saved_activation_bytes(config, seq_len, micro_batch, bf16, checkpointing, cuda, fp8)
    return saved + micro_batch * seq_len * beside * size


def available_bytes() -> tuple[int | None, str]:
    """Free memory of the device this rank trains on: the GPU's, else the machine's MemAvailable.

    The GPU is the current device, which ``init_distributed`` set: not ``LOCAL_RANK`` itself, which
    names no device where each rank sees only its own GPU (Slurm's ``--gpus-per-task``)."""
    import torch

    return free_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def check_fits(model, seq_len: int, micro_batch: int, bf16: bool) -> None:
    """One UserError line when a micro-batch of ``model`` cannot fit, before the engine allocates anything."""
    import torch

    from ds_sft.model.fp8 import fp8_linear_names
    from ds_sft.model.llama import PROJECTIONS

    config = model.config
    checkpointing = bool(config.activation_checkpointing)
    fp8 = len(fp8_linear_names(model)) < len(PROJECTIONS) * config.n_layers  # some were swapped
    need = activation_bytes(config, seq_len, micro_batch, bf16, checkpointing, torch.cuda.is_available(), fp8)
    free, where = available_bytes()
    if free is not None and need > free:
        hint = "" if checkpointing else ", --activation_checkpointing"
        raise UserError(
            f"a micro-batch of {micro_batch} x {seq_len:,} tokens needs at least {need / 2**30:,.1f} GiB of "
            f"activations ({config.n_layers} layers, d_model {config.d_model}), {free / 2**30:,.1f} GiB "
            f"is {where}: pass a smaller --micro_batch_size{hint}, or prepare with a smaller --seq_len"
        )
