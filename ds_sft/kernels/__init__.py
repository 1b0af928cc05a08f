"""Fused kernels for the training hot path, each with its PyTorch reference.

    reference.py                   plain PyTorch: the definition of every op here, for tests and "eager"
    rmsnorm.py                     RMSNorm in Triton
    cross_entropy_kernel.py        cross-entropy in Triton: online logsumexp, gradient in the forward
    fused_linear_cross_entropy.py  LM head + cross-entropy in chunks, never the full logits
    _launch.py                     block sizes, warps and grids the Triton launchers share

Public API::

    rms_norm(x, weight, eps, backend="auto")
    cross_entropy(logits, labels, ignore_index=-100, reduction="sum", backend="auto")
    linear_cross_entropy(hidden, weight, labels, ignore_index=-100, chunk_size=None, backend="auto")

The model calls ``rms_norm`` and ``linear_cross_entropy`` (the summed loss); ``cross_entropy``, whose
Triton kernel the chunked loss runs on each chunk, is benchmarked and tested on its own.

``backend``:

- ``"triton"``: the Triton kernels (``rmsnorm.py``, ``cross_entropy_kernel.py``, and the chunked
  ``fused_linear_cross_entropy.py`` on top of the CE kernel). CUDA, or CPU through the interpreter
  when ``TRITON_INTERPRET=1`` was set before the first kernel was imported (tests only: ~1000x slower).
- ``"torch"``: plain PyTorch. ``linear_cross_entropy`` runs the same chunked algorithm as Triton
  (the memory win on CPU); RMSNorm and a standalone cross-entropy have nothing to fuse without a
  kernel, so they are the references.
- ``"eager"``: the references in ``reference.py`` (full logits), differentiated by autograd.
- ``"auto"``: ``"triton"`` for CUDA tensors when Triton is installed, ``"torch"`` otherwise.

The CE kernel module is ``cross_entropy_kernel.py``, not ``cross_entropy.py``: importing a submodule
sets it as an attribute of the package, which would shadow the ``cross_entropy`` function below.

Importing this package is cheap and needs no Triton: the kernel modules load on first use.
Losses are fp32; ``reduction="mean"`` divides by the non-ignored count (0 when all are ignored).
Under DeepSpeed ZeRO-3, see ``fused_linear_cross_entropy.py`` for where to call
``linear_cross_entropy`` so the sharded lm_head weight is gathered.
"""

from __future__ import annotations

import importlib.util

import torch

from ds_sft.kernels.fused_linear_cross_entropy import linear_cross_entropy_chunked
from ds_sft.kernels.reference import (
    cross_entropy_reference,
    linear_cross_entropy_reference,
    rms_norm_reference,
)

BACKENDS = ("auto", "triton", "torch", "eager")
# Looked up once, at import: under torch.compile, resolve_backend runs inside the traced forward, and
# torch 2.11's dynamo refuses to trace importlib.util.find_spec (a graph break; an error with fullgraph).
HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = [
    "BACKENDS",
    "cross_entropy",
    "linear_cross_entropy",
    "resolve_backend",
    "rms_norm",
]


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> the concrete backend for ``device``; validates the others."""
    if backend not in BACKENDS:
        raise ValueError(f"kernels backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if backend == "triton" and not HAS_TRITON:
        raise RuntimeError(
            "backend='triton' needs the triton package: pip install 'ds-sft[triton]', or use 'torch'"
        )
    return backend


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """``y = x / sqrt(mean(x^2) + eps) * weight``, statistics in fp32, result in ``x.dtype``."""
    if resolve_backend(backend, x.device) == "triton":
        from ds_sft.kernels.rmsnorm import triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "sum",
    backend: str = "auto",
) -> torch.Tensor:
    """Token cross-entropy of ``logits [..., V]`` vs ``labels [...]`` (definition: ``reference.py``)."""
    if resolve_backend(backend, logits.device) == "triton":
        from ds_sft.kernels.cross_entropy_kernel import triton_cross_entropy

        return triton_cross_entropy(logits, labels, ignore_index, reduction)
    return cross_entropy_reference(logits, labels, ignore_index, reduction)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden [..., H] @ weight[V, H].T`` against ``labels [...]``, fp32.

    ``"triton"`` and ``"torch"`` compute logits only for the trained tokens (label != ``ignore_index``),
    never more than ``chunk_size`` of them at a time (default: as many whole 32-token blocks as fit
    128 MB of logits, fp32 in ``"torch"``'s copy, the matmul's dtype in ``"triton"``'s in-place pass:
    ``fused_linear_cross_entropy.default_chunk_size``).
    """
    resolved = resolve_backend(backend, hidden.device)
    if resolved == "eager":
        return linear_cross_entropy_reference(hidden, weight, labels, ignore_index)
    chunked = linear_cross_entropy_chunked
    if torch.compiler.is_compiling():
        # The chunk loop keeps only the trained rows, a data-dependent shape: under torch.compile it
        # runs eagerly after the model's graph instead of breaking the graph half-way through. Wrapped
        # here, not at import: disable imports dynamo and with it Triton, which importing the kernels
        # must not (test_dispatch); the call to disable costs one more graph break under compile.
        chunked = torch.compiler.disable(chunked, reason="the LM-head loss selects the trained rows")
    return chunked(hidden, weight, labels, ignore_index, chunk_size, resolved)
