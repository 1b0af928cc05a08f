"""Cleaning, dedup and decontamination, each checked against hand-made rows with a known answer."""

from __future__ import annotations

import json

import numpy as np

from ds_sft.data.clean import (
    Drops,
    NgramSet,
    clean_records,
    decontaminate,
    dedup,
    normalize_text,
    record_words,
    text_ngram_hashes,
    unique_rows,
    words,
)


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


def test_folded_key_keeps_field_boundaries_and_chat_roles():
    rows = [
        record("Name a colour", "blue green"),
        record("Name a colour blue", "green"),  # same words, one moved across the field boundary
        {**record("And now?", "Red."), "history": [{"role": "user", "content": "Hi"}]},
        {**record("and now", "red"), "history": [{"role": "system", "content": "hi"}]},  # other role
        {**record("AND NOW", "red!"), "history": [{"role": "user", "content": "hi."}]},  # folded copy of 3rd
    ]
    drops = Drops()
    assert unique_rows(rows, record_words(rows), drops) == [0, 1, 2, 3]
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
    np.testing.assert_array_equal(grams.hashes, text_ngram_hashes(joined))
    np.testing.assert_array_equal(grams.counts, [4 + 9 + 2 + 30 - 12, 0])


def test_ngram_overlap_matches_hand_count():
    vocabulary = [f"w{i}" for i in range(20)]
    reference = [" ".join(vocabulary[:15])]  # 3 thirteen-grams: starting at w0, w1, w2
    text = " ".join(vocabulary[2:20])  # 6 thirteen-grams starting at w2..w7; only the one at w2 is shared
    short = "too few words"
    grams = NgramSet([words(text), words(short), words(reference[0])])
    np.testing.assert_array_equal(grams.counts, [6, 0, 3])
    np.testing.assert_allclose(grams.overlap(text_ngram_hashes(reference)), [1 / 6, 0.0, 1.0])
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
        rows, grams, np.arange(len(rows)), text_ngram_hashes(reference), 0.1, "overlaps_gsm8k_test", drops
    )
    np.testing.assert_array_equal(kept, np.arange(50))
    assert drops.by_source() == {"alpaca": {"overlaps_gsm8k_test": 3}}
