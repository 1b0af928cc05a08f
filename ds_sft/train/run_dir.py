"""The run folder (``--out_dir``): claimed only when it is ds-sft's, replaced only when asked.

``train`` writes into its run folder for hours and, with ``--overwrite``, deletes an earlier run
there, so before any work (nothing is created, written or deleted before a refusal):

1. **Inputs stay outside.** The run folder may not be, hold or lie inside the ``--data_dir``, the
   ``--base_model`` path, the ``--deepspeed_config`` file or a ``--resume`` checkpoint of another
   folder (symlinks resolved): training would write into its own inputs, and ``--overwrite`` would
   delete them before they are read (:func:`check_inputs_outside`). The one exception is the run's own
   ``effective_config.json`` passed back as ``--deepspeed_config``, which the run rewrites itself.
2. **The folder is ds-sft's.** A run folder proves it by :data:`MARKER`, written when a run first
   claims it. A folder that is missing, empty, or holds only copied-in checkpoints (each tag exactly
   as its ``trainer_state.json`` lists it: how a new job continues a run elsewhere) becomes a run
   folder; any other folder is refused, naming what is in it (:func:`check_is_run_folder`). In a run
   folder, a path a run writes must be what a run writes there: a regular file or a real folder,
   never a symlink, so nothing is ever written through one (:func:`wrong_kinds`).
3. **Lock.** Rank 0 takes an exclusive ``flock`` on ``RUN/.lock`` and writes who holds it (pid, host,
   start time) into it. The kernel drops the lock when its process dies, however it dies, so a lock
   file left by a dead process is simply taken over; a live holder makes the new run stop in one line
   naming it. Only rank 0 locks (the other ranks of the same run write into the folder too); its
   verdict is broadcast, so every rank stops (rank 0 saying why, once), or goes on, together.
4. **A run there stays** unless the user says what to do with it: ``--resume`` continues it (refused
   when it has no checkpoint to continue from, or when the checkpoint comes from another folder),
   ``--overwrite`` replaces it, and without either the run stops in one line saying so. ``--overwrite``
   removes what a run wrote (:func:`removable`): ``final/`` holding only the files its
   :data:`FINAL_LISTING` lists (weights, config, the tokenizer's files), tags holding only the files
   their ``trainer_state.json`` lists, ``latest``/``best``,
   ``metrics.jsonl``, the report and plots, the scratch folders of a save or a universal conversion
   cut short (``checkpoints/.partial``, ``.replaced``, ``.universal-*``) holding only files named as
   those write them, never through a symlink; it refuses when any of them holds anything else. Files
   with other names (notes, ``eval/``, ``wandb/``) are kept where they are.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
from pathlib import Path

from ds_sft.errors import UserError, preview
from ds_sft.locations import expand_user
from ds_sft.run_layout import EFFECTIVE_CONFIG, METRICS_FILE, TRAINER_STATE, is_tag, latest_tag
from ds_sft.safe_read import describe_mode
from ds_sft.safe_write import unshare, write_result_file
from ds_sft.train.report import PLOT_FILES
from ds_sft.written_files import foreign_entries, read_listing

LOCK_FILE = ".lock"
MARKER = "ds_sft_run.json"  # {"format": RUN_FORMAT, "created": ...}: this folder is a ds-sft run
RUN_FORMAT = "ds-sft training run"
FINAL_LISTING = "ds_sft_files.json"  # in final/: the files save_final wrote there
# The files transformers' save_pretrained writes for a tokenizer, the ones prepare puts in DATA/tokenizer
# and train copied into final/tokenizer/ before final/ had a listing (a run of an older ds-sft).
SAVED_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# What a run writes at the top of its folder (wandb/ is wandb's: kept at --overwrite, never checked).
RUN_FILES = {MARKER, LOCK_FILE, EFFECTIVE_CONFIG, METRICS_FILE, "report.md", *PLOT_FILES}
RUN_FOLDERS = {"final", "checkpoints", "wandb"}
# What an earlier run leaves that a new one would mix with, removed by --overwrite (the marker, the lock
# and effective_config.json stay: the new run holds, keeps and rewrites them).
OVERWRITTEN = ("final", "checkpoints", METRICS_FILE, "report.md", *PLOT_FILES)
# Files beside the tags in RUN/checkpoints/: latest, best (+ write_atomic's .tmp), and DeepSpeed's.
CHECKPOINT_FILES = ("latest", "best", "latest.tmp", "best.tmp", "latest_universal", "zero_to_fp32.py",
                    "zero_to_torch.py")  # fmt: skip


class RunLock:
    """The held ``flock`` on ``RUN/.lock`` (rank 0), or nothing (other ranks). Released on
    :meth:`release` or when the process ends."""

    def __init__(self, handle=None):
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the file drops the flock
            self.handle = None


def holder(lock_path: Path) -> str:
    """Who holds ``lock_path``, as its holder wrote it."""
    info = read_listing(lock_path.parent, lock_path.name) or {}
    if not all(isinstance(info.get(key), str | int) for key in ("pid", "host", "started")):
        return "a process that has not written its name yet"
    return f"pid {info['pid']} on {info['host']}, started {info['started']}"


def lock(run_dir: Path) -> RunLock:
    """Take ``RUN/.lock`` or raise a UserError naming its live holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_FILE
    try:  # never through a symlink: truncating it would clobber whatever it points to
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise UserError(
            f"cannot open {lock_path} ({err.strerror}): remove it if it is not a plain file"
        ) from None
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(
            f"{run_dir} is in use by another training run ({holder(lock_path)}): wait for it to end, "
            "stop it, or pass another --out_dir"
        ) from None
    except OSError as err:  # a filesystem without locks (some FUSE mounts): run, but say it is unguarded
        print(f"warning: cannot lock {lock_path} ({err.strerror}): nothing stops a second run from "
              "writing into this folder", file=sys.stderr)  # fmt: skip
    if os.fstat(fd).st_nlink > 1:  # a hard link (a cp -al copy of a run): the holder line would go in both
        unshare(lock_path)  # while the shared lock is held, so no run of this folder slips in between
        held = lock(run_dir)  # the copy of its own
        handle.close()
        return held
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": now()}) + "\n")
    handle.flush()
    return RunLock(handle)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# ----------------------------------------------------------------------------- inputs outside the run


