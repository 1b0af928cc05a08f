"""Where a run starts: a fresh trainer state, or a checkpoint loaded into the engine and the sampler.

``--resume`` finds a checkpoint (:func:`~ds_sft.train.checkpoint_check.find_checkpoint`) whose run identity
is checked against this run's before the engine exists (:mod:`ds_sft.train.compatibility`). DeepSpeed
loads a checkpoint of this run's ZeRO stage and precision (:func:`resume_same_kind`); one of another
is loaded by an engine of its own kind, whose state is written into this run's
(:func:`resume_another_kind`). Either goes through DeepSpeed's universal format when the world size
changed. What the resume changed is printed (:func:`announce_resume`) and kept in the trainer state,
as is the val sample every eval scores (:func:`val_sample`).
"""

from __future__ import annotations

from pathlib import Path

from ds_sft.data.val_sample import scored_val_rows
from ds_sft.errors import UserError
from ds_sft.train import checkpoint_load, checkpointing, compatibility, state_transfer, trainer_state
from ds_sft.train.engine import build_engine
from ds_sft.train.param_groups import format_group_table


def optimizer_groups(engine) -> list[dict]:
    """The param_groups of the torch optimizer that steps (inside DeepSpeed's ZeRO or bf16 wrapper)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer).param_groups


def start_engine(
    s, ds_config: dict, model, train_set, run_dir: Path, tag_dir: Path | None, sampler, world: int, say
):
    """Build the engine and, given the checkpoint ``tag_dir`` (``--resume``'s, found by
    :func:`~ds_sft.train.checkpoint_check.find_checkpoint` before the weights loaded), load it into the
    engine and into ``sampler``.

    Returns (engine, trainer state, run identity). The identity (``compatibility.run_identity``) is
    checked against the checkpoint's before the engine exists and saved with every checkpoint."""
    identity = compatibility.run_identity(s, model, train_set, world, ds_config)
    if tag_dir is None:
        engine = new_engine(s, model, ds_config, say)
        if s.resume == "auto":
            say(f"--resume: no checkpoint in {run_dir / 'checkpoints'}, starting from step 0")
        return engine, trainer_state.fresh_state(), identity

    saved = trainer_state.read_trainer_state(tag_dir)
    if saved["step"] >= s.max_iters:  # said, not silent: final/ and the report come from it as it is
        say(
            f"note: {tag_dir} is at step {saved['step']} and --max_iters is {s.max_iters}: nothing to "
            "train; final/ and the report are written from it (pass a larger --max_iters to train on)"
        )
    changes = compatibility.check_resume(tag_dir, saved, identity, s.allow_change or (), model)
    universal = checkpoint_load.needs_universal(saved, world)
    universal_in = run_dir / "checkpoints" if universal else None  # this run's, which it has locked
    changed = state_transfer.changes(compatibility.saved_identity(saved), identity)
    if changed:
        resumed = resume_another_kind(s, ds_config, model, tag_dir, saved, changed, universal_in, say)
    else:
        resumed = resume_same_kind(s, ds_config, model, tag_dir, saved, universal_in, say)
    engine, state, optimizer_changes = resumed
    changes += optimizer_changes
    reseed = any(change["key"] == "seed" for change in changes)  # allowed: the new seed's order
    sampler.load_state_dict(state["sampler"], reseed=reseed)
    announce_resume(s, run_dir, tag_dir, saved, state["step"], changes, universal, say)
    earlier = compatibility.recorded_changes(state, tag_dir)
    state["changes"] = earlier + [{"step": state["step"], **change} for change in changes]
    return engine, state, identity


def new_engine(s, model, ds_config: dict, say):
    """The run's engine around ``model`` (compiled with ``--compile``); prints its parameter groups."""
    engine, group_table = build_engine(model, ds_config, s.weight_decay)
    if s.compile:
        engine.compile()
    say("parameter groups:\n" + format_group_table(group_table))
    return engine


def resume_same_kind(s, ds_config: dict, model, tag_dir: Path, saved: dict, universal_in: Path | None, say):
    """DeepSpeed loads a checkpoint of this run's ZeRO stage and precision into the new engine (converted
    to the universal format in ``universal_in`` first when the world size changed), then this run's
    optimizer settings go back over the loaded ones. Returns (engine, trainer state, optimizer changes)."""
    if universal_in is not None:
        ds_config = checkpoint_load.with_universal_load(ds_config)
    engine = new_engine(s, model, ds_config, say)
    requested = compatibility.optimizer_settings(optimizer_groups(engine))
    state = checkpoint_load.load(engine, tag_dir, universal_in)
    # load_checkpoint put the saved param_groups (new dicts) over this run's: train with this run's
    loaded = optimizer_groups(engine)
    trained = compatibility.optimizer_settings(loaded)
    if isinstance(saved.get("optimizer"), dict):  # what it trained with: torch's AdamW loads any
        trained.update(saved["optimizer"])  # saved group as decoupled, an Adam run's L2 groups too
    changes = compatibility.optimizer_changes(tag_dir, trained, requested)
    compatibility.apply_optimizer_settings(loaded, requested)
    return engine, state, changes


