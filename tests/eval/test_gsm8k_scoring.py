"""GSM8K answer extraction and scoring, against hand-worked completions."""

from __future__ import annotations

import json
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ds_sft.errors import UserError
from ds_sft.eval import gsm8k


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18"),
        ("The answer is 1,234.", "1234"),
        ("So the total is $1,234.50 dollars.", "1234.50"),
        ("The temperature drops to -3 degrees.", "-3"),
        ("16-3=13", "13"),  # a subtraction, not a negative 3
        ("#### 1,000\nThen she buys 5 more.", "1000"),  # the marked answer wins over the last number
        ("first #### 7 then a correction #### 8", "8"),  # the last marker wins
        ("#### \nso it is 12", "12"),  # a marker without a number falls back to the last number
        ("It costs 0.5 each", "0.5"),
        ("lists 1,2,3", "3"),  # commas not in thousands groups separate numbers
        ("She loses -$5 on it.", "-5"),  # a sign before the currency sign: read as 5
        ("#### -$12", "-12"),
        ("The change is \u22123 degrees.", "-3"),  # Unicode's minus sign: read as 3
        ("It falls 10 - $4 = $6", "6"),  # a subtraction before a currency sign stays one
        ("Each costs $.50", "0.50"),  # decimals alone: read as 50
        ("It is .5 of the cake", "0.5"),  # read as 5
        ("It moves -.5 each step", "-0.5"),
        ("The balance is $-.5", "-0.5"),
        ("She has 5 apples.5 more come", "5"),  # a word before the dot: punctuation, not a decimal point
        ("So wait...5", "5"),  # an ellipsis before a number
        ("It falls 16-.5 = 15.5 degrees", "15.5"),
    ],
)
def test_extract_answer(completion, expected):
    assert gsm8k.extract_answer(completion) == Decimal(expected)


# How a number is written around its value (what the reference below builds from its parts)
SIGNS = {"": 1, "$": 1, "-": -1, "-$": -1, "$-": -1, "\u2212": -1, "\u2212$": -1}
# the words before it, and the number they hold themselves (the answer when the one after is none)
BEFORE = {"": None, "The answer is ": None, "She had 3 apples, so ": 3, "x = ": None, "(": None,
          "#### ": None, "total:": None}  # fmt: skip
AFTER = ["", ".", " dollars.", "?", ".\n", " each.", ")", "%"]
DECIMALS = st.text("0123456789", min_size=1, max_size=4)
WHOLES = st.integers(0, 10**13)
DENOMINATORS = st.integers(1, 10**6)
# Digits joined in ways that make no number (the first two parts are joined by the first joiner): a
# version, address or date, a time or ratio, a decimal over a number or a number over a decimal.
NOT_NUMBER_JOINS = [".", "/", ":", "./", "/.", ":.", ".:", "/:"]


def _grouped(draw, whole: int) -> str:
    return f"{whole:,}" if whole >= 1000 and draw(st.booleans()) else str(whole)


