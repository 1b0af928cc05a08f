"""GSM8K answer extraction and scoring, against hand-worked completions."""

from __future__ import annotations

import json
from decimal import Decimal
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
BEFORE = ["", "The answer is ", "She had 3 apples, so ", "x = ", "(", "#### ", "total:"]
AFTER = ["", ".", " dollars.", "?", ".\n", " each.", ")", "%"]
DECIMALS = st.text("0123456789", min_size=1, max_size=4)


@st.composite
def written_numbers(draw) -> tuple[str, str, str, Decimal]:
    """(words before, a number, punctuation or words after, its value): the number written with a sign
    or a currency sign or both, thousands commas or plain digits or no integer part at all (".5"),
    any decimals; its value from Decimal on its parts, not from the parser's reading of it."""
    sign = draw(st.sampled_from(sorted(SIGNS)))
    whole = draw(st.none() | st.integers(0, 10**13))
    grouped = whole is not None and whole >= 1000 and draw(st.booleans())
    decimals = draw(DECIMALS if whole is None else st.none() | DECIMALS)
    digits = "" if whole is None else f"{whole:,}" if grouped else str(whole)
    written = sign + digits + ("" if decimals is None else "." + decimals)
    value = Decimal(f"{'-' if SIGNS[sign] < 0 else ''}{whole or 0}.{decimals or 0}")
    return draw(st.sampled_from(BEFORE)), written, draw(st.sampled_from(AFTER)), value


@given(written_numbers())
@example(("Each costs ", "$.50", ".", Decimal("0.5")))
@example(("It is ", "5", ".", Decimal(5)))
def test_every_way_of_writing_a_number_reads_as_its_value(case):
    """The class ".5", "-.5", "$.50", "$-.5", "0.50", "1,000.5" and "is 5." belong to: the last number
    of a completion and a reference's number after its mark read as the value their parts spell."""
    before, written, after, value = case
    assert gsm8k.extract_answer(before + written + after) == value
    assert gsm8k.Problem("q", f"work\n#### {written}{after}").target == value


def test_no_number_is_none_and_wrong():
    assert gsm8k.extract_answer("I don't know.") is None
    assert not gsm8k.is_correct("I don't know.", Decimal(5))


@pytest.mark.parametrize(
    ("completion", "target", "correct"),
    [
        ("#### 18", "18", True),
        ("#### 18.00", "18", True),  # numeric, not string, equality
        ("The answer is 1,000", "1000", True),
        ("#### 18", "-18", False),
        ("#### 180", "18", False),
        ("The answer is 17.5", "17", False),
    ],
)
def test_is_correct_is_exact_numeric_match(completion, target, correct):
    assert gsm8k.is_correct(completion, Decimal(target)) is correct


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
    assert all(gsm8k.is_correct(p.answer, p.target) for p in problems)


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
    # read as a completion is, these scored against another number: the 5 of the working, the last 6
    "a word after the mark": b'{"question": "q", "answer": "Tom had 5 apples.\\n#### none"}',
    "no mark": b'{"question": "q", "answer": "3 * 2 = 6 dollars, 1 receipt"}',
    "the number before the mark": b'{"question": "q", "answer": "so 4 left ####"}',
    "the number later after the mark": b'{"question": "q", "answer": "#### about 7"}',
    # read up to the first character that is not a number, these scored against 3, 1, 1, 1, 0 and 10
    "a fraction": b'{"question": "q", "answer": "#### 3/4"}',
    "a thousand spaced": b'{"question": "q", "answer": "#### 1 000"}',
    "a comma not of thousands": b'{"question": "q", "answer": "#### 1,00"}',
    "an exponent": b'{"question": "q", "answer": "#### 1e3"}',
    "hexadecimal": b'{"question": "q", "answer": "#### 0x10"}',
    "a range": b'{"question": "q", "answer": "#### 10-12"}',
    "two numbers": b'{"question": "q", "answer": "#### 12 apples and 3 pears"}',
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
     ("#### 1,234,567.5", "1234567.5"), ("#### $12", "12"), ("#### \u22123", "-3"), ("#### $-.5", "-0.5")],
)  # fmt: skip
def test_a_reference_answer_is_the_number_right_after_its_last_mark(answer, number):
    from decimal import Decimal

    assert gsm8k.Problem("q", answer).target == Decimal(number)
