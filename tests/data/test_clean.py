"""Cleaning, dedup and decontamination, each checked against hand-made rows with a known answer."""

from __future__ import annotations

import json
import re
import string
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_sft.data.clean import (
    CALCULATOR_ANNOTATION,
    Drops,
    NgramSet,
    clean_records,
    decontaminate,
    normalize_text,
    record_words,
    unique_rows,
    words,
)
from tests.conftest import REPO_ROOT
from tests.data.helpers import dedup


def record(instruction, response, source="s", extra=""):
    return {"id": "x", "source": source, "category": "general", "instruction": instruction, "input": extra,
            "response": response, "history": []}  # fmt: skip


def test_normalize_text():
    decomposed = "cafe\u0301"  # e + combining acute -> NFC single code point
    assert normalize_text(f"  {decomposed}\r\nline two   \r\n\r\n\r\n\r\nend\u00a0here\u200b  ") == (
        "caf\u00e9\nline two\n\nend here"
    )
    code = "def f():\n    return 1\n"
    assert normalize_text(code) == "def f():\n    return 1"  # indentation is kept


# a code answer's lines: (indentation level, text), the text without edge whitespace
code_lines = st.lists(
    st.tuples(st.integers(0, 4), st.text("abcxyz=():_0123 ", min_size=1, max_size=12).map(str.strip)).filter(
        lambda line: line[1]
    ),
    min_size=2,
    max_size=8,
)


@given(
    lines=code_lines,
    margin=st.sampled_from(["", "  ", "    ", "\t"]),
    unit=st.sampled_from(["  ", "    ", "\t"]),
)
def test_normalize_text_keeps_each_lines_indentation_relative_to_the_others(lines, margin, unit):
    """A code answer indented as a whole comes out with the shared margin gone and every line's
    indentation relative to the others kept (``strip()`` took the first line's alone:
    ``"    x()\n    y()"`` became ``"x()\n    y()"``); the reference is textwrap.dedent."""
    levels = [level for level, _ in lines]
    if levels[0] > min(levels) == max(levels[1:]):
        levels[0] = min(levels)  # a first line indented alone: prose's stray margin, which goes (see dedent)
    text = "\n".join(
        margin + unit * level + words for (level, words), level in zip(lines, levels, strict=True)
    )
    assert normalize_text(text) == textwrap.dedent(text).strip("\n")


@given(st.text(" \t\nab\r\u00a0", max_size=30))
def test_normalize_text_is_idempotent(text):
    once = normalize_text(text)
    assert normalize_text(once) == once


def test_normalize_text_trailing_space_and_blank_line_edges():
    cases = {
        "a\t\n\n\nb": "a\n\nb",  # the tab goes, then the blank lines it left collapse
        "a \n \n \n \nb": "a\n\nb",
        "a\n\n\n  ": "a",  # trailing spaces at the very end: strip's job
        "a  b\n\nc": "a  b\n\nc",  # inner runs of spaces and one blank line stay
        "x\r\n\r\n\r\ny ": "x\n\ny",
    }
    assert {text: normalize_text(text) for text in cases} == cases


def test_alpaca_noinput_markers_and_empty_rows_dropped():
    drops = Drops()
    rows = [
        record("Say hi", "hi", extra="<noinput>"),
        record("Say ho", "ho", extra="N/A"),
        record("Say he", "he", extra="No input"),
        record("   ", "x"),
        record("y", " \n "),
    ]
    kept = clean_records(rows, drops)
    assert [r["input"] for r in kept] == ["", "", ""]
    assert drops.by_source() == {"s": {"empty_instruction": 1, "empty_response": 1}}


def test_gsm8k_annotations_stripped_final_line_kept():
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"
    drops = Drops()
    kept = clean_records([record("q", answer), record("q2", "no final line")], drops, gsm8k=True)
    assert kept[0]["response"] == "Natalia sold 48/2 = 24 clips in May.\nIn all 48+24 = 72 clips.\n#### 72"
    assert drops.by_source() == {"s": {"no_final_answer_line": 1}}


