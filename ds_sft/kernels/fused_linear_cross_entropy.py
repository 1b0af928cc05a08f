"""Fused linear + cross-entropy: the LM-head loss without ever holding the full logits.

The eager loss materialises ``logits = hidden @ weight.T`` (``N x V``: 8,192 tokens x 50,304 =
1.6 GB in fp32), an fp32 copy for the softmax, and the same again for its gradient. Here the tokens
go through in chunks of ``chunk_size``; for each chunk::

    logits  = h_c @ W.T                           (chunk x V, the only large buffer)
    loss_c, dlogits = CE loss and gradient        (Triton kernel or plain PyTorch, written over logits)
    grad_h[c]   = dlogits @ W
    grad_W     += dlogits.T @ h_c                 (product and accumulator in fp32, whatever the weight dtype)

so the gradients are complete when the forward returns and the backward only scales them by the
upstream gradient. Only the trained tokens (label != ``ignore_index``) go through the loop: an SFT
row's prompt and padding have no loss, and skipping their logits saves their share of the head.

Peak extra memory is one logits chunk plus ``grad_W`` instead of ``O(N x V)``. The chunk is sized in
bytes, not tokens (:func:`default_chunk_size`): a fixed token count would grow the chunk with the
vocabulary (1,024 tokens are 206 MB of fp32 logits at GPT-2's 50,304 entries, 622 MB at Qwen's
151,936), while the default keeps it at :data:`CHUNK_LOGITS_BYTES` whatever ``V``, counted in the
bytes the chunk's loss works in (:func:`bytes_per_logit`): the Triton kernel's bf16 chunk holds twice
the tokens of an fp32 one, and each chunk fewer is one pass less over ``W`` and ``grad_W``. The loss
is accumulated in fp32.

Time: the chunks do the eager loss's three matmuls at a few hundred rows each instead of all ``N``,
which costs efficiency, and win it back by touching the logits fewer times. On CPU three things keep
the chunked loss under eager's time (``bench/kernel_speed.py``; figures in BENCHMARKS.md): every chunk's
logits go into one reused buffer, fp32 products run on oneDNN (:func:`_matmul_transposed`), and a
bf16 chunk's ``grad_W`` product is added into the fp32 ``grad_W`` in cache-sized blocks
(:func:`_weight_block_rows`).

No gradient is wanted under ``torch.no_grad`` / ``inference_mode`` (an evaluation) or when neither
``hidden`` nor ``weight`` requires one: then the loop computes losses only. The autograd function
cannot see that by itself (its forward always runs with grad disabled, and ``needs_input_grad``
follows ``requires_grad`` alone), so :func:`linear_cross_entropy_chunked` tells it.

ZeRO-3: the lm_head weight is partitioned (``numel() == 0``) except while a forward that uses it
runs. Fetch it by attribute inside the model's forward under the engine, e.g.
``linear_cross_entropy(hidden, self.lm_head.weight, labels)`` in the forward of the module that owns
it, or ``self.wte.weight`` (tied head) in the parent's forward: DeepSpeed gathers a partitioned
parameter on attribute access during a forward and registers it as an external parameter of the
running module (``tests/kernels/test_zero3.py`` checks both). Outside the engine's forward (a loss
computed after ``engine(...)`` returns, or a weight reference cached earlier) it arrives empty: wrap
such a call in ``deepspeed.zero.GatheredParameters(weight)``. The weight is an argument of the
autograd function, so its gradient flows through DeepSpeed's usual reduce-scatter hooks.
"""

from __future__ import annotations

import torch

