"""The block's elementwise chains, fused by ``torch.compile`` where the model trains on a GPU.

:class:`FusedOnCuda` wraps :mod:`ds_sft.model.llama`'s ``rope_queries_and_keys`` and ``swiglu``.
Eager, rotary embeddings are a chain of small kernels over whole activations: ``apply_rope`` upcasts
``[B, H, T, D]`` to fp32, multiplies, subtracts, adds, concatenates and rounds back, nine kernels per
tensor forward and about twice that backward, each one a pass through memory and a launch from the
host. On an H200 the 112m step's busiest kernels were small fp32 elementwise ones, 195 calls and 4.9 of
the 49 ms of GPU time per step (BENCHMARKS.md): as many as RoPE's fp32 multiplies (192); and the step
waits on the host's launches. SwiGLU's ``silu(gate) * up`` is two passes forward and three backward
over the widest activation of the block. Compiled, inductor fuses each chain into one kernel per
direction (two for RoPE's pair at most); autograd sees one node.

Where: CUDA tensors while gradients are recorded (the training forward, and activation checkpointing's
recompute). Elsewhere the eager definitions run: CPU (where inductor's C++ compile would cost more
than it saves in a test or a short run), evaluation and generation (whose changing batch and decode
shapes would each compile again, for little work), and inside a ``--compile``-d model, which fuses
them with everything else. The arithmetic is the eager one (RoPE in fp32, rounded once into the
input's dtype); a fused kernel may round an intermediate differently (an FMA, SiLU kept in fp32), so
results agree to rounding, not bit for bit. Each function is compiled once per process, on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


class FusedOnCuda:
    """A function that runs through its ``torch.compile`` (made on first use, :attr:`compiled`) for
    CUDA tensors under autograd, and as itself everywhere else. The first argument decides."""

    def __init__(self, eager: Callable) -> None:
        self.eager = eager
        functools.update_wrapper(self, eager)

    @functools.cached_property
    def compiled(self) -> Callable:
        return torch.compile(self.eager)

    def __call__(self, first: torch.Tensor, *rest):
        if first.is_cuda and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self.compiled(first, *rest)
        return self.eager(first, *rest)
