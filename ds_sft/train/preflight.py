"""Every refusal the flags and the files alone can give, made before the expensive work.

After these checks ``ds-sft train`` joins the process group (with several ranks: a rendezvous), claims
its folder, loads the weights (seconds to minutes for a large model) and builds the DeepSpeed engine.
A run that one look at its data and its model's files would refuse must not pay for any of that: so
the splits are opened and checked here (rows of one length, trained tokens in both, a tokenizer
folder that is the one the data was made with and holds only a tokenizer's files), the batch is
checked against the split, and the data against the model as its files describe it, without its
weights: the base model's own tokenizer, and its config as the load will build it
(:func:`~ds_sft.model.checkpoint.read_config`: config files, safetensors headers, GGUF metadata; its
names and shapes checked there too), whose vocabulary the data's ids and whose positions its rows must
fit; a preset's config likewise. Each rank runs them (as it resolves the flags), before any rank waits
for another.

What needs more than files waits for it: the vocabulary of a base model in a torch file (its shapes
lie inside a pickle that only the load unpickles: :func:`~ds_sft.train.compatibility.check_fresh` on
the built model; its positions are read here), the memory a micro-batch takes (``memory.check_fits``),
a checkpoint to resume (the claimed folder, :func:`~ds_sft.train.checkpoint_check.find_checkpoint`,
still before the weights load) and whether the checkpoint's run is this one (its identity holds the
weights' digest).
"""

from __future__ import annotations

from ds_sft.errors import UserError


def check_run(s, world: int):
    """The splits of ``s.data_dir`` once nothing the flags or files say refuses the run: (train set, val
    set, the notes rank 0 prints, the model config the data was checked against: None when the files do
    not say it, and the built model must be checked); else the UserError of the first refusal.
    ``world``: the launch's ranks."""
    from ds_sft.data.model_match import data_tokenizer_identity
    from ds_sft.data.shards import PackedDataset
    from ds_sft.train.compatibility import check_base_model
    from ds_sft.train.final import tokenizer_files

    train_set = PackedDataset(s.data_dir, "train")
    val_set = PackedDataset(s.data_dir, "val")
    check_splits(s, train_set, val_set)
    notes = []
    skipped = tokenizer_files(train_set.tokenizer_dir)[1]
    if skipped:
        notes.append(
            f"{train_set.tokenizer_dir}: not a saved tokenizer's file, left out of final/tokenizer/: "
            + ", ".join(skipped)
        )
    data_tokenizer_identity(str(s.data_dir))  # its tokenizer/ folder is the one its shards were made with
    notes.append(check_batch_fits_split(s, world, len(train_set)))
    notes.append(check_base_model(s))
    checked = check_data_fits_model(s, train_set.seq_len)
    return train_set, val_set, [note for note in notes if note], checked


def check_splits(s, train_set, val_set) -> None:
    """Both splits hold rows of one length and trained tokens: every train step would be skipped
    without them (``step.train_step``), and every eval would have no loss."""
    if len(val_set) and val_set.seq_len != train_set.seq_len:  # the model checks read train's
        raise UserError(
            f"{s.data_dir}: its val rows hold {val_set.seq_len} tokens, its train rows "
            f"{train_set.seq_len}: the splits come from different runs of `ds-sft prepare`; prepare the "
            "data again"
        )
    if not train_set.trained_tokens:
        raise UserError(
            f"{s.data_dir}: no train row has a trained token (every label is masked), so there is "
            "nothing to learn: prepare the data again"
        )
    if not len(val_set):
        raise UserError(f"{s.data_dir} has an empty val split: prepare it with --val_fraction > 0")
    if not val_set.trained_tokens:  # the val sample draws rows with trained tokens (data.val_sample)
        raise UserError(
            f"{s.data_dir}: no val row has a trained token (every label is masked), so there is no val "
            "loss: prepare the data again"
        )


def check_data_fits_model(s, seq_len: int):
    """The data's ids fit the model's vocabulary and its rows the model's positions, before any weight
    is loaded or initialised (:func:`~ds_sft.data.model_match.check_model_fits`, the one check). The
    model's config: a preset's, or the one the load builds for the base model, read from its files
    (:func:`~ds_sft.model.checkpoint.read_config`). Returns that config; None for a base model whose
    files hold their shapes in a pickle (a torch file), of which only the positions its config
    declares are checked here."""
    from ds_sft.data.model_match import check_model_fits, model_positions, refuse_rows_past_positions
    from ds_sft.model.checkpoint import read_config
    from ds_sft.model.config import ModelConfig

    if s.base_model is None:
        config = ModelConfig.preset(s.model)
        check_model_fits(f"the {s.model} preset", config, s.data_dir, seq_len)
        return config
    config = read_config(s.base_model)
    if config is not None:
        check_model_fits(s.base_model, config, s.data_dir, seq_len)
        return config
    positions = model_positions(s.base_model)  # None: the files do not say; checked once it is built
    if positions is not None:
        refuse_rows_past_positions(f"{s.data_dir} holds rows", seq_len, s.base_model, positions)
    return None


def check_batch_fits_split(s, world: int, train_rows: int) -> str | None:
    """Refuse a micro-step that reads more rows than the train split holds; a note when a step does.

    All ranks' micro-batches together (``micro x ranks`` rows) would hold the same packed row several
    times: a batch size the data cannot give, not a choice (65,536 rows of a 65-row split would go on
    to fill the memory). An optimizer step of more rows than the split (``micro x accum x ranks``) reads
    it several times over, an epoch and more per step: legal (the sampler's stream runs on through the
    epochs, and small-data recipes do it), so it is said, not refused."""
    per_micro_step = s.micro_batch_size * world
    if per_micro_step > train_rows:
        fix = (
            f"pass --micro_batch_size {train_rows // world} or less"
            if train_rows >= world
            else f"train on {train_rows} rank(s) or fewer"
        )
        raise UserError(
            f"--micro_batch_size {s.micro_batch_size} x {world} rank(s) = {per_micro_step:,} rows per "
            f"micro-step, but the train split of {s.data_dir} holds {train_rows:,} packed rows: {fix}, "
            "or prepare more data"
        )
    per_step = per_micro_step * s.grad_accum
    if per_step > train_rows:
        return (
            f"note: a step reads {per_step:,} rows ({s.micro_batch_size} micro x {s.grad_accum} accum x "
            f"{world} rank(s)), the train split holds {train_rows:,}: each step sees every row "
            f"~{per_step / train_rows:.1f} times (fewer rows per step: a smaller --grad_accum)"
        )
    return None
