"""Is a checkpoint tag intact and free of pickled code? And which one does ``--resume`` take?

Integrity: ``trainer_state.json`` is written last and lists every file of the tag with its size and
sha256 (rank 0 hashes them; checkpoints live on a filesystem every rank sees, as DeepSpeed's own
resume assumes). Before resuming, the files are checked against it (:func:`damage`): a truncated or
corrupted file (a disk that filled, a copy cut short, a flipped bit) is named in one line, and so is
a state whose ZeRO stage or precision the files' names contradict (:func:`kind_problem`: DeepSpeed
would fail deep in its load). ``--resume`` alone then falls back to the newest intact checkpoint,
saying which it skipped and why; ``--resume TAG_DIR`` asked for that one checkpoint and stops instead
(:func:`find_checkpoint`). All of it runs before the weights load.

Pickled code: a ``.pt`` file is a pickle, and unpickling can call any importable function. Every
load from a checkpoint allows nothing beyond :data:`CHECKPOINT_GLOBALS`, the few classes that
DeepSpeed's ZeRO 0-3 fp32/bf16 checkpoints and our numpy RNG state hold
(:func:`~ds_sft.train.checkpoint_load.weights_only_unpickling`). Before the engine exists, the same
list is checked against the opcodes of every ``.pt`` of a tag (:func:`pickled_code`, nothing
executed), so ``--resume`` can fall back to an older checkpoint instead of stopping. The sha256
manifest only detects damage: whoever can plant a file can rewrite the manifest too, which is why the
trainer state is checked field by field too (:func:`~ds_sft.train.trainer_state.trainer_state_problem`).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ds_sft.errors import UserError, one_line
from ds_sft.json_input import JsonRefused, NotJson
from ds_sft.run_layout import TRAINER_STATE, is_tag, latest_tag, tag_step
from ds_sft.safe_read import sha256_file
from ds_sft.train.trainer_state import FILES, read_trainer_state, trainer_state_problem
from ds_sft.written_files import file_record, foreign_entries

# Everything a ds-sft checkpoint pickles beyond tensors and plain containers, as the pickle names it
# (collected from ZeRO 0-3 checkpoints in fp32 and bf16; numpy's _reconstruct moved to numpy._core in
# numpy 2, and a numpy 2 dtype is rebuilt as its own class, e.g. numpy.dtypes.UInt32DType for the RNG).
CHECKPOINT_GLOBALS = {
    "numpy.dtype",
    "numpy.ndarray",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.dtypes.UInt32DType",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}


def file_digests(tag_dir: Path) -> dict:
    """{file name: {"bytes", "sha256"}} for every file DeepSpeed wrote into ``tag_dir``: the listing of
    ``ds_sft.written_files``, flat (DeepSpeed writes no folders into a tag), kept in its trainer state."""
    files = sorted(p for p in tag_dir.iterdir() if p.is_file() and p.name != TRAINER_STATE)
    return {p.name: file_record(p) for p in files}


def damage(tag_dir: Path) -> str | None:
    """Why ``tag_dir`` cannot be resumed from (malformed state, missing, truncated, corrupted, foreign
    or code-carrying files), or None."""
    if not (tag_dir / TRAINER_STATE).is_file():
        return f"it has no {TRAINER_STATE} (the save never completed)"
    try:
        state = read_trainer_state(tag_dir)
    except OSError as err:
        return f"its {TRAINER_STATE} cannot be read ({err.strerror})"
    except NotJson:  # torn or damaged bytes
        return f"its {TRAINER_STATE} is corrupted"
    except JsonRefused as err:  # JSON, but not a state: NaN, a repeated key, a list, nested too deep
        return f"its {TRAINER_STATE} is malformed JSON ({err})"
    problem = trainer_state_problem(state, with_files=True)
    if problem:
        return f"its {TRAINER_STATE} is malformed ({problem})"
    expected = state[FILES]
    for name, digest in expected.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != digest["bytes"]:
            return f"{name} is truncated or overwritten ({size:,} bytes, {digest['bytes']:,} when saved)"
        if sha256_file(path) != digest["sha256"]:
            return f"{name} is corrupted (its sha256 differs from the one recorded when saved)"
    foreign = foreign_entries(tag_dir, expected, TRAINER_STATE)  # a link, a folder, a FIFO named x.pt...
    if foreign:
        are = "is" if len(foreign) == 1 else "are"
        return f"{', '.join(foreign)} {are} not among the regular files it was saved with"
    return kind_problem(state, expected) or pickled_code(tag_dir)


# DeepSpeed names a tag's files by the engine that saved them: ZeRO 1-3 write one optimizer file per
# rank, prefixed bf16_ in bf16 (stage 0 keeps its optimizer in the model states), and ZeRO 3 one
# model-states file per rank.
OPTIM_STATES = re.compile(r"(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt")
ZERO3_MODEL_STATES = re.compile(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt")


def kind_problem(state: dict, names) -> str | None:
    """Why the ZeRO stage and precision ``state`` records are not those of the engine that wrote the
    files ``names`` (their names tell), or None. A resume builds its engine from the recorded kind, and
    DeepSpeed fails deep in its load on another kind's files."""
    stage = state["zero_stage"]
    optim = [match for match in map(OPTIM_STATES.fullmatch, names) if match]
    if (stage > 0) != bool(optim):
        written_by = "ZeRO 1-3 (optimizer files)" if optim else "ZeRO 0 (no optimizer files)"
        return f"its files were written by {written_by}, but its {TRAINER_STATE} says ZeRO {stage}"
    if (stage == 3) != any(map(ZERO3_MODEL_STATES.fullmatch, names)):
        written_by = "ZeRO 1-2" if stage == 3 else "ZeRO 3"
        return (
            f"its model-states files were written by {written_by}, but its {TRAINER_STATE} says ZeRO {stage}"
        )
    precision = state.get("run", {}).get("precision")  # older states do not record it
    if precision is not None and any(bool(match.group(1)) != (precision == "bf16") for match in optim):
        other = "fp32" if precision == "bf16" else "bf16"
        return f"its optimizer files were written in {other}, but its {TRAINER_STATE} says {precision}"
    return None


