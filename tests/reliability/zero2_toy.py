"""A stand-alone DeepSpeed ZeRO-2 job on CPU, small enough to validate a launcher path in seconds.

It trains a two-layer MLP on a fixed synthetic regression set for a few steps and, on rank 0, writes
the per-step loss (averaged over ranks) to ``--out`` as JSON. The global batch is fixed and split
evenly across ranks, so the loss trajectory does not depend on the world size: one process with the
whole batch and two processes with half each must agree to fp32 rounding. That makes it a check of
the launcher and the network path alone, independent of the ds-sft trainer.

Run it with ``deepspeed`` (which passes ``--local_rank``), ``torchrun``, or plain ``python`` with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

GLOBAL_BATCH = 8
STEPS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes the losses to")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps to run")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = parser.parse_args()

    import deepspeed
    import torch
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if GLOBAL_BATCH % world:
        raise SystemExit(f"global batch {GLOBAL_BATCH} does not split over {world} ranks")
    micro = GLOBAL_BATCH // world

    torch.manual_seed(0)  # the same weights and data on every rank
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    inputs = torch.randn(args.steps, GLOBAL_BATCH, 16)
    targets = inputs.sum(-1, keepdim=True).sin()

    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        # torch_adam: the fused CPU Adam would JIT-compile for ~30 s first.
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    losses = []
    for step in range(args.steps):
        x = inputs[step, rank * micro : (rank + 1) * micro]
        y = targets[step, rank * micro : (rank + 1) * micro]
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world_size": world, "losses": losses}, f)
    engine.destroy()
    dist.destroy_process_group()
    # FACTS.md: a clean interpreter exit after gloo sometimes aborts ("terminate called without an
    # active exception"); leaving through os._exit after flushing avoided it in every run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
