"""Python's ``re`` with a clock on every match, for patterns and texts that ds-sft does not control.

The harness runs a task config's regexes (its ``regex`` filters, ``regexes_to_ignore``, a template's
``regex_replace``) with Python's backtracking ``re`` on the task's data and on model output. Nested
repeats take exponential time and are refused up front (:func:`ds_sft.eval.harness.regex_problem`),
but polynomial time has too many shapes for a check: ``a*a*a*a*a*a*b`` took 10 s on 80 characters
and 64 times that per doubling, and the harness's own gsm8k ``(?s).*#### `` is quadratic on a
reference without ``####``. So the time itself is bounded: :class:`BoundedRe` stands in for the
``re`` module, and each match arms a SIGALRM timer whose handler raises :class:`RegexOverTime`
inside the match (``re``'s matcher polls for signals every few thousand steps). The exception is a
``BaseException`` so that a library's ``except Exception`` around a match cannot turn it into "no
match", which would be a wrong score rather than an error.

Signals reach the main thread only: called from another thread, a match runs without a clock (the
command line runs the harness in its main thread).
"""

from __future__ import annotations

import re
import signal
import threading
import time
from contextlib import contextmanager

# One match on one text, and every match of one run together; a real task's regex takes microseconds
# on an answer.
REGEX_SECONDS = 5.0
REGEX_TOTAL_SECONDS = 300.0


class RegexOverTime(BaseException):
    """A regex ran past :data:`REGEX_SECONDS` on one text, or a run's regexes past
    :data:`REGEX_TOTAL_SECONDS` together."""

    def __init__(self, pattern: str | bytes, chars: int, seconds: float, in_all: bool) -> None:
        super().__init__(pattern, chars, seconds, in_all)
        self.pattern, self.chars, self.seconds, self.in_all = pattern, chars, seconds, in_all

    def __str__(self) -> str:
        spent = (
            f"took the last of the {self.seconds:g} s that one run's regexes may take together"
            if self.in_all
            else f"ran over {self.seconds:g} s"
        )
        return (
            f"the regex {self.pattern!r:.80} {spent} on a text of {self.chars:,} characters (Python's re "
            "backtracks when neighbouring parts can match the same characters, as in a*a*b or .*,.*x): "
            "make its parts match different characters, or shorten the texts"
        )


class BoundedRe:
    """A stand-in for the ``re`` module whose functions and compiled patterns match under a clock:
    one call may take :data:`REGEX_SECONDS`, all of this object's calls :data:`REGEX_TOTAL_SECONDS`.
    The rest (flags, ``escape``, ``error``) is ``re``'s own."""

    def __init__(self) -> None:
        self.spent = 0.0
        self._timing = False

    def __getattr__(self, name: str):
        return getattr(re, name)

    def compile(self, pattern, flags=0) -> BoundedPattern:
        if isinstance(pattern, BoundedPattern):
            pattern = pattern.compiled
        return BoundedPattern(re.compile(pattern, flags), self)

    def search(self, pattern, string, flags=0):
        return self.compile(pattern, flags).search(string)

    def match(self, pattern, string, flags=0):
        return self.compile(pattern, flags).match(string)

    def fullmatch(self, pattern, string, flags=0):
        return self.compile(pattern, flags).fullmatch(string)

    def findall(self, pattern, string, flags=0):
        return self.compile(pattern, flags).findall(string)

    def finditer(self, pattern, string, flags=0):
        return self.compile(pattern, flags).finditer(string)

    def split(self, pattern, string, maxsplit=0, flags=0):
        return self.compile(pattern, flags).split(string, maxsplit)

    def sub(self, pattern, repl, string, count=0, flags=0):
        return self.compile(pattern, flags).sub(repl, string, count)

    def subn(self, pattern, repl, string, count=0, flags=0):
        return self.compile(pattern, flags).subn(repl, string, count)

    @contextmanager
    def clock(self, pattern, text):
        """Raise :class:`RegexOverTime` inside the block when it outlasts this call's share of time.
        Whatever SIGALRM handler and timer the process had are back after it."""
        if self._timing or threading.current_thread() is not threading.main_thread():
            yield  # a match inside a match (a callable repl) runs on its caller's clock
            return
        seconds = min(REGEX_SECONDS, REGEX_TOTAL_SECONDS - self.spent)
        in_all = seconds < REGEX_SECONDS
        over = RegexOverTime(
            pattern, len(text) if isinstance(text, (str, bytes)) else 0,
            REGEX_TOTAL_SECONDS if in_all else REGEX_SECONDS, in_all,
        )  # fmt: skip
        if seconds <= 0:
            raise over

        def stop(signum, frame):
            raise over

        previous_handler = signal.signal(signal.SIGALRM, stop)
        previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
        self._timing = True
        start = time.monotonic()
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            elapsed = time.monotonic() - start
            self.spent += elapsed
            self._timing = False
            signal.signal(signal.SIGALRM, previous_handler)
            if previous_delay:  # someone else's timer: it goes on, firing at once if it came due
                signal.setitimer(signal.ITIMER_REAL, max(previous_delay - elapsed, 1e-6), previous_interval)


class BoundedPattern:
    """A compiled ``re`` pattern whose matching methods run on its :class:`BoundedRe`'s clock."""

    def __init__(self, compiled: re.Pattern, owner: BoundedRe) -> None:
        self.compiled, self.owner = compiled, owner
        self.pattern, self.flags = compiled.pattern, compiled.flags
        self.groups, self.groupindex = compiled.groups, compiled.groupindex

    def __repr__(self) -> str:
        return repr(self.compiled)

    def _timed(self, method: str, string, *args):
        with self.owner.clock(self.pattern, string):
            return getattr(self.compiled, method)(string, *args)

    def search(self, string, *span):
        return self._timed("search", string, *span)

    def match(self, string, *span):
        return self._timed("match", string, *span)

    def fullmatch(self, string, *span):
        return self._timed("fullmatch", string, *span)

    def findall(self, string, *span):
        return self._timed("findall", string, *span)

    def finditer(self, string, *span):
        """All matches found under one clock, then handed out one by one."""
        with self.owner.clock(self.pattern, string):
            return iter(list(self.compiled.finditer(string, *span)))

    def split(self, string, maxsplit=0):
        with self.owner.clock(self.pattern, string):
            return self.compiled.split(string, maxsplit=maxsplit)

    def sub(self, repl, string, count=0):
        with self.owner.clock(self.pattern, string):
            return self.compiled.sub(repl, string, count=count)

    def subn(self, repl, string, count=0):
        with self.owner.clock(self.pattern, string):
            return self.compiled.subn(repl, string, count=count)
