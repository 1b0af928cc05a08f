"""Plain PyTorch references: the definition of every op in this package, differentiated by autograd.

Tests compare each kernel against these functions and the benchmark uses them as its eager
baseline, so there is exactly one definition of what the kernels must compute. They are written
for clarity, not memory: ``linear_cross_entropy_reference`` materialises the full logits.

Conventions shared by the cross-entropies:

- statistics in fp32 whatever the input dtype;
- ``loss_i = lse_i - x_i[y_i]``;
- rows whose label is ``ignore_index`` contribute 0 to the loss and get a zero gradient;
- ``reduction="mean"`` divides by the number of non-ignored rows, and by 1 when there are none, so
  an all-ignored batch gives 0 instead of ``F.cross_entropy``'s NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("sum", "mean")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``y = x / sqrt(mean(x^2) + eps) * weight``, computed in fp32 and rounded once to ``x.dtype``."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def cross_entropy_reference(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "sum"
) -> torch.Tensor:
    """Token cross-entropy of ``logits [..., V]`` against ``labels [...]``, summed or averaged; fp32."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    x = logits.reshape(-1, logits.shape[-1]).float()
    y = labels.reshape(-1)
    total = F.cross_entropy(x, y, ignore_index=ignore_index, reduction="none").sum()
    return total / (y != ignore_index).sum().clamp(min=1) if reduction == "mean" else total


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """``cross_entropy_reference(hidden @ weight.T, labels)``, summed: the eager LM-head loss (full
    logits)."""
    return cross_entropy_reference(hidden @ weight.t(), labels, ignore_index)
