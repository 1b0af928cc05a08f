"""GSM8K accuracy: greedy chain-of-thought answers scored by exact numeric match.

A GSM8K reference answer is a worked solution ending in ``#### 18``. A model trained on that format
writes the same marker; a model that was not (the instruct base) usually ends with a sentence such
as "... so she makes $18." So the predicted answer is the number after the *last* ``####`` when the
completion has one, else the last number anywhere in it. Both sides are read as exact rationals
("1,000" == "1000", "18.00" == "18", "$.50" == "0.5", "3/4" == "0.75", "1 1/2" == "1.5", "-3" stays
negative) and compared for equality; a completion without any number counts as wrong. What is read
as a number, and what is not ("1.2.3", "3:30"), is said at :data:`_NUMBER`.

Which problems: the whole test split (1,319), or ``limit`` of them drawn with a seeded shuffle so
that two models compared with the same seed answer the same problems.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

from ds_sft.errors import UserError
from ds_sft.json_input import JsonRefused
from ds_sft.locations import shared_dir
from ds_sft.options import COUNT, checked

HUB_ID = "openai/gsm8k"

# A number as people write it, and where it is read as one. The body is digits, or digits grouped in
# threes by commas ("1,234"), or decimals alone (".5", "$.50": read from the digits they were 5 and
# 50; a dot opens a number only where no word or dot precedes it: "apples.5", "wait...5" are
# punctuation before a 5). A comma that does not group thousands separates numbers ("1,2,3").
# A minus sign is a sign only where it cannot be a subtraction ("-3" yes, "16-3" no), also before a
# currency sign ("-$5": a loss of 5, which a match from the digits read as 5) or after one ("$-5").
# The currency sign is part of the number, so that a reference's "#### $12" starts with it; a
# percent sign after it is not ("25%" is 25: GSM8K's references write a percentage's number alone).
#
# The body goes on over every ".", "/" or ":" that joins digits, and what it joins decides whether it
# is a number at all, as a whole (:func:`_body_value`): reading its first digits scored "1.2.3" as 1.2
# (or as its last number, 3), "3/4" as 4 and "3:30" as 30.
# - one "." between digits: a decimal ("5." ends a sentence: that dot joins nothing);
# - one "/" between whole numbers: the fraction's exact value. "3/4" is 0.75 and matches a reference
#   0.75: the same number written in the form the question used. "3/0" is no number;
# - a whole number, one space and a fraction below 1: a mixed number ("1 1/2" is 1.5); "5 6/3" is
#   the two numbers 5 and 2;
# - anything else is no number, and nothing in it is read: a version, an address or a date ("1.2.3",
#   "1/2/2024"), a decimal over a number ("1.5/2"), and whatever a ":" joins: a ratio ("3:4") is two
#   numbers, and a time ("3:30") is one only in a unit the text does not give (3.5 hours? 210 minutes?).
_WHOLE = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w)])-\$?|\$-?)?"
    rf"(?:(?P<whole>{_WHOLE})\ (?=\d+/\d+(?!\d)(?![./:]\d)))?"  # a mixed number's whole part
    rf"(?P<body>(?:{_WHOLE}|(?<![\w.])(?=\.\d))(?:\.\d+|[/:]{_WHOLE})*)"
)
# Unicode's minus sign (U+2212, what typeset text and some tokenizers' merges give), read as "-"
_MINUS_SIGN = "\u2212"
_ANSWER_MARK = "####"


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the reference solution, ending in "#### N"

    @functools.cached_property
    def target(self) -> Fraction:
        """The reference's number, read once: every answer is compared against it."""
        number = reference_answer(self.answer)
        if number is None:
            raise UserError(f"GSM8K reference answer is not one number after '####': {self.answer[-80:]!r}")
        return number


def _exact(digits: str) -> Fraction:
    """The value of decimal ``digits`` (commas dropped). Read through Decimal: ``int()`` refuses a
    string of more than 4,300 digits, which an answer looping on one digit writes."""
    return Fraction.from_decimal(Decimal(digits.replace(",", "")))