def resume_another_kind(
    s, ds_config: dict, model, tag_dir: Path, saved: dict, changed: dict, universal_in: Path | None, say
):
    """A checkpoint of another ZeRO stage or precision (``changed``): loaded by an engine of its own kind
    (universal when the world size changed), its weights, optimizer state and RNG written into an
    engine of this run's (:mod:`ds_sft.train.state_transfer`). Returns (engine, trainer state,
    optimizer changes)."""
    kind = {"zero_stage": s.zero_stage, "precision": s.precision}
    kind.update({key: old for key, (old, _) in changed.items()})
    carried, state, rng = state_transfer.load_saved_kind(
        model, ds_config, s.weight_decay, tag_dir, kind, universal_in
    )
    state_transfer.load_weights(model, carried)
    engine = new_engine(s, model, ds_config, say)
    # an engine of this run's settings given the saved state: nothing to put back
    state_transfer.write_state(engine, carried)
    checkpoint_load.set_rng_state(rng)
    say(f"resuming {state_transfer.describe(changed)}")
    recorded = saved.get("optimizer")  # the settings the checkpoint trained with (older ones: none)
    if not isinstance(recorded, dict):
        return engine, state, []
    requested = compatibility.optimizer_settings(optimizer_groups(engine))
    return engine, state, compatibility.optimizer_changes(tag_dir, recorded, requested)


def announce_resume(
    s, run_dir: Path, tag_dir: Path, saved: dict, step: int, changes: list, universal: bool, say
) -> None:
    """Print where the run resumed, what the resume changed, and what differs from the run it continues:
    later checkpoints its first save deletes, a cosine that now ends elsewhere."""
    say(
        f"resumed from {tag_dir} at step {step}"
        + (f" (saved by {saved['world_size']} ranks; loaded via a universal checkpoint)" if universal else "")
    )
    for change in changes:
        say(f"resume changes {compatibility.describe(change)}")
    later = checkpointing.later_tags(run_dir / "checkpoints", step)
    if later:
        say(
            f"note: {run_dir / 'checkpoints'} also holds {', '.join(p.name for p in later)}, saved after "
            f"step {step} by the run this one branches from: this run's first save deletes "
            "them; to keep them, copy them now, or resume into another --out_dir"
        )
    if saved.get("max_iters", s.max_iters) != s.max_iters and step < s.max_iters:
        say(
            f"note: --max_iters {saved['max_iters']} -> {s.max_iters}: the cosine now ends at step "
            f"{s.max_iters}, so from step {step} on the lr is not the saved run's"
        )


def val_sample(s, val_set, state: dict, data_key, say) -> list[int]:
    """The val rows every eval of the run scores, drawn once (``stratified_rows``) and kept in the
    trainer state: a resume with another --micro_batch_size or --eval_iters scores the same rows, so
    ``best_val`` and the alarms go on comparing like with like. Drawn again only for other data. (An empty
    val split, or one without trained tokens, was refused before the run began: ``preflight``.)"""
    wanted = s.eval_iters * s.micro_batch_size
    kept = state.get("val_sample")  # checked sorted and non-negative (trainer_state.trainer_state_problem)
    if kept is not None and kept.get("data") == data_key:
        rows = kept["rows"]
        if rows[-1] >= len(val_set):  # the same data's key, so the same split: only an edited state
            raise UserError(
                f"the resumed checkpoint's val sample names row {rows[-1]}, but the val split of "
                f"{s.data_dir} holds {len(val_set)}: pass another checkpoint"
            )
        if kept["count"] != wanted:
            say(
                f"note: the val sample stays the run's {len(rows)} rows (--eval_iters x --micro_batch_size "
                f"asks for {wanted} now, {kept['count']} then): evals stay comparable; start a new run for "
                "another sample"
            )
    else:
        rows = scored_val_rows(val_set, wanted, str(s.data_dir), "prepare the data again")
        if kept is not None:
            say("note: the data changed at this resume: a new val sample, not comparable with earlier evals")
        state["val_sample"] = {"data": data_key, "count": wanted, "rows": rows}
    say(f"val sample: {len(rows)} of {len(val_set)} val rows, stratified by source (any world size)")
    return rows
