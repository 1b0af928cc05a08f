"""find_shown against the regular-expression search it replaces, on generated texts that repeat."""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from ds_sft.data.shown_text import find_shown, occurrences

# few letters, so that texts repeat and answers occur many times; several kinds of whitespace,
# Unicode ones included (\s and str.isspace() must agree on them)
CHARS = st.sampled_from(list("ab<>") + [" ", "\n", "\t", "\u00a0", "\u2003", "\x1c"])
TEXTS = st.text(CHARS, max_size=40)


def regex_span(text, shown, followed_by, start, limit, at_limit):
    """The search as templates.py did it before: the non-space characters joined by \\s*."""
    joined = r"\s*".join(re.escape(char) for char in shown if not char.isspace())
    pattern = f"({joined}){re.escape(followed_by)}" + (r"\Z" if at_limit else "")
    found = re.compile(pattern).search(text, start, limit)
    return found.span(1) if found else None


@settings(max_examples=3000, deadline=None)
@given(
    text=TEXTS,
    shown=st.text(CHARS, max_size=6),
    followed_by=st.text(CHARS, max_size=3),
    start=st.integers(0, 45),
    cut=st.integers(0, 45),
    at_limit=st.booleans(),
)
@example(text="ab a b>", shown="ab", followed_by=">", start=0, cut=0, at_limit=False)
@example(text="a\u00a0b>", shown=" a b ", followed_by=">", start=0, cut=0, at_limit=True)
@example(text="aaaa>", shown="", followed_by=">", start=1, cut=0, at_limit=False)
def test_the_same_span_as_the_regular_expression(text, shown, followed_by, start, cut, at_limit):
    start = min(start, len(text))
    limit = max(start, len(text) - cut) if not at_limit else len(text)
    expected = regex_span(text, shown, followed_by, start, limit, at_limit)
    assert find_shown(text, shown, followed_by, start, limit, at_limit) == expected


@settings(max_examples=1000, deadline=None)
@given(st.text("ab", max_size=30), st.text("ab", min_size=1, max_size=5), st.integers(0, 31))
def test_occurrences_are_every_overlapping_match(text, pattern, begin):
    expected = [i for i in range(begin, len(text)) if text.startswith(pattern, i)]
    assert list(occurrences(text, pattern, begin)) == expected


def test_a_repeated_answer_is_found_after_its_false_starts():
    """Each occurrence but the last is followed by more text, not the turn end: the search goes past
    the first (str.find) into the enumerated ones and still finds the leftmost that fits."""
    answer = " ".join(["ab"] * 50)
    text = "<p>" + " ".join([answer] * 3) + "|end|ab"
    span = find_shown(text, answer, "|end|", 3, len(text), False)
    assert span == regex_span(text, answer, "|end|", 3, len(text), False)
    assert span == (len(text) - len("|end|ab") - len(answer), len(text) - len("|end|ab"))
