"""Launch settings shared by the Triton kernels: block sizes, warps, grid sizes, and the launch itself."""

from __future__ import annotations

import contextlib

import torch
import triton

# Largest block one program holds in registers; RMSNorm needs its whole row in one block.
MAX_BLOCK = 65536
# Cross-entropy loops over the vocabulary in blocks of at most this many logits.
MAX_VOCAB_BLOCK = 32768


def num_warps_for(block: int) -> int:
    """Enough warps to keep a block's loads in flight (more warps for wider rows)."""
    return 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32


def row_block(n_cols: int) -> int:
    """The power-of-two block covering a whole row of ``n_cols``."""
    block = triton.next_power_of_2(n_cols)
    if block > MAX_BLOCK:
        raise ValueError(f"row size {n_cols} exceeds the fused kernels' limit of {MAX_BLOCK}")
    return block


def reduction_programs(n_rows: int, device: torch.device) -> int:
    """Programs for a row-partitioned reduction: a few per SM on CUDA, enough to keep memory busy
    while the partials stay small (4 x 132 SMs x hidden 768 fp32 = 1.6 MB); 4 under the interpreter.
    A fixed count per device keeps the result bitwise reproducible."""
    slots = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(n_rows, slots))


def check_launchable(kernel, device: torch.device) -> None:
    """Raise a one-line RuntimeError when ``kernel`` cannot launch on ``device``.

    On CPU a Triton kernel runs only through the interpreter, and ``@triton.jit`` decides that when
    the kernel is defined: ``TRITON_INTERPRET=1`` set after the module was imported is too late.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "backend='triton' on CPU needs TRITON_INTERPRET=1 in the environment before the first "
            "triton kernel is imported (tests/conftest.py sets it); use backend='torch' on CPU"
        )


def launch(kernel, grid: tuple[int, ...], device: torch.device, *args, **meta) -> None:
    """Run ``kernel[grid](*args, **meta)`` on ``device``, the GPU that holds its tensors.

    Triton launches on the *current* CUDA device (it asks the driver, not the arguments), and only
    the trainer sets that one: ``ds-sft eval --device cuda:1`` would run the kernels on cuda:0 with
    pointers into cuda:1's memory. Every kernel of this package launches through here.
    """
    check_launchable(kernel, device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **meta)
