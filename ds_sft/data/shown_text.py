"""Find a text in a render "up to whitespace", in time linear in the render.

The ``located`` route of :mod:`ds_sft.data.templates` looks for each answer in the whole render of a
conversation as the template shows it: the answer's non-space characters in order, with any
whitespace (or none) between them, right before the template's turn end. As a regular expression
(the characters joined by ``\\s*``) that search costs the render's length times the answer's on
repetitive text, as each start position matches most of the answer before failing: a 64k-character
answer took 27 s, holding the GIL. Here the window's whitespace is taken out once and the answer's
characters are found in what is left with ``str.find`` (C); only when that first occurrence is not
followed by the turn end are the others enumerated, by Knuth-Morris-Pratt: linear however the
text repeats.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterator

_WORDS = re.compile(r"\S+")  # for str patterns \s is exactly str.isspace(), so \S+ are str.split()'s words


def occurrences(text: str, pattern: str, begin: int = 0) -> Iterator[int]:
    """Every index from ``begin`` at which ``pattern`` (not empty) starts in ``text``, overlapping
    ones included, leftmost first, in O(len(text) + len(pattern)) (Knuth-Morris-Pratt)."""
    border = [0] * len(pattern)  # border[i]: the longest proper prefix of pattern[:i + 1] ending it
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = border[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        border[i] = k
    k = 0
    for i in range(begin, len(text)):
        while k and text[i] != pattern[k]:
            k = border[k - 1]
        if text[i] == pattern[k]:
            k += 1
        if k == len(pattern):
            yield i - k + 1
            k = border[k - 1]


class Squeezed:
    """``text[start:limit]`` without its whitespace, and where each remaining character came from."""

    def __init__(self, text: str, start: int, limit: int) -> None:
        words = [(word.start(), word.group()) for word in _WORDS.finditer(text, start, limit)]
        self.text = "".join(word for _, word in words)
        self._word_starts = [place for place, _ in words]
        self._offsets = []  # where each word starts in self.text
        total = 0
        for _, word in words:
            self._offsets.append(total)
            total += len(word)

    def original(self, index: int) -> int:
        """Where character ``index`` of :attr:`text` sits in the text it was taken from."""
        word = bisect_right(self._offsets, index) - 1
        return self._word_starts[word] + index - self._offsets[word]


def find_shown(
    text: str, shown: str, followed_by: str, start: int, limit: int, at_limit: bool
) -> tuple[int, int] | None:
    """The leftmost span of ``text[start:limit]`` that shows ``shown`` up to whitespace and is
    followed by ``followed_by``, which ends at ``limit`` when ``at_limit``: ``(begin, end)``, the
    first and past the last non-space character shown, or None. (For a ``shown`` without non-space
    characters the span is empty, where ``followed_by`` starts.) The same span as a regular
    expression search of ``shown``'s non-space characters joined by ``\\s*``, then ``followed_by``."""
    needle = "".join(shown.split())
    if at_limit:  # the span can only end where the final turn end starts
        limit -= len(followed_by)
        if limit < start or not text.startswith(followed_by, limit):
            return None
        if not needle:
            return limit, limit
        window = Squeezed(text, start, limit)
        fits = window.text.endswith(needle) and not text[limit - 1].isspace()
        return (window.original(len(window.text) - len(needle)), limit) if fits else None
    if not needle:
        place = text.find(followed_by, start, limit)
        return (place, place) if place >= 0 else None
    window = Squeezed(text, start, limit)

    def span_at(index: int) -> tuple[int, int] | None:
        end = window.original(index + len(needle) - 1) + 1
        fits = end + len(followed_by) <= limit and text.startswith(followed_by, end)
        return (window.original(index), end) if fits else None

    first = window.text.find(needle)
    if first < 0:
        return None
    # the common case: the answer once, right before its turn end; else each later occurrence
    later = occurrences(window.text, needle, first + 1)
    return span_at(first) or next(filter(None, map(span_at, later)), None)
