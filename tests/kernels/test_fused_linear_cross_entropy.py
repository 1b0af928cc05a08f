"""The chunked linear cross-entropy (Triton CE kernel per chunk, and its plain-PyTorch twin)
against the eager reference that materialises the full logits: the summed loss, ``grad_hidden`` and
``grad_weight``, chunk sizes that do not divide the token count, ignored tokens, bf16; the PyTorch
path at full model size and at Qwen's and Llama 3's vocabularies with the default (vocabulary-sized)
chunks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from ds_sft import kernels
from ds_sft.kernels.fused_linear_cross_entropy import default_chunk_size
from ds_sft.kernels.reference import linear_cross_entropy_reference

IGNORE = -100


def _inputs(tokens, hidden, vocab, device, dtype=torch.float32, seed=0, ignored=0.2):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) / hidden**0.5 * 3
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[torch.rand(tokens, generator=gen) < ignored] = IGNORE
    return h.to(device, dtype), w.to(device, dtype), labels.to(device)


def _run(fn, hidden, weight, labels, upstream, **options):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, labels, **options)
    loss.backward(upstream)
    return loss, h.grad, w.grad


def _check(hidden, weight, labels, backend, chunk_size=16, tol=None):
    tol = tol or {"atol": 1e-5, "rtol": 1e-4}
    upstream = torch.randn((), generator=torch.Generator().manual_seed(1)).to(hidden.device)
    loss, gh, gw = _run(
        kernels.linear_cross_entropy, hidden, weight, labels, upstream, chunk_size=chunk_size, backend=backend
    )
    # The reference in fp32 whatever the inputs: the chunked loss accumulates in fp32 too.
    loss_ref, gh_ref, gw_ref = _run(
        linear_cross_entropy_reference, hidden.float(), weight.float(), labels, upstream
    )
    assert loss.dtype == torch.float32 and loss.shape == loss_ref.shape
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    torch.testing.assert_close(loss, loss_ref, **tol)
    torch.testing.assert_close(gh.float(), gh_ref, **tol)
    torch.testing.assert_close(gw.float(), gw_ref, **tol)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 64), (5, 576), (123, 64)])
def test_matches_reference(tokens, hidden, backend, device):
    h, w, labels = _inputs(tokens, hidden, 1000, device, seed=tokens)
    _check(h, w, labels, backend, chunk_size=16)


def test_triton_full_vocabulary(device):
    h, w, labels = _inputs(4, 768, 50304, device, ignored=0.0)
    _check(h, w, labels, "triton", chunk_size=3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_ignored_gives_zero_loss_and_gradients(backend, device):
    h, w, labels = _inputs(7, 64, 1000, device)
    labels[:] = IGNORE
    loss, gh, gw = _run(
        kernels.linear_cross_entropy, h, w, labels, torch.ones((), device=device), backend=backend
    )
    assert loss == 0 and torch.all(gh == 0) and torch.all(gw == 0)


def test_triton_bf16(device):
    h, w, labels = _inputs(37, 64, 1000, device, dtype=torch.bfloat16, seed=5)
    _check(h, w, labels, "triton", chunk_size=16, tol={"atol": 5e-2, "rtol": 2e-2})


def test_leading_dimensions_and_hidden_only_gradient(device):
    """[B, T, H] hidden with [B, T] labels; a frozen weight gets no gradient computed."""
    h, w, labels = _inputs(12, 64, 1000, device, seed=6)
    hb, lb = h.view(3, 4, 64).requires_grad_(), labels.view(3, 4)
    loss = kernels.linear_cross_entropy(hb, w, lb, chunk_size=5, backend="torch")
    loss.backward()
    h_ref = h.detach().clone().view(3, 4, 64).requires_grad_()
    linear_cross_entropy_reference(h_ref, w, lb).backward()
    assert w.grad is None and hb.grad.shape == (3, 4, 64)
    torch.testing.assert_close(hb.grad, h_ref.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.slow  # ~30 s on 2 busy cores, most of it in the eager reference
def test_torch_path_full_size_fp32():
    """The CPU path at the model's size: 2,048 tokens, hidden 768, vocabulary 50,304; the last of the
    1,000-token chunks is partial."""
    h, w, labels = _inputs(2048, 768, 50304, "cpu", seed=8)
    _check(h, w, labels, "torch", chunk_size=1000, tol={"atol": 1e-4, "rtol": 1e-4})


@pytest.mark.slow  # ~25 s
def test_torch_path_full_size_bf16():
    h, w, labels = _inputs(2048, 768, 50304, "cpu", dtype=torch.bfloat16, seed=9)
    _check(h, w, labels, "torch", chunk_size=1024, tol={"atol": 2e-2, "rtol": 2e-2})


@pytest.mark.parametrize(("vocab", "dtype"), [(151936, torch.float32), (128256, torch.float32),
                                              (151936, torch.bfloat16)])  # fmt: skip
def test_torch_path_large_vocabularies_default_chunks(vocab, dtype):
    """Qwen's and Llama 3's vocabularies with the default chunking (sized by the vocabulary), forward and
    backward: 600 tokens make three chunks at these sizes, the last one partial."""
    chunk = default_chunk_size(vocab)
    assert 600 // chunk >= 2 and 600 % chunk, "600 tokens must make several chunks, the last one partial"
    h, w, labels = _inputs(600, 64, vocab, "cpu", dtype=dtype, seed=vocab % 97)
    # sums over 10^5 logits in another order: the full-size tests' tolerances
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}
    _check(h, w, labels, "torch", chunk_size=None, tol=tol)


def _bf16_ulps(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``|value - reference|`` in units of the last place of each reference element in bf16."""
    finfo = torch.finfo(torch.bfloat16)
    magnitude = reference.float().abs().clamp(min=finfo.smallest_normal)
    ulp = finfo.eps * torch.exp2(torch.floor(torch.log2(magnitude)))
    return (value.float() - reference.float()).abs() / ulp