@st.composite
def written_numbers(draw) -> tuple[str, str, str, Decimal | Fraction | None, Decimal | Fraction | None]:
    """(words before, a number, punctuation or words after, what the completion reads as, what a
    reference "#### {number}{after}" reads as) for each form a number takes: a sign or a currency
    sign or both; thousands commas or plain digits or no integer part at all (".5"), any decimals; a
    fraction ("3/4"), a mixed number ("1 1/2"), a whole number before a fraction of 1 or more ("5 6/3":
    two numbers, of which a completion commits to one, and a reference is refused); or digits joined
    into no number ("1.2.3", "3:30", "3:4", "1/2/2024", "1.5/2", "3/0"), of which nothing is read: the
    answer is the words' own number, or none, and a reference is refused. Each value from Decimal or
    Fraction on the parts, not from the parser's reading of them."""
    sign = draw(st.sampled_from(sorted(SIGNS)))
    negative = SIGNS[sign] < 0
    before, after = draw(st.sampled_from(sorted(BEFORE))), draw(st.sampled_from(AFTER))
    form = draw(st.sampled_from(["decimal", "fraction", "mixed", "whole then fraction", "not a number"]))
    if form == "decimal":
        whole = draw(st.none() | WHOLES)
        decimals = draw(DECIMALS if whole is None else st.none() | DECIMALS)
        digits = "" if whole is None else _grouped(draw, whole)
        written = sign + digits + ("" if decimals is None else "." + decimals)
        value = Decimal(f"{'-' if negative else ''}{whole or 0}.{decimals or 0}")
        return before, written, after, value, value
    if form == "fraction":
        numerator, denominator = draw(WHOLES), draw(DENOMINATORS)
        value = SIGNS[sign] * Fraction(numerator, denominator)
        return before, f"{sign}{_grouped(draw, numerator)}/{denominator}", after, value, value
    if form in ("mixed", "whole then fraction"):
        whole, denominator = draw(WHOLES), draw(DENOMINATORS)
        proper = form == "mixed"
        numerator = draw(st.integers(0, denominator - 1) if proper else st.integers(denominator, 10**7))
        written = f"{sign}{_grouped(draw, whole)} {numerator}/{denominator}"
        if proper:
            value = SIGNS[sign] * (whole + Fraction(numerator, denominator))
            return before, written, after, value, value
        # after a mark the first number is the answer, elsewhere the last
        first = before == "#### "
        return (
            before,
            written,
            after,
            SIGNS[sign] * whole if first else Fraction(numerator, denominator),
            None,
        )
    joins = draw(st.sampled_from(NOT_NUMBER_JOINS))
    parts = draw(st.lists(DECIMALS, min_size=len(joins) + 1, max_size=len(joins) + 3))
    if joins == "/":  # a single "/" makes a fraction unless it divides by zero
        parts = [parts[0], "0" * len(parts[1])]
    joiners = [*joins, *draw(st.lists(st.sampled_from("./:"), min_size=len(parts), max_size=len(parts)))]
    written = (
        sign + parts[0] + "".join(joiner + part for joiner, part in zip(joiners, parts[1:], strict=False))
    )  # more joiners than needed
    return before, written, after, BEFORE[before], None


@given(written_numbers())
@example(("Each costs ", "$.50", ".", Decimal("0.5"), Decimal("0.5")))
@example(("It is ", "5", ".", Decimal(5), Decimal(5)))
@example(("It is version ", "1.2.3", ".", None, None))
@example(("She had 3 apples, so ", "3:30", " pm.", 3, None))
@example(("Pour ", "1 1/2", " cups.", Fraction(3, 2), Fraction(3, 2)))
def test_every_way_of_writing_a_number_reads_as_its_value(case):
    """The class ".5", "-.5", "$.50", "$-.5", "0.50", "1,000.5", "is 5.", "3/4", "-1 1/2", "1.2.3" and
    "3:30" belong to: the last number of a completion reads as the value its parts spell (digits
    joined into no number: nothing), and so does a reference's number after its mark (a reference
    without one is refused before any model loads)."""
    before, written, after, value, reference = case
    assert gsm8k.extract_answer(before + written + after) == value
    problem = gsm8k.Problem("q", f"work\n#### {written}{after}")
    if reference is None:
        with pytest.raises(UserError, match="is not one number after '####'"):
            _ = problem.target
    else:
        assert problem.target == reference


def _scored(completion: str, reference: str) -> dict:
    """The sample :func:`gsm8k.score` records for one problem answered with ``completion``."""
    problem = gsm8k.Problem("q", f"work\n#### {reference}")
    return gsm8k.score([problem], lambda questions: [(completion, False)], batch_size=1).samples[0]


def test_no_number_is_none_and_wrong():
    assert gsm8k.extract_answer("I don't know.") is None
    sample = _scored("I don't know.", "5")
    assert (sample["predicted"], sample["correct"], sample["target"]) == (None, False, "5")


@pytest.mark.parametrize(
    ("completion", "target", "correct", "predicted"),
    [
        ("#### 18", "18", True, "18"),
        ("#### 18.00", "18", True, "18"),  # numeric, not string, equality
        ("The answer is 1,000", "1000", True, "1000"),
        ("#### 18", "-18", False, "18"),
        ("#### 180", "18", False, "180"),
        ("The answer is 17.5", "17", False, "17.5"),
        ("#### 3/4", "0.75", True, "0.75"),  # a fraction is its exact value
        ("It takes 1 1/2 hours.", "1.5", True, "1.5"),
        ("#### 1/3", "0.33", False, "1/3"),  # no decimal writes it: recorded as the fraction
        ("#### 2/3", "2/3", True, "2/3"),
        ("Version 1.2.3", "1.2", False, None),  # no number, and no 1.2 read from it
        ("We meet at 3:30", "30", False, None),
    ],
)
def test_a_sample_is_an_exact_numeric_match(completion, target, correct, predicted):
    sample = _scored(completion, target)
    assert (sample["correct"], sample["predicted"]) == (correct, predicted)


