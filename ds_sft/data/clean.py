"""Cleaning: normalize text, drop what cannot be trained on, dedup, decontaminate; count every drop.

The invariant the manifest reports per source is ``rows_in == rows_kept + sum(dropped.values())``:
a row leaves the pipeline only through :meth:`Drops.add`, with a reason.

Decontamination follows the 13-gram overlap test of the GPT-3 paper: split text into lowercase word
tokens, hash every run of 13 consecutive words, and drop a training row when the share of its
13-grams that also occur in the reference set (the GSM8K test set, the held-out val rows) reaches
``threshold``. A 13-gram found in many distinct documents (:data:`COMMON_NGRAM_DOCS`) is boilerplate,
not contamination: a system prompt or instruction preamble every row repeats would otherwise make
the rows overlap each other and the val split. Its words are left out of the share altogether (every
n-gram touching them), so a row is judged on its own text.

The hashing is vectorized: words become integer ids, and a 13-term polynomial rolling hash over the
concatenated id array is 13 numpy multiply-adds, so millions of n-grams cost well under a second.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import string
import unicodedata
from collections import Counter

import numpy as np

NGRAM = 13
# An n-gram held by more than this many distinct documents on one side (the training rows, or the
# reference) is boilerplate: a shared system prompt, an instruction template, a stock phrase. 10 is
# the cut lm-evaluation-harness and NeMo Curator (max_matches=10) use for 13-gram decontamination;
# a val or test question copied into as many as 9 other rows is still caught. Text shared by 10
# rows or fewer counts as copied: in a dataset of 10 rows or fewer a shared preamble still overlaps.
COMMON_NGRAM_DOCS = 10

# Alpaca's placeholders for "this instruction has no input".
NO_INPUT_MARKERS = {"<noinput>", "<no input>", "noinput", "no input", "no input.", "n/a", "n/a."}
# GSM8K's calculator annotations: "48/2 = <<48/2=24>>24" -> "48/2 = 24". The final "#### N" line stays.
# Split at the first "=" so no two quantifiers can share a character: "<<" and a run of n "=" then
# take n steps, where "<<[^<>\n]*=[^<>\n]*>>" backtracked through n^2 (a 150 kB row: 80 s).
CALCULATOR_ANNOTATION = re.compile(r"<<[^<>\n=]*=[^<>\n]*>>")
GSM8K_FINAL_ANSWER = re.compile(r"\n#### *\S[^\n]*$")
_ODD_SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")  # no-break, thin, ideographic ...
_INVISIBLE = re.compile(r"[\u200b\u2060\ufeff]")  # zero-width space, word joiner, stray BOM
_BLANK_LINES = re.compile(r"\n{3,}")
# Words for n-grams: UTF-8 bytes, ASCII-lowercased, ASCII punctuation as a separator.
# bytes.lower/translate/split run on 256-entry tables: ~2x faster than a str regex or casefold.
_PUNCTUATION_TO_SPACE = bytes.maketrans(string.punctuation.encode(), b" " * len(string.punctuation))
# Dedup keys: words and runs of punctuation, so spacing around a mark does not matter ("2 + 2" is
# "2+2") but the marks do ("2+2" is not "2*2", "f(x)" is not "f[x]", "x == 1" is not "x = = 1").
_WORDS_AND_MARKS = re.compile(r"\w+|[^\w\s]+")
# A field's closing marks say nothing ("Paris." is "Paris", "What is 2+2?" is "what is 2 + 2"),
# except exclamation marks right after a digit: "5!" is a factorial.
CLOSING_MARKS = ".?!"


class Drops:
    """Dropped-row counts by (source, reason)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def add(self, source: str, reason: str, n: int = 1) -> None:
        if n:
            self.counts[(source, reason)] += n

    def total(self, source: str) -> int:
        return sum(n for (src, _), n in self.counts.items() if src == source)

    def by_source(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (source, reason), n in sorted(self.counts.items()):
            out.setdefault(source, {})[reason] = n
        return out


def normalize_text(text: str) -> str:
    """NFC, one kind of newline and of space, no trailing spaces, at most one blank line, no blank
    lines first, nothing blank last, and no indentation that every line shares (:func:`dedent`).

    Runs of spaces inside a line are kept: they are code indentation in many responses.
    """
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
        text = _INVISIBLE.sub("", _ODD_SPACES.sub(" ", text))
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # the substring tests skip the regexes for the many texts that do not need them; spaces at the
    # very end need no regex either, as strip() removes them
    if " \n" in text or "\t\n" in text:
        # per line, not re.sub("[ \t]+$", flags=re.M): a regex retries a long run of spaces from each
        # of its characters, n^2 steps (a 150 kB row of spaces took 156 s)
        text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return dedent(text.rstrip()) if "\n" in text else text.strip()


def dedent(text: str) -> str:
    """``text`` from its first line that is not blank, less the indentation all its lines share
    (``textwrap.dedent``'s rule); a first line still indented where no other line is loses it, as
    a stray space before prose does. A ``strip()`` took the first line's indentation alone: a code
    answer indented as a whole (``"    x = 1\n    y = 2"``) lost its shape. Lines carry no trailing
    spaces by now, so a blank line is empty."""
    lines = text.split("\n")
    lines = lines[next((i for i, line in enumerate(lines) if line.strip(" \t")), len(lines)) :]
    margins = [line[: len(line) - len(line.lstrip(" \t"))] for line in lines if line]
    margin = len(os.path.commonprefix(margins))
    lines = [line[margin:] for line in lines]
    if lines and lines[0][:1] in (" ", "\t") and not any(line[:1] in (" ", "\t") for line in lines[1:]):
        lines[0] = lines[0].lstrip(" \t")
    return "\n".join(lines)


def clean_records(
    records: list[dict], drops: Drops, gsm8k: bool = False, every_turn: bool = False
) -> list[dict]:
    """Normalize every text field; drop rows with an empty instruction or response.

    ``gsm8k``: the source is GSM8K-shaped, so its answers must end with the ``#### N`` line the
    GSM8K evaluation reads (rows without it are dropped).
    ``every_turn``: every assistant turn of a conversation is trained (``--train_on all``), so the
    earlier turns are normalized too, and a conversation with an empty answer is dropped; with
    ``--train_on last`` they are prompt text, kept as they came.
    """
    kept = []
    for record in records:
        instruction = normalize_text(record["instruction"])
        extra = normalize_text(record["input"])
        if extra.lower() in NO_INPUT_MARKERS:
            extra = ""
        response = record["response"]
        if gsm8k:  # elsewhere "<<" and "=" are code: "x <<= 2; y >>= 1" must stay as written
            response = CALCULATOR_ANNOTATION.sub("", response)
        response = normalize_text(response)
        history = record.get("history", [])
        if every_turn and history:
            history = [{**turn, "content": normalize_text(turn["content"])} for turn in history]
        empty_answer = every_turn and any(t["role"] == "assistant" and not t["content"] for t in history)
        if not instruction:
            drops.add(record["source"], "empty_instruction")
        elif not response or empty_answer:
            drops.add(record["source"], "empty_response")
        elif gsm8k and not GSM8K_FINAL_ANSWER.search(response):
            drops.add(record["source"], "no_final_answer_line")
        else:
            cleaned = {"instruction": instruction, "input": extra, "response": response, "history": history}
            kept.append({**record, **cleaned})
    return kept


def text_fields(record: dict) -> list[str]:
    """A record's texts in reading order: earlier chat turns, instruction, input, response."""
    turns = [turn["content"] for turn in record.get("history", ())]
    return [*turns, record["instruction"], record["input"], record["response"]]


def drop_special_token_text(records: list[dict], special_tokens: list[str], drops: Drops) -> list[dict]:
    """The records none of whose texts spell a special token of the tokenizer (counted as dropped).

    The tokenizer turns the text ``<|endoftext|>`` into the EOS id itself, so a row holding it would
    teach the model to stop mid-answer and then train on what follows; ``<|im_start|>`` in a user turn
    would forge a turn of its own. Such text is an injection or an accident, never data.
    """
    if not special_tokens:
        return records
    spelled = re.compile("|".join(re.escape(token) for token in special_tokens))
    kept = []
    for record in records:
        if any(spelled.search(text) for text in text_fields(record)):
            drops.add(record["source"], "special_token_text")
        else:
            kept.append(record)
    return kept


def words(text: str) -> list[bytes]:
    """Lowercased words (ASCII case folding) with ASCII punctuation as separators, as UTF-8 bytes:
    the units of the decontamination n-grams."""
    return text.encode().lower().translate(_PUNCTUATION_TO_SPACE).split()


def record_words(records: list[dict]) -> list[list[list[bytes]]]:
    """Per record, the :func:`words` of each of its :func:`text_fields`."""
    return [[words(text) for text in text_fields(record)] for record in records]


def folded(text: str) -> str:
    """A text's dedup form: lowercased, its closing ``.``/``?``/``!`` dropped, words and punctuation
    marks one space apart. Only differences that leave the meaning alone fold: case, spacing, a final
    period. ``2+2`` and ``2*2``, ``x = 1`` and ``x == 1``, ``5!`` and ``5`` stay apart."""
    text = text.lower().rstrip()
    body = text.rstrip(CLOSING_MARKS)
    if body[-1:].isdigit():
        closing = text[len(body) :]
        body += closing[: len(closing) - len(closing.lstrip("!"))]  # a factorial stays
    return " ".join(_WORDS_AND_MARKS.findall(body))


def unique_rows(records: list[dict], drops: Drops) -> list[int]:
    """Indices of the first of each exact duplicate, then of each folded duplicate (across sources).

    The exact key is the fields as they are. The folded key is each field's :func:`folded` form, then
    the chat turns' roles, joined by 0x1F: a whitespace character to ``\\s``, so no folded text holds
    one and no two keys run together.
    """
    exact: set[tuple] = set()
    folded_keys: set[str] = set()
    kept = []
    for index, record in enumerate(records):
        history = record.get("history", [])
        # a tuple, not a joined string: a field may hold any separator (NUL included)
        exact_key = (record["instruction"], record["input"], record["response"], repr(history))
        if exact_key in exact:
            drops.add(record["source"], "duplicate_exact")
            continue
        exact.add(exact_key)
        roles = " ".join(turn["role"] for turn in history)
        folded_key = "\x1f".join([*map(folded, text_fields(record)), roles])
        if folded_key in folded_keys:
            drops.add(record["source"], "duplicate_normalized")
            continue
        folded_keys.add(folded_key)
        kept.append(index)
    return kept


_HASH_BASE = np.uint64(0x100000001B3)  # an odd 64-bit multiplier; arithmetic wraps modulo 2**64


def ngram_hashes(docs: list[list[bytes]], n: int = NGRAM) -> tuple[np.ndarray, np.ndarray]:
    """All word n-gram hashes of ``docs`` (each a list of :func:`words`) and, for each, the index of
    the document it came from.

    Words are keyed by Python's bytes hash: randomized per process, but only equality within one
    run matters, and a 64-bit collision changing a decision has probability ~1e-10.
    """
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    total = int(lengths.sum())
    flat = np.fromiter(map(hash, itertools.chain.from_iterable(docs)), dtype=np.int64, count=total)
    flat = flat.view(np.uint64)
    owner = np.repeat(np.arange(len(docs)), lengths)
    windows = total - n + 1
    if windows <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    hashed = np.zeros(windows, dtype=np.uint64)
    for k in range(n):  # polynomial rolling hash: 13 vectorized multiply-adds over all windows at once
        hashed = hashed * _HASH_BASE + flat[k : k + windows]
    inside_one_doc = owner[:windows] == owner[n - 1 :]
    return hashed[inside_one_doc], owner[:windows][inside_one_doc]


def _member(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Which ``values`` are in ``members`` (sorted, unique), as a boolean mask.

    Nearly every n-gram is in no reference. A bit table over the low hash bits, 1/16 full, rules those
    out with one gather; only the ~6% that pass pay for a binary search (10x faster than searching
    them all: a random probe into a large sorted array misses the cache at every step)."""
    inside = np.zeros(len(values), dtype=bool)
    if not len(members):
        return inside
    bits = max(16, (16 * len(members)).bit_length())
    low = np.uint64((1 << bits) - 1)
    maybe_in = np.zeros(1 << bits, dtype=bool)
    maybe_in[members & low] = True
    probe = np.flatnonzero(maybe_in[values & low])
    where = np.minimum(np.searchsorted(members, values[probe]), len(members) - 1)
    inside[probe[members[where] == values[probe]]] = True
    return inside


def _more_than(sorted_hashes: np.ndarray, times: int) -> np.ndarray:
    """The distinct values of ``sorted_hashes`` that occur in it more than ``times`` times."""
    starts = np.flatnonzero(np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]])
    occurrences = np.diff(np.r_[starts, len(sorted_hashes)])
    return sorted_hashes[starts[occurrences > times]]


def _near(mask: np.ndarray, owner: np.ndarray, reach: int) -> np.ndarray:
    """Which entries have a true ``mask`` entry at most ``reach`` places away within their own run
    of ``owner`` (sorted): for one document's consecutive n-grams, those sharing a word with a masked one."""
    if not len(mask):
        return mask.copy()
    new_run = np.r_[True, owner[1:] != owner[:-1]]
    starts = np.flatnonzero(new_run)
    run = np.cumsum(new_run) - 1
    index = np.arange(len(mask))
    low = np.maximum(index - reach, starts[run])
    high = np.minimum(index + reach, np.r_[starts[1:], len(mask)][run] - 1)
    seen = np.r_[0, np.cumsum(mask)]
    return seen[high + 1] > seen[low]


class NgramSet:
    """The hashed ``n``-grams of documents, each with the index of its document (``owner``), in
    document and then reading order."""

    def __init__(self, hashes: np.ndarray, owner: np.ndarray, n_docs: int, n: int) -> None:
        self.hashes, self.owner, self.n_docs, self.n = hashes, owner, n_docs, n

    @classmethod
    def of_docs(cls, docs: list[list[bytes]], n: int = NGRAM) -> NgramSet:
        """From documents given as :func:`words` lists."""
        return cls(*ngram_hashes(docs, n), len(docs), n)

    @classmethod
    def of_texts(cls, texts: list[str], n: int = NGRAM) -> NgramSet:
        """From plain texts (a reference set such as the GSM8K test set)."""
        return cls.of_docs([words(text) for text in texts], n)

    @classmethod
    def of_records(cls, fields: list[list[list[bytes]]], n: int = NGRAM) -> NgramSet:
        """From :func:`record_words`: a record's n-grams run across its fields, in reading order."""
        return cls.of_docs([list(itertools.chain.from_iterable(field_words)) for field_words in fields], n)

    def of(self, index: np.ndarray) -> NgramSet:
        """The n-grams of documents ``index`` only (to serve as a reference for the others)."""
        chosen = np.zeros(self.n_docs, dtype=bool)
        chosen[index] = True
        keep = chosen[self.owner]
        return NgramSet(self.hashes[keep], self.owner[keep], self.n_docs, self.n)

    @functools.cached_property
    def common(self) -> np.ndarray:
        """The n-grams (sorted hashes) held by more than :data:`COMMON_NGRAM_DOCS` distinct documents."""
        # Only an n-gram occurring that often at all can be; the distinct documents are then counted
        # for those few (a sort of all hashes is 3x cheaper than the argsort the exact count needs).
        frequent = _more_than(np.sort(self.hashes), COMMON_NGRAM_DOCS)
        chosen = _member(self.hashes, frequent)
        # one (n-gram, document) pair per document, whatever the n-gram's repeats inside it
        pairs = np.unique(np.stack([self.hashes[chosen], self.owner[chosen].astype(np.uint64)]), axis=1)
        return _more_than(pairs[0], COMMON_NGRAM_DOCS)

    def overlap(self, reference: NgramSet) -> np.ndarray:
        """Per document, the share of its distinctive n-grams found in ``reference`` (0 when it has none).

        The words of an n-gram common among these documents or among the reference's (:attr:`common`)
        are boilerplate, and an n-gram with a boilerplate word in it is not distinctive: it counts
        neither as a hit nor toward the document's n-grams. A row of a 20-word shared preamble and a
        20-word question is judged on its question alone, as if the preamble were not there; n-grams
        running from the preamble into the question would tie every row opening with "Rewrite the
        following sentence" to the val row that does."""
        common = _member(self.hashes, np.union1d(self.common, reference.common))
        distinctive = ~_near(common, self.owner, self.n - 1)
        found = distinctive & _member(self.hashes, np.unique(reference.hashes))
        hits = np.bincount(self.owner[found], minlength=self.n_docs)
        total = np.bincount(self.owner[distinctive], minlength=self.n_docs)
        return np.divide(hits, total, out=np.zeros(self.n_docs), where=total > 0)


def decontaminate(
    records: list[dict],
    grams: NgramSet,
    candidates: np.ndarray,
    reference: NgramSet,
    threshold: float,
    reason: str,
    drops: Drops,
) -> np.ndarray:
    """The ``candidates`` (indices into ``records``/``grams``) whose n-gram overlap with the
    reference stays below ``threshold``; the others are dropped and counted under ``reason``."""
    scores = grams.overlap(reference)[candidates]
    for index in candidates[scores >= threshold].tolist():
        drops.add(records[index]["source"], reason)
    return candidates[scores < threshold]
