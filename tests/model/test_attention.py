"""document_attention against dense-mask scaled_dot_product_attention (what llama.py runs on CPU):
outputs and q/k/v gradients on every non-padding position, eager and under torch.compile, with and
without a sliding window."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_sft.model import attention
from ds_sft.model.attention import document_attention

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def row_documents(lengths: list[int], seq_len: int) -> torch.Tensor:
    """Document ids 0, 1, 2 ... for runs of ``lengths`` tokens, -1 on the rest of the row."""
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((seq_len,), -1)])
    return ids[:seq_len]


def dense_reference(q, k, v, document_ids, window=None):
    position = torch.arange(q.shape[2])
    causal = position[None, :] <= position[:, None]
    if window is not None:
        causal &= position[:, None] - position[None, :] < window
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(causal & same_document)[:, None])


def output_and_grads(attention, q, k, v, document_ids, weights, **kwargs):
    """Output and q/k/v gradients of ``sum(out * weights)`` over the non-padding queries."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, document_ids, **kwargs)
    real = (document_ids >= 0)[:, None, :, None]
    (out * weights * real).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def assert_matches_dense(
    layouts: list[list[int]], seq_len: int, tile: int, dtype=torch.float32, heads=2, window=None
):
    document_ids = torch.stack([row_documents(lengths, seq_len) for lengths in layouts])
    generator = torch.Generator().manual_seed(len(layouts) * 1000 + seq_len)
    shape = (len(layouts), heads, seq_len, 8)
    q, k, v, weights = (torch.randn(shape, generator=generator).to(dtype) for _ in range(4))

    ours = output_and_grads(document_attention, q, k, v, document_ids, weights, tile=tile, window=window)
    reference = output_and_grads(dense_reference, q, k, v, document_ids, weights, window=window)

    assert torch.isfinite(ours[0]).all()  # padding queries too
    real = (document_ids >= 0)[:, None, :, None]
    tol = TOLERANCE[dtype]
    for name, got, want in zip(("out", "q.grad", "k.grad", "v.grad"), ours, reference, strict=True):
        if name == "out":
            got, want = got * real, want * real  # padding outputs are unspecified
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, msg=name)


LAYOUTS = {  # seq_len, tile, rows of document lengths
    "a document longer than several tiles": (96, 16, [[5, 70, 3, 18]]),
    "boundaries exactly on tile boundaries": (64, 16, [[16, 32, 16]]),
    "boundaries one off the tile boundaries": (64, 16, [[15, 17, 31, 1]]),
    "seq_len not a multiple of the tile": (50, 16, [[9, 30, 11]]),
    "trailing padding over whole tiles": (80, 16, [[20, 7]]),
    "a single document": (64, 16, [[64]]),
    "a single document, padded": (64, 16, [[23]]),
    "one-token documents": (32, 8, [[1] * 20]),
    "rows of different layouts": (64, 16, [[64], [3, 61], [16, 16, 16, 16], [40], [7, 9, 30, 18]]),
    "the default tile, one 150-token document": (200, 64, [[10, 150, 40], [70, 60]]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(LAYOUTS))
def test_matches_dense_mask(case, dtype):
    seq_len, tile, layouts = LAYOUTS[case]
    assert_matches_dense(layouts, seq_len, tile, dtype)


@settings(max_examples=25, deadline=None)
@given(
    tile=st.sampled_from([4, 8, 16]),
    seq_len=st.integers(1, 70),
    rows=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=8), min_size=1, max_size=3),
)
def test_random_layouts_match_dense_mask(tile, seq_len, rows):
    assert_matches_dense(rows, seq_len, tile)


@settings(max_examples=40, deadline=None)
@given(
    tile=st.sampled_from([4, 8, 16]),
    window=st.integers(1, 45),
    seq_len=st.integers(1, 70),
    rows=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=8), min_size=1, max_size=3),
)
def test_sliding_windows_match_dense_mask(tile, window, seq_len, rows):
    """Windows shorter, equal and longer than tiles and documents: same-document, causal, in-window."""
    assert_matches_dense(rows, seq_len, tile, window=window)


@pytest.mark.parametrize("window", [1, 16, 17, 40])
def test_sliding_windows_in_bfloat16(window):
    assert_matches_dense([[5, 70, 3, 18], [96]], 96, 16, torch.bfloat16, window=window)


@pytest.mark.parametrize("window", [1, 5, 16, 33])
def test_sliding_window_skips_the_tiles_before_it(window, monkeypatch):
    """A query tile reads at most the key tiles that its window reaches: ceil((window - 1) / tile) + 1."""
    spans = []
    apply = attention._MaskedAttention.apply

    def counting(q, k, v, blocked):
        spans.append(k.shape[2])
        return apply(q, k, v, blocked)

    monkeypatch.setattr(attention._MaskedAttention, "apply", counting)
    q = torch.randn(1, 2, 128, 8)
    document_attention(q, q, q, torch.zeros(1, 128, dtype=torch.long), tile=16, window=window)
    assert max(spans) == 16 * (-(-(window - 1) // 16) + 1)


def test_tiles_of_padding_output_zeros_and_all_padding_is_finite():
    q = k = v = torch.randn(2, 2, 48, 8)
    documents = torch.stack([row_documents([10], 48), row_documents([], 48)])
    out = document_attention(q, k, v, documents, tile=16)
    assert (out[0, :, 16:] == 0).all() and (out[1] == 0).all()
    assert (document_attention(q[1:], k[1:], v[1:], documents[1:], tile=16) == 0).all()


def test_rejects_mismatched_document_ids():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="document_ids"):
        document_attention(q, q, q, torch.zeros(1, 15, dtype=torch.long))


def test_compiled_caller_equals_eager():
    """Under torch.compile the data-dependent bucketing runs eagerly behind a graph break."""
    torch.manual_seed(0)
    projection = torch.nn.Linear(8, 8)
    document_ids = torch.stack([row_documents([5, 30, 12], 48), row_documents([48], 48)])

    def layer(x):  # [B, H, T, D] -> [B, H, T, D], attention between traced ops
        q = projection(x)
        return projection(document_attention(q, x, x.sin(), document_ids, tile=16))

    x = torch.randn(2, 2, 48, 8)
    # aot_eager traces like the default backend (dynamo + AOTAutograd around the graph break) without
    # inductor's compile time; what runs behind the break is the same eager function either way
    compiled = torch.compile(layer, fullgraph=False, backend="aot_eager")
    outputs = []
    for fn in (layer, compiled):
        x_grad = x.clone().requires_grad_()
        out = fn(x_grad)
        out.sum().backward()
        outputs.append((out.detach(), x_grad.grad))
    torch.testing.assert_close(outputs[0], outputs[1])