def real(path) -> Path:
    return Path(os.path.realpath(expand_user(path)))


def check_inputs_outside(run_dir: Path, s) -> None:
    """Refuse a run folder that is, holds or lies inside one of the run's inputs (symlinks resolved),
    or lies inside another run's own ``checkpoints/`` or ``final/``: that run's resume, pruning and
    ``--overwrite`` rewrite those (a resume moved a run made at ``A/checkpoints/step_000099`` aside)."""
    out = real(run_dir)
    inputs = {"--data_dir": s.data_dir, "--deepspeed_config": s.deepspeed_config}
    if s.base_model is not None and expand_user(s.base_model).exists():  # not an alias or hub id
        inputs["--base_model"] = s.base_model
    if s.resume not in (None, "auto") and not real(s.resume).is_relative_to(out / "checkpoints"):
        inputs["--resume"] = s.resume  # a checkpoint of another folder (this run's own may be anywhere in it)
    if real(s.deepspeed_config) == out / EFFECTIVE_CONFIG:  # passed back: the run reads it, then rewrites it
        del inputs["--deepspeed_config"]
    for flag, path in inputs.items():
        where = real(path)
        if out == where:
            how = "is"
        elif out.is_relative_to(where):
            how = "lies inside"
        elif where.is_relative_to(out):
            how = "holds"
        else:
            continue
        raise UserError(
            f"--out_dir {run_dir} {how} {flag} {path}: a run writes into its folder (and --overwrite "
            "deletes there), so it would change its own input; pass an --out_dir apart from every input"
        )
    for own in (out, *out.parents):
        if own.name in ("checkpoints", "final") and is_marked(own.parent):
            raise UserError(
                f"--out_dir {run_dir} lies inside {own}, the {own.name}/ folder of the run in {own.parent}, "
                "which that run rewrites: pass an --out_dir outside it"
            )


