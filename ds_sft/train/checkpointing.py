"""Save, resume and consolidate, on top of ``engine.save_checkpoint`` / ``engine.load_checkpoint``.

Layout::

    RUN/checkpoints/step_000050/     the engine's files (model, optimizer partitions, client state)
                    step_000050/trainer_state.json   step, sampler, best val, world size (readable
                                                     before the engine exists)
    RUN/checkpoints/latest           the tag of the newest *complete* checkpoint
    RUN/checkpoints/best             the tag with the lowest val loss

``latest`` is rewritten (atomically, by rank 0) only after every rank has returned from
``save_checkpoint`` and passed a barrier, so a run killed mid-save resumes from the previous one.
Older tags beyond ``--keep_last`` are deleted, except the best.

Exact resume needs everything that shapes the next step: weights, optimizer moments and step
counts (the engine), the position in the data stream (the sampler state), the RNG of every rank
(gathered to rank 0 into the client state), and the step counter (which fixes the lr).

Resuming on a different world size: ZeRO 1-3 shard the optimizer state by rank and DeepSpeed
refuses to re-partition it, so the checkpoint is converted once to DeepSpeed's *universal* format
(``ds_to_universal``: one fp32 file per parameter, optimizer moments included) and loaded with
``checkpoint.load_universal``; the continuation keeps the optimizer state, not just the weights.

Final weights: :func:`consolidated_state_dict` asks each parameter for its fp32 master copy
(``safe_get_full_fp32_param``, which gathers ZeRO partitions), falling back to the bf16 optimizer's
fp32 groups at stage 0 and to the parameter itself in fp32 stage 0, where no master copy exists;
DeepSpeed's ``zero_to_fp32`` does not handle stage 0 at all.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np

STATE_FILE = "trainer_state.json"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict]:
    import torch.distributed as dist

    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def save(engine, ckpt_dir: Path, step: int, trainer_state: dict, keep_last: int) -> str:
    """Save a complete checkpoint for ``step`` on every rank; move ``latest`` once all are done."""
    import torch.distributed as dist

    tag = tag_for(step)
    client_state = {"trainer": trainer_state, "rng": gather_rng_states()}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        write_atomic(ckpt_dir / tag / STATE_FILE, json.dumps(trainer_state, indent=2))
        write_atomic(ckpt_dir / "latest", tag)
        if trainer_state.get("best_tag"):
            write_atomic(ckpt_dir / "best", trainer_state["best_tag"])
        prune(ckpt_dir, keep_last, trainer_state.get("best_tag"))
    dist.barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int, best_tag: str | None) -> None:
    tags = sorted(
        p.name
        for p in ckpt_dir.iterdir()
        if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).is_file()
    )
    for tag in tags[:-keep_last]:
        if tag != best_tag:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            shutil.rmtree(ckpt_dir / f"{tag}_universal", ignore_errors=True)


def find_checkpoint(resume: str | None, out_dir: Path) -> Path | None:
    """The tag directory to resume from: ``--resume`` alone means OUT_DIR/checkpoints/latest if any."""
    if resume is None:
        return None
    path = out_dir / "checkpoints" if resume == "auto" else Path(resume)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if (path / STATE_FILE).is_file():
        return path
    if resume == "auto":
        return None
    from ds_sft.errors import UserError

    raise UserError(
        f"--resume {resume}: no complete checkpoint there (expected a tag directory with "
        f"{STATE_FILE}, or a checkpoints directory with a 'latest' file)"
    )


def read_trainer_state(tag_dir: Path) -> dict:
    return json.loads((tag_dir / STATE_FILE).read_text())


def needs_universal(trainer_state: dict, world_size: int) -> bool:
    return trainer_state["world_size"] != world_size and trainer_state["zero_stage"] > 0


def convert_to_universal(tag_dir: Path) -> Path:
    """Rank 0 converts ``tag_dir`` once to DeepSpeed's universal format beside it; all ranks wait."""
    import torch.distributed as dist

    out = tag_dir.with_name(tag_dir.name + "_universal")
    if dist.get_rank() == 0 and not (out / "zero").is_dir():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        ds_to_universal(
            Namespace(
                input_folder=str(tag_dir),
                output_folder=str(out),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,
            )
        )
        # ds_to_universal leaves out the client state; the model-states file carries it.
        for name in os.listdir(tag_dir):
            if name.endswith("model_states.pt") and not (out / name).exists():
                shutil.copy2(tag_dir / name, out / name)
    dist.barrier()
    return out


def load(engine, tag_dir: Path, universal: bool = False) -> dict:
    """Load weights, optimizer and client state; restore this rank's RNG. Returns the trainer state."""
    import torch.distributed as dist

    if universal:
        tag_dir = convert_to_universal(tag_dir)
    _, client_state = engine.load_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {tag_dir}")
    rng_states = client_state["rng"]
    rank = dist.get_rank()
    if rank < len(rng_states):  # on a larger world, the new ranks keep their fresh seeds
        set_rng_state(rng_states[rank])
    return client_state["trainer"]


def consolidated_state_dict(engine) -> dict:
    """Full fp32 weights by parameter name, on every rank (a collective at ZeRO 3)."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    optimizer = engine.optimizer
    stage0_master = {}
    if engine.zero_optimization_stage() == 0 and hasattr(optimizer, "fp32_groups"):
        for low, master in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True):
            stage0_master.update({id(p): m for p, m in zip(low, master, strict=True)})
    state = {}
    for name, param in engine.module.named_parameters():
        if engine.zero_optimization_stage() > 0:
            full = safe_get_full_fp32_param(param)
        else:
            full = stage0_master.get(id(param), param)
        state[name] = full.detach().to(device="cpu", dtype=torch.float32).clone()
    return state
