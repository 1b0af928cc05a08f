"""The checkpoint tag format: what :func:`tag_for` writes, the readers read back as the same step."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from ds_sft.run_layout import is_tag, latest_tag, tag_for, tag_step

STEPS = st.integers(0, 2**31 - 1)  # a step is an int32 (train's --max_iters)


@given(STEPS)
@example(999_999).via("the last six-digit tag")
@example(1_000_000).via("the first seven-digit tag")
def test_a_tag_reads_back_as_the_step_it_was_written_for(step):
    tag = tag_for(step)
    assert is_tag(tag) and tag_step(tag) == step
    with tempfile.TemporaryDirectory() as ckpt_dir:
        (Path(ckpt_dir) / "latest").write_text(tag + "\n")
        assert latest_tag(Path(ckpt_dir)) == tag