# The logits of one chunk, in the bytes its loss works in (:func:`bytes_per_logit`: fp32 in the
# PyTorch twin, the matmul's dtype in the Triton kernel). The chunk is what the loss adds to the
# gradients it must hold anyway (grad_W alone is V x H x 4 bytes: 467 MB at V 151,936, H 768), so it
# is kept well under them; but each chunk re-reads W and grad_W, so chunks of ~100 tokens are
# memory-bound (1.5x eager's time at V 151,936 on 2 CPU cores, 110 tokens) where ~250 keep up.
# Figures: BENCHMARKS.md, bench/kernel_speed.py.
CHUNK_LOGITS_BYTES = 128 * 2**20
# Chunks are a whole number of matmul row blocks: a ragged last block costs far more than its share.
# On 2 CPU cores (oneDNN), 4,096 tokens: fp32 at V 151,936 took 0.98x eager's time in 220-token
# chunks, 0.89x in 192 or 224; bf16 at 128,256 1.01x in 261, 0.81x in 256 (bench/kernel_speed.py).
CHUNK_TOKEN_MULTIPLE = 32
MIN_CHUNK_TOKENS = 32  # below this the per-chunk passes over W and grad_W dominate the time


def default_chunk_size(vocab_size: int, logit_bytes: int = 4) -> int:
    """The most tokens, in multiples of :data:`CHUNK_TOKEN_MULTIPLE`, whose logits of ``logit_bytes``
    each fit in :data:`CHUNK_LOGITS_BYTES` (at least ``MIN_CHUNK_TOKENS``). In fp32: 640 at V = 50,304,
    256 at 128,256, 192 at 151,936; in bf16 (the Triton kernel on bf16 logits) 1,312, 512 and 416."""
    fitting = CHUNK_LOGITS_BYTES // (logit_bytes * max(vocab_size, 1))
    return max(MIN_CHUNK_TOKENS, fitting // CHUNK_TOKEN_MULTIPLE * CHUNK_TOKEN_MULTIPLE)


def bytes_per_logit(hidden: torch.Tensor, weight: torch.Tensor, backend: str) -> int:
    """Bytes per logit of a chunk's largest buffer: the Triton kernel works in place on the logits, in
    the dtype of their matmul; the PyTorch twin (:func:`cross_entropy_loss_and_grad_torch`) on an fp32
    copy of them."""
    if backend != "triton":
        return 4
    return (_autocast_dtype(hidden.device) or hidden.dtype).itemsize


def cross_entropy_loss_and_grad_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    compute_grad: bool = True,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain-PyTorch twin of ``kernels.cross_entropy_kernel.cross_entropy_loss_and_grad`` (same contract,
    less its ``n_valid``: the chunked loss is a sum).

    Works in place over one fp32 buffer (the logits themselves when they are fp32 and ``inplace``):
    ``x -> exp(x - max)``, then scaled into the gradient. Five passes over the chunk and no
    temporaries of its size, where ``torch.logsumexp`` + softmax would allocate two.
    """
    x = logits.to(torch.float32, copy=not inplace)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).unsqueeze(1)
    loss = -x.gather(1, safe_labels).squeeze(1)
    row_max = x.amax(dim=-1, keepdim=True)
    x.sub_(row_max).exp_()
    sum_exp = x.sum(dim=-1)
    lse = row_max.squeeze(1) + sum_exp.log()
    loss += lse
    loss = torch.where(valid, loss, 0.0)
    if not compute_grad:
        return loss, None

    # dloss/dx = softmax - [j == label] on a trained row, 0 on an ignored one.
    row_scale = valid.to(torch.float32)
    grad = x.mul_((row_scale / sum_exp).unsqueeze(1))
    grad.scatter_add_(1, safe_labels, (-row_scale).unsqueeze(1))
    if inplace and grad is not logits:  # bf16 logits: round the gradient back into their buffer
        return loss, logits.copy_(grad)
    return loss, grad.to(logits.dtype)


def _loss_and_grad_for(backend: str):
    if backend == "triton":
        from ds_sft.kernels.cross_entropy_kernel import cross_entropy_loss_and_grad

        return cross_entropy_loss_and_grad
    return cross_entropy_loss_and_grad_torch


def _chunked_loss_and_grads(
    hidden, weight, labels, loss_and_grad, ignore_index, chunk_size, need_hidden, need_weight
):
    """The chunk loop: summed fp32 loss, ``grad_hidden`` and fp32 ``grad_weight`` (None where not needed)."""
    compute_grad = need_hidden or need_weight
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    )
    block_rows = _weight_block_rows(weight.device)
    hidden, weight = _in_matmul_dtype(hidden, weight)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for rows, h, logits in _logits_chunks(hidden, weight, chunk_size):
        loss, dlogits = loss_and_grad(
            logits, labels[rows], ignore_index=ignore_index, compute_grad=compute_grad, inplace=True
        )
        del logits  # (dlogits is the same buffer) gone before the next chunk's: one chunk alive at a time
        total += loss.sum()
        if compute_grad:
            if need_hidden:
                grad_hidden[rows] = _matmul_transposed(dlogits, weight.t())
            if need_weight:
                _add_weight_gradient(grad_weight, dlogits, h, block_rows)
        del dlogits
    return total, grad_hidden, grad_weight


def _add_weight_gradient(grad_weight, dlogits, h, block_rows):
    """``grad_weight += dlogits.T @ h`` with the chunk's product in fp32 whatever the operands' dtype.

    A bf16 product would be rounded to bf16 once per chunk before the fp32 sum: one rounding error per
    chunk where the eager loss's single ``dlogits.T @ h`` over all tokens rounds once, so the error
    grew with the number of chunks (tests/kernels/test_fused_linear_cross_entropy.py). A bf16 or fp16
    product goes by blocks of vocabulary rows, since the whole chunk's would be one more weight-sized
    (V x H) buffer: on CUDA cuBLAS writes it in fp32 from the bf16 operands (``out_dtype``),
    elsewhere the operands are widened to fp32 (exactly) and the product added in place.
    """
    if dlogits.dtype == grad_weight.dtype:
        grad_weight.addmm_(dlogits.t(), h)
        return
    fp32_product = dlogits.device.type == "cuda"  # torch.mm's out_dtype runs on CUDA only
    if not fp32_product:
        h = h.float()
    for v in range(0, grad_weight.shape[0], block_rows):
        block = dlogits[:, v : v + block_rows].t()
        if fp32_product:
            grad_weight[v : v + block_rows] += torch.mm(block, h, out_dtype=torch.float32)
        else:
            grad_weight[v : v + block_rows].addmm_(block.float(), h)


def _weight_block_rows(device: torch.device) -> int:
    """Rows of ``grad_W`` updated at a time when the chunk's operands are not fp32 (fp32 product and sum).

    CPU: a block whose product and fp32 rows stay in cache (2,048 x 768) took half the time of
    16,384-row blocks (3.4 s against 7.0 s over 4,096 tokens at V 151,936 on 2 cores, then with a bf16
    product). GPU: fewer, larger GEMMs (16,384 rows, not yet measured on one).
    """
    return 2048 if device.type == "cpu" else 16384


def _logits_chunks(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int):
    """``(rows, hidden[rows], hidden[rows] @ weight.T)`` chunk by chunk; drop each chunk's logits before
    asking for the next. Off oneDNN every chunk's logits are written into one buffer by ``mm(out=)``
    (valid until the next chunk): a fresh chunk-sized tensor per chunk pays its page faults each time
    on CPU (``torch.mm`` of fp32 logits: 10.4 s fresh against 8.9 s reused, 4,096 tokens at V 151,936)."""
    reuse = not _on_onednn(hidden, weight)  # oneDNN's product comes in a tensor of its own
    buffer = hidden.new_empty(min(chunk_size, hidden.shape[0]), weight.shape[0]) if reuse else None
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h = hidden[rows]
        yield rows, h, _matmul_transposed(h, weight, out=buffer[: h.shape[0]] if reuse else None)


def _onednn_linear():
    """oneDNN's fp32 linear (``x @ w.T``) where this build of torch has it, else None. Private API (what
    torch.compile emits for CPU linears), looked up once and used only if present."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear()