def _body_value(body: str) -> Fraction | None:
    """The value of a number's body (:data:`_NUMBER`), or None when what it joins is no number."""
    joiners = re.findall(r"[./:]", body)
    if joiners in ([], ["."]):
        return _exact(body)
    if joiners == ["/"]:
        numerator, denominator = map(_exact, body.split("/"))
        return numerator / denominator if denominator else None
    return None


def find_numbers(text: str) -> list[tuple[str, Fraction]]:
    """Every number in ``text`` in order (:data:`_NUMBER`): as written (commas kept, a Unicode minus
    as "-") and its exact value."""
    found = []
    for match in _NUMBER.finditer(text.replace(_MINUS_SIGN, "-")):
        sign, whole, body = match["sign"] or "", match["whole"], match["body"]
        value = _body_value(body)
        if whole is not None and (value is None or value >= 1):  # not a mixed number: two numbers
            found.append((sign + whole, -_exact(whole) if "-" in sign else _exact(whole)))
            sign, whole = "", None
        if value is None:
            continue
        if whole is not None:
            value += _exact(whole)
        found.append((match[0] if whole is not None else sign + body, -value if "-" in sign else value))
    return found


def parse_number(text: str) -> Fraction | None:
    """The value of ``text`` when it is one number and nothing else (``"1,234.50"``, ``"-$.5"``,
    ``"3/4"``, ``"1 1/2"``), else None."""
    written = text.strip().replace(_MINUS_SIGN, "-")
    numbers = find_numbers(written)
    return numbers[0][1] if len(numbers) == 1 and numbers[0][0] == written else None


