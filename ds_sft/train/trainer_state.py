"""``trainer_state.json``: ds-sft's own record in every checkpoint tag, its fields defined once.

:data:`FIELDS` names each field with where its value comes from and what a saved value must be. The
run's progress (step, best val, streaks, the val sample...) starts at :func:`fresh_state` and the loop
updates it; each save completes it with what it reads from the engine, the sampler and the settings
(:func:`snapshot`); publishing the tag adds ``files``, the size and sha256 of every other file of the
tag. It is written last, so a tag holding it is a complete save, and it is readable before any
engine exists: ``--resume`` reads from it which tag to load and how (universal or not).

So a resume can only take the paths a genuine state could choose, every field ds-sft reads back is
checked for its type and range (:func:`trainer_state_problem`), the ``files`` manifest's names too
(plain file names of the tag).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

from ds_sft.json_input import parse_json_object
from ds_sft.options import Int, is_number
from ds_sft.run_layout import TRAINER_STATE, is_tag
from ds_sft.safe_read import read_regular_file

FILES = "files"  # {file name: {"bytes", "sha256"}}, added when the tag is published


# The integers a state holds, each as ds-sft may have written it (options' domains: no bool, no float).
TALLY = Int(0, 2**62)  # steps, tokens, samples, rows, bytes
POSITIVE = Int(1, 2**62)
STATE_SEED = Int(-(2**63), 2**64)  # a seed as the sampler keeps it: whatever int64/uint64 a run was given


def _sampler_fine(sampler, state: dict) -> bool:
    run = state.get("run", {})
    run_seed = run.get("seed") if isinstance(run, dict) else None
    return (
        isinstance(sampler, dict)
        and TALLY.holds(sampler.get("epoch"))
        and TALLY.holds(sampler.get("consumed_samples"))
        and STATE_SEED.holds(sampler.get("seed"))
        and (run_seed is None or sampler["seed"] == run_seed)
    )


def _run_fine(value, state: dict) -> bool:
    """The run's table (``compatibility.run_identity``): its stage and precision choose the engine a
    changed resume loads the checkpoint with, its model config is built to compare weights."""
    run = state.get("run", {})  # older states hold none (but one that holds null is malformed)
    return (
        isinstance(run, dict)
        and run.get("zero_stage", state.get("zero_stage")) == state.get("zero_stage")
        and run.get("precision", "bf16") in ("bf16", "fp32")
        and (run.get("seed") is None or STATE_SEED.holds(run["seed"]))
        and (run.get("model") is None or isinstance(run["model"], dict))
    )


def _val_sample_fine(sample, state: dict) -> bool:
    """None (older states hold none), or ``{"data", "count", "rows"}``: rows sorted, each once."""
    if sample is None:
        return True
    count, rows = (sample.get("count"), sample.get("rows")) if isinstance(sample, dict) else (None, None)
    return bool(
        POSITIVE.holds(count)
        and isinstance(rows, list)
        and rows
        and all(TALLY.holds(row) for row in rows)
        and all(a < b for a, b in itertools.pairwise(rows))
    )


AT_SAVE = "at save"  # a field each save writes from the engine, the sampler or the settings


class Field(NamedTuple):
    start: Any  # its value in a fresh run's state (copied), or AT_SAVE
    fine: Any  # (saved value or None when absent, the whole state) -> may ds-sft have written it?


def _anything(value, state: dict) -> bool:
    """Read leniently where it is used: ``changes`` by ``compatibility.recorded_changes`` (one line at
    the resume), ``optimizer`` only when it is an object."""
    return True


# Every field of a trainer state, in the order a malformed state names them.
FIELDS: dict[str, Field] = {
    "step": Field(0, lambda v, state: TALLY.holds(v)),  # optimizer steps done
    "world_size": Field(AT_SAVE, lambda v, state: Int(1, 2**20).holds(v)),  # ranks that saved it
    "zero_stage": Field(AT_SAVE, lambda v, state: Int(0, 3).holds(v)),  # the engine's that saved it
    "nan_streak": Field(0, lambda v, state: TALLY.holds(v)),  # non-finite steps in a row
    "train_tokens": Field(0, lambda v, state: TALLY.holds(v)),  # trained tokens, every segment's
    "elapsed_s": Field(0.0, lambda v, state: is_number(v) and 0 <= v < float("inf")),  # steps' seconds
    "best_val": Field(None, lambda v, state: v is None or is_number(v)),  # the lowest val loss
    "best_tag": Field(None, lambda v, state: v is None or is_tag(v)),  # the tag that holds it
    "val_history": Field([], lambda v, state: isinstance(v, list) and all(map(is_number, v))),
    # where this segment's cosine ends (older states hold none): a resume says when it moves
    "max_iters": Field(AT_SAVE, lambda v, state: "max_iters" not in state or POSITIVE.holds(v)),
    "val_sample": Field(None, _val_sample_fine),  # {"data": its key, "count": asked, "rows"}: every eval's
    "sampler": Field(AT_SAVE, _sampler_fine),  # the data stream's position (ResumableSampler.state_dict)
    "run": Field(AT_SAVE, _run_fine),  # the run's identity, compared at resume (compatibility)
    # what resumes changed ({"step", "key", "saved", "now", "how"}: compatibility)
    "changes": Field([], _anything),
    # the optimizer's settings per group, which a resume into an engine of another kind compares
    "optimizer": Field(AT_SAVE, _anything),
}


def fresh_state() -> dict:
    """The progress fields of a run at step 0 (a resume reads them back from the checkpoint)."""
    return {
        name: json.loads(json.dumps(field.start))  # a fresh list each time
        for name, field in FIELDS.items()
        if field.start is not AT_SAVE
    }


def snapshot(state: dict, **at_save) -> dict:
    """The trainer state a save writes: the progress fields of ``state``, and ``at_save``, the value of
    every field read at the save (a KeyError names one left out; nothing else is written)."""
    return {name: at_save[name] if field.start is AT_SAVE else state[name] for name, field in FIELDS.items()}


def trainer_state_problem(state, with_files: bool = False) -> str | None:
    """What is wrong with a trainer state (``trainer_state.json``, or the client state's copy), or None.
    ``with_files``: also the ``files`` manifest, whose names must be plain file names of the tag."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__} instead of an object"
    wrong = [name for name, field in FIELDS.items() if not field.fine(state.get(name), state)]
    if with_files and not _files_fine(state.get(FILES)):
        wrong.append(FILES)
    return f"bad or missing {', '.join(wrong)}" if wrong else None


def _files_fine(files) -> bool:
    return isinstance(files, dict) and all(
        isinstance(name, str)
        and name not in ("", ".", "..", TRAINER_STATE)
        and "/" not in name
        and "\\" not in name
        and isinstance(digest, dict)
        and TALLY.holds(digest.get("bytes"))
        and isinstance(digest.get("sha256"), str)
        and re.fullmatch(r"[0-9a-f]{64}", digest["sha256"]) is not None
        for name, digest in files.items()
    )


def read_trainer_state(tag_dir: Path) -> dict:
    """``trainer_state.json`` as saved; ``checkpoint_check.damage`` has checked it before a resume
    reads it."""
    return parse_json_object(read_regular_file(tag_dir / TRAINER_STATE))