@pytest.mark.parametrize("problems", [1, 7])
def test_the_scorer_reads_each_completion_and_reference_once(monkeypatch, problems):
    """Each sample read its completion's number twice (for the record, then again for the verdict)
    and its reference's number twice (the target recorded, then compared)."""
    read = {"completion": [], "reference": []}
    extract, reference = gsm8k.extract_answer, gsm8k.reference_answer
    monkeypatch.setattr(
        gsm8k, "extract_answer", lambda text: read["completion"].append(text) or extract(text)
    )
    monkeypatch.setattr(
        gsm8k, "reference_answer", lambda text: read["reference"].append(text) or reference(text)
    )
    asked = [gsm8k.Problem(f"q{i}", f"w\n#### {i}") for i in range(problems)]
    result = gsm8k.score(asked, lambda questions: [(f"so {q[1:]}", False) for q in questions], batch_size=3)
    assert result.correct == problems
    assert sorted(read["completion"]) == sorted(f"so {i}" for i in range(problems))
    assert sorted(read["reference"]) == sorted(f"w\n#### {i}" for i in range(problems))


def _problems(n):
    return [gsm8k.Problem(question=f"q{i}", answer=f"work\n#### {i}") for i in range(n)]


def test_select_is_seeded_subset_in_file_order():
    problems = _problems(50)
    first = gsm8k.select(problems, limit=10, seed=3)
    assert first == gsm8k.select(problems, limit=10, seed=3)
    assert first != gsm8k.select(problems, limit=10, seed=4)
    assert len(first) == len(set(p.question for p in first)) == 10
    indices = [int(p.question[1:]) for p in first]
    assert indices == sorted(indices)
    assert gsm8k.select(problems, limit=None, seed=0) == problems
    assert gsm8k.select(problems, limit=500, seed=0) == problems
    with pytest.raises(UserError):
        gsm8k.select(problems, limit=0, seed=0)


def test_score_counts_exact_matches_per_batch():
    questions = ["q0?????", "q1?", "q2?????", "q3?", "q4???"]  # of different lengths; target = the digit
    problems = [gsm8k.Problem(question=q, answer=f"w\n#### {i}") for i, q in enumerate(questions)]
    batches = []

    def answer(questions):
        batches.append(questions)
        # right for even targets, a wrong number for odd ones
        return [(f"#### {int(q[1]) if int(q[1]) % 2 == 0 else 99}", q == "q3?") for q in questions]

    result = gsm8k.score(problems, answer, batch_size=2)
    # asked shortest first (ties in file order), so a batch pads little
    assert batches == [["q1?", "q3?"], ["q4???", "q0?????"], ["q2?????"]]
    assert (result.correct, result.total) == (3, 5)
    # the samples come back in the problems' own order
    assert [s["question"] for s in result.samples] == [p.question for p in problems]
    assert [s["correct"] for s in result.samples] == [True, False, True, False, True]
    assert result.samples[1]["predicted"] == "99" and result.samples[1]["target"] == "1"
    assert [s["hit_max_new_tokens"] for s in result.samples] == [False, False, False, True, False]


def test_load_test_set_from_path(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n\n")
    problems, origin = gsm8k.load_test_set(path)
    assert origin == str(path)
    assert problems[0].target == Decimal(2)


def test_load_test_set_errors_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="--gsm8k_test .* does not exist"):
        gsm8k.load_test_set(tmp_path / "missing.jsonl")
    for not_a_file in (tmp_path, Path("/dev/zero")):  # it exists: "does not exist" misled
        with pytest.raises(UserError, match="--gsm8k_test .* is not a regular file"):
            gsm8k.load_test_set(not_a_file)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(UserError, match="bad.jsonl:1"):
        gsm8k.load_test_set(bad)


def test_real_test_set_targets_all_parse(shared):
    problems, _ = gsm8k.load_test_set(shared / "data" / "gsm8k" / "test.jsonl")
    assert len(problems) == 1319
    # every reference solution scores as correct against its own target
    assert all(gsm8k.extract_answer(p.answer) == p.target for p in problems)