# ----------------------------------------------------------------------------- what is in the folder


def kind(path: Path) -> str:
    """'file', 'folder', 'symlink', 'missing', or what else is there ('FIFO (named pipe)', 'socket'...),
    never following."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return "file" if stat.S_ISREG(mode) else "folder"
    return describe_mode(mode).removeprefix("a ")


def entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as err:
        raise UserError(f"{folder} cannot be listed ({err.strerror}): pass a folder you can read") from None


def relative(path: Path, run_dir: Path) -> str:
    return path.relative_to(run_dir).as_posix() + ("/" if kind(path) == "folder" else "")


def checkpoint_entry_kind(name: str) -> str | None:
    """The kind a ds-sft checkpoint folder's entry ``name`` has, or None when it is not one of its names."""
    from ds_sft.train.checkpointing import PARTIAL, REPLACED, UNIVERSAL_PREFIX

    if name in CHECKPOINT_FILES:
        return "file"
    if is_tag(name) or name in (PARTIAL, REPLACED) or name.startswith(UNIVERSAL_PREFIX):
        return "folder"
    return None


def wrong_kinds(run_dir: Path) -> list[str]:
    """Paths a run writes (top level, checkpoints/, anything in final/) holding something of another
    kind (a symlink, a folder where a file goes...): a run would write through it, or fail on it."""
    wrong = []
    for path in entries(run_dir):
        expected = "file" if path.name in RUN_FILES else "folder" if path.name in RUN_FOLDERS else None
        if expected and kind(path) != expected:
            wrong.append(f"{path.name} is a {kind(path)}, where a run writes a {expected}")
    ckpt_dir = run_dir / "checkpoints"
    if kind(ckpt_dir) == "folder":
        for path in entries(ckpt_dir):
            expected = checkpoint_entry_kind(path.name)
            if expected and kind(path) != expected:
                wrong.append(f"checkpoints/{path.name} is a {kind(path)}, where a run writes a {expected}")
    if kind(run_dir / "final") == "folder":  # the final weights, config, listing and tokenizer copy
        problem = plain_tree_problem(run_dir / "final", run_dir)
        if problem:
            wrong.append(f"{problem}, where a run writes only files and folders")
    return wrong


def plain_tree_problem(folder: Path, run_dir: Path) -> str | None:
    """The first thing under ``folder`` that is not a regular file or a real folder, or None."""
    for root, dirnames, filenames in os.walk(folder):  # never follows a symlink
        for name in sorted(dirnames + filenames):
            path = Path(root) / name
            if kind(path) not in ("file", "folder"):
                return f"{relative(path, run_dir)} is a {kind(path)}"
    return None


def tag_problem(tag_dir: Path, run_dir: Path) -> str | None:
    """Why ``tag_dir`` is not a checkpoint tag as ds-sft writes it (exactly the files its
    ``trainer_state.json`` lists, plus that file, all regular), or None. Nothing is hashed."""
    from ds_sft.train.trainer_state import read_trainer_state, trainer_state_problem

    where = relative(tag_dir, run_dir)
    if kind(tag_dir / TRAINER_STATE) != "file":
        return f"{where} has no {TRAINER_STATE} listing its files"
    try:
        state = read_trainer_state(tag_dir)
    except (OSError, ValueError, RecursionError):
        return f"{where}{TRAINER_STATE} cannot be read"
    if trainer_state_problem(state, with_files=True):
        return f"{where}{TRAINER_STATE} is not one ds-sft writes"
    entries(tag_dir)  # one that cannot be listed is refused as such
    foreign = foreign_entries(tag_dir, state["files"], TRAINER_STATE)
    if foreign:
        return f"{relative(tag_dir / foreign[0], run_dir)} is not among the files of the checkpoint"
    return None


