"""The names in a training run's folder and the checkpoint tag format, spelled once: ``train`` writes
them, and ``model``, ``data``, ``eval`` and the benchmarks read them back.

    RUN/effective_config.json                   EFFECTIVE_CONFIG: every setting the run trained with
    RUN/metrics.jsonl                           METRICS_FILE: one record a line, resumed segments too
    RUN/checkpoints/latest                      the newest tag (:func:`latest_tag`)
    RUN/checkpoints/step_000100/                a tag: :func:`tag_for` writes it, :func:`tag_step` reads it
    RUN/checkpoints/<tag>/trainer_state.json    TRAINER_STATE, beside DeepSpeed's shards

A tag is the step zero-padded to six digits; steps stay below 2^31, so ten digits at most. Each step has
one tag and each tag one step: a name is a tag only when :func:`tag_for` writes it for the step it names
(ASCII digits, no zero beyond the six-digit padding), so ``step_0000001`` is no second tag of step 1.
"""

from __future__ import annotations

import re
from pathlib import Path

from ds_sft.safe_read import read_regular_file

EFFECTIVE_CONFIG = "effective_config.json"
METRICS_FILE = "metrics.jsonl"
TRAINER_STATE = "trainer_state.json"
# six digits, or seven to ten without a leading zero; [0-9], not \d, which matches other scripts' digits too
TAG = re.compile(r"step_(?:[0-9]{6}|[1-9][0-9]{6,9})")
# What train writes beside RUN/final/: a final/ next to one of them is a run's, and stands for the
# whole run when another command asks whether its output would overlap it (data, eval and export
# cannot ask train's run_dir: the arrows point the other way)
RUN_SIGNS = (EFFECTIVE_CONFIG, METRICS_FILE, "checkpoints")


def tag_for(step: int) -> str:
    """The tag of the checkpoint saved after ``step`` steps."""
    return f"step_{step:06d}"


def is_tag(name) -> bool:
    """True for a checkpoint tag as :func:`tag_for` writes it (so it names a folder beside ``latest``)."""
    return isinstance(name, str) and TAG.fullmatch(name) is not None


def tag_step(name: str) -> int:
    """The step a tag names. Tags rank by it, not by name: past 999,999 steps the digits grow, and
    ``step_1000000`` sorts before ``step_999999`` as text."""
    return int(name.removeprefix("step_"))


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``ckpt_dir/latest`` names, if it is one (never a path that leads elsewhere; a few bytes
    read, whatever the file holds; a FIFO or device there names none)."""
    try:
        tag = read_regular_file(ckpt_dir / "latest", 64).decode("ascii", "replace").strip()
    except OSError:
        return None
    return tag if is_tag(tag) else None
