"""Save and resume, on top of ``engine.save_checkpoint`` / ``engine.load_checkpoint``.

Layout::

    RUN/checkpoints/step_000050/     the engine's files (model, optimizer partitions, client state)
                    step_000050/trainer_state.json   step, sampler, best val, world size (readable
                                                     before the engine exists)
    RUN/checkpoints/latest           the tag of the newest *complete* checkpoint
    RUN/checkpoints/best             the tag with the lowest val loss

Every rank writes into ``RUN/checkpoints/.partial/<tag>/``; once all have returned from
``save_checkpoint`` and passed a barrier, rank 0 writes the manifest, moves the folder to its tag,
and only then rewrites ``latest`` (atomically), so a run killed mid-save resumes from the previous
checkpoint and a tag folder is only ever a complete save. The next save deletes what such a save
left in ``.partial/`` (or ``.replaced/``) only when every file there is named as a save names its
files (:func:`remove_scratch`; no marker is needed, so an older ds-sft's leftovers qualify too); a
folder holding anything else is moved whole to ``.partial.kept`` and named, never deleted. A run
resumed from an older checkpoint saves steps the first run saved too: the new tag *replaces* the old
one whole (the old folder is moved aside, then deleted; a symlink is unlinked, never followed), so
no file of the first run (such as another world size's ZeRO partitions) stays beside the new ones.
Tags later than the one just saved belong to the run this one branched from: they are deleted before
the new tag takes its place (a crash then falls back to this run's own checkpoints, never the other
run's), then older tags beyond ``--keep_last``, except the best.

Integrity: ``trainer_state.json`` is written last and lists every file of the tag with its size and
sha256 (rank 0 hashes them; checkpoints live on a filesystem every rank sees, as DeepSpeed's own
resume assumes). Before resuming, the files are checked against it: a truncated or corrupted file
(a disk that filled, a copy cut short, a flipped bit) is named in one line, and so is a state whose
ZeRO stage or precision the files' names contradict (:func:`kind_problem`: DeepSpeed would fail deep
in its load); any other failure of DeepSpeed's load is one line naming the tag. ``--resume`` alone then
falls back to the newest intact checkpoint, saying which it skipped and why; ``--resume TAG_DIR``
asked for that one checkpoint and stops instead. A state saved with NaN/Inf in it passes the digests;
the load counts them (:func:`non_finite_values`) and refuses it, naming the newest earlier intact
tag. A disk error while saving (full, read-only) stops
the run with one line saying so and that the previous checkpoint, which ``latest`` still names, is
intact.

Pickled code: a ``.pt`` file is a pickle, and unpickling can call any importable function. DeepSpeed
loads its files with ``torch.load(weights_only=False)`` (the engine, ``ds_to_universal``, the ZeRO-3
universal load), so every load from a checkpoint runs inside :func:`weights_only_unpickling`, which
forces torch's ``weights_only`` unpickler on every ``torch.load`` of the process (and of any worker
process it starts) and allows nothing beyond :data:`CHECKPOINT_GLOBALS`: the few classes that
DeepSpeed's ZeRO 0-3 fp32/bf16 checkpoints and our numpy RNG state hold. A file naming anything else
is refused, never executed. Before the engine exists, the same list is checked against the opcodes of
every ``.pt`` of a tag (:func:`pickled_code`, nothing executed), so ``--resume`` can fall back to an
older checkpoint instead of stopping. The sha256 manifest only detects damage: whoever can plant a
file can rewrite the manifest too. ``trainer_state.json`` decides the path a resume takes (which tag,
universal or not), so its contents are checked field by field (:func:`trainer_state_problem`): a
hostile one can only pick among safe paths.

Exact resume needs everything that shapes the next step: weights, optimizer moments and step
counts (the engine), the position in the data stream (the sampler state), the RNG of every rank
(gathered to rank 0 into the client state), and the step counter (which fixes the lr).

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

import itertools
import json
import os
import random
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ds_sft.errors import UserError, first_line, one_line, refused_global
from ds_sft.json_input import parse_json_object
from ds_sft.options import is_number
from ds_sft.paths import sha256_file
from ds_sft.run_layout import TRAINER_STATE, is_tag, latest_tag, tag_for, tag_step

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
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # read by torch.load at every call
PARTIAL = ".partial"  # where every rank writes a checkpoint before it takes its tag's place
REPLACED = ".replaced"  # where an earlier run's folder of the same tag waits to be deleted
UNIVERSAL_PREFIX = ".universal-"  # + tempfile's suffix: a universal conversion while it is loaded
# The names of the files a save (.partial), a replaced tag (.replaced) and a universal conversion
# (.universal-XXXX, with ds_to_universal's temporary shards "exp_avg.00") hold: DeepSpeed's pickles and
# scripts, the trainer state (+ write_atomic's .tmp). A scratch folder holding any other file is not
# ds-sft's alone, whichever ds-sft version left it.
SCRATCH_FILES = re.compile(
    rf"[^/]+\.pt|\w+\.\d+|{re.escape(TRAINER_STATE)}(\.tmp)?|latest_universal|zero_to_\w+\.py"
)


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


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a new file: one left hard-linked (cp -al) would be written through
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


def file_digests(tag_dir: Path) -> dict:
    """{file name: {"bytes", "sha256"}} for every file DeepSpeed wrote into ``tag_dir``."""
    files = sorted(p for p in tag_dir.iterdir() if p.is_file() and p.name != TRAINER_STATE)
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


def foreign_entries(paths, listed) -> list[str]:
    """The names among ``paths`` (a tag folder's entries) that are not the run's own files: a name its
    trainer state does not list (``listed``, the state file aside), or a listed one that is no longer a
    regular file (a link, a folder, a FIFO: a FIFO named x.pt would block a reader forever)."""
    ours = {*listed, TRAINER_STATE}
    return sorted(p.name for p in paths if p.name not in ours or p.is_symlink() or not p.is_file())


def damage(tag_dir: Path) -> str | None:
    """Why ``tag_dir`` cannot be resumed from (malformed state, missing, truncated, corrupted, foreign
    or code-carrying files), or None."""
    if not (tag_dir / TRAINER_STATE).is_file():
        return f"it has no {TRAINER_STATE} (the save never completed)"
    try:
        state = read_trainer_state(tag_dir)
    except OSError as err:
        return f"its {TRAINER_STATE} cannot be read ({err.strerror})"
    except (ValueError, RecursionError):  # not JSON, not UTF-8, an integer of over 4,300 digits, too deep
        return f"its {TRAINER_STATE} is corrupted"
    problem = trainer_state_problem(state, with_files=True)
    if problem:
        return f"its {TRAINER_STATE} is malformed ({problem})"
    expected = state["files"]
    for name, digest in expected.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != digest["bytes"]:
            return f"{name} is truncated or overwritten ({size:,} bytes, {digest['bytes']:,} when saved)"
        if sha256_file(path) != digest["sha256"]:
            return f"{name} is corrupted (its sha256 differs from the one recorded when saved)"
    foreign = foreign_entries(tag_dir.iterdir(), expected)
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


def _is_int(value, low: int, high: int = 2**62) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _field_problems(state: dict) -> dict[str, bool]:
    """{field: is it wrong} for every field ds-sft reads back from a trainer state."""
    sampler, run = state.get("sampler"), state.get("run", {})
    run_seed = run.get("seed") if isinstance(run, dict) else None
    sample = state.get("val_sample")  # older states hold none
    count, rows = (sample.get("count"), sample.get("rows")) if isinstance(sample, dict) else (None, None)
    return {
        "step": not _is_int(state.get("step"), 0),
        "world_size": not _is_int(state.get("world_size"), 1, 2**20),
        "zero_stage": not _is_int(state.get("zero_stage"), 0, 3),
        "nan_streak": not _is_int(state.get("nan_streak"), 0),
        "train_tokens": not _is_int(state.get("train_tokens"), 0),
        "elapsed_s": not (is_number(state.get("elapsed_s")) and 0 <= state["elapsed_s"] < float("inf")),
        "best_val": not (state.get("best_val") is None or is_number(state["best_val"])),
        "best_tag": not (state.get("best_tag") is None or is_tag(state["best_tag"])),
        "val_history": not (
            isinstance(state.get("val_history"), list) and all(map(is_number, state["val_history"]))
        ),
        "max_iters": not ("max_iters" not in state or _is_int(state["max_iters"], 1)),
        "val_sample": not (
            sample is None
            or _is_int(count, 1)
            and isinstance(rows, list)
            and rows
            and all(_is_int(row, 0) for row in rows)
            and all(a < b for a, b in itertools.pairwise(rows))  # sorted, each row once
        ),
        "sampler": not (
            isinstance(sampler, dict)
            and _is_int(sampler.get("epoch"), 0)
            and _is_int(sampler.get("consumed_samples"), 0)
            and _is_int(sampler.get("seed"), -(2**63), 2**64)
            and (run_seed is None or sampler["seed"] == run_seed)
        ),
        # the run's table (compatibility.run_identity): its stage and precision choose the engine a
        # changed resume loads the checkpoint with, its model config is built to compare weights
        "run": not (
            isinstance(run, dict)
            and run.get("zero_stage", state.get("zero_stage")) == state.get("zero_stage")
            and run.get("precision", "bf16") in ("bf16", "fp32")
            and (run_seed is None or _is_int(run_seed, -(2**63), 2**64))
            and (run.get("model") is None or isinstance(run["model"], dict))
        ),
    }


def trainer_state_problem(state, with_files: bool = False) -> str | None:
    """What is wrong with a trainer state (``trainer_state.json``, or the client state's copy), or None.

    Every field ds-sft reads back is checked for its type and range, so the state can only choose among
    the paths a genuine one could (which tag, universal or not); fields it does not read are left
    alone. ``with_files``: also the ``files`` manifest, whose names must be plain file names of the tag.
    """
    if not isinstance(state, dict):
        return f"a {type(state).__name__} instead of an object"
    wrong = [field for field, bad in _field_problems(state).items() if bad]
    if with_files:
        files = state.get("files")
        if not (
            isinstance(files, dict)
            and all(
                isinstance(name, str)
                and name not in ("", ".", "..", TRAINER_STATE)
                and "/" not in name
                and "\\" not in name
                and isinstance(digest, dict)
                and _is_int(digest.get("bytes"), 0)
                and isinstance(digest.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", digest["sha256"]) is not None
                for name, digest in files.items()
            )
        ):
            wrong.append("files")
    return f"bad or missing {', '.join(wrong)}" if wrong else None


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


@contextmanager
def disk_errors(ckpt_dir: Path, tag: str):
    """Turn a failed write (disk full, read-only, no permission) into one line that says what is safe;
    the half-written save is deleted first, so the space it took is free again."""

    try:
        yield
    except (OSError, RuntimeError) as err:
        # torch's zip writer reports a full disk as a RuntimeError from inline_container.cc
        if isinstance(err, RuntimeError) and "inline_container" not in str(err):
            raise
        remove_scratch(ckpt_dir / PARTIAL)
        reason = str(err).strip().splitlines()[0]
        if isinstance(err, RuntimeError):  # its words ("unexpected pos 704 vs 598") name no cause
            reason = f"a file was cut short: a full disk or quota, or a file-size limit ({reason})"
        free = shutil.disk_usage(ckpt_dir).free / 2**20 if ckpt_dir.exists() else 0.0
        latest = ckpt_dir / "latest"
        kept = (
            f"{latest.read_text().strip()} (named by {latest}) is intact"
            if latest.is_file()
            else "no earlier checkpoint was saved"
        )
        raise UserError(
            f"could not write checkpoint {ckpt_dir / tag} ({reason}; {free:.0f} MiB free there): "
            f"{kept}; free space or fix permissions, then rerun with --resume"
        ) from None


def remove(path: Path, missing_ok: bool = False) -> None:
    """Delete ``path``: a folder with everything in it, a file, or a symlink itself (never its target;
    ``shutil.rmtree`` unlinks the symlinks it meets inside a folder, never follows them)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=missing_ok)
        else:
            path.unlink()
    except FileNotFoundError:
        if not missing_ok:
            raise


def scratch_problem(folder: Path) -> str | None:
    """What in the scratch folder ``folder`` (:data:`PARTIAL`, :data:`REPLACED`, a universal
    conversion) ds-sft did not write, named from ``folder``'s parent: a link or special file, or a file
    not named as a save or conversion names its files (:data:`SCRATCH_FILES`); None when all is its own."""
    if folder.is_symlink() or not folder.is_dir():
        return f"{folder.name} is not a folder"
    for root, dirnames, filenames in os.walk(folder):  # never follows a symlink
        for name in sorted(dirnames + filenames):
            path = Path(root) / name
            where = path.relative_to(folder.parent).as_posix()
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                return f"{where} is not a regular file or folder"
            if path.is_file() and not SCRATCH_FILES.fullmatch(name):
                return f"{where} is not a file a checkpoint save writes"
    return None


def kept_path(path: Path, name: str) -> Path:
    """The first free ``<name>.kept``, ``<name>.kept2``... beside ``path``: where what the run did not
    write goes instead of being deleted (no ds-sft name, so nothing reads or deletes it again)."""
    kept, n = path.with_name(f"{name}.kept"), 2
    while os.path.lexists(kept):
        kept, n = path.with_name(f"{name}.kept{n}"), n + 1
    return kept


def remove_scratch(folder: Path) -> None:
    """Delete the scratch folder ``folder`` an earlier save left (cut short, or killed before it deleted
    a replaced tag), when it holds only what ds-sft writes there (:func:`scratch_problem`); else move it
    whole to ``<name>.kept`` and say so: a file put there by someone else is never deleted."""
    if not os.path.lexists(folder):
        return
    problem = scratch_problem(folder)
    if problem is None:
        remove(folder, missing_ok=True)
        return
    kept = kept_path(folder, folder.name)
    os.replace(folder, kept)
    print(f"note: kept {one_line(str(folder))} ({one_line(problem)}), now in {one_line(str(kept))}",
          file=sys.stderr, flush=True)  # fmt: skip


def save(engine, ckpt_dir: Path, step: int, trainer_state: dict, keep_last: int) -> str:
    """Save a complete checkpoint for ``step`` on every rank, replacing any earlier folder of its tag;
    move ``latest`` once all are done (see the module docstring)."""
    import torch.distributed as dist

    from ds_sft.train.distributed import on_rank_zero

    tag = tag_for(step)
    partial = ckpt_dir / PARTIAL
    client_state = {"trainer": trainer_state, "rng": gather_rng_states()}
    # rank 0's parts are told to every rank (on_rank_zero): a full disk there must not leave them waiting
    on_rank_zero(lambda: remove_scratch(partial), engine.device)  # what a save killed mid-way left
    with disk_errors(ckpt_dir, tag):
        engine.save_checkpoint(str(partial), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()

    def publish() -> None:
        with disk_errors(ckpt_dir, tag):
            state = {**trainer_state, "files": file_digests(partial / tag)}
            write_atomic(partial / tag / TRAINER_STATE, json.dumps(state, indent=2))
            drop_later_tags(ckpt_dir, step)
            replace_tag(partial / tag, ckpt_dir / tag)
            write_atomic(ckpt_dir / "latest", tag)
            for script in partial.glob("zero_to_*.py"):  # DeepSpeed's recovery scripts, kept beside the tags
                os.replace(script, ckpt_dir / script.name)
            partial.rmdir()
        if trainer_state.get("best_tag"):
            write_atomic(ckpt_dir / "best", trainer_state["best_tag"])
        else:  # an earlier run's, which this one (resumed from before that run's best) never had
            remove(ckpt_dir / "best", missing_ok=True)
        prune(ckpt_dir, keep_last, trainer_state.get("best_tag"))

    on_rank_zero(publish, engine.device)
    return tag


def remove_tag(tag_dir: Path, tag: str | None = None) -> None:
    """Delete the checkpoint tag in ``tag_dir`` (named ``tag``, when it was moved aside), but no file
    a user put there. Then only the files its trainer state lists go (that file first, so no complete
    tag is left half deleted), and the folder, holding only theirs, is renamed ``<tag>.kept``: the
    tag's name is free, and ``--resume`` never takes it for a checkpoint. A folder whose list cannot
    be read is kept whole (which of its files the run wrote is not known), renamed the same way."""
    tag = tag or tag_dir.name
    if tag_dir.is_symlink() or not tag_dir.is_dir():
        remove(tag_dir, missing_ok=True)  # a link itself, never its target
        return
    try:
        state = read_trainer_state(tag_dir)
    except (OSError, ValueError, RecursionError):
        state = None
    listed = state["files"] if trainer_state_problem(state, with_files=True) is None else None
    entries = list(tag_dir.iterdir())
    theirs = foreign_entries(entries, listed) if listed is not None else sorted(p.name for p in entries)
    if not theirs:
        remove(tag_dir)
        return
    ours = {p.name for p in entries} - set(theirs)
    for name in sorted(ours, key=lambda name: name != TRAINER_STATE):
        (tag_dir / name).unlink(missing_ok=True)
    kept = kept_path(tag_dir, tag)
    os.replace(tag_dir, kept)
    why = "" if listed is not None else f" (its {TRAINER_STATE} does not say which files the run wrote)"
    print(
        f"note: checkpoint {tag}: kept what the run did not write there{why}, "
        f"now in {one_line(str(kept))}: {one_line(', '.join(theirs))}",
        file=sys.stderr,
        flush=True,
    )


def later_tags(ckpt_dir: Path, step: int) -> list[Path]:
    """The tags in ``ckpt_dir`` of steps after ``step``, oldest first: after a resume from ``step``,
    those of the run this one branched from (by resuming one of its earlier checkpoints)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        (p for p in ckpt_dir.iterdir() if is_tag(p.name) and tag_step(p.name) > step),
        key=lambda p: tag_step(p.name),
    )


def drop_later_tags(ckpt_dir: Path, step: int) -> None:
    """Delete :func:`later_tags`: not part of this run's history (said at the resume)."""
    for path in later_tags(ckpt_dir, step):
        remove_tag(path)


def replace_tag(new: Path, tag_dir: Path) -> None:
    """Move the complete checkpoint ``new`` to ``tag_dir``; an earlier run's folder there is moved
    aside first and deleted once the new one is in place (a rename cannot replace a folder)."""
    replaced = tag_dir.with_name(REPLACED)
    remove_scratch(replaced)
    if tag_dir.is_symlink() or tag_dir.exists():
        os.replace(tag_dir, replaced)  # renames a symlink itself, never its target
    os.replace(new, tag_dir)
    remove_tag(replaced, tag_dir.name)


def prune(ckpt_dir: Path, keep_last: int, best_tag: str | None) -> None:
    for path in saved_tags(ckpt_dir)[keep_last:]:
        if path.name != best_tag:
            remove_tag(path)


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


def read_trainer_state(tag_dir: Path) -> dict:
    """``trainer_state.json`` as saved; :func:`damage` has checked it before a resume reads it."""
    return parse_json_object((tag_dir / TRAINER_STATE).read_bytes())


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
