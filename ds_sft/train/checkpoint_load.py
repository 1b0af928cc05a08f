"""Load a checkpoint into an engine, on top of ``engine.load_checkpoint``, never unpickling code.

Pickled code: DeepSpeed loads its files with ``torch.load(weights_only=False)`` (the engine,
``ds_to_universal``, the ZeRO-3 universal load), so every load from a checkpoint runs inside
:func:`weights_only_unpickling`, which forces torch's ``weights_only`` unpickler on every
``torch.load`` of the process (and of any worker process it starts) and allows nothing beyond
:data:`~ds_sft.train.checkpoint_check.CHECKPOINT_GLOBALS`. A file naming anything else is refused,
never executed. Any other failure of DeepSpeed's load is one line naming the tag. A state saved with
NaN/Inf in it passes the digests; the load counts them (:func:`non_finite_values`) and refuses it,
naming the newest earlier intact tag.

Resuming on a different world size: ZeRO 1-3 shard the optimizer state by rank and DeepSpeed
refuses to re-partition it, so the checkpoint is converted to DeepSpeed's *universal* format
(``ds_to_universal``: one fp32 file per parameter, optimizer moments included) and loaded with
``checkpoint.load_universal``; the continuation keeps the optimizer state, not just the weights. The
conversion is rebuilt at every such resume into a fresh folder that ds-sft creates in the resuming
run's own folder (``OUT_DIR/checkpoints/.universal-XXXX/``, never beside a ``--resume`` checkpoint
of another folder) and removes once loaded: a ``<tag>_universal/`` folder
found beside a checkpoint is never loaded, and never deleted (ds-sft did not write it).
At ZeRO 3, DeepSpeed 0.19.8's universal load shares one Adam step counter among the parameter
groups and gives every group the first group's weight decay: :func:`repair_zero3_universal_load`
puts both right, and the continuation then matches the uninterrupted run.

Resuming with another ZeRO stage or precision: DeepSpeed loads a checkpoint only into an engine of
its own kind, so the checkpoint is loaded into one (by :func:`load`, universal included) and its fp32
master weights, Adam moments and step are carried by parameter name into the new engine
(:mod:`ds_sft.train.state_transfer`), bit for bit.
"""

from __future__ import annotations

import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ds_sft.errors import UserError, first_line, one_line, refused_global
from ds_sft.run_layout import is_tag, tag_step
from ds_sft.train.checkpoint_check import CHECKPOINT_GLOBALS, damage, saved_tags
from ds_sft.train.checkpointing import UNIVERSAL_PREFIX
from ds_sft.train.trainer_state import trainer_state_problem

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # read by torch.load at every call


def allowed_globals() -> list[tuple[object, str]]:
    """:data:`CHECKPOINT_GLOBALS` as (object, pickled name) pairs for ``torch.serialization.safe_globals``."""
    import importlib

    pairs = []
    for name in sorted(CHECKPOINT_GLOBALS):
        module, _, attr = name.rpartition(".")
        if module == "numpy.core.multiarray":  # numpy 1's name; importing numpy.core warns in numpy 2
            module = "numpy._core.multiarray"
        pairs.append((getattr(importlib.import_module(module), attr), name))
    return pairs


