"""The Triton cross-entropy kernel against ``kernels.reference.cross_entropy_reference`` (which is
``F.cross_entropy``), run through the Triton interpreter on CPU: loss and gradient for every
reduction, ignored rows, a full-size vocabulary, bf16 logits.
"""

from __future__ import annotations

import pytest
import torch

from ds_sft.kernels.cross_entropy_kernel import triton_cross_entropy
from ds_sft.kernels.reference import cross_entropy_reference

IGNORE = -100


def _inputs(rows, vocab, device, dtype=torch.float32, seed=0, ignored=0.2):
    """Logits with a realistic spread, labels with a share of ignored rows."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(rows, vocab, generator=gen)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[torch.rand(rows, generator=gen) < ignored] = IGNORE
    return logits.to(device=device, dtype=dtype), labels.to(device)


def _loss_and_grad(fn, logits, labels, upstream, **options):
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, labels, **options)
    loss.backward(upstream)
    return loss, leaf.grad


def _kernel(logits, labels, ignore_index=IGNORE, reduction="sum"):
    return triton_cross_entropy(logits, labels, ignore_index, reduction)


def _check(logits, labels, reduction, atol=1e-6, **options):
    upstream = torch.randn((), generator=torch.Generator().manual_seed(1)).to(logits.device)  # not 1
    loss, grad = _loss_and_grad(_kernel, logits, labels, upstream, reduction=reduction, **options)
    loss_ref, grad_ref = _loss_and_grad(
        cross_entropy_reference, logits, labels, upstream, reduction=reduction, **options
    )
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), grad_ref.float(), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("rows", [1, 5, 123])
def test_matches_reference(rows, reduction, device):
    logits, labels = _inputs(rows, 1000, device, seed=rows)
    _check(logits, labels, reduction)


def test_full_vocabulary(device):
    """V = 50,304 spans two 32k blocks, so the online logsumexp rescales across blocks."""
    logits, labels = _inputs(3, 50304, device, seed=3, ignored=0.0)
    logits[0, 40000] = 30.0  # the row max sits in the second block
    _check(logits, labels, "sum")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_ignored_rows_give_zero_loss_and_gradient(reduction, device):
    logits, labels = _inputs(5, 1000, device)
    labels[:] = IGNORE
    loss, grad = _loss_and_grad(_kernel, logits, labels, torch.ones((), device=device), reduction=reduction)
    assert loss == 0
    assert torch.all(grad == 0)


def test_custom_ignore_index(device):
    logits, labels = _inputs(5, 1000, device, ignored=0.0)
    labels[1] = 7  # the ignore index below: a real class id in this vocabulary
    _check(logits, labels, "mean", ignore_index=7)


def test_bf16_logits(device):
    """bf16 in, fp32 statistics inside; the gradient comes back in bf16 (one rounding)."""
    logits, labels = _inputs(5, 1000, device, dtype=torch.bfloat16, seed=11)
    _check(logits, labels, "sum", atol=1e-2)


def test_leading_dimensions(device):
    logits, labels = _inputs(6, 1000, device, seed=5)
    _check(logits.view(2, 3, 1000), labels.view(2, 3), "mean")


@pytest.mark.parametrize("layout", ["transposed logits", "strided labels"])
def test_a_layout_the_kernel_cannot_walk_is_refused(layout, device):
    """The launcher's precondition was an ``assert``, gone under ``python -O``, when the kernel would read
    the wrong elements (it walks a row by its first stride, labels as a flat array)."""
    from ds_sft.kernels.cross_entropy_kernel import cross_entropy_loss_and_grad

    logits, labels = _inputs(8, 8, device)
    if layout == "transposed logits":
        logits = logits.t()
    else:
        labels = torch.stack([labels, labels], dim=1)[:, 0]
    with pytest.raises(ValueError, match="contiguous logits and contiguous labels"):
        cross_entropy_loss_and_grad(logits, labels)