def test_calculator_annotations_are_stripped_from_gsm8k_only():
    code = "int x = 1; x <<= 2; y >>= 1;\nprint(a << b == c >> d)"
    kept = clean_records([record("Shift", code, source="alpaca")], Drops())
    assert kept[0]["response"] == code  # no "annotation" in code is taken out
    kept = clean_records([record("q", code + "\n#### 4")], Drops(), gsm8k=True)
    # GSM8K's own rule takes out what looks like an annotation: "<<= 2; y >>" and "<< b == c >>"
    assert kept[0]["response"] == "int x = 1; x = 1;\nprint(a  d)\n#### 4"


# What the cleaning regexes were before they were made linear: the reference they must still agree with.
TRAILING_SPACE_REGEX = re.compile(r"[ \t]+$", re.MULTILINE)
CALCULATOR_REGEX = re.compile(r"<<[^<>\n]*=[^<>\n]*>>")


@given(st.text(alphabet=" \tx=<>\n", max_size=60))
@settings(max_examples=300, deadline=None)
def test_linear_cleaning_agrees_with_the_regexes_it_replaced(text):
    spaced = text.replace("x", "x \n")  # every line also ends in spaces now and then
    assert normalize_text(spaced) == normalize_text(TRAILING_SPACE_REGEX.sub("", spaced))
    assert CALCULATOR_ANNOTATION.sub("", text) == CALCULATOR_REGEX.sub("", text)


@pytest.mark.parametrize(
    "response",  # built in the child: a megabyte is too long for one command-line argument
    [
        "' \\n' + ' ' * 10**6 + 'x'",
        "'\\t\\n' + ' \\t' * 10**6 + 'x'",
        "'<<' + '=' * 10**6",
        "'<<' + '=x' * 10**6",
    ],
    ids=["spaces", "tabs", "equals", "equals_and_text"],
)
def test_a_megabyte_run_of_one_character_cleans_in_linear_time(response):
    """A row of a million spaces or "=" took hours through the backtracking regexes (n^2 steps).
    In a child process with a timeout 100x what linear work takes, so a regression fails, not hangs."""
    code = (
        "from ds_sft.data.clean import Drops, clean_records\n"
        "row = dict(id='x', source='s', category='general', instruction='q', input='', history=[],"
        f" response={response} + '\\n#### 1')\n"
        "clean_records([row], Drops(), gsm8k=True)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def test_real_gsm8k_answers_lose_every_annotation(shared):
    rows = [json.loads(line) for line in (shared / "data/gsm8k/train.jsonl").open()][:500]
    kept = clean_records([record(r["question"], r["answer"]) for r in rows], Drops(), gsm8k=True)
    assert len(kept) == 500
    for row, cleaned in zip(rows, kept, strict=True):
        assert "<<" not in cleaned["response"] and ">>" not in cleaned["response"]
        assert cleaned["response"].splitlines()[-1] == row["answer"].splitlines()[-1]  # "#### N"


def test_dedup_exact_and_normalized_across_sources():
    rows = [
        record("What is 2+2?", "4", source="a"),
        record("What is 2+2?", "4", source="b"),  # exact duplicate from another source
        record("what is 2 + 2", "4.", source="b"),  # same after case/punctuation/space folding
        record("What is 3+3?", "6", source="b"),
    ]
    drops = Drops()
    kept = dedup(rows, drops)
    assert [r["instruction"] for r in kept] == ["What is 2+2?", "What is 3+3?"]
    assert drops.by_source() == {"b": {"duplicate_exact": 1, "duplicate_normalized": 1}}


# Pairs of texts that differ only where the meaning does not: case, spacing, closing marks.
MUST_COLLIDE = [
    ("What is 2+2?", "what is 2 + 2"),
    ("Paris.", "Paris"),
    ("It is 4.", "it is 4"),
    ("Why?", "why"),
    ("Wow!!", "wow"),
    ("Hello   world", "hello world"),
    ("Line one\nLine two", "line one line two"),
    ("f( x )", "f(x)"),
    ("a , b", "a, b"),
    ("x = 1", "x=1"),
    ("Done...", "done"),
]
# Pairs whose punctuation carries the meaning (math, code, units, a factorial): never duplicates.
MUST_NOT_COLLIDE = [
    ("2+2", "2*2"), ("2+2", "2-2"), ("2+2", "2/2"), ("2^2", "2*2"), ("a < b", "a > b"),
    ("x = 1", "x == 1"), ("f(x)", "f[x]"), ("i++", "i--"), ("5!", "5"), ("What is 5!", "What is 5"),
    ("$5", "5"), ("50%", "50"), ("3.14", "314"), ("a.b", "ab"), ("a.b", "a b"), ("-5", "5"),
    ("a && b", "a || b"), ("C++", "C"), ("C#", "C"), ("#include", "include"), ("x.y()", "x.y"),
    ("a_b", "ab"), ("a - -b", "a --b"), ("x == 1", "x = = 1"),
]  # fmt: skip


@pytest.mark.parametrize(("a", "b"), MUST_COLLIDE + MUST_NOT_COLLIDE)
def test_dedup_folds_only_what_leaves_the_meaning(a, b):
    """Each pair as instructions of otherwise equal rows, and as their responses."""
    for rows in ([record(a, "same"), record(b, "same")], [record("same", a), record("same", b)]):
        drops = Drops()
        assert len(dedup(rows, drops)) == (1 if (a, b) in MUST_COLLIDE else 2)


PUNCTUATION = [mark for mark in string.punctuation if mark != "_"]  # "_" is a word character
word = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=6)
mark = st.text(alphabet=PUNCTUATION, min_size=1, max_size=3)


