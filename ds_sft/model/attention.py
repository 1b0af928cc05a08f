"""Causal attention within each packed document that computes only the tiles a document can see (CPU).

A packed row of ``T`` tokens holds several documents back to back, and a query may attend only to
earlier keys of its own document: the ``[T, T]`` mask is block-diagonal causal. Dense-mask
``scaled_dot_product_attention`` computes all ``T^2`` query-key pairs and throws most away: with
documents of ~90 tokens in a 512-token row, about 90 % of the pairs are masked out.

Tiles. Cut the row into query tiles of ``tile`` tokens. Documents are contiguous runs, so the keys that
tile ``i`` needs start at the first token of the document holding the tile's *first* query (the later
queries' documents start no earlier) and end at the tile's last query: the key tiles ``first .. i``, a
window of ``w = i - first + 1`` tiles. Inside the window a ``[tile, w * tile]`` mask (same document,
key position <= query position) keeps the result exact.

Sliding windows. With a ``window`` a query sees only its own document's ``window`` latest keys
(itself included), so the tile's first query needs keys from ``max(document start, query - window + 1)``
on: the window of key tiles starts there, and tiles wholly before it are skipped like other
documents' tiles. One more condition in the ``[tile, w * tile]`` pattern (query - key < window) keeps
the result exact.

Buckets. A batched matmul needs one shape, so the query tiles are grouped by window width: all tiles
of width ``w``, from every row, gather into one ``[H, m, tile, D]`` batch against their
``[H, m, w * tile, D]`` key/value windows. That is at most ``T / tile`` buckets of a dozen large ops
each, where one SDPA call per document pays a per-call overhead that made it slower than the dense
mask. Exact widths beat widths rounded up to powers of two (fewer buckets, up to 2x more pairs), and
an exact window starts at a document start, never before the row, so it needs no padding keys.

Cost model. The work is the score matrix, ``tile * w * tile`` pairs per query tile. A tile's first
query sits on average ~L/2 into its document (L length-weighted) and the window also reaches back to
the tile boundary, so a row costs about ``T * (L / 2 + 1.5 * tile)`` pairs against ``T^2`` dense:
3x fewer at T=512, L~90 and 4.6x at T=1024, L~190 (counted on the bench layouts: 3.6x and 5.0x).
A row holding one ``T``-token document degrades to causal tiles, about half the dense pairs. On CPU
the pairs are memory-bound passes over materialised scores, so :class:`_MaskedAttention` makes as
few as it can (SDPA's flash kernel per bucket was slower: its backward is poor on short key spans).
``tile=64`` measured best: 32 makes more, smaller ops; 128 wastes more pairs at document edges.

Gathering tiles and scattering the outputs back are small autograd Functions (``index_select`` /
``index_copy_`` forward, the reverse backward) that keep one gradient buffer for all buckets. The
bucket sizes depend on the data, hence ``torch.compiler.disable``: under ``torch.compile`` the graph
breaks around each call and this runs eagerly.

Each op here is parallel over 2 threads; when another process holds a core, every parallel region
waits for the descheduled thread, and a hundred ops suffer where one dense kernel does not: measure
on a quiet machine (``bench/attention.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TILE = 64  # tokens per query/key tile (see "Cost model" above)


@torch.compiler.disable
def document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    document_ids: torch.Tensor,
    tile: int = TILE,
    window: int | None = None,
) -> torch.Tensor:
    """Attention within documents: ``q, k, v [B, H, T, D]`` (k, v expanded to H heads) -> ``[B, H, T, D]``.

    ``document_ids [B, T]``: 0, 1, 2 ... per document, each document one contiguous run, -1 on
    trailing padding. On every non-padding query this equals ``scaled_dot_product_attention`` with
    the mask ``same document & key <= query`` (``& query - key < window`` with a sliding ``window``).
    Padding queries get finite values that nothing should
    read: zeros in a tile that is all padding, else attention over the padding run (as the dense mask
    gives). ``T`` need not be a multiple of ``tile``.
    """
    B, H, T, D = q.shape
    if document_ids.shape != (B, T):
        raise ValueError(f"document_ids {tuple(document_ids.shape)} should be [batch, seq] = {(B, T)}")
    n_tiles = -(-T // tile)
    padded = n_tiles * tile
    documents = F.pad(document_ids, (0, padded - T), value=-1)  # [B, padded]: the tail is padding

    # Where each token's document starts: the last position at or before it where the id changed.
    position = torch.arange(padded, device=q.device)
    starts_document = torch.ones_like(documents, dtype=torch.bool)
    starts_document[:, 1:] = documents[:, 1:] != documents[:, :-1]
    document_start = torch.where(starts_document, position, 0).cummax(dim=1).values
    tile_index = torch.arange(n_tiles, device=q.device)
    earliest_key = document_start[:, ::tile]  # [B, n_tiles]: what each tile's first query sees first
    if window is not None:
        earliest_key = earliest_key.clamp(min=tile_index * tile - window + 1)
    width = tile_index - earliest_key // tile + 1  # [B, n_tiles] key tiles per query tile
    active = documents.view(B, n_tiles, tile).amax(dim=-1) >= 0  # tiles with at least one real query
    if not active.any():
        return q * 0  # nothing but padding: zeros, still connected to the graph

    # Head-major tiles [H, B * n_tiles, tile, D]: a window's w key tiles are w consecutive rows of
    # dim 1, so one index_select gathers it already laid out as [H, m, w * tile, D] for the matmuls.
    query_tiles, key_tiles, value_tiles = (_head_major_tiles(x, padded, tile) for x in (q, k, v))
    tile_documents = documents.view(B * n_tiles, tile)

    query_index, key_index, blocked = [], [], []  # per bucket
    for w in width[active].unique().tolist():
        rows, tiles = torch.nonzero(active & (width == w), as_tuple=True)
        queries = rows * n_tiles + tiles
        first_key = queries - w + 1  # the window ends with the query tile
        keys = (first_key[:, None] + torch.arange(w, device=q.device)).flatten()
        key_document = tile_documents.index_select(0, keys).view(len(queries), 1, w * tile)
        other_document = key_document != tile_documents.index_select(0, queries)[:, :, None]
        # the window ends with the query tile, so causality is one [tile, w * tile] pattern
        query_position = position[:tile, None] + (w - 1) * tile
        future = position[: w * tile] > query_position
        if window is not None:
            future |= query_position - position[: w * tile] >= window  # slid out of the window
        query_index.append(queries)
        key_index.append(keys)
        blocked.append(other_document | future)  # [m, tile, w * tile], broadcast over heads

    q_buckets = _GatherTiles.apply(query_tiles, *query_index)
    k_buckets = _GatherTiles.apply(key_tiles, *key_index)
    v_buckets = _GatherTiles.apply(value_tiles, *key_index)
    out_buckets = [
        _MaskedAttention.apply(q_b, k_b.view(H, len(i), -1, D), v_b.view(H, len(i), -1, D), mask)
        for i, q_b, k_b, v_b, mask in zip(query_index, q_buckets, k_buckets, v_buckets, blocked, strict=True)
    ]
    out = _ScatterTiles.apply(B * n_tiles, query_index, *out_buckets)  # all-padding tiles are zero
    return out.view(H, B, padded, D)[:, :, :T].transpose(0, 1)


def _head_major_tiles(x: torch.Tensor, padded: int, tile: int) -> torch.Tensor:
    """``[B, H, T, D]``, zero-padded to ``padded`` tokens -> ``[H, B * padded / tile, tile, D]``."""
    H, T, D = x.shape[1:]
    x = x.transpose(0, 1)
    if padded > T:
        x = F.pad(x, (0, 0, 0, padded - T))
    return x.reshape(H, -1, tile, D)  # the one copy


class _GatherTiles(torch.autograd.Function):
    """``source.index_select(1, index)`` for each bucket's index, with one gradient buffer for all.

    Autograd would give each gather its own zero-filled, source-sized gradient and then add them up;
    here every bucket's gradient lands in the same buffer. Each output is contiguous, so the matmuls
    read it without a copy.
    """

    @staticmethod
    def forward(ctx, source, *indices):
        ctx.save_for_backward(*indices)
        ctx.source_shape = source.shape
        return tuple(source.index_select(1, index) for index in indices)

    @staticmethod
    def backward(ctx, *grads):
        H, n_tiles = ctx.source_shape[:2]
        grad_source = grads[0].new_zeros(ctx.source_shape)
        # index_add_ along dim 0 of [H * n_tiles, tile * D], one index per (head, tile): measured 2x
        # faster than along dim 1 and 4x faster than index_put_(accumulate) (2 threads, quiet machine);
        # along dim 1 it also stalled 100x when another process held a core
        rows = grad_source.view(H * n_tiles, -1)
        head_offset = torch.arange(H, device=rows.device)[:, None] * n_tiles
        for index, grad in zip(ctx.saved_tensors, grads, strict=True):
            rows.index_add_(0, (head_offset + index).flatten(), grad.reshape(H * len(index), -1))
        return grad_source, *(None for _ in grads)


class _ScatterTiles(torch.autograd.Function):
    """The inverse of :class:`_GatherTiles`: bucket outputs back to their tile rows (the rest zero).

    Built from a chain of ``index_copy_``, autograd would clone the whole gradient once per bucket.
    """

    @staticmethod
    def forward(ctx, n_rows, indices, *tiles):
        ctx.save_for_backward(*indices)
        H, _, tile, D = tiles[0].shape
        out = tiles[0].new_zeros(H, n_rows, tile, D)
        for index, t in zip(indices, tiles, strict=True):
            out.index_copy_(1, index, t)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return None, None, *(grad_out.index_select(1, index) for index in ctx.saved_tensors)


class _MaskedAttention(torch.autograd.Function):
    """``softmax(q k^T / sqrt(D) with blocked = -inf) v``, in few passes over the scores.

    The ``[.., tile, span]`` scores are as big as a key window (at ``D == tile``) and, unlike the
    windows, cross memory in every elementwise step, which bounds this on CPU more than the matmuls.
    So the mask is applied in place, softmax reads the scores once in the input dtype (it accumulates
    in fp32 internally: for bf16 this is the precision of Hugging Face's eager attention), and
    backward keeps only the probabilities.
    """

    @staticmethod
    def forward(ctx, q, k, v, blocked):
        scale = q.shape[-1] ** -0.5
        q = q * scale  # scaling a tile of queries is cheaper than scaling the span-wide scores
        scores = torch.matmul(q, k.transpose(-1, -2)).masked_fill_(blocked, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return torch.matmul(probs, v)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
        grad_probs = torch.matmul(grad_out, v.transpose(-1, -2))
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)  # q carries the scale already
        return grad_q, grad_k, grad_v, None
