"""The sampler's global stream: hand-computed order, resume, and re-sharding across world sizes,
micro-batch splits and global batch sizes (chains of resumes drawn by Hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds_sft.data.sampler import ResumableSampler


def test_stream_is_the_seeded_permutation_of_each_epoch():
    sampler = ResumableSampler(10, seed=7)
    expected = np.concatenate([np.random.default_rng([7, e]).permutation(10) for e in range(3)])
    np.testing.assert_array_equal(sampler.global_indices(0, 30), expected)


def test_ranks_partition_each_step():
    n, mb, ga, world = 37, 3, 2, 4
    samplers = [ResumableSampler(n, rank=r, world_size=world, seed=1) for r in range(world)]
    for step in range(5):
        per_rank = [s.step_indices(mb, ga, step=step) for s in samplers]
        assert all(x.shape == (ga, mb) for x in per_rank)
        union = np.stack(per_rank, axis=-1).reshape(-1)  # micro-step, slot, rank -> stream order
        start = step * mb * ga * world
        np.testing.assert_array_equal(np.sort(union), np.sort(samplers[0].global_indices(start, start + 24)))


def run_steps(world_size, micro_batch, grad_accum, steps, state=None):
    """Indices of the global batch of each step, in stream order, as a list of sorted tuples."""
    samplers = [ResumableSampler(23, rank=r, world_size=world_size, seed=3) for r in range(world_size)]
    for s in samplers:
        if state:
            s.load_state_dict(state)
    seen = []
    for _ in range(steps):
        batch = np.concatenate([s.step_indices(micro_batch, grad_accum).reshape(-1) for s in samplers])
        seen.append(tuple(sorted(batch.tolist())))
        for s in samplers:
            s.advance(micro_batch * grad_accum * world_size)
    return seen, samplers[0].state_dict()


def test_resume_and_reshard_two_ranks_to_one_give_the_same_order():
    uninterrupted, _ = run_steps(world_size=2, micro_batch=2, grad_accum=2, steps=10)
    first, state = run_steps(world_size=2, micro_batch=2, grad_accum=2, steps=4)
    assert state == {"epoch": 1, "consumed_samples": 32, "seed": 3}  # 4 steps x 8 = 32 of 23 rows
    resumed_same, _ = run_steps(world_size=2, micro_batch=2, grad_accum=2, steps=6, state=state)
    resumed_one_rank, _ = run_steps(world_size=1, micro_batch=2, grad_accum=4, steps=6, state=state)
    assert first + resumed_same == uninterrupted
    assert first + resumed_one_rank == uninterrupted


def test_state_with_another_seed_is_refused():
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(4, seed=1).load_state_dict({"epoch": 0, "consumed_samples": 2, "seed": 2})


def stream(n: int, seed: int, length: int) -> np.ndarray:
    """The global stream by its definition: epoch e's rows are default_rng([seed, e]).permutation(n)."""
    epochs = -(-length // n)
    return np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(epochs)])[:length]


def train_segments(n: int, seed: int, segments) -> list[np.ndarray]:
    """Each optimizer step's rows over all ranks (in stream order), through a chain of resumes: every
    segment ``(ranks, micro, accum, steps)`` starts fresh samplers from the previous one's state."""
    state, steps = None, []
    for ranks, micro, accum, count in segments:
        samplers = [ResumableSampler(n, rank=r, world_size=ranks, seed=seed) for r in range(ranks)]
        for sampler in samplers:
            if state is not None:
                sampler.load_state_dict(state)
        for _ in range(count):
            per_rank = np.stack([s.step_indices(micro, accum) for s in samplers], axis=-1)
            steps.append(per_rank.reshape(-1))  # micro-step, row, rank: the stream order
            for sampler in samplers:
                sampler.advance(micro * accum * ranks)
        state = samplers[0].state_dict()
    return steps


segment = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4))


@given(
    n=st.integers(1, 30), seed=st.integers(0, 2**32 - 1), segments=st.lists(segment, min_size=1, max_size=5)
)
def test_any_chain_of_resumes_reads_the_stream_in_order(n, seed, segments):
    """Whatever the ranks, micro-batch, accumulation, and even global batch of each resumed segment, the
    steps read the global stream in order: no row skipped, none repeated, none out of place."""
    steps = train_segments(n, seed, segments)
    np.testing.assert_array_equal(np.concatenate(steps), stream(n, seed, sum(map(len, steps))))
    assert [len(s) for s in steps] == [r * m * a for r, m, a, count in segments for _ in range(count)]


@given(n=st.integers(1, 30), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_splits_of_one_global_batch_train_the_same_rows_each_step(n, seed, data):
    """Shapes (ranks x micro x accumulation) of one global batch, resumed one after another, give each
    step the rows the uninterrupted single-rank run gives it."""
    splits = [(r, m, 12 // (r * m)) for r in (1, 2, 3, 4) for m in (1, 2, 3) if 12 % (r * m) == 0]
    chosen = data.draw(st.lists(st.sampled_from(splits), min_size=1, max_size=4))
    counts = data.draw(st.lists(st.integers(1, 3), min_size=len(chosen), max_size=len(chosen)))
    resumed = train_segments(n, seed, [(*split, c) for split, c in zip(chosen, counts, strict=True)])
    uninterrupted = train_segments(n, seed, [(1, 12, 1, sum(counts))])
    assert [sorted(s.tolist()) for s in resumed] == [sorted(s.tolist()) for s in uninterrupted]


def test_an_allowed_seed_change_keeps_the_position_and_takes_the_new_order():
    old = ResumableSampler(10, seed=1)
    old.advance(13)
    new = ResumableSampler(10, seed=2)
    new.load_state_dict(old.state_dict(), reseed=True)
    assert new.consumed_samples == 13
    np.testing.assert_array_equal(new.step_indices(3), stream(10, 2, 16)[13:16].reshape(1, 3))