@given(
    parts=st.lists(st.tuples(word, st.one_of(st.just(" "), mark)), min_size=1, max_size=8),
    last=word,
    spacing=st.lists(st.sampled_from(["", " ", "  ", "\n", "\t "]), min_size=20, max_size=20),
    closing=st.sampled_from(["", ".", "?", "!", "...", "?!"]),
    swap=st.tuples(st.integers(0, 7), mark),
    data=st.data(),
)
def test_generated_texts_fold_case_spacing_and_closing_marks_only(parts, last, spacing, closing, swap, data):
    """Texts of words and punctuation runs: a variant with other case, spacing around the marks and
    a closing mark is a duplicate; one with a mark changed, added or removed between words is not."""
    canonical = "".join(w + m for w, m in parts) + last
    pieces = []
    for k, (w, m) in enumerate(parts):
        w = w.upper() if data.draw(st.booleans()) else w.lower()
        pieces.append(f"{w}{spacing[k]}{m}{spacing[k + 8]}" if m != " " else f"{w} {spacing[k].strip()}")
    if last[-1].isdigit() and closing.startswith("!"):
        closing = "."  # "5!" is a factorial, not a closing mark
    variant = "".join(pieces) + last.swapcase() + closing
    rows = [record(canonical, "r"), record(variant, "r")]
    assert len(dedup(rows, Drops())) == 1, (canonical, variant)
    k, other = swap
    k %= len(parts)
    if parts[k][1] == other:
        return
    changed = list(parts)
    changed[k] = (parts[k][0], other)
    text = "".join(w + m for w, m in changed) + last
    assert len(dedup([record(canonical, "r"), record(text, "r")], Drops())) == 2, (canonical, text)


def test_folded_key_keeps_field_boundaries_and_chat_roles():
    rows = [
        record("Name a colour", "blue green"),
        record("Name a colour blue", "green"),  # same words, one moved across the field boundary
        {**record("And now?", "Red."), "history": [{"role": "user", "content": "Hi"}]},
        {**record("and now", "red"), "history": [{"role": "system", "content": "hi"}]},  # other role
        {**record("AND NOW", "red!"), "history": [{"role": "user", "content": "hi."}]},  # folded copy of 3rd
    ]
    drops = Drops()
    assert unique_rows(rows, drops) == [0, 1, 2, 3]
    assert drops.by_source() == {"s": {"duplicate_normalized": 1}}


