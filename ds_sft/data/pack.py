"""Packing documents into fixed-length rows: best-fit-decreasing, whole documents only.

Padding every example to ``seq_len`` wastes most of a batch on instruction data (the shared mix
averages ~190 GPT-2 tokens per example: pad-to-1024 rows are ~18% real tokens). Packing puts several
documents in one row; attention stays inside each document because every row carries document ids
and position ids that restart at 0 (see :mod:`ds_sft.data.shards`), so packing changes what is
computed per step, not what is learned.

Best-fit-decreasing: take documents longest first and put each into the open row with the *least*
room that still fits it, opening a new row when none does. Over the whole set (not per batch of
1,000 as TRL does) it fills rows of 1024 to ~99.6% on the shared mix.

The "least room that still fits" query is one numpy ``argmax`` over a boolean array indexed by
remaining capacity (``open_rows_with_room[c]``), with a stack of row ids per capacity, so each
document costs a few microseconds regardless of how many rows are open.
"""

from __future__ import annotations

import numpy as np

from ds_sft.data.tokenize import Documents


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Group document indices into rows whose lengths sum to at most ``capacity``.

    Every length must be in ``1..capacity``. Deterministic: ties keep input order.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"document lengths must be in 1..{capacity}, got {lengths.min()}..{lengths.max()}")
    rows_by_room: list[list[int]] = [[] for _ in range(capacity + 1)]
    has_room = np.zeros(capacity + 1, dtype=bool)  # has_room[c]: some open row has exactly c free slots
    rows: list[list[int]] = []
    for doc in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[doc])
        room = need + int(np.argmax(has_room[need:]))
        if has_room[room]:
            row = rows_by_room[room].pop()
            has_room[room] = bool(rows_by_room[room])
        else:
            row, room = len(rows), capacity
            rows.append([])
        rows[row].append(doc)
        left = room - need
        if left:  # a full row never takes another document
            rows_by_room[left].append(row)
            has_room[left] = True
    return rows


def one_per_row(n_docs: int) -> list[list[int]]:
    """The ``--no_pack`` layout: each document alone in a padded row."""
    return [[doc] for doc in range(n_docs)]


# What pack_rows holds per position of a row: an int64 token id and a uint8 loss-mask byte.
BYTES_PER_POSITION = 9


def pack_rows(docs: Documents, rows: list[list[int]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Lay documents out in rows of ``seq_len``.

    Returns ``tokens`` [R, seq_len] (``pad_id`` after the last document), ``loss_mask`` [R, seq_len]
    uint8 (1 on response + EOS tokens), ``doc_lengths`` / ``doc_sources`` per document in row order,
    and ``row_offsets`` [R + 1]: row r holds documents ``row_offsets[r]:row_offsets[r+1]``.
    """
    order = np.fromiter((doc for row in rows for doc in row), dtype=np.int64)
    docs_per_row = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    ordered = docs.select(order)
    lengths = ordered.lengths
    row_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(docs_per_row, out=row_offsets[1:])
    doc_row = np.repeat(np.arange(len(rows)), docs_per_row)
    # where each document starts inside its row = its start in the flat stream - its row's start
    start_in_row = ordered.offsets[:-1] - ordered.offsets[row_offsets[:-1]][doc_row]
    if len(lengths) and (start_in_row + lengths).max() > seq_len:
        raise ValueError("a row's documents exceed seq_len")
    destination = np.repeat(doc_row * seq_len + start_in_row - ordered.offsets[:-1], lengths) + np.arange(
        ordered.offsets[-1]
    )
    tokens = np.full(len(rows) * seq_len, pad_id, dtype=np.int64)
    tokens[destination] = ordered.tokens
    loss_mask = np.zeros(len(rows) * seq_len, dtype=np.uint8)
    loss_mask[destination] = ordered.loss_mask()
    return {
        "tokens": tokens.reshape(len(rows), seq_len),
        "loss_mask": loss_mask.reshape(len(rows), seq_len),
        "doc_lengths": lengths.astype(np.int32),
        "doc_sources": ordered.source_ids,
        "row_offsets": row_offsets,
    }


def efficiency(docs: Documents, n_rows: int, seq_len: int) -> dict[str, float]:
    """Share of row capacity holding real tokens, and holding trained (response + EOS) tokens."""
    capacity = max(n_rows * seq_len, 1)
    real = int(docs.offsets[-1])
    trained = int(docs.trained.sum(dtype=np.int64))
    return {"real_tokens": real / capacity, "trained_tokens": trained / capacity}
