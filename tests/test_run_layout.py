"""The checkpoint tag format: what :func:`tag_for` writes, the readers read back as the same step."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import example, given, settings
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


def round_trips(name: str) -> bool:
    """Whether ``name`` is what :func:`tag_for` writes for the step (>= 0) :func:`tag_step` reads from it."""
    try:
        step = tag_step(name)
    except ValueError:  # no step in it at all
        return False
    return step >= 0 and name == tag_for(step)


# names near the format: the prefix, then digits of any script (int() reads them all), signs, padding
DIGITS = st.sampled_from("0123456789١٢٣٠۰߀०১੦૦୦௦౦೦൦෦๐໐༠၀႐០᠐᥆᧐᪀᪐᭐᮰᱀᱐꘠꣐꤀꧐꩐꯰０")
NEAR_TAGS = st.builds(
    lambda sign, digits, tail: f"step_{sign}{''.join(digits)}{tail}",
    st.sampled_from(["", "+", "-", " ", "_"]),
    st.lists(DIGITS, min_size=0, max_size=12),
    st.sampled_from(["", " ", "\n", "_", "0"]),
)


@settings(derandomize=True, max_examples=1000)
@given(st.one_of(NEAR_TAGS, st.from_regex(r"step_[0-9]{0,12}", fullmatch=True), st.text(max_size=16)))
@example("step_0000001").via("a seventh digit that is a leading zero: not tag_for(1)")
@example("step_0000000").via("step 0 with seven digits")
@example("step_١٢٣٤٥٦").via("Arabic-Indic digits, which int() reads as 123456")
@example("step_00001").via("five digits")
@example("step_12345678901").via("eleven digits, past any int32 step")
def test_a_name_is_a_tag_exactly_when_it_round_trips(name):
    """is_tag(t) iff t == tag_for(tag_step(t)) (up to ten digits): one tag per step, so ``latest``, the
    tag list and pruning can never see two folders of one step, nor read a name as another's step."""
    ten_digits_at_most = len(name) <= len("step_") + 10
    assert is_tag(name) == (round_trips(name) and ten_digits_at_most)
    with tempfile.TemporaryDirectory() as ckpt_dir:
        (Path(ckpt_dir) / "latest").write_text(name, encoding="utf-8", errors="surrogateescape")
        read = latest_tag(Path(ckpt_dir))
        assert read is None or (is_tag(read) and read == tag_for(tag_step(read)))