def write_final_listing(final: Path, files: list[str]) -> None:
    """Record the files ``save_final`` wrote into ``final/`` (paths relative to it): what ``--overwrite``
    may remove there, as a checkpoint's ``trainer_state.json`` lists its own."""
    write_result_file(final / FINAL_LISTING, json.dumps({"files": sorted(files)}, indent=1) + "\n")


def final_listing(final: Path) -> set[str]:
    """The files ``final/`` records as the run's; without a readable listing (a run of an older ds-sft),
    the weights, their config and the files a saved tokenizer is made of, by name: anything else there
    (a note in final/tokenizer/) is not provably the run's."""
    from ds_sft.model.checkpoint import CONFIG_FILE as MODEL_CONFIG
    from ds_sft.model.checkpoint import MODEL_FILE

    older = {MODEL_FILE, MODEL_CONFIG, *(f"tokenizer/{name}" for name in SAVED_TOKENIZER_FILES)}
    files = (read_listing(final, FINAL_LISTING) or {}).get("files")
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return older
    return {*files, FINAL_LISTING}


def final_problem(final: Path, run_dir: Path) -> str | None:
    """Why ``final/`` is not as ``save_final`` writes it (exactly the regular files its listing names,
    in the folders they make), or None. Nothing is hashed: the run owns these names in the folder it
    claimed (``ds_sft.written_files``). A folder the run did not make is not its own, even empty."""
    foreign = foreign_entries(final, final_listing(final), None)  # the listing is among them when read
    if not foreign:
        return None
    path = first_entry(final / foreign[0])
    if kind(path) not in ("file", "folder"):
        return f"{relative(path, run_dir)} is a {kind(path)}"
    return f"{relative(path, run_dir)} is not among the files the run wrote there ({FINAL_LISTING})"


def first_entry(path: Path) -> Path:
    """The first thing that is not a folder under the folder ``path`` (walked in name order, never
    through a link), to name what it holds; ``path`` itself when it is not a folder or holds none."""
    for root, dirnames, filenames in os.walk(path) if kind(path) == "folder" else ():
        dirnames.sort()
        beside = [name for name in sorted(filenames + dirnames) if kind(Path(root) / name) != "folder"]
        if beside:
            return Path(root) / beside[0]
    return path


def checkpoint_entries(ckpt_dir: Path, run_dir: Path) -> tuple[list[Path], list[str]]:
    """(the entries of ``checkpoints/`` that ds-sft wrote, why others bearing its names are not as it
    writes them); entries with other names are in neither list. A scratch folder (``.partial``,
    ``.replaced``, ``.universal-*``) is ds-sft's when it holds only the files a save or a conversion
    writes (:func:`checkpointing.scratch_problem`), as one an older ds-sft left does too."""
    from ds_sft.train.checkpointing import scratch_problem

    ours, problems = [], []
    for path in entries(ckpt_dir):
        expected = checkpoint_entry_kind(path.name)
        if expected is None:
            continue
        if kind(path) != expected:
            problem = f"{relative(path, run_dir)} is a {kind(path)}"
        elif is_tag(path.name):
            problem = tag_problem(path, run_dir)
        elif expected == "folder":
            scratch = scratch_problem(path)
            problem = scratch and f"checkpoints/{scratch}"
        else:
            problem = None
        (problems.append(problem) if problem else ours.append(path))
    return ours, problems


def is_marked(run_dir: Path) -> bool:
    """Whether ``run_dir`` carries ds-sft's run marker (a regular file holding :data:`RUN_FORMAT`)."""
    marker = read_listing(run_dir, MARKER)
    return marker is not None and marker.get("format") == RUN_FORMAT