def test_record_ngrams_are_those_of_the_joined_text():
    """A record's 13-grams run across its fields in reading order (chat turns first), exactly as if
    its texts were joined; the reference is plain text hashing of that join."""
    rows = [
        {**record(" ".join(f"i{k}" for k in range(9)), " ".join(f"r{k}" for k in range(30)), extra="in put"),
         "history": [{"role": "user", "content": "earlier turn, said first"}]},
        record("short", "too few words"),
    ]  # fmt: skip
    joined = ["\n".join(filter(None, [*(t["content"] for t in r["history"]), r["instruction"], r["input"],
                                       r["response"]])) for r in rows]  # fmt: skip
    grams = NgramSet.of_records(record_words(rows))
    np.testing.assert_array_equal(grams.hashes, NgramSet.of_texts(joined).hashes)
    np.testing.assert_array_equal(np.bincount(grams.owner, minlength=2), [4 + 9 + 2 + 30 - 12, 0])


def test_ngram_overlap_matches_hand_count():
    vocabulary = [f"w{i}" for i in range(20)]
    reference = [" ".join(vocabulary[:15])]  # 3 thirteen-grams: starting at w0, w1, w2
    text = " ".join(vocabulary[2:20])  # 6 thirteen-grams starting at w2..w7; only the one at w2 is shared
    short = "too few words"
    grams = NgramSet.of_docs([words(text), words(short), words(reference[0])])
    np.testing.assert_array_equal(np.bincount(grams.owner, minlength=3), [6, 0, 3])
    np.testing.assert_allclose(grams.overlap(NgramSet.of_texts(reference)), [1 / 6, 0.0, 1.0])
    np.testing.assert_allclose(grams.overlap(grams.of(np.array([0]))), [1.0, 0.0, 1 / 3])


def test_decontamination_catches_planted_test_questions(shared):
    test_rows = [json.loads(line) for line in (shared / "data/gsm8k/test.jsonl").open()]
    reference = [f"{r['question']}\n{r['answer']}" for r in test_rows]
    planted = [
        record(test_rows[i]["question"], "I think the answer is 12.", source="alpaca") for i in (0, 7, 99)
    ]
    clean = [record(f"Write a haiku about autumn number {i}.", "Leaves fall slowly down.") for i in range(50)]
    rows = clean + planted
    drops = Drops()
    grams = NgramSet.of_records(record_words(rows))
    kept = decontaminate(
        rows, grams, np.arange(len(rows)), NgramSet.of_texts(reference), 0.1, "overlaps_gsm8k_test", drops
    )
    np.testing.assert_array_equal(kept, np.arange(50))
    assert drops.by_source() == {"alpaca": {"overlaps_gsm8k_test": 3}}


# --- boilerplate is not contamination ------------------------------------------------------------


def reference_overlap(docs: list[str], reference: list[str], n: int = 13, common: int = 10) -> list[float]:
    """An independent plain-Python overlap: word tuples, sets and counters, no hashing.

    An n-gram in more than ``common`` distinct documents of ``docs`` or of ``reference`` is
    boilerplate, and so is each word of it in a document; a document's score is the share of its
    n-grams free of boilerplate words that occur in ``reference``."""
    punctuation = re.compile(f"[{re.escape(string.punctuation)}]")

    def grams(text):
        tokens = punctuation.sub(" ", text.lower()).split()
        return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]

    doc_grams, ref_grams = [grams(d) for d in docs], [grams(r) for r in reference]

    def frequent(gram_lists):
        held_by = Counter(g for gram_list in gram_lists for g in set(gram_list))
        return {g for g, k in held_by.items() if k > common}

    boilerplate = frequent(doc_grams) | frequent(ref_grams)
    in_reference = {g for gram_list in ref_grams for g in gram_list}
    scores = []
    for gram_list in doc_grams:
        boilerplate_words = {i + k for i, g in enumerate(gram_list) if g in boilerplate for k in range(n)}
        mine = [g for i, g in enumerate(gram_list) if not boilerplate_words & set(range(i, i + n))]
        scores.append(sum(g in in_reference for g in mine) / len(mine) if mine else 0.0)
    return scores