@contextmanager
def weights_only_unpickling():
    """Inside: every ``torch.load`` (ours, DeepSpeed's, a worker process's) unpickles with torch's
    ``weights_only`` unpickler, allowing tensors, plain containers and :data:`CHECKPOINT_GLOBALS` only.

    DeepSpeed passes ``weights_only=False`` explicitly; torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
    overrides even that, at every call and in every child process, so no DeepSpeed code path (engine,
    ``ds_to_universal`` and its extraction workers, the ZeRO-3 universal load) can unpickle code. A
    spawned worker does not inherit the allowlist: it refuses DeepSpeed's classes instead of running
    anything.
    """
    import torch

    saved = {
        key: os.environ.pop(key, None) for key in (FORCE_WEIGHTS_ONLY, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    }
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def needs_universal(trainer_state: dict, world_size: int) -> bool:
    return trainer_state["world_size"] != world_size and trainer_state["zero_stage"] > 0


def with_universal_load(ds_config: dict) -> dict:
    """``ds_config`` telling the engine to load a universal checkpoint (:func:`convert_to_universal`)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def convert_to_universal(tag_dir: Path, ckpt_dir: Path, device) -> Path:
    """Rank 0 converts ``tag_dir`` to DeepSpeed's universal format in a fresh folder of its own making in
    this run's ``ckpt_dir`` (locked by this run: never the folder of the run ``--resume`` names, which
    may be live, read-only or shared), ``.universal-XXXX/<tag>/``, where DeepSpeed's ``latest_universal``
    lands too; every rank gets the path, or every rank the error. :func:`remove_universal` removes it."""
    import tempfile

    import torch.distributed as dist

    verdict = [None, None]  # [folder, error]
    if dist.get_rank() == 0:
        out = None
        try:  # every failure, making the folder included, must reach every rank, not leave them waiting
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            out = Path(tempfile.mkdtemp(prefix=UNIVERSAL_PREFIX, dir=ckpt_dir)) / tag_dir.name
            verdict[0] = str(out)
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
                if name.endswith("model_states.pt"):
                    shutil.copy2(tag_dir / name, out / name)
        except Exception as err:  # every rank must hear of it, not wait at a collective for rank 0
            if out is not None:
                shutil.rmtree(out.parent, ignore_errors=True)
            verdict[1] = unsafe_pickle_message(tag_dir, err) or f"{type(err).__name__}: {first_line(err)}"
    dist.broadcast_object_list(verdict, src=0, device=device)
    if verdict[1] is not None:
        raise UserError(f"could not convert {tag_dir} to a universal checkpoint: {one_line(verdict[1])}")
    return Path(verdict[0])


def remove_universal(folder: Path) -> None:
    """Rank 0 removes the folder :func:`convert_to_universal` made, once every rank has loaded it."""
    import torch.distributed as dist

    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(folder.parent, ignore_errors=True)


def unsafe_pickle_message(tag_dir: Path, err: BaseException) -> str | None:
    """The one line for torch's weights_only refusal of a file of ``tag_dir``; None for other errors."""
    import pickle

    if not isinstance(err, pickle.UnpicklingError):
        return None
    named = refused_global(err)
    what = f"names {named}" if named else f"is not a plain checkpoint ({first_line(err)})"
    return (
        f"a file of {tag_dir} {what}, which no checkpoint holds; ds-sft loads checkpoints only with torch's "
        "weights_only unpickler and ran nothing from it: pass another checkpoint"
    )


def load_failure(tag_dir: Path, err) -> str:
    """The one line for a checkpoint DeepSpeed's load failed on (files that do not match the saved
    kind or shapes, an edited state...): the tag, DeepSpeed's reason, what to do."""
    reason = f"{type(err).__name__}: {first_line(err)}" if isinstance(err, BaseException) else err
    return (
        f"could not load the checkpoint {tag_dir} ({one_line(reason)}): pass another checkpoint with "
        "--resume PATH, or --overwrite to start again"
    )


