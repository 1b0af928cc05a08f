"""The harness's regexes under a clock: the same answers as ``re`` on ordinary work, and a one-line
stop on each way a task config's pattern reaches a match (filters, ``regexes_to_ignore``, a
template's ``regex_replace``) when the pattern backtracks for hours."""

from __future__ import annotations

import re
import signal
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_sft.eval import bounded_re
from ds_sft.eval.bounded_re import BoundedRe, RegexOverTime

# a*...*b on a run of a's without b: (n choose 9) attempts, so hours on 300 characters; it passes the
# shape check (no repeat inside a repeat), which is why the clock exists
ENDLESS = "a*" * 9 + "b"
ENDLESS_TEXT = "a" * 300
PATTERNS = ["a", "a*", "(a)(b)?", "(?P<word>\\w+)", "\\s+", "x|", "(?i)B+", "^", "$", "(a|b)c", "[ab]{2}"]
TEXTS = st.text(st.sampled_from(list("abcAB x\n")), max_size=12)


def _normal(value):
    """A match object as what it found, so that results from two pattern objects compare."""
    if isinstance(value, re.Match):
        return ("match", value.span(), value.groups(), value.groupdict())
    if isinstance(value, (list, tuple)):
        return [_normal(item) for item in value]
    return value


@settings(max_examples=400, deadline=None)
@given(pattern=st.sampled_from(PATTERNS), text=TEXTS, count=st.integers(0, 2))
def test_every_function_answers_as_re_does(pattern, text, count):
    bounded = BoundedRe()
    compiled, plain = bounded.compile(pattern), re.compile(pattern)
    for name in ("search", "match", "fullmatch", "findall"):
        assert _normal(getattr(bounded, name)(pattern, text)) == _normal(getattr(re, name)(pattern, text))
        assert _normal(getattr(compiled, name)(text)) == _normal(getattr(plain, name)(text))
        assert _normal(getattr(compiled, name)(text, 1, 5)) == _normal(getattr(plain, name)(text, 1, 5))
    assert _normal(list(bounded.finditer(pattern, text))) == _normal(list(re.finditer(pattern, text)))
    assert bounded.split(pattern, text, count) == re.split(pattern, text, maxsplit=count)
    for repl in ("<\\g<0>>", lambda found: found.group(0).upper()):
        assert bounded.sub(pattern, repl, text, count) == re.sub(pattern, repl, text, count=count)
        assert bounded.subn(pattern, repl, text, count) == re.subn(pattern, repl, text, count=count)
    assert (compiled.pattern, compiled.groups, compiled.groupindex) == (
        plain.pattern,
        plain.groups,
        plain.groupindex,
    )
    assert bounded.compile(compiled).pattern == pattern and bounded.escape("a.b") == re.escape("a.b")
    assert bounded.IGNORECASE is re.IGNORECASE and bounded.error is re.error


@pytest.fixture
def quick_clock(monkeypatch):
    """One second a match: the endless pattern needs hours, an ordinary one microseconds."""
    monkeypatch.setattr(bounded_re, "REGEX_SECONDS", 1.0)


@pytest.mark.parametrize("call", ["search", "findall", "sub", "split", "finditer", "compiled.fullmatch"])
def test_a_match_that_runs_for_hours_is_stopped_in_its_second(quick_clock, call):
    bounded = BoundedRe()
    owner, name = (bounded.compile(ENDLESS), call.split(".")[1]) if "." in call else (bounded, call)
    args = {"sub": ("", ENDLESS_TEXT)}.get(name, (ENDLESS_TEXT,))
    args = args if owner is not bounded else (ENDLESS, *args)
    start = time.monotonic()
    with pytest.raises(RegexOverTime) as stopped:
        getattr(owner, name)(*args)
    assert time.monotonic() - start < 30
    assert str(stopped.value).startswith(f"the regex {ENDLESS!r} ran over 1 s on a text of 300 characters")
    assert bounded.search("a+b", "xaab").span() == (1, 4)  # the clock is disarmed after it


def test_the_run_has_one_budget_for_all_its_matches(quick_clock, monkeypatch):
    monkeypatch.setattr(bounded_re, "REGEX_TOTAL_SECONDS", 2.5)
    bounded = BoundedRe()
    bounded.spent = 2.0  # earlier matches took 2 s: half a second is left, under the 1 s per match
    with pytest.raises(RegexOverTime, match="took the last of the 2.5 s that one run's regexes may take"):
        bounded.search(ENDLESS, ENDLESS_TEXT)
    assert bounded.spent >= 2.5 - 1e-3  # the half second it had, and the 2 before (two clocks: a ms)
    with pytest.raises(RegexOverTime, match="took the last of the 2.5 s"):  # nothing is left at all
        bounded.search("a", "a")


def test_a_stop_is_not_an_exception_a_library_catches():
    """lm-eval catches Exception around parts of its work: a stop caught there would be "no match"."""
    assert not issubclass(RegexOverTime, Exception)


