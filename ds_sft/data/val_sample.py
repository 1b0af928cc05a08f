"""A fixed, stratified sample of val rows: what the trainer's evals (and ``eval --val_rows``) score.

Best-fit-decreasing packing puts the longest documents in the first rows, so "the first N rows" is
a biased sample (on the demo split: mean document 268 tokens against 177 overall, GSM8K 25.8% of
the trained tokens against 43.0%). Here every row is put in the stratum of the source that holds
most of its trained tokens, the rows are ordered by (stratum, that source's share of the row, a
seeded tie-break), and ``count`` of them are taken at a fixed stride from a seeded start
(systematic sampling). Each stratum then gets its share of the rows to within one, and within a
stratum the pure and the mixed rows alike. A small sample can still miss the split's composition by
a few points, so rows are then swapped within their stratum while that brings each source's share
of the sample's trained tokens closer to its share of the split's (balanced sampling: the per-row
token counts are known for every row, so the sample can be made to match them).

The sample depends on the split, ``count`` and ``seed`` only, not on the world size: ranks split
the same rows among themselves, so a resumed run on another number of ranks sees the same numbers.
"""

from __future__ import annotations

import numpy as np

from ds_sft.errors import UserError
from ds_sft.labels import IGNORE_INDEX


def trained_tokens_by_source(dataset) -> np.ndarray:
    """``[rows, sources]`` int64: trained tokens (label != -100) of each source in each row."""
    counts = np.zeros((len(dataset), len(dataset.sources)), dtype=np.int64)
    for row in range(len(dataset)):
        item = dataset[row]
        labels, sources = np.asarray(item["labels"]), np.asarray(item["source_ids"])
        counts[row] = np.bincount(sources[labels != IGNORE_INDEX], minlength=len(dataset.sources))
    return counts


def stratified_rows(counts: np.ndarray, count: int | None, seed: int = 0) -> list[int]:
    """``count`` row indices (sorted) drawn from the rows with trained tokens, given the per-source
    trained tokens ``counts`` of every row (:func:`trained_tokens_by_source`); all of those rows when
    ``count`` is None or not smaller, none when no row has a trained token.

    A row without trained tokens adds nothing to a token-weighted loss, but drawn into a small sample
    it takes the place of one that does: a sample of such rows alone had no loss at all."""
    scored = np.flatnonzero(counts.sum(axis=1) > 0)
    return scored[_draw(counts[scored], count, seed)].tolist()


def scored_val_rows(dataset, count: int | None, where: str, remedy: str) -> list[int]:
    """:func:`stratified_rows` of ``dataset`` (the train's evals and ``eval`` alike); a split with no
    trained token at all is refused in one line naming ``where`` it is and the ``remedy``."""
    rows = stratified_rows(trained_tokens_by_source(dataset), count)
    if not rows:
        raise UserError(
            f"{where}: no val row has a trained token (every label is masked), so there is no val loss: "
            + remedy
        )
    return rows


def _draw(counts: np.ndarray, count: int | None, seed: int) -> list[int]:
    """:func:`stratified_rows` over rows that all hold trained tokens."""
    rows = counts.shape[0]
    if count is None or count >= rows:
        return list(range(rows))
    if count <= 0:
        raise ValueError(f"a val sample needs at least one row, got {count}")
    rng = np.random.default_rng([seed, rows, count])
    totals = counts.sum(axis=1)
    dominant = counts.argmax(axis=1)
    share = counts[np.arange(rows), dominant] / np.maximum(totals, 1)
    order = np.lexsort((rng.random(rows), share, dominant))  # last key sorts first
    picks = np.floor((np.arange(count) + rng.random()) * rows / count).astype(np.int64)
    chosen = np.zeros(rows, dtype=bool)
    chosen[order[picks]] = True
    return sorted(np.flatnonzero(_balance(counts, chosen, dominant)).tolist())


def _balance(counts: np.ndarray, chosen: np.ndarray, stratum: np.ndarray) -> np.ndarray:
    """Swap a chosen row for an unchosen one of the same stratum while that brings the sample's
    token shares closer (squared distance) to the split's; ``chosen`` (bool per row) comes back.

    A small systematic sample can still be off by several points (16 of 112 rows: 4.8). The swaps
    keep every stratum's row count and only move the sample towards the split's composition.
    """
    target = token_shares(counts)
    for _ in range(chosen.size):  # each swap strictly improves, so this only bounds the loop
        inside, outside = np.flatnonzero(chosen), np.flatnonzero(~chosen)
        current = counts[inside].sum(axis=0)
        trial = current[None, None, :] - counts[inside][:, None, :] + counts[outside][None, :, :]
        shares = trial / np.maximum(trial.sum(axis=2, keepdims=True), 1)
        distance = np.square(shares - target).sum(axis=2)
        distance[stratum[inside][:, None] != stratum[outside][None, :]] = np.inf
        best = np.unravel_index(np.argmin(distance), distance.shape)
        if not distance[best] < np.square(token_shares(counts[inside]) - target).sum() - 1e-12:
            break
        chosen[inside[best[0]]], chosen[outside[best[1]]] = False, True
    return chosen


def token_shares(counts: np.ndarray, rows: list[int] | None = None) -> np.ndarray:
    """Each source's share of the trained tokens of ``rows`` (all rows when None)."""
    selected = counts if rows is None else counts[rows]
    per_source = selected.sum(axis=0)
    return per_source / max(int(per_source.sum()), 1)
