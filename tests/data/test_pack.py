"""Best-fit-decreasing packing against a plain-Python reference, and the row layout it produces."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_sft.data.pack import best_fit_decreasing, efficiency, one_per_row, pack_rows
from tests.data.helpers import documents_with_prompts


def reference_bfd(lengths, capacity):
    """Textbook BFD: scan every open row and pick the fullest one that still fits."""
    rooms, rows = [], []
    for doc in sorted(range(len(lengths)), key=lambda d: -lengths[d]):
        fits = [r for r in range(len(rows)) if rooms[r] >= lengths[doc]]
        if fits:
            least = min(rooms[r] for r in fits)
            row = next(r for r in fits if rooms[r] == least)
        else:
            row = len(rows)
            rows.append([])
            rooms.append(capacity)
        rows[row].append(doc)
        rooms[row] -= lengths[doc]
    return rows


@settings(max_examples=60, deadline=None)
@given(
    st.integers(4, 64).flatmap(
        lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=60))
    )
)
def test_bfd_matches_reference(case):
    capacity, lengths = case
    rows = best_fit_decreasing(np.array(lengths, dtype=np.int64), capacity)
    assert sorted(d for row in rows for d in row) == list(range(len(lengths)))  # every doc exactly once
    assert all(sum(lengths[d] for d in row) <= capacity for row in rows)
    # same number of rows and the same multiset of row fills as the textbook algorithm
    expected = reference_bfd(lengths, capacity)
    assert len(rows) == len(expected)
    fill = sorted(sum(lengths[d] for d in row) for row in rows)
    assert fill == sorted(sum(lengths[d] for d in row) for row in expected)


def test_bfd_rejects_documents_longer_than_a_row():
    with pytest.raises(ValueError, match="1..8"):
        best_fit_decreasing(np.array([3, 9]), 8)


def make_docs(lengths, prompt_lens, sources):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.arange(offsets[-1], dtype=np.int32) + 1  # token value = flat position + 1
    return documents_with_prompts(
        tokens, offsets, np.array(prompt_lens, np.int32), np.array(sources, np.int16)
    )


def test_pack_rows_layout():
    docs = make_docs([5, 3, 4, 2], [2, 1, 3, 1], [0, 1, 0, 1])
    rows = [[0, 1], [2, 3]]
    packed = pack_rows(docs, rows, seq_len=8, pad_id=0)
    np.testing.assert_array_equal(packed["tokens"][0], [1, 2, 3, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(packed["tokens"][1], [9, 10, 11, 12, 13, 14, 0, 0])
    np.testing.assert_array_equal(packed["loss_mask"][0], [0, 0, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(packed["loss_mask"][1], [0, 0, 0, 1, 0, 1, 0, 0])
    assert packed["doc_lengths"].tolist() == [5, 3, 4, 2]
    assert packed["doc_sources"].tolist() == [0, 1, 0, 1]
    assert packed["row_offsets"].tolist() == [0, 2, 4]
    eff = efficiency(docs, 2, 8)
    assert eff == {"real_tokens": 14 / 16, "trained_tokens": 7 / 16}


def test_no_pack_gives_one_document_per_padded_row():
    docs = make_docs([5, 3], [2, 1], [0, 0])
    packed = pack_rows(docs, one_per_row(2), seq_len=6, pad_id=99)
    np.testing.assert_array_equal(packed["tokens"], [[1, 2, 3, 4, 5, 99], [6, 7, 8, 99, 99, 99]])