def saved_tags(ckpt_dir: Path) -> list[Path]:
    """The tag folders in ``ckpt_dir`` whose save completed (its trainer state is written last), newest
    first."""
    tags = (p for p in ckpt_dir.glob("step_*") if is_tag(p.name) and (p / TRAINER_STATE).is_file())
    return sorted(tags, key=lambda p: tag_step(p.name), reverse=True)


def pickled_code(tag_dir: Path) -> str | None:
    """Which ``.pt`` file of ``tag_dir`` names Python objects a checkpoint never holds, or None."""
    import pickle

    import torch

    for path in sorted(tag_dir.glob("*.pt")):
        try:
            named = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            unexpected = sorted(set(named) - CHECKPOINT_GLOBALS)
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as err:
            return f"{path.name} cannot be checked for pickled code ({str(err).strip().splitlines()[0]})"
        if unexpected:
            return f"{path.name} names Python objects no checkpoint holds ({', '.join(unexpected)})"
    return None


def find_checkpoint(resume: str | None, out_dir: Path) -> Path | None:
    """The tag directory to resume from, checked intact (see the module docstring).

    ``--resume`` alone: OUT_DIR/checkpoints/latest, else the newest intact older tag (None when there
    is no checkpoint at all). ``--resume PATH``: that tag directory (or its ``latest``), or an error.
    """

    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if (path / "latest").is_file():
            named = latest_tag(path)
            if named is None:
                raise UserError(
                    f"--resume {resume}: its 'latest' file does not name a checkpoint tag (step_N)"
                )
            path = path / named
        if not (path / TRAINER_STATE).is_file():
            raise UserError(
                f"--resume {resume}: no complete checkpoint there (expected a tag directory with "
                f"{TRAINER_STATE}, or a checkpoints directory with a 'latest' file)"
            )
        problem = damage(path)
        if problem:
            raise UserError(f"--resume {path}: {problem}; pass another checkpoint, or --resume alone "
                            "to fall back to the newest intact one")  # fmt: skip
        return path
    ckpt_dir = out_dir / "checkpoints"
    named = [ckpt_dir / latest_tag(ckpt_dir)] if latest_tag(ckpt_dir) else []
    skipped = []
    for path in dict.fromkeys(named + saved_tags(ckpt_dir)):  # latest first, then newest to oldest, each once
        problem = damage(path)
        if problem is None:
            for line in skipped:
                print(f"warning: {one_line(line)}", file=sys.stderr, flush=True)
            return path
        skipped.append(f"skipping checkpoint {path}: {problem}")
    if skipped:
        raise UserError(f"no intact checkpoint in {ckpt_dir} to resume from ({'; '.join(skipped)})")
    return None
