"""Every op gives the reference's values and gradients whatever the memory layout of its tensors.

A Triton kernel reads ``PTR + row * stride + cols``: it assumes the last dimension of each tensor it
indexes is contiguous, so every wrapper must hand it contiguous tensors, the ones autograd saves for
the backward included. A strided tensor that slips through is read at the wrong addresses: no error,
wrong numbers. Here each op runs with each of its tensors (inputs and upstream gradients) given in
turn, and then all at once, as a view whose last dimension has stride 2, against the eager reference
on the same values.
"""

from __future__ import annotations

import pytest
import torch

from ds_sft import kernels


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, in a view whose last dimension steps over every other element of a buffer (a
    scalar, which has no layout, as it is)."""
    if not t.dim():
        return t
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    return wide[..., ::2].copy_(t)


def rms_norm(x, weight, backend):
    return (kernels.rms_norm(x, weight, 1e-6, backend=backend),)


def cross_entropy(logits, labels, backend):
    return (kernels.cross_entropy(logits, labels, backend=backend),)


def linear_cross_entropy(hidden, weight, labels, backend):
    return (kernels.linear_cross_entropy(hidden, weight, labels, chunk_size=4, backend=backend),)


# op -> (its tensors' shapes by argument name; "labels" are class indices, the rest floats), the
# shapes of its outputs (one upstream gradient each; a scalar's takes no layout)
OPS = {
    rms_norm: ({"x": (5, 64), "weight": (64,)}, [(5, 64)]),
    cross_entropy: ({"logits": (6, 300), "labels": (6,)}, [()]),
    linear_cross_entropy: ({"hidden": (6, 32), "weight": (300, 32), "labels": (6,)}, [()]),
}
CASES = [
    (op, where)
    for op, (inputs, outputs) in OPS.items()
    for where in [*inputs, *(f"upstream {i}" for i, shape in enumerate(outputs) if shape), "all"]
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(("op", "where"), CASES, ids=[f"{op.__name__}-{where}" for op, where in CASES])
def test_strided_tensors_give_the_reference_results(op, where, backend, device):
    inputs, outputs = OPS[op]
    gen = torch.Generator().manual_seed(0)
    values = {
        name: torch.randint(0, 300, shape, generator=gen)
        if name == "labels"
        else torch.randn(shape, generator=gen)
        for name, shape in inputs.items()
    }
    if "labels" in values:
        values["labels"][0] = -100  # an ignored row
    upstream = [torch.randn(shape, generator=gen) for shape in outputs]

    def run(backend, layout):
        leaves = {n: v.to(device, copy=True).requires_grad_(n != "labels") for n, v in values.items()}
        args = {n: layout(n, leaf) for n, leaf in leaves.items()}
        results = op(**args, backend=backend)
        grads = [layout(f"upstream {i}", g.to(device)) for i, g in enumerate(upstream)]
        torch.autograd.backward(results, grads)
        return [r.detach() for r in results], {n: leaf.grad for n, leaf in leaves.items() if n != "labels"}

    given = run(backend, lambda name, t: strided(t) if where in (name, "all") else t)
    expected = run("eager", lambda name, t: t)
    for got, want in zip(given[0], expected[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, want in expected[1].items():
        torch.testing.assert_close(given[1][name], want, atol=1e-5, rtol=1e-5, msg=f"gradient of {name}")
