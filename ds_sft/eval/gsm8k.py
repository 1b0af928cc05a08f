"""GSM8K accuracy: greedy chain-of-thought answers scored by exact numeric match.

A GSM8K reference answer is a worked solution ending in ``#### 18``. A model trained on that format
writes the same marker; a model that was not (the instruct base) usually ends with a sentence such
as "... so she makes $18." So the predicted answer is the number after the *last* ``####`` when the
completion has one, else the last number anywhere in it. Both sides are parsed to exact decimals
("1,000" == "1000", "18.00" == "18", "$.50" == "0.5", "-3" stays negative) and compared for
equality; a completion without any number counts as wrong.

Which problems: the whole test split (1,319), or ``limit`` of them drawn with a seeded shuffle so
that two models compared with the same seed answer the same problems.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from ds_sft.errors import UserError, first_line
from ds_sft.paths import shared_dir

HUB_ID = "openai/gsm8k"

# A number as people write it: digits, or digits grouped in threes by commas ("1,234"), with optional
# decimals, or decimals alone (".5", "$.50": read from the digits they were 5 and 50). A dot is a
# decimal point only before digits ("is 5." ends a sentence), and opens a number only where no word
# or dot precedes it ("apples.5", "wait...5": punctuation before a 5). A minus sign is a sign only
# where it cannot be a subtraction ("-3" yes, "16-3" no), also before a currency sign ("-$5": a loss
# of 5, which a match from the digits read as 5) or after one ("$-5"). The currency sign is part of
# the number, so that a reference's "#### $12" starts with it.
_NUMBER = re.compile(
    r"(?:(?<![\w)])-\$?|\$-?)?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w.])\.\d+)"
)
# Unicode's minus sign (U+2212, what typeset text and some tokenizers' merges give), read as "-"
_MINUS_SIGN = "\u2212"
_ANSWER_MARK = "####"


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the reference solution, ending in "#### N"

    @property
    def target(self) -> Decimal:
        number = reference_answer(self.answer)
        if number is None:
            raise UserError(f"GSM8K reference answer is not one number after '####': {self.answer[-80:]!r}")
        return number


def parse_number(text: str) -> Decimal | None:
    """``"1,234.50"`` -> ``Decimal("1234.50")``, ``"-$.5"`` -> ``Decimal("-0.5")``; ``None`` when
    ``text`` is not a number."""
    try:
        return Decimal(text.replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None


def find_numbers(text: str) -> list[str]:
    """Every number in ``text`` in order, as written (commas kept; a Unicode minus as "-")."""
    return _NUMBER.findall(text.replace(_MINUS_SIGN, "-"))


def reference_answer(answer: str) -> Decimal | None:
    """The number a reference solution gives: right after its last ``####``, the only number there
    (words may follow: "#### 3.5 dollars"); None for anything else. A completion is read leniently
    (:func:`extract_answer`); a reference was too, so "#### none" was scored against the 5 of "Tom
    had 5 apples", and "#### 3/4", "#### 1 000" or "#### 1e3" against the 3, 1 and 1 they start with."""
    if _ANSWER_MARK not in answer:
        return None
    # its minus signs as find_numbers reads them, so that "#### \u22123" starts with the "-3" found
    after_mark = answer.rsplit(_ANSWER_MARK, 1)[1].strip().replace(_MINUS_SIGN, "-")
    numbers = find_numbers(after_mark)
    if len(numbers) != 1 or not after_mark.startswith(numbers[0]):
        return None
    return parse_number(numbers[0])


def extract_answer(completion: str) -> Decimal | None:
    """The number a completion commits to: the first after the last ``####``, else the last one."""
    if _ANSWER_MARK in completion:
        after_mark = find_numbers(completion.rsplit(_ANSWER_MARK, 1)[1])
        if after_mark:
            return parse_number(after_mark[0])
    numbers = find_numbers(completion)
    return parse_number(numbers[-1]) if numbers else None


def is_correct(completion: str, target: Decimal) -> bool:
    """Whether the number ``completion`` commits to (:func:`extract_answer`) is ``target``."""
    predicted = extract_answer(completion)
    return predicted is not None and predicted == target


def select_indices(count: int, limit: int | None, seed: int) -> list[int]:
    """Positions in the test file: all in order, or ``limit`` of them from a seeded shuffle (sorted)."""
    if limit is None or limit >= count:
        return list(range(count))
    if limit <= 0:
        raise UserError(f"--gsm8k_limit must be positive, got {limit}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return sorted(order[:limit])


def select(problems: Sequence[Problem], limit: int | None, seed: int) -> list[Problem]:
    """All problems in file order, or ``limit`` of them from a seeded shuffle (same seed, same set)."""
    return [problems[i] for i in select_indices(len(problems), limit, seed)]


def read_jsonl(path: Path) -> list[Problem]:
    """The problems of a GSM8K test file, every row checked before any model loads: JSON of two
    non-empty strings, an answer with a number to score against. A bad row is one line naming it."""
    problems = []
    expected = "expected JSON lines with 'question' and 'answer' strings, the answer ending in '#### N'"
    with open(path, "rb") as file:
        for line_number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
                raise UserError(
                    f"{path}:{line_number}: not a GSM8K row ({first_line(err)}); {expected}"
                ) from None
            fields = [row.get(key) for key in ("question", "answer")] if isinstance(row, dict) else []
            if not (fields and all(isinstance(field, str) and field.strip() for field in fields)):
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
        predicted = extract_answer(completion)
        samples.append(
            {
                "question": problem.question,
                "target": str(problem.target),
                "completion": completion,
                "predicted": None if predicted is None else str(predicted),
                "correct": is_correct(completion, problem.target),
                "hit_max_new_tokens": hit_limit,
            }
        )
    return Score(correct=sum(s["correct"] for s in samples), total=len(samples), samples=samples)
