"""The fixed val sample the trainer's evals score: stratified by source, balanced on token shares,
independent of the world size; on the demo split its per-source token shares are within 2 points of
the whole split's (the first rows, which packing fills with the longest documents, are not)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ds_sft.data.val_sample import stratified_rows, token_shares, trained_tokens_by_source

counts_matrices = st.integers(1, 4).flatmap(
    lambda sources: arrays(
        np.int64, st.tuples(st.integers(1, 40), st.just(sources)), elements=st.integers(0, 60)
    )
)


def _distance(counts, rows):
    return float(np.square(token_shares(counts, rows) - token_shares(counts)).sum())


@given(counts=counts_matrices, fraction=st.floats(0.01, 1.2), seed=st.integers(0, 3))
def test_sample_is_stratified_deterministic_and_locally_balanced(counts, fraction, seed):
    scored = [row for row in range(counts.shape[0]) if counts[row].sum() > 0]
    count = max(1, int(fraction * counts.shape[0]))
    picked = stratified_rows(counts, count, seed)
    assert picked == stratified_rows(counts, count, seed)  # a fixed sample
    assert set(picked) <= set(scored)  # a row without trained tokens is never drawn
    if count >= len(scored):
        assert picked == scored
        return
    picked = [scored.index(row) for row in picked]  # positions among the scored rows, as below
    counts, rows = counts[scored], len(scored)
    assert len(picked) == count and picked == sorted(set(picked)) and picked[0] >= 0 and picked[-1] < rows
    # each stratum (a row's dominant source) holds its proportional share of the rows, to within one
    stratum = counts.argmax(axis=1)
    for s in range(counts.shape[1]):
        expected = count * np.sum(stratum == s) / rows
        assert abs(np.sum(stratum[picked] == s) - expected) < 1 + 1e-9
    # no swap of a picked row for an unpicked one of the same stratum brings the shares closer
    best = _distance(counts, picked)
    for out in picked:
        for into in set(range(rows)) - set(picked):
            if stratum[out] == stratum[into]:
                trial = sorted(set(picked) - {out} | {into})
                assert _distance(counts, trial) >= best - 1e-9


@pytest.mark.parametrize("count", [1, 3, 8, None])
def test_rows_without_trained_tokens_are_never_drawn(count):
    """One scored row among 40 masked ones: a sample of 3 was three masked rows, and every eval of
    the run a ValueError (no trained tokens in the evaluated rows)."""
    counts = np.zeros((41, 2), dtype=np.int64)
    counts[17] = (0, 5)
    assert stratified_rows(counts, count) == [17]
    assert stratified_rows(np.zeros((6, 2), dtype=np.int64), count) == []


def test_the_sample_does_not_depend_on_the_world_size():
    """Ranks split the one sample (rows[r::W]); together they score the same rows on any W."""
    counts = np.random.default_rng(0).integers(0, 50, size=(97, 3))
    sample = stratified_rows(counts, 24)
    for world in (1, 2, 3, 8):
        assert sorted(r for rank in range(world) for r in sample[rank::world]) == sample


@pytest.fixture(scope="module")
def demo_split(shared, gpt2_tokenizer_dir, tmp_path_factory):
    """The shared mix prepared as ``make demo`` prepares it (3,000 examples, rows of 512), GPT-2 BPE."""
    from ds_sft.command import main_for
    from ds_sft.data.shards import PackedDataset

    out = tmp_path_factory.mktemp("demo") / "data"
    argv = [
        "--from_shared",
        "--tokenizer",
        str(gpt2_tokenizer_dir),
        "--max_examples",
        "3000",
        "--seq_len",
        "512",
    ]
    assert main_for("prepare", [*argv, "--output_dir", str(out)]) == 0
    return PackedDataset(out, "val")


def test_demo_split_sample_matches_the_split_within_two_points(demo_split):
    counts = trained_tokens_by_source(demo_split)
    whole = token_shares(counts)
    first = token_shares(counts, list(range(16)))
    assert np.abs(first - whole).max() > 0.02  # the old selection: the first eval_iters x micro rows
    # the demo's 4 x 4 rows, and other sizes below the split's 112 rows
    for count in (8, 16, 32, 64):
        shares = token_shares(counts, stratified_rows(counts, count))
        assert np.abs(shares - whole).max() <= 0.02, (count, shares, whole)
