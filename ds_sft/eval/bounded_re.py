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
import sys
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

        # Armed inside the try, and undone in a loop: an alarm due at once (the last microseconds of the
        # run's budget) or one that lands during the clean-up would otherwise leave the handler armed.
        previous_handler = signal.getsignal(signal.SIGALRM)
        previous_delay, previous_interval = signal.getitimer(signal.ITIMER_REAL)
        start, failed, late = time.monotonic(), False, None
        self._timing = True
        try:
            signal.signal(signal.SIGALRM, stop)
            signal.setitimer(signal.ITIMER_REAL, seconds)
            yield
        except BaseException:
            failed = True
            raise
        finally:
            while True:
                try:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    signal.signal(signal.SIGALRM, previous_handler)
                    break
                except RegexOverTime as err:  # due as the block ended: its time had run out
                    late = err
            elapsed = time.monotonic() - start
            self.spent += elapsed
            self._timing = False
            if previous_delay:  # someone else's timer: it goes on, firing at once if it came due
                signal.setitimer(signal.ITIMER_REAL, max(previous_delay - elapsed, 1e-6), previous_interval)
            if late is not None and not failed:
                raise late


class BoundedPattern:
    """A compiled ``re`` pattern whose matching methods run on its :class:`BoundedRe`'s clock."""

    def __init__(self, compiled: re.Pattern, owner: BoundedRe) -> None:
        self.compiled, self.owner = compiled, owner
        self.pattern, self.flags = compiled.pattern, compiled.flags
        self.groups, self.groupindex = compiled.groups, compiled.groupindex

    def __repr__(self) -> str:
        return repr(self.compiled)

    def __eq__(self, other) -> bool:
        return isinstance(other, BoundedPattern) and self.compiled == other.compiled

    def __hash__(self) -> int:
        return hash(self.compiled)

    def __copy__(self) -> BoundedPattern:
        return self  # as re's patterns: immutable, and a copy keeps its owner's clock

    def __deepcopy__(self, memo) -> BoundedPattern:
        return self

    def _timed(self, method: str, string, *args, **kwargs):
        with self.owner.clock(self.pattern, string):
            result = getattr(self.compiled, method)(string, *args, **kwargs)
            # finditer's matches are found as it is read: all of them here, on the clock
            return iter(list(result)) if method == "finditer" else result

    def search(self, string, pos=0, endpos=sys.maxsize):
        return self._timed("search", string, pos, endpos)

    def match(self, string, pos=0, endpos=sys.maxsize):
        return self._timed("match", string, pos, endpos)

    def fullmatch(self, string, pos=0, endpos=sys.maxsize):
        return self._timed("fullmatch", string, pos, endpos)

    def findall(self, string, pos=0, endpos=sys.maxsize):
        return self._timed("findall", string, pos, endpos)

    def finditer(self, string, pos=0, endpos=sys.maxsize):
        return self._timed("finditer", string, pos, endpos)

    def split(self, string, maxsplit=0):
        return self._timed("split", string, maxsplit=maxsplit)

    def sub(self, repl, string, count=0):
        with self.owner.clock(self.pattern, string):
            return self.compiled.sub(repl, string, count=count)

    def subn(self, repl, string, count=0):
        with self.owner.clock(self.pattern, string):
            return self.compiled.subn(repl, string, count=count)