BAD_ROWS = {
    "not UTF-8": b'{"question": "\xff", "answer": "#### 1"}',
    "nested too deeply": b"[" * 100_000 + b"]" * 100_000,
    "question a number": b'{"question": 5, "answer": "#### 1"}',
    "null": b"null",
    "answer a number": b'{"question": "q", "answer": 3}',
    "question a list": b'{"question": ["a"], "answer": "#### 1"}',
    "empty question": b'{"question": " ", "answer": "#### 1"}',
    "answer without a number": b'{"question": "q", "answer": "three"}',
    "an array": b'["q", "#### 1"]',
    "a lone surrogate": b'{"question": "\\ud800 how many?", "answer": "#### 1"}',  # the tokenizer's TypeError
    # read as a completion is, these scored against another number: the 5 of the working, the last 6
    "a word after the mark": b'{"question": "q", "answer": "Tom had 5 apples.\\n#### none"}',
    "no mark": b'{"question": "q", "answer": "3 * 2 = 6 dollars, 1 receipt"}',
    "the number before the mark": b'{"question": "q", "answer": "so 4 left ####"}',
    "the number later after the mark": b'{"question": "q", "answer": "#### about 7"}',
    # read up to the first character that is not a number, these scored against 1, 1, 1, 0 and 10
    "a thousand spaced": b'{"question": "q", "answer": "#### 1 000"}',
    "a comma not of thousands": b'{"question": "q", "answer": "#### 1,00"}',
    "an exponent": b'{"question": "q", "answer": "#### 1e3"}',
    "hexadecimal": b'{"question": "q", "answer": "#### 0x10"}',
    "a range": b'{"question": "q", "answer": "#### 10-12"}',
    "two numbers": b'{"question": "q", "answer": "#### 12 apples and 3 pears"}',
    # no number at all, though each starts with one: scored against 1.2, 3, 3, 1 and 3
    "a version": b'{"question": "q", "answer": "#### 1.2.3"}',
    "a time": b'{"question": "q", "answer": "#### 3:30"}',
    "a ratio": b'{"question": "q", "answer": "#### 3:4"}',
    "a date": b'{"question": "q", "answer": "#### 1/2/2024"}',
    "a division by zero": b'{"question": "q", "answer": "#### 3/0"}',
}


@pytest.mark.parametrize("row", BAD_ROWS)
def test_a_bad_test_row_is_one_line_naming_it_before_any_model_loads(tmp_path, row):
    """Each of these was a traceback (UnicodeDecodeError, RecursionError, TypeError: some after every
    answer was generated), scored silently (a list), or refused only after generation (no number)."""
    path = tmp_path / "test.jsonl"
    path.write_bytes(
        json.dumps({"question": "1+1?", "answer": "#### 2"}).encode() + b"\n" + BAD_ROWS[row] + b"\n"
    )
    with pytest.raises(UserError, match=r"test\.jsonl:2: ") as err:
        gsm8k.load_test_set(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("answer", "number"),
    [("#### 18", "18"), ("so 2 + 3 = 5\n#### 5", "5"), ("#### 1,234", "1234"), ("#### -3", "-3"),
     ("#### 3.5 dollars", "3.5"), ("a #### 1 then\n#### 2", "2"), ("#### 18.", "18"), ("#### 5%", "5"),
     ("#### 1,234,567.5", "1234567.5"), ("#### $12", "12"), ("#### \u22123", "-3"), ("#### $-.5", "-0.5"),
     ("#### 3/4", "0.75"), ("#### -1 1/2 cups", "-1.5")],
)  # fmt: skip
def test_a_reference_answer_is_the_number_right_after_its_last_mark(answer, number):
    from decimal import Decimal

    assert gsm8k.Problem("q", answer).target == Decimal(number)


def test_a_number_longer_than_int_reads_is_read():
    """A model looping on one digit writes a number past the 4,300 digits ``int()`` reads: scored and
    recorded as any other, not a ValueError after every answer was generated."""
    digits = "7" * 5000
    assert _scored(f"so it is {digits}.", digits)["predicted"] == digits
    assert _scored(f"#### {digits}/2", "3" + "8" * 4999 + ".5")["correct"]  # 77/2 = 38.5, 777/2 = 388.5
