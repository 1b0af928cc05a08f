"""The sampler's global stream: hand-computed order, resume, and re-sharding across world sizes."""

from __future__ import annotations

import numpy as np
import pytest

from ds_sft.data.sampler import ResumableSampler


def test_stream_is_the_seeded_permutation_of_each_epoch():
    sampler = ResumableSampler(10, seed=7)
    expected = np.concatenate([np.random.default_rng([7, e]).permutation(10) for e in range(3)])
    np.testing.assert_array_equal(sampler.global_indices(0, 30), expected)
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


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


def test_iteration_matches_step_indices_and_len():
    sampler = ResumableSampler(10, rank=1, world_size=2, seed=5)
    sampler.advance(4)
    listed = list(sampler)
    assert len(listed) == len(sampler) == 3
    np.testing.assert_array_equal(listed, sampler.global_indices(4, 10)[1::2])
    np.testing.assert_array_equal(sampler.step_indices(1, 3).reshape(-1), listed)


def test_state_with_another_seed_is_refused():
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(4, seed=1).load_state_dict({"epoch": 0, "consumed_samples": 2, "seed": 2})