def _matmul_transposed(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T`` (into ``out`` where the product is not oneDNN's).

    fp32 on CPU goes through oneDNN: torch's own fp32 matmul calls MKL's sgemm, which on the AMD EPYC
    (AVX-512) this project measures on takes 1.6x oneDNN's time for the logits product of 220-token
    chunks (8.9 s against 5.6 s over 4,096 tokens at V 151,936) and 1.1x for ``dlogits @ W``. Same fp32
    arithmetic, no reduced precision. bf16 matmuls already reach oneDNN through torch.
    """
    if _on_onednn(a, b):
        return _ONEDNN_LINEAR(a, b, None, "none", [], "")
    return torch.mm(a, b.t(), out=out)


def _on_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`_matmul_transposed` runs ``a @ b.T`` on oneDNN."""
    return _ONEDNN_LINEAR is not None and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on ``device``'s type, None where it is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _in_matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden`` and ``weight`` in the dtype their matmul has here: autocast's when it is on (as the
    eager ``hidden @ weight.T`` would run), else their own. Cast once per call, not per chunk, and
    explicit, because ``mm(out=)`` is outside autocast's reach."""
    dtype = _autocast_dtype(hidden.device)
    if dtype is None:
        return hidden, weight
    return hidden.to(dtype), weight.to(dtype)


def _gather_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``x[rows]``; ``rows=None`` means every row."""
    return x if rows is None else x[rows]


def _scatter_rows(x: torch.Tensor, rows: torch.Tensor | None, total: int) -> torch.Tensor:
    """The inverse of :func:`_gather_rows`: ``x`` placed at ``rows`` of a zero tensor of ``total`` rows."""
    if rows is None:
        return x
    return x.new_zeros((total, *x.shape[1:])).index_copy_(0, rows, x)


def linear_cross_entropy_chunked(hidden, weight, labels, ignore_index, chunk_size, backend):
    """The summed chunked loss, with its gradients precomputed only when a backward can follow.

    ``chunk_size=None``: :func:`default_chunk_size` of the vocabulary (``weight``'s rows), in the
    bytes the backend's loss works in.
    """
    chunk_size = chunk_size or default_chunk_size(weight.shape[0], bytes_per_logit(hidden, weight, backend))
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LinearCrossEntropyFunction.apply(
        hidden, weight, labels, ignore_index, chunk_size, backend, wants_grad
    )


class LinearCrossEntropyFunction(torch.autograd.Function):
    """The summed chunked loss; ``apply(hidden, weight, labels, ignore_index, chunk_size, backend,
    wants_grad)`` (call it through :func:`linear_cross_entropy_chunked`).

    ``backend`` is ``"triton"`` (the CE kernel per chunk) or ``"torch"`` (its PyTorch twin).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, backend, wants_grad):
        ctx.hidden_shape = hidden.shape
        ctx.weight_dtype = weight.dtype
        # Only trained tokens reach the LM head. An ignored token (prompt, padding: about half of an
        # SFT row) has no loss and no gradient, yet its logits cost as much as a trained token's, and
        # the head is a third of a small model's FLOPs. The chunk loop runs on the trained rows;
        # their hidden gradients are scattered back into a zero gradient for the whole input.
        hidden2d = hidden.reshape(-1, hidden.shape[-1])
        labels1d = labels.reshape(-1)
        # nonzero is the one host sync here (its length decides the loop); all rows trained, no gather.
        rows = (labels1d != ignore_index).nonzero().squeeze(1)
        ctx.trained_rows = rows = None if rows.numel() == labels1d.numel() else rows
        hidden2d, labels1d = _gather_rows(hidden2d, rows), _gather_rows(labels1d, rows).contiguous()
        total, grad_hidden, grad_weight = _chunked_loss_and_grads(
            hidden2d, weight, labels1d, _loss_and_grad_for(backend), ignore_index, chunk_size,
            wants_grad and ctx.needs_input_grad[0], wants_grad and ctx.needs_input_grad[1],
        )  # fmt: skip
        # Kept on ctx rather than saved: the backward scales them in place and hands them over, so
        # no second weight-sized buffer appears (a second backward through this graph is refused).
        ctx.grads = (grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy computes its gradients in the forward: backward runs once"
            )
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                grad.mul_(grad_output)
        if grad_hidden is not None:
            rows = ctx.hidden_shape.numel() // ctx.hidden_shape[-1]
            grad_hidden = _scatter_rows(grad_hidden, ctx.trained_rows, rows).view(ctx.hidden_shape)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None
