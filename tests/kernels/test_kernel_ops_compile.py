"""The Triton RMSNorm and cross-entropy under ``torch.compile``: one graph, no break, same numbers.

Dynamo cannot trace a Triton launch from the wrappers (argument checks, the device context, the
interpreter's kernel objects): wrapped in ``torch.autograd.Function``s, every norm broke the graph,
and ``fullgraph=True`` refused the model. As torch custom ops (``ds_sft::...``) with fake
implementations and registered autograd, dynamo records each launcher as one opaque call.

On CPU the kernels run in the Triton interpreter and the graph goes through ``aot_eager`` (dynamo, then
AOTAutograd's forward and backward graphs over the fake implementations: what inductor would be
handed, without a C++ compile on 2 cores); on CUDA (DS_SFT_GPU_TESTS=1) through inductor, the
trainer's ``--compile``.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from ds_sft import kernels


class NormHeadLoss(torch.nn.Module):
    """RMSNorm, a linear head and the mean cross-entropy: both kernels, forward and backward."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.norm_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, x, labels):
        h = kernels.rms_norm(x, self.norm_weight, 1e-6, backend="triton")
        return kernels.cross_entropy(self.head(h), labels, reduction="mean", backend="triton")


def _run(model, x, labels):
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    loss = model(x, labels)
    loss.backward()
    return loss, x.grad, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_compile_into_one_graph_with_eager_s_numbers(dtype, device):
    torch.manual_seed(0)
    model = NormHeadLoss(64, 96).to(device=device, dtype=dtype)
    x = torch.randn(2, 5, 64, device=device, dtype=dtype)
    labels = torch.randint(0, 96, (2, 5), device=device)
    labels[0, 1] = -100
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    eager = _run(model, x, labels)
    # the same kernels; inductor (CUDA) may order the head's bf16 products another way
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for _ in range(2):  # the second call reuses the graph: no recompile
        got = _run(compiled, x, labels)
        assert counter.frame_count == 1
        torch.testing.assert_close(got[0], eager[0], **tol)
        for grad, expected in zip([got[1], *got[2]], [eager[1], *eager[2]], strict=True):
            torch.testing.assert_close(grad, expected, **tol)


def _leaf(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype).to(device).requires_grad_()


def _op_cases(device):
    """Each custom op with arguments of each kind it meets: dtypes, odd widths, both reductions."""
    from ds_sft.kernels.cross_entropy_kernel import cross_entropy_op
    from ds_sft.kernels.rmsnorm import rms_norm_backward, rms_norm_forward

    for dtype in (torch.float32, torch.bfloat16):
        x, w = _leaf(7, 24, dtype=dtype, device=device), _leaf(24, dtype=dtype, device=device)
        y, rstd = rms_norm_forward(x, w, 1e-6)
        yield rms_norm_forward, (x, w, 1e-6)
        yield rms_norm_backward, (torch.randn_like(y), x.detach(), w.detach(), rstd)
        logits = _leaf(6, 37, dtype=dtype, device=device)
        labels = torch.tensor([3, -100, 0, 36, 5, -100], device=device)
        for mean in (False, True):
            yield cross_entropy_op, (logits, labels, -100, mean, True)
            # without its gradient: what the wrapper asks where no backward can follow
            yield cross_entropy_op, (logits.detach(), labels, -100, mean, False)


def test_each_op_s_fake_implementation_and_autograd_agree_with_its_kernel(device):
    """``torch.library.opcheck``: the schema holds (no input mutated or aliased), the fake
    implementation gives the real outputs' shapes, dtypes and strides (what the compiled graph is built
    from), and the registered autograd runs in eager and under AOTAutograd."""
    for op, args in _op_cases(device):
        torch.library.opcheck(op, args)