def load(engine, tag_dir: Path, universal_in: Path | None = None) -> dict:
    """Load weights, optimizer and client state, never unpickling code (:func:`weights_only_unpickling`);
    restore this rank's RNG. Returns the trainer state. ``universal_in``: on another world size, the
    run's own checkpoints folder, where ``tag_dir`` is converted to the universal format first."""
    import torch.distributed as dist

    universal = universal_in is not None
    with weights_only_unpickling():
        source = convert_to_universal(tag_dir, universal_in, engine.device) if universal else tag_dir
        try:
            _, client_state = engine.load_checkpoint(
                str(source.parent),
                tag=source.name,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
            if client_state is not None and universal and engine.zero_optimization_stage() == 3:
                repair_zero3_universal_load(engine.optimizer, source)
        except Exception as err:
            if universal and dist.get_rank() == 0:
                shutil.rmtree(source.parent, ignore_errors=True)
            if isinstance(err, UserError):
                raise
            raise UserError(unsafe_pickle_message(tag_dir, err) or load_failure(tag_dir, err)) from None
    if universal:
        remove_universal(source)
    if client_state is None:
        raise UserError(load_failure(tag_dir, "DeepSpeed found no checkpoint there"))
    weights, moments = non_finite_values(engine)
    if weights or moments:
        raise UserError(non_finite_message(tag_dir, int(weights), int(moments)))
    trainer = client_state.get("trainer")
    problem = trainer_state_problem(trainer)
    rng_states = client_state.get("rng")
    if problem is None and not isinstance(rng_states, list):
        problem = "no list of RNG states"
    if problem:
        raise UserError(
            f"the client state saved in {tag_dir} is malformed ({problem}): pass another checkpoint"
        )
    rank = dist.get_rank()
    if rank < len(rng_states):  # on a larger world, the new ranks keep their fresh seeds
        try:
            set_rng_state(rng_states[rank])
        except (TypeError, ValueError, KeyError, RuntimeError) as err:
            raise UserError(
                f"the RNG state of rank {rank} saved in {tag_dir} is malformed ({first_line(err)}): "
                "pass another checkpoint"
            ) from None
    return trainer


def non_finite_values(engine) -> list[float]:
    """[weights, optimizer state]: how many NaN/Inf values the engine holds, summed over ranks (a
    collective: every rank calls it). Weights are the module's (bf16 copies, or this rank's ZeRO 3
    partition) and the optimizer's fp32 masters; optimizer state is Adam's moments and step.

    Sha256 digests find a checkpoint damaged after it was written, not one written with NaN in it or
    rewritten whole. Resumed, such a state makes every loss NaN: each step is skipped, and after
    ``--max_nan_steps`` the run would stop blaming the learning rate. One pass over the state at load
    names the checkpoint instead."""
    import torch

    from ds_sft.train.distributed import all_reduce_sum
    from ds_sft.train.state_transfer import inner_optimizer

    optimizer = inner_optimizer(engine)
    weights = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    # the tensors Adam updates: its groups' parameters, or at ZeRO 3 (whose groups are empty between
    # steps) the keys of its state
    weights += [p for group in optimizer.param_groups for p in group["params"]] + list(optimizer.state)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    counts = torch.zeros(2, dtype=torch.float64, device=engine.device)
    for column, tensors in enumerate((weights, state)):
        # fp32 stage 0's masters are the module's parameters: each storage counted once
        for tensor in {(t.data_ptr(), t.numel()): t for t in tensors if t.is_floating_point()}.values():
            counts[column] += torch.isfinite(tensor.detach()).logical_not_().sum().to(counts)
    return all_reduce_sum(counts, engine.device).tolist()


def non_finite_message(tag_dir: Path, weights: int, moments: int) -> str:
    """The refusal of a checkpoint holding NaN/Inf values, pointing at the newest earlier intact tag."""
    # --resume PATH may name a copied tag folder of any name: then nothing beside it counts as earlier
    step = tag_step(tag_dir.name) if is_tag(tag_dir.name) else -1
    older = (p for p in saved_tags(tag_dir.parent) if tag_step(p.name) < step)
    earlier = next((p for p in older if damage(p) is None), None)
    where = (
        f"resume from an earlier one: --resume {earlier}"
        if earlier
        else f"no earlier intact checkpoint is left in {tag_dir.parent}"
    )
    return (
        f"the checkpoint {tag_dir} holds NaN/Inf values ({weights:,} in its weights, {moments:,} in its "
        f"optimizer state): every step from it would be skipped as a non-finite loss; {where}"
    )


def repair_zero3_universal_load(zero3_optimizer, universal_dir: Path) -> None:
    """Undo two mistakes of DeepSpeed 0.19.8's ZeRO-3 universal load (``stage3.py``,
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``); ZeRO 1/2 load each group on its own.

    1. ``state_step = optim_sd[...]['state'][0]['step']`` (line 3664), then
       ``self.optimizer.state[fp32_param]['step'] = state_step`` for every sub-group (line 3681): one
       tensor object shared by all of them. torch's Adam increments ``step`` *in place* once per
       group it updates, so with two groups the counter runs ahead twice as fast and every group
       after the first applies the wrong bias correction from the first update on. The first resumed
       loss is computed before that update, so the drift shows from the second (tiny model, 2 ranks
       -> 1: 2.4e-3, then 5.0e-3). Each sub-group gets its own copy back.
    2. The loop at line 3687 copies ``param_groups[0]``'s hyperparameters onto every group, so the
       no-decay group (norms, embeddings) decays like the projections. Each group gets its own saved
       hyperparameters back (the lr is rewritten before every step anyway).
    """
    import torch

    inner = zero3_optimizer.optimizer
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    # load() runs this inside weights_only_unpickling, as DeepSpeed's own load of the same file.
    saved = torch.load(universal_dir / "zero" / "optimizer_state.pt", weights_only=True)
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    for group, saved_group in zip(inner.param_groups, saved_groups, strict=True):
        group.update({key: value for key, value in saved_group.items() if key != "params"})