def only_copied_checkpoints(run_dir: Path, found: list[Path]) -> bool:
    """Whether ``found`` (the folder's entries) is a ``checkpoints/`` of ds-sft's alone (and a lock),
    with at least one tag, the files of each exactly those its ``trainer_state.json`` lists."""
    names = {path.name for path in found} - {LOCK_FILE}
    if names != {"checkpoints"} or kind(run_dir / "checkpoints") != "folder":
        return False
    ckpt_dir = run_dir / "checkpoints"
    ours, problems = checkpoint_entries(ckpt_dir, run_dir)
    tags = [path for path in ours if is_tag(path.name)]  # each proven by its trainer_state.json
    return bool(tags) and not problems and len(ours) == len(entries(ckpt_dir))


def is_lock_file(path: Path) -> bool:
    """Whether ``path`` is a lock file as :func:`lock` leaves it: empty, or its holder line (whole, or
    cut short by a full disk). A folder holding only a ``.lock`` of the user's (their notes, another
    tool's lock) was taken for a fresh run's, and the claim wrote over it."""
    if kind(path) != "file":
        return False
    try:
        with path.open("rb") as file:
            text = file.read(4097)
    except OSError:
        return False
    return len(text) <= 4096 and (not text or text.startswith(b'{"pid": '))  # lock()'s json.dumps


def check_is_run_folder(run_dir: Path) -> None:
    """Refuse, before anything is written there, a folder that is not (and cannot become) a ds-sft run's."""
    if kind(run_dir) == "missing":
        return
    found = entries(run_dir)
    fresh = all(path.name == LOCK_FILE and is_lock_file(path) for path in found)
    if not (fresh or is_marked(run_dir) or only_copied_checkpoints(run_dir, found)):
        shown = preview([relative(path, run_dir) for path in found], 5)
        raise UserError(
            f"--out_dir {run_dir} is not empty and not a ds-sft run folder (it holds {shown}; a run "
            f"folder has {MARKER}): pass a new or empty --out_dir, e.g. --out_dir runs/NAME"
        )
    wrong = wrong_kinds(run_dir)
    if wrong:
        raise UserError(
            f"--out_dir {run_dir}: {wrong[0]}; ds-sft writes nothing through or over what it did not "
            "make: move it away, or pass another --out_dir"
        )