@pytest.mark.parametrize("chunks", [1, 4, 16, 64, 256])
def test_bf16_weight_gradient_stays_the_reference_s_however_many_chunks(chunks):
    """The eager loss rounds ``grad_W = dlogits.T @ h`` to bf16 once; the chunked loss rounded each
    chunk's product to bf16 before its fp32 sum, one rounding error more per chunk: an element whose
    chunk products cancel ended 205 bf16 ulps off the reference's in 4 chunks, 2,467 in 256. Summed in
    fp32 and rounded once, every element is within one ulp of the reference's at every chunk count."""
    h, w, labels = _inputs(2048, 32, 64, "cpu", dtype=torch.bfloat16, seed=14, ignored=0.0)
    gw = _run(kernels.linear_cross_entropy, h, w, labels, None, chunk_size=2048 // chunks, backend="torch")[2]
    gw_ref = _run(linear_cross_entropy_reference, h, w, labels, None)[2]
    assert gw.dtype == torch.bfloat16
    assert _bf16_ulps(gw, gw_ref).max() <= 1


def test_weight_gradient_adds_each_chunk_s_product_in_fp32(device):
    """``_add_weight_gradient`` over 64 chunks of bf16 ``dlogits`` and ``h`` (on CUDA cuBLAS's fp32
    output, elsewhere operands widened to fp32), in vocabulary blocks, the last one partial: the sum is
    within fp32's error bound for 16-term products summed 64 times, where a product rounded to bf16
    misses by up to 2^-9 of itself."""
    import ds_sft.kernels.fused_linear_cross_entropy as fused

    chunks, chunk, vocab, hidden = 64, 16, 300, 48
    gen = torch.Generator().manual_seed(15)
    dlogits = torch.randn(chunks * chunk, vocab, generator=gen).to(device, torch.bfloat16)
    h = torch.randn(chunks * chunk, hidden, generator=gen).to(device, torch.bfloat16)
    grad_weight = torch.zeros(vocab, hidden, device=device)
    for start in range(0, chunks * chunk, chunk):
        rows = slice(start, start + chunk)
        fused._add_weight_gradient(grad_weight, dlogits[rows], h[rows], block_rows=128)
    exact = dlogits.double().t() @ h.double()
    bound = (chunk + chunks) * 2.0**-24 * (dlogits.double().abs().t() @ h.double().abs())
    assert bool(((grad_weight.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_under_autocast(backend, device):
    """fp32 parameters under bf16 autocast: the chunk matmuls run in bf16 like the eager logits do,
    and the gradients come back in fp32."""
    h, w, labels = _inputs(37, 64, 1000, device, seed=10)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss, gh, gw = _run(kernels.linear_cross_entropy, h, w, labels, None, chunk_size=16, backend=backend)
        loss_ref, gh_ref, gw_ref = _run(linear_cross_entropy_reference, h, w, labels, None)
    assert gh.dtype == gw.dtype == torch.float32
    for ours, ref in ((loss, loss_ref), (gh, gh_ref), (gw, gw_ref)):
        torch.testing.assert_close(ours, ref, atol=5e-2, rtol=2e-2)


def test_second_backward_is_refused():
    """The gradients are scaled in place and handed over: a retained graph must not reuse them."""
    h, w, labels = _inputs(7, 64, 1000, "cpu")
    loss = kernels.linear_cross_entropy(h.requires_grad_(), w, labels, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


def test_head_runs_only_on_trained_tokens(monkeypatch):
    """Ignored tokens never reach the LM head: the per-chunk loss sees 40 rows of logits when 40 of
    100 tokens are trained, and the result is still the reference's."""
    import ds_sft.kernels.fused_linear_cross_entropy as flce

    rows_seen, loss_and_grad = [], flce.cross_entropy_loss_and_grad_torch

    def counting(logits, labels, **options):
        rows_seen.append(logits.shape[0])
        return loss_and_grad(logits, labels, **options)

    monkeypatch.setattr(flce, "cross_entropy_loss_and_grad_torch", counting)
    h, w, labels = _inputs(100, 64, 1000, "cpu", ignored=0.0)
    labels[torch.randperm(100, generator=torch.Generator().manual_seed(0))[:60]] = IGNORE
    _check(h, w, labels, "torch", chunk_size=16)
    assert sum(rows_seen) == 40


def _spy_gradient_work(monkeypatch):
    """Record, per chunk-loop call, whether it computed grad_hidden / grad_weight."""
    import ds_sft.kernels.fused_linear_cross_entropy as fused

    calls, loop = [], fused._chunked_loss_and_grads

    def spy(*args, **kwargs):
        total, grad_hidden, grad_weight = loop(*args, **kwargs)
        calls.append((grad_hidden is not None, grad_weight is not None))
        return total, grad_hidden, grad_weight

    monkeypatch.setattr(fused, "_chunked_loss_and_grads", spy)
    return calls


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_requires_grad"])
def test_no_gradient_work_without_grad(mode, backend, device, monkeypatch):
    """An evaluation forward (no_grad, inference_mode, or inputs that need no gradient) allocates no
    grad_hidden / fp32 grad_weight and keeps nothing for a backward; the loss still equals the
    reference's."""
    h, w, labels = _inputs(37, 64, 1000, device, seed=3)
    calls = _spy_gradient_work(monkeypatch)
    if mode != "no_requires_grad":
        h, w = h.requires_grad_(), w.requires_grad_()
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    with context():
        loss = kernels.linear_cross_entropy(h, w, labels, chunk_size=16, backend=backend)
    assert not loss.requires_grad and loss.grad_fn is None
    assert all(call == (False, False) for call in calls)
    reference = linear_cross_entropy_reference(h.detach(), w.detach(), labels)
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-4)


def test_gradient_work_when_grad_is_wanted(device, monkeypatch):
    """The control of the test above: with grad enabled the forward precomputes both gradients."""
    h, w, labels = _inputs(37, 64, 1000, device, seed=3)
    calls = _spy_gradient_work(monkeypatch)
    loss = kernels.linear_cross_entropy(
        h.requires_grad_(), w.requires_grad_(), labels, chunk_size=16, backend="torch"
    )
    assert loss.requires_grad and calls == [(True, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_chunk_of_logits_alive_at_a_time(dtype, monkeypatch):
    """When a chunk's logits are computed, no earlier chunk's logits are still referenced (fp32 on CPU
    gets a fresh oneDNN product per chunk, bf16 a view of one reused buffer): the peak holds one
    chunk, whatever the path. The result is still the reference's."""
    import weakref

    import ds_sft.kernels.fused_linear_cross_entropy as fused

    vocab, product = 1000, fused._matmul_transposed
    alive_at_each_chunk, earlier = [], []

    def tracking(a, b, out=None):
        result = product(a, b, out)
        if result.shape[-1] == vocab:  # a chunk's logits (not dlogits @ W)
            alive_at_each_chunk.append(sum(ref() is not None for ref in earlier))
            earlier.append(weakref.ref(result))
        return result

    monkeypatch.setattr(fused, "_matmul_transposed", tracking)
    h, w, labels = _inputs(100, 64, vocab, "cpu", dtype=dtype, ignored=0.0, seed=12)
    tol = None if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}
    _check(h, w, labels, "torch", chunk_size=16, tol=tol)
    assert alive_at_each_chunk == [0] * 7


def test_logits_chunks_share_one_buffer_off_onednn():
    """bf16 (and anything not on oneDNN) writes every chunk's logits into one buffer: one allocation,
    not one per chunk; each chunk's values are still ``h_c @ W.T``."""
    import ds_sft.kernels.fused_linear_cross_entropy as fused

    h, w, _ = _inputs(50, 64, 300, "cpu", dtype=torch.bfloat16, seed=13)
    storages, chunks = set(), 0
    for rows, h_c, logits in fused._logits_chunks(h, w, 16):
        torch.testing.assert_close(logits, h[rows] @ w.t())
        assert h_c.data_ptr() == h[rows].data_ptr()
        storages.add(logits.untyped_storage().data_ptr())
        chunks += 1
    assert chunks == 4 and len(storages) == 1


SHAPES = [(0, 64, 300), (1, 1, 1), (37, 64, 1000), (220, 768, 2049)]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize(("rows", "inner", "cols"), SHAPES)
@pytest.mark.parametrize("transposed_b", [False, True])
def test_cpu_fp32_products_run_on_onednn(rows, inner, cols, transposed_b):
    """fp32 products on CPU go through oneDNN's linear (the private op must exist in this torch, or the
    CPU loss loses its speed silently) and are exact to fp32 rounding: odd shapes, no rows, and ``b``
    given as a transposed view (``dlogits @ W`` is ``dlogits @ (W.T).T``); bf16 takes torch's matmul."""
    import ds_sft.kernels.fused_linear_cross_entropy as fused

    gen = torch.Generator().manual_seed(rows + cols)
    a = torch.randn(rows, inner, generator=gen)
    shape = (inner, cols) if transposed_b else (cols, inner)
    b = torch.randn(shape, generator=gen)
    b = b.t() if transposed_b else b
    assert fused._ONEDNN_LINEAR is not None
    assert fused._on_onednn(a, b) and not fused._on_onednn(a.bfloat16(), b.bfloat16())
    result = fused._matmul_transposed(a, b)
    assert result.shape == (rows, cols) and result.dtype == torch.float32
    # fp32's worst-case error bound for a sum of `inner` products, whatever the order (K u |a||b|): a
    # product computed through bf16 or tf32 would break it by orders of magnitude
    bound = inner * 2.0**-24 * a.double().abs().mm(b.double().abs().t())
    assert bool(((result.double() - a.double().mm(b.double().t())).abs() <= bound).all())


@given(vocab=st.integers(min_value=1, max_value=4_000_000), logit_bytes=st.sampled_from([2, 4]))
@example(vocab=50304, logit_bytes=4).via("GPT-2's padded vocabulary in fp32: 640 tokens")
@example(vocab=50304, logit_bytes=2).via("and in bf16: 1,312")
def test_default_chunks_are_the_most_whole_row_blocks_that_fit(vocab, logit_bytes):
    """A whole number of row blocks, as many as fit the logits budget (the minimum where none fit)."""
    import ds_sft.kernels.fused_linear_cross_entropy as fused

    chunk, multiple = default_chunk_size(vocab, logit_bytes), fused.CHUNK_TOKEN_MULTIPLE
    assert chunk % multiple == 0 and chunk >= fused.MIN_CHUNK_TOKENS
    assert chunk == fused.MIN_CHUNK_TOKENS or logit_bytes * vocab * chunk <= fused.CHUNK_LOGITS_BYTES
    assert logit_bytes * vocab * (chunk + multiple) > fused.CHUNK_LOGITS_BYTES
    if vocab == 50304:
        assert chunk == {4: 640, 2: 1312}[logit_bytes]


@pytest.mark.parametrize(
    ("backend", "dtype", "autocast", "logit_bytes"),
    [
        ("triton", torch.bfloat16, False, 2),  # the kernel works in place on bf16 logits
        ("triton", torch.float32, True, 2),  # autocast makes them bf16
        ("triton", torch.float32, False, 4),
        ("torch", torch.bfloat16, False, 4),  # the PyTorch twin computes in an fp32 copy
        ("torch", torch.float32, True, 4),
    ],
)
def test_the_default_chunk_is_sized_in_the_bytes_its_loss_works_in(
    backend, dtype, autocast, logit_bytes, monkeypatch
):
    """linear_cross_entropy_chunked hands the autograd function the default chunk of the bytes per
    logit its backend's loss holds: twice the tokens for the Triton kernel on bf16 logits."""
    import ds_sft.kernels.fused_linear_cross_entropy as fused

    vocab = 50304
    hidden, weight = torch.zeros(4, 8, dtype=dtype), torch.zeros(vocab, 8, dtype=dtype)
    chunks = []
    monkeypatch.setattr(fused.LinearCrossEntropyFunction, "apply", lambda *args: chunks.append(args[4]))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert fused.bytes_per_logit(hidden, weight, backend) == logit_bytes
        fused.linear_cross_entropy_chunked(
            hidden, weight, torch.zeros(4, dtype=torch.long), -100, None, backend
        )
    assert chunks == [default_chunk_size(vocab, logit_bytes)]