def test_the_process_alarm_and_handler_are_back_after_each_match(quick_clock):
    def mine(signum, frame):
        raise AssertionError("the caller's handler fired")

    previous = signal.signal(signal.SIGALRM, mine)
    signal.setitimer(signal.ITIMER_REAL, 60.0, 30.0)
    try:
        bounded = BoundedRe()
        assert bounded.sub("b", "c", "abab") == "acac"
        with pytest.raises(RegexOverTime):
            bounded.findall(ENDLESS, ENDLESS_TEXT)
        assert signal.getsignal(signal.SIGALRM) is mine
        delay, interval = signal.getitimer(signal.ITIMER_REAL)
        assert 50 < delay <= 60 and interval == 30.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_an_alarm_due_at_once_leaves_the_process_alarm_and_handler_as_they_were():
    """With a microsecond of the run's budget left the alarm came before the block was entered, and the
    clock's handler stayed installed with the caller's timer gone (200 of 200 tries)."""

    def mine(signum, frame):
        raise AssertionError("the caller's handler fired")

    previous = signal.signal(signal.SIGALRM, mine)
    try:
        for _ in range(200):
            signal.setitimer(signal.ITIMER_REAL, 60.0)
            bounded = BoundedRe()
            bounded.spent = bounded_re.REGEX_TOTAL_SECONDS - 1e-6
            with pytest.raises(RegexOverTime):
                bounded.search(ENDLESS, ENDLESS_TEXT)
            assert signal.getsignal(signal.SIGALRM) is mine and not bounded._timing
            assert 50 < signal.getitimer(signal.ITIMER_REAL)[0] <= 60
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_compiled_pattern_takes_re_s_keywords_compares_and_copies_as_re_s_does():
    import copy

    bounded = BoundedRe()
    compiled = bounded.compile("a")
    assert compiled.search("xa", pos=1).span() == (1, 2) and compiled.match("xa", endpos=1) is None
    assert compiled == bounded.compile("a") and hash(compiled) == hash(re.compile("a"))
    assert compiled != bounded.compile("b")
    assert copy.copy(compiled) is compiled and copy.deepcopy(compiled) is compiled  # one clock, one budget


def test_a_match_inside_a_replacement_runs_on_its_callers_clock(quick_clock):
    bounded = BoundedRe()
    inner = bounded.compile("[0-9]")
    assert bounded.sub("\\w+", lambda found: inner.sub("#", found.group(0)), "ab1 c22") == "ab# c##"
    with pytest.raises(RegexOverTime):
        bounded.sub("x", lambda found: str(bounded.search(ENDLESS, ENDLESS_TEXT)), "x")


def test_off_the_main_thread_a_match_runs_as_re_does():
    results = []
    thread = threading.Thread(target=lambda: results.append(BoundedRe().findall("a(b)", "abab")))
    thread.start()
    thread.join()
    assert results == [["b", "b"]]


@pytest.fixture
def harness():
    pytest.importorskip("lm_eval", reason="the harness is the optional extra ds-sft[eval]")
    from ds_sft.eval import harness

    return harness


def _filter_step(function: str, **arguments):
    from lm_eval.api.registry import get_filter

    return lambda responses: get_filter(function)(**arguments).apply([responses], [{"choices": ["2"]}])


def _metric_step(**arguments):
    from lm_eval.api.metrics import exact_match_hf_evaluate

    return lambda responses: exact_match_hf_evaluate(responses, ["2"] * len(responses), **arguments)


def _template_step(pattern):
    from lm_eval.utils import apply_template

    return lambda responses: apply_template(
        "{{ text | regex_replace('" + pattern + "', '') }}", {"text": responses[0]}
    )


# every road from a task config's pattern to a match, and the harness's own gsm8k patterns
ROADS = {
    "regex filter": lambda pattern: _filter_step("regex", regex_pattern=pattern),
    "multi_choice_regex ignore": lambda pattern: _filter_step(
        "multi_choice_regex", regexes_to_ignore=[pattern]
    ),
    "exact_match regexes_to_ignore": lambda pattern: _metric_step(regexes_to_ignore=[pattern]),
    "template regex_replace": _template_step,
}


@pytest.mark.parametrize("road", ROADS)
def test_every_road_from_a_task_config_to_a_match_is_on_the_clock(quick_clock, harness, road):
    with harness.sandboxed_templates(), harness.bounded_regexes():
        step = ROADS[road](ENDLESS)
        start = time.monotonic()
        with pytest.raises(RegexOverTime):
            step([ENDLESS_TEXT])
        assert time.monotonic() - start < 30
        clocked = ROADS[road]("#### ")(["#### 2"])
    assert clocked == ROADS[road]("#### ")(["#### 2"])  # as with re itself, outside the block


def test_the_stock_gsm8k_pattern_is_quadratic_and_stopped_on_a_huge_reference(quick_clock, harness):
    from lm_eval.api.metrics import exact_match_hf_evaluate

    (ignore_all_before,) = [
        p
        for p in harness.gsm8k_task_config("t.jsonl", 16)["metric_list"][0]["regexes_to_ignore"]
        if "####" in p
    ]
    with harness.bounded_regexes(), pytest.raises(RegexOverTime, match="ran over 1 s on a text of 2,000,000"):
        exact_match_hf_evaluate(["#### 2"], ["x" * 2_000_000], regexes_to_ignore=[ignore_all_before])


def test_inside_the_block_no_harness_module_holds_re_and_after_it_every_one_does(harness):
    import sys

    def holders():
        return {name for name, module in list(sys.modules.items())
                if name.split(".")[0] == "lm_eval" and getattr(module, "re", None) is re}  # fmt: skip

    with harness.bounded_regexes():
        inside = holders()
        bounded = {
            type(module.re) for name, module in sys.modules.items() if name == "lm_eval.filters.extraction"
        }
    after = holders()
    assert inside == set() and bounded == {BoundedRe}
    assert {"lm_eval.filters.extraction", "lm_eval.api.metrics", "lm_eval.utils"} <= after
