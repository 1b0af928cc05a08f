"""A sample order that survives restarts and changes of world size.

Think of training as reading one infinite *global stream* of dataset indices: epoch 0's seeded
permutation, then epoch 1's, and so on (``permutation(seed, epoch)``, no dependence on the number of
ranks). Position ``p`` of the stream is dataset index ``perm[p // n][p % n]``.

- Rank ``r`` of ``W`` reads stream positions ``p`` with ``p % W == r``, counted from
  ``consumed_samples`` (a multiple of ``W`` whenever the global batch is).
- The only state is how many stream positions all ranks together have consumed
  (``consumed_samples``). Saving it and loading it, on any world size, continues the same stream.
- An optimizer step with ``micro_batch`` rows per rank and ``grad_accum`` micro-steps consumes
  ``global_batch = micro_batch * grad_accum * W`` positions. Step ``k`` covers positions
  ``[k * global_batch, (k + 1) * global_batch)`` (counted from where the sampler started), so
  2 ranks x 4 accumulation steps, 1 rank x 8 and 1 rank x 2 micro-batches of 4 see the same rows
  in every step: a resume may change world size, micro-batch and accumulation freely as long as the
  global batch stays. A resume that changes the global batch (allowed by ``--allow_change``) goes on
  from the same position with steps of the new size: no row is skipped or repeated.

Trainer API (see :meth:`ResumableSampler.step_indices`)::

    sampler = ResumableSampler(len(dataset), rank=r, world_size=W, seed=seed)
    sampler.load_state_dict(ckpt["sampler"])                 # on resume; any W
    for step in range(start_step, total_steps):
        for micro in sampler.step_indices(micro_batch, grad_accum):   # [grad_accum, micro_batch]
            batch = collate([dataset[i] for i in micro])
            ...
        sampler.advance(micro_batch * grad_accum * W)          # after the optimizer step
    ckpt["sampler"] = sampler.state_dict()
"""

from __future__ import annotations

import numpy as np


class ResumableSampler:
    """Deterministic, resumable, distributed sampler over ``num_samples`` rows (see module docstring)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        if num_samples <= 0:
            raise ValueError("ResumableSampler needs at least one sample")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.consumed_samples = 0  # global stream positions consumed by all ranks together
        self._cached_epoch: tuple[int, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    def permutation(self, epoch: int) -> np.ndarray:
        """The global order of epoch ``epoch`` (cached: one epoch is reused by many steps)."""
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._cached_epoch = (epoch, order)
        return self._cached_epoch[1]

    def global_indices(self, start: int, stop: int) -> np.ndarray:
        """Dataset indices at global stream positions ``start .. stop - 1`` (may span epochs)."""
        positions = np.arange(start, stop)
        out = np.empty(len(positions), dtype=np.int64)
        epochs = positions // self.num_samples
        for epoch in np.unique(epochs):
            here = epochs == epoch
            out[here] = self.permutation(int(epoch))[positions[here] % self.num_samples]
        return out

    def step_indices(self, micro_batch: int, grad_accum: int = 1, step: int = 0) -> np.ndarray:
        """This rank's dataset indices for optimizer step ``step`` after ``consumed_samples``.

        Returns an int64 array ``[grad_accum, micro_batch]``: row ``a`` is micro-step ``a``. With
        ``G = micro_batch * grad_accum * world_size``, the step reads global positions
        ``consumed_samples + step * G + j * world_size + rank`` for ``j = 0 .. G / world_size - 1``.
        """
        global_batch = micro_batch * grad_accum * self.world_size
        start = self.consumed_samples + step * global_batch
        mine = self.global_indices(start, start + global_batch)[self.rank :: self.world_size]
        return mine.reshape(grad_accum, micro_batch)

    def advance(self, num_global_samples: int) -> None:
        """Record that all ranks together trained ``num_global_samples`` more stream positions."""
        self.consumed_samples += int(num_global_samples)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, state: dict, reseed: bool = False) -> None:
        """Continue from ``state``'s position of the stream. Its seed must be this sampler's, unless
        ``reseed`` (an allowed seed change): then the position is kept and the order is this seed's."""
        if not reseed and state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"sampler state has seed {state['seed']}, this sampler {self.seed}: orders would differ"
            )
        self.consumed_samples = int(state["consumed_samples"])