def joined(row: dict) -> str:
    return "\n".join(filter(None, [row["instruction"], row["input"], row["response"]]))


# Openings many instructions share ("Rewrite the following sentence ...").
OPENINGS = [["rewrite", "the", "following", "sentence", "using"], ["what", "is", "the", "capital", "of"], []]


@st.composite
def preamble_datasets(draw):
    """Rows of distinct questions behind one shared preamble (0-40 words), some opening with the same
    few words, the first ``n_val`` held out as val, then planted copies of val questions (with or
    without the preamble), each with its own answer. Returns (rows, val indices, the planted copies'
    question lengths).

    A preamble of 1-12 words holds no 13-gram of its own, so it cannot be told from copied text;
    its rows get no shared openings (a 13-gram of it and an opening would tie them together)."""
    preamble = [f"p{k}" for k in range(draw(st.integers(0, 40)))]
    openings = OPENINGS if len(preamble) in (0, *range(13, 41)) else [[]]
    n_rows = draw(st.integers(12, 40))
    questions = [
        draw(st.sampled_from(openings)) + [f"q{i}x{k}" for k in range(draw(st.integers(4, 30)))]
        for i in range(n_rows)
    ]
    rows = [
        record(" ".join(preamble + question), " ".join(f"a{i}x{k}" for k in range(draw(st.integers(1, 30)))))
        for i, question in enumerate(questions)
    ]
    n_val = draw(st.integers(2, n_rows // 2))
    copies = draw(st.lists(st.tuples(st.integers(0, n_val - 1), st.booleans()), max_size=6))
    for j, (copied, with_preamble) in enumerate(copies):
        rows.append(
            record(" ".join((preamble if with_preamble else []) + questions[copied]), f"c{j} d{j} e{j}")
        )
    return rows, np.arange(n_val), [len(questions[copied]) for copied, _ in copies]


@given(preamble_datasets())
@settings(max_examples=60)
def test_shared_preamble_is_not_contamination_but_copied_questions_are(dataset):
    """The val split's class: every row repeats one preamble. Scores equal the plain reference's;
    rows of distinct questions all stay; val questions copied into train go (those of 20+ words:
    a shorter one holds few or no 13-grams of its own)."""
    rows, val, copy_lengths = dataset
    grams = NgramSet.of_records(record_words(rows))
    texts = [joined(row) for row in rows]
    np.testing.assert_allclose(
        grams.overlap(grams.of(val)), reference_overlap(texts, [texts[i] for i in val.tolist()]), atol=1e-12
    )
    drops = Drops()
    train = np.arange(len(val), len(rows))
    kept = decontaminate(rows, grams, train, grams.of(val), 0.1, "overlaps_val", drops)
    originals = len(rows) - len(copy_lengths)
    assert kept[kept < originals].tolist() == list(range(len(val), originals))  # nothing distinct lost
    long_copies = {originals + j for j, length in enumerate(copy_lengths) if length >= 20}
    assert not long_copies & set(kept.tolist())
    assert drops.by_source().get("s", {}).get("overlaps_val", 0) == len(train) - len(kept)


@pytest.mark.parametrize("preamble_words", [0, 8, 13, 20, 60])
def test_gsm8k_test_questions_are_caught_behind_a_shared_preamble(shared, preamble_words):
    """The GSM8K test-set decontamination of the shared data: planted test questions go, with or
    without the preamble every row carries, and the 60 clean rows behind it all stay."""
    test_rows = [json.loads(line) for line in (shared / "data/gsm8k/test.jsonl").open()]
    reference = [f"{r['question']}\n{r['answer']}" for r in test_rows]
    preamble = " ".join(f"Follow rule {k} carefully." for k in range(preamble_words // 4)) + " "
    clean = [
        record(f"{preamble}Write a haiku about autumn, number {i} of sixty.", f"Leaves fall {i}.")
        for i in range(60)
    ]
    planted = [
        record(preamble + test_rows[i]["question"], "I think the answer is 12.", source="p")
        for i in (0, 7, 99, 512)
    ]
    rows = clean + planted
    grams = NgramSet.of_records(record_words(rows))
    test_grams = NgramSet.of_texts(reference)
    np.testing.assert_allclose(
        grams.overlap(test_grams), reference_overlap([joined(r) for r in rows], reference)
    )
    drops = Drops()
    kept = decontaminate(rows, grams, np.arange(len(rows)), test_grams, 0.1, "overlaps_gsm8k_test", drops)
    np.testing.assert_array_equal(kept, np.arange(60))
    assert drops.by_source() == {"p": {"overlaps_gsm8k_test": 4}}


def test_text_shared_by_few_rows_still_counts_as_copied():
    """The boilerplate cut counts distinct documents: a 30-word passage held by 10 rows (the val row
    among them) is copied text, held by 11 it is boilerplate. One of the holders repeats it three
    times, which must count once (as occurrences, 10 holders would make 12 and pass the cut)."""
    passage = " ".join(f"w{k}" for k in range(30))
    for holders, dropped in ((10, 9), (11, 0)):
        rows = [record(passage, f"answer{i}") for i in range(holders - 1)]
        rows.append(record(f"{passage} {passage} {passage}", "tripled"))
        rows += [record(" ".join(f"r{i}x{k}" for k in range(20)), "own") for i in range(20)]
        grams = NgramSet.of_records(record_words(rows))
        train = np.arange(1, len(rows))
        kept = decontaminate(rows, grams, train, grams.of(np.array([0])), 0.1, "overlaps_val", Drops())
        assert len(train) - len(kept) == dropped


@pytest.mark.parametrize("preamble_words", [13, 20, 40])
def test_prepare_keeps_every_row_behind_a_shared_system_prompt(run_prepare, tmp_path, preamble_words):
    """End to end, the red team's case: 200 chat rows under one system prompt lost up to 77% as
    `overlaps_val`; none is dropped now."""
    system = " ".join(f"Rule {k}: be exact." for k in range(preamble_words // 4))
    questions = [" ".join(f"q{i}w{k}" for k in range(12)) for i in range(200)]
    rows = [
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question},
                      {"role": "assistant", "content": f"Answer {i} is {i * 7}."}]}
        for i, question in enumerate(questions)
    ]  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    manifest = run_prepare(
        ["--source", f"chat={path}", "--seq_len", "1024", "--output_dir", str(tmp_path / "out")]
    )
    assert manifest["counts"]["chat"]["dropped"] == {}


@pytest.mark.parametrize("separator", ["\x00", "\x1f", "\n", "|"])
def test_exact_key_keeps_field_boundaries_whatever_the_fields_hold(separator):
    """The exact key joined the fields with NUL, which a field may hold: ("a\\0b", "c") and
    ("a", "b\\0c") were one key, the second row dropped as an exact duplicate of a different row.
    Rows equal as joined text but split differently into fields (and turns) are all kept."""
    s = separator
    rows = [
        record(f"Name{s}a", "colour", extra="blue"),
        record("Name", "colour", extra=f"a{s}blue"),
        {**record("x", "y"), "history": [{"role": "user", "content": f"hi{s}there"}]},
        {**record(f"there{s}x", "y"), "history": [{"role": "user", "content": "hi"}]},
    ]
    drops = Drops()
    assert unique_rows(rows, drops) == [0, 1, 2, 3], drops.by_source()