def mark(run_dir: Path) -> None:
    """Write :data:`MARKER` into a folder this run claims (once; a copied run keeps its own)."""
    if is_marked(run_dir):
        return
    # written whole beside it, then linked into place: a write cut short (a full disk) left a partial
    # marker that no later run took for one ("not empty and not a ds-sft run folder"); linking, unlike
    # a rename, never replaces a file of that name
    text = json.dumps({"format": RUN_FORMAT, "created": now()}) + "\n"
    with tempfile.NamedTemporaryFile("w", dir=run_dir, prefix=".marker-", suffix=".tmp") as handle:
        handle.write(text)
        handle.flush()
        os.chmod(handle.name, 0o644)
        try:
            os.link(handle.name, run_dir / MARKER)
            return
        except OSError as err:  # a filesystem without hard links (vfat, many FUSE mounts): written in place
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
    fd = os.open(run_dir / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as marker:
        marker.write(text)


# ----------------------------------------------------------------------------- an earlier run


def previous_run(run_dir: Path) -> list[str]:
    """What an earlier run left in ``run_dir`` (empty for a fresh folder)."""
    found = []
    if os.path.lexists(run_dir / "final"):
        found.append("final/ weights")
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        found.append("checkpoints")
    if os.path.lexists(run_dir / METRICS_FILE):
        found.append(METRICS_FILE)
    return found


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``RUN/checkpoints`` has a tag ``--resume`` would try (``latest``'s, or any complete one)."""
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return False
    return latest_tag(ckpt_dir) is not None or any(
        is_tag(path.name) and (path / TRAINER_STATE).is_file() for path in ckpt_dir.iterdir()
    )


def removable(run_dir: Path) -> list[Path]:
    """``--overwrite``: the paths of the earlier run to remove, each exactly as a run writes it; a
    UserError naming the first that holds anything else (nothing is removed then)."""
    paths, problems = [], []
    for name in OVERWRITTEN:
        path = run_dir / name
        if name == "checkpoints" and kind(path) == "folder":
            ours, wrong = checkpoint_entries(path, run_dir)
            paths += ours
            problems += wrong
        elif name == "final" and kind(path) == "folder":
            problem = final_problem(path, run_dir)
            (problems.append(problem) if problem else paths.append(path))
        elif kind(path) == "file":
            paths.append(path)
        elif kind(path) != "missing":
            problems.append(f"{name} is a {kind(path)}")
    if problems:
        raise UserError(
            f"--overwrite: {run_dir} holds what a ds-sft run does not write ({problems[0]}), so it cannot "
            "be replaced without deleting it: move it out, or pass another --out_dir"
        )
    return paths


def remove_previous_run(run_dir: Path, doomed: list[Path]) -> None:
    """``--overwrite``: remove ``doomed`` (:func:`removable`), then ``checkpoints/`` if that emptied it."""
    for path in doomed:
        shutil.rmtree(path) if kind(path) == "folder" else path.unlink()
    ckpt_dir = run_dir / "checkpoints"
    if kind(ckpt_dir) == "folder" and not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()


def check_previous_run(run_dir: Path, resume, overwrite: bool) -> list[Path]:
    """Refuse to start beside (or over) what an earlier run left when the flags do not say what to do
    with it, or when it cannot be done; returns what ``--overwrite`` is to remove (else nothing)."""
    found = previous_run(run_dir)
    if not found:
        return []
    held = ", ".join(found)
    if resume is None and not overwrite:
        raise UserError(
            f"{run_dir} already holds a training run ({held}): pass --resume to continue it, --overwrite "
            "to replace it, or another --out_dir"
        )
    if resume is None:
        return removable(run_dir)
    if resume != "auto" and not real(resume).is_relative_to(real(run_dir) / "checkpoints"):
        raise UserError(
            f"{run_dir} already holds a training run ({held}); continuing --resume {resume} there would "
            "mix the two: pass a new --out_dir"
        )
    if not has_checkpoint(run_dir):
        raise UserError(
            f"{run_dir} holds a training run ({held}) but no checkpoint to continue it from: pass "
            "--overwrite to start it again, or another --out_dir"
        )
    return []


def claim(run_dir: Path, resume, overwrite: bool) -> RunLock:
    """Rank 0's decision: check, lock and mark ``run_dir`` for this run (removing the earlier run's
    files at ``--overwrite``), or raise the UserError with nothing written (not even the lock file)."""
    check_is_run_folder(run_dir)
    if not os.path.lexists(run_dir / LOCK_FILE):  # refuse before the lock file is made; a live run
        check_previous_run(run_dir, resume, overwrite)  # holding one is named first (lock, below)
    held = lock(run_dir)
    try:  # again under the lock: a run that held it a moment ago may have changed the folder
        check_is_run_folder(run_dir)
        doomed = check_previous_run(run_dir, resume, overwrite)
        if doomed:
            found = ", ".join(previous_run(run_dir))
            remove_previous_run(run_dir, doomed)
            print(f"--overwrite: removed the previous run's {found} (and its report) from {run_dir}")
        mark(run_dir)
    except UserError:
        held.release()
        raise
    return held


def claim_run_dir(run_dir: Path, resume, overwrite: bool) -> RunLock:
    """Rank 0 claims ``run_dir`` (:func:`claim`); every rank hears the verdict before any work
    (:func:`~ds_sft.train.distributed.on_rank_zero`): if it is no, rank 0 raises its error and the
    others exit with 2."""
    from ds_sft.train.distributed import collective_device, on_rank_zero

    return on_rank_zero(lambda: claim(run_dir, resume, overwrite), collective_device()) or RunLock()