def number_text(value: Fraction) -> str:
    """``value`` written as a decimal when it has a finite one (``"0.75"``, ``"-3"``), else as a
    fraction (``"1/3"``): how a sample records its target and its prediction."""
    denominator = value.denominator
    twos = (denominator & -denominator).bit_length() - 1
    rest, fives = denominator >> twos, 0
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest != 1:  # a prime other than 2 and 5 divides it: no finite decimal
        return f"{value.numerator}/{denominator}"
    places = max(twos, fives)  # the fewest decimals that write it
    digits = Decimal(abs(value.numerator) * 10**places // denominator).as_tuple().digits
    return f"{Decimal((int(value < 0), digits, -places)):f}"  # built from its digits: no rounding


def reference_answer(answer: str) -> Fraction | None:
    """The number a reference solution gives: right after its last ``####``, the only number there
    (words may follow: "#### 3.5 dollars"); None for anything else. A completion is read leniently
    (:func:`extract_answer`); a reference was too, so "#### none" was scored against the 5 of "Tom
    had 5 apples", and "#### 1 000" or "#### 1e3" against the 1 they start with."""
    if _ANSWER_MARK not in answer:
        return None
    # its minus signs as find_numbers reads them, so that "#### \u22123" starts with the "-3" found
    after_mark = answer.rsplit(_ANSWER_MARK, 1)[1].strip().replace(_MINUS_SIGN, "-")
    numbers = find_numbers(after_mark)
    if len(numbers) != 1 or not after_mark.startswith(numbers[0][0]):
        return None
    return numbers[0][1]


def extract_answer(completion: str) -> Fraction | None:
    """The number a completion commits to: the first after the last ``####``, else the last one."""
    if _ANSWER_MARK in completion:
        after_mark = find_numbers(completion.rsplit(_ANSWER_MARK, 1)[1])
        if after_mark:
            return after_mark[0][1]
    numbers = find_numbers(completion)
    return numbers[-1][1] if numbers else None


def select_indices(count: int, limit: int | None, seed: int) -> list[int]:
    """Positions in the test file: all in order, or ``limit`` of them from a seeded shuffle (sorted)."""
    if limit is None or checked("--gsm8k_limit", limit, COUNT) >= count:
        return list(range(count))
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return sorted(order[:limit])


def select(problems: Sequence[Problem], limit: int | None, seed: int) -> list[Problem]:
    """All problems in file order, or ``limit`` of them from a seeded shuffle (same seed, same set)."""
    return [problems[i] for i in select_indices(len(problems), limit, seed)]


def read_jsonl(path: Path) -> list[Problem]:
    """The problems of a GSM8K test file, every row checked before any model loads: JSON of two
    non-empty strings, an answer with a number to score against. A bad row is one line naming it."""
    from ds_sft.data.sources import read_json_lines

    problems = []
    expected = "expected JSON lines with 'question' and 'answer' strings, the answer ending in '#### N'"
    with open(path, "rb") as file:
        # each line by the one JSON reader, bounded in length: not UTF-8, nested past the recursion
        # limit, a lone surrogate (a TypeError from the tokenizer once the model had loaded), a NaN
        for line_number, _, row in read_json_lines(file, path.stat().st_size):
            if isinstance(row, JsonRefused):
                raise UserError(f"{path}:{line_number}: not a GSM8K row ({row}); {expected}")
            fields = [row.get(key) for key in ("question", "answer")]
            if not all(isinstance(field, str) and field.strip() for field in fields):
                raise UserError(f"{path}:{line_number}: not a GSM8K row; {expected}")
            if reference_answer(fields[1]) is None:
                raise UserError(
                    f"{path}:{line_number}: the text after the answer's last '####' is not one number "
                    f"({fields[1].rsplit(_ANSWER_MARK, 1)[-1].strip()[:40]!r}); {expected}"
                )
            problems.append(Problem(question=fields[0], answer=fields[1]))
    if not problems:
        raise UserError(f"{path} holds no GSM8K problems")
    return problems


def load_test_set(path: str | Path | None = None) -> tuple[list[Problem], str]:
    """The GSM8K test split and where it came from.

    Looked for in order: ``path`` (``--gsm8k_test``), ``shared/data/gsm8k/test.jsonl``, the hub
    dataset ``openai/gsm8k`` (main, test) when the hub is reachable.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "does not exist"
            raise UserError(f"--gsm8k_test {path} {what}: pass the GSM8K test.jsonl")
        return read_jsonl(path), str(path)
    shared = shared_dir()
    if shared is not None and (shared / "data" / "gsm8k" / "test.jsonl").is_file():
        local = shared / "data" / "gsm8k" / "test.jsonl"
        return read_jsonl(local), str(local)
    try:
        import datasets

        rows = datasets.load_dataset(HUB_ID, "main", split="test")
    except Exception as err:  # offline, hub error, missing config: all mean "not available here"
        raise UserError(
            f"no GSM8K test set: pass --gsm8k_test PATH/test.jsonl, or --no_gsm8k to skip it "
            f"(loading {HUB_ID} from the hub failed: {type(err).__name__})"
        ) from err
    return [Problem(row["question"], row["answer"]) for row in rows], f"hub:{HUB_ID}"


@dataclass
class Score:
    correct: int
    total: int
    samples: list[dict]  # question, target, completion, predicted, correct, hit_max_new_tokens: per problem


def score(
    problems: Sequence[Problem], answer_fn: Callable[[list[str]], list[tuple[str, bool]]], batch_size: int
) -> Score:
    """Ask ``answer_fn`` (a batch of questions -> (completion, hit max_new_tokens) pairs) every
    problem and count exact matches.

    Batches hold questions of similar length (asked shortest first), so a batch of prompts needs
    little left padding; the samples come back in the order of ``problems``.
    """
    from tqdm import tqdm

    order = sorted(range(len(problems)), key=lambda i: len(problems[i].question))
    completions: list[tuple[str, bool]] = [("", False)] * len(problems)
    with tqdm(total=len(problems), desc="gsm8k", unit="problem") as progress:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            answers = answer_fn([problems[i].question for i in batch])
            for i, completion in zip(batch, answers, strict=True):
                completions[i] = completion
            progress.update(len(batch))
    samples = []
    for problem, (completion, hit_limit) in zip(problems, completions, strict=True):
        predicted, target = extract_answer(completion), problem.target  # each read once
        samples.append(
            {
                "question": problem.question,
                "target": number_text(target),
                "completion": completion,
                "predicted": None if predicted is None else number_text(predicted),
                "correct": predicted == target,  # None (no number) is never a target
                "hit_max_new_tokens": hit_limit,
            }
        )
    return Score(correct=sum(s["correct"] for s in samples), total=len(samples), samples=samples)
