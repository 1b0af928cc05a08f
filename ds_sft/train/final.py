"""``RUN/final/``: the run's consolidated fp32 weights and the tokenizer they were trained with.

At the end of a finished run every rank takes part in :func:`consolidated_state_dict` (a collective at
ZeRO 3: the fp32 masters gathered by parameter name, as a change of ZeRO stage or precision reads them)
and rank 0 writes the folder (:func:`save_final`): the weights in ``save_model``'s layout, the data's
tokenizer files, ``trained_on.json`` and the listing of exactly these files that ``--overwrite`` may
remove (:func:`~ds_sft.train.run_dir.write_final_listing`). The tokenizer's files are checked when the
run starts (:func:`tokenizer_files`) and read then (:func:`read_tokenizer`), so ``final/`` gets the
tokenizer the run trained with, whatever happens to the data folder meanwhile.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ds_sft.errors import UserError
from ds_sft.safe_read import describe_mode
from ds_sft.safe_write import own_folder, replace_file, write_result_file


def tokenizer_files(tokenizer_dir) -> tuple[list[str], list[str]]:
    """The files of ``DATA/tokenizer`` that ``final/tokenizer/`` gets, and the entries it leaves out.

    Only the regular files a saved tokenizer consists of (``SAVED_TOKENIZER_FILES``) are copied: a
    copy of the whole folder followed its symlinks (``/etc/passwd``, all of ``/work/shared``, ``/``)
    into the run's own files and stopped at a FIFO in a traceback after training. One of those names
    that is not a regular file (a link, a folder, a FIFO) is refused in one line, since the copied
    tokenizer would lack it; any other entry is not part of a tokenizer and is left out with a note.
    Checked before the run starts (:mod:`~ds_sft.train.preflight`), and read once its folder is claimed
    (:func:`read_tokenizer`), both before the model exists.
    """
    from ds_sft.train.run_dir import SAVED_TOKENIZER_FILES

    if tokenizer_dir is None or not Path(tokenizer_dir).is_dir():
        return [], []
    copied, skipped = [], []
    for entry in sorted(os.scandir(tokenizer_dir), key=lambda e: e.name):
        regular = entry.is_file(follow_symlinks=False)
        if entry.name not in SAVED_TOKENIZER_FILES:
            skipped.append(entry.name)
        elif regular:
            copied.append(entry.name)
        else:
            kind = describe_mode(entry.stat(follow_symlinks=False).st_mode)
            raise UserError(
                f"{entry.path} is {kind}, not a regular file: final/tokenizer/ gets a copy of the "
                "tokenizer's own files; put the file itself there (or run `ds-sft prepare` again)"
            )
    return copied, skipped


def read_tokenizer(tokenizer_dir) -> dict[str, bytes]:
    """The bytes of the files :func:`tokenizer_files` names, read when the run starts: what
    ``final/tokenizer/`` gets at its end. Copied at the end, a ``ds-sft prepare`` run again into the
    data folder meanwhile (another tokenizer) put its files beside weights trained on the old ids."""
    return {name: read_regular_file(Path(tokenizer_dir) / name) for name in tokenizer_files(tokenizer_dir)[0]}


def read_regular_file(source: Path) -> bytes:
    """The bytes of the regular file ``source``, never through a symlink: ``O_NOFOLLOW`` and
    ``O_NONBLOCK`` open a link or FIFO put there since the check without following it or waiting for a
    writer, and ``fstat`` refuses what is not a regular file."""
    try:
        descriptor = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        raise UserError(f"{source}: cannot be read ({err.strerror}); it must be a regular file") from None
    with os.fdopen(descriptor, "rb") as reader:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise UserError(f"{source}: is not a regular file; put the tokenizer file itself there")
        return reader.read()


def write_final(
    model, final: Path, tokenizer: dict[str, bytes], manifest: dict | None = None, step: int | None = None
) -> None:
    """``final/``: the weights (:func:`~ds_sft.model.checkpoint.save_model`), the data's tokenizer files
    as the run read them at its start (:func:`read_tokenizer`) in ``final/tokenizer/``, the data's
    template and the ``step`` (:data:`~ds_sft.data.model_match.TRAINED_ON`: what eval asks the model in,
    and whether the run's checkpoints went on since), and the listing of exactly these files, which is
    what ``--overwrite`` may remove there (a user's file put beside them stays theirs: it is refused)."""
    from ds_sft.data.model_match import TRAINED_ON, trained_on
    from ds_sft.model.checkpoint import CONFIG_FILE, MODEL_FILE, save_model
    from ds_sft.train.run_dir import write_final_listing

    save_model(model, final)
    written = [MODEL_FILE, CONFIG_FILE]
    if manifest is not None:
        write_result_file(final / TRAINED_ON, trained_on(manifest, step))
        written.append(TRAINED_ON)
    if tokenizer:
        own_folder(final / "tokenizer")
    for name, data in tokenizer.items():
        # replaced, never written through: a resumed final/ may be a cp -al copy
        replace_file(final / "tokenizer" / name, lambda temporary, data=data: temporary.write_bytes(data))
        written.append(f"tokenizer/{name}")
    write_final_listing(final, written)


def save_final(engine, run_dir: Path, tokenizer: dict[str, bytes], manifest: dict, step: int) -> Path | None:
    """Consolidated fp32 weights (every rank takes part; rank 0 writes) -> RUN/final."""
    from ds_sft.model.llama import LlamaModel
    from ds_sft.train.distributed import on_rank_zero

    state = consolidated_state_dict(engine)
    final = run_dir / "final"

    def write() -> None:
        model = LlamaModel(engine.module.config)
        model.load_state_dict(state, strict=True)
        write_final(model, final, tokenizer, manifest, step)
        print(f"final fp32 weights: {final}")

    on_rank_zero(write, engine.device)
    return final


def consolidated_state_dict(engine) -> dict:
    """Full fp32 weights by parameter name, on every rank (a collective at ZeRO 3): the fp32 masters,
    read as a change of ZeRO stage or precision reads them (:func:`state_transfer.read_state`)."""
    from ds_sft.train.state_transfer import read_state

    return {name: entry["fp32"] for name, entry in read_state(engine, moments=False)["params"].items()}
