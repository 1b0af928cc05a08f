"""Records -> token documents whose loss mask is right by construction.

Each document is ``prompt_ids + response_ids + [EOS]``, the prompt and the response tokenized
*separately*. The trained tokens are then simply positions ``prompt_len ..`` of the document: no
searching the token stream for a "### Response:" marker, which silently masks everything when the
marker tokenizes differently in context. (With byte-level BPE, tokenizing apart gives the same ids
as tokenizing the joined text for these templates, since the prompt ends in a newline.)
Every piece after a document's first is tokenized as a continuation: SentencePiece-style tokenizers
(LLaMA-2, Mistral) mark a text's start with "▁", a space the document does not hold
(:func:`ds_sft.data.tokenizer.continuation_backend`).
A conversation trained on every assistant turn (``train_on="all"``) is the same thing repeated:
``text_1 + answer_1 + [EOS] + text_2 + answer_2 + [EOS] ...``, each piece tokenized apart
(:func:`ds_sft.data.templates.conversation_segments`), the answers and EOS ids trained, the texts not.

Speed: both halves go through the ``tokenizers`` library's ``encode_batch`` (Rust, all cores) in
chunks, and documents are kept as one flat int32 array plus offsets, so selecting, repeating and
packing them are numpy gathers rather than Python loops over lists of lists. For GPT-2-style
byte-level tokenizers the Alpaca template's fixed text (~40 tokens a row) is tokenized once and
spliced around the tokenized fields (:class:`AlpacaPrompts`): the same ids, less work. And the BPE
word cache is widened (:data:`BPE_CACHE_WORDS`) so that each distinct word is merged about once.

Bounded work: a row that cannot fit ``--seq_len`` is found before it is tokenized, from the length of
its text alone (:class:`LengthFloor`): a 40 MB field once took 16 GB and two minutes to tokenize only
to be dropped. It is dropped all the same (``longer_than_seq_len``), or with ``--truncate`` its texts
are cut first to what can reach into ``seq_len``, which leaves the kept tokens unchanged. ``prepare``
makes that judgement (:func:`plan_document`) right after cleaning (:func:`bound_records`), so that
dedup and decontamination never pay for text that cannot be trained either. A conversation trained
on every turn is checked before its turns are rendered (each turn renders the whole conversation so
far, so that costs time quadratic in turns); with ``--truncate`` it is cut to the turns that start
within ``seq_len``: for a template whose turns take the ``prefix`` route the tokens are those of the
full conversation; one that rewrites earlier turns (``located``) shows the shortened conversation as
the template renders it.
"""

from __future__ import annotations

import itertools
import json
import string
from dataclasses import dataclass

import numpy as np

from ds_sft.data.normalizer_bounds import normalizer_change
from ds_sft.data.templates import (
    alpaca_fields,
    answer_end_id,
    conversation,
    conversation_segments,
    render_prompt,
)
from ds_sft.data.tokenizer import continuation_backend, start_ids

CHUNK = 2048  # rows per encode_batch call: large enough for the Rust threads, small enough for a progress bar
# A BPE model caches the merges of the words it has seen, 10,000 words by default: fewer than the
# distinct words of an instruction mix (59k GPT-2 pre-tokens in the shared one), so most words were
# merged again at each occurrence. 100k entries (a few MB) cut encode CPU time by 10-20% on the shared mix.
BPE_CACHE_WORDS = 100_000
# How a document's trained turns were found: one trained answer (not a conversation trained on every
# turn), or a conversation's turns by prefix renders or located in its whole render (templates.py).
ROUTES = ("one_turn", "prefix", "located")


@dataclass
class Documents:
    """Token documents back to back: document ``i`` is ``tokens[offsets[i]:offsets[i+1]]``."""

    tokens: np.ndarray  # int32 [total tokens]
    offsets: np.ndarray  # int64 [n + 1]
    trained: np.ndarray  # uint8 [total tokens]: 1 on the trained targets (answers and their EOS)
    source_ids: np.ndarray  # int16 [n]
    routes: np.ndarray | None = None  # int8 [n]: index in ROUTES of how each document's turns were masked
    # int64 [n]: for a document found longer than seq_len before tokenizing (left empty, or cut with
    # --truncate), the fewest tokens it has in full; 0 for the others (see LengthFloor)
    floors: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.source_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def full_lengths(self) -> np.ndarray:
        """Per document, its length, or for one found too long before tokenizing, the fewest it has."""
        return self.lengths if self.floors is None else np.maximum(self.lengths, self.floors)

    @property
    def prompt_lens(self) -> np.ndarray:
        """Per document, the tokens before its first trained one (its length when none is trained)."""
        if not len(self):
            return np.zeros(0, np.int64)
        lengths = self.lengths
        within = np.arange(self.offsets[-1]) - np.repeat(self.offsets[:-1], lengths)
        first = np.minimum.reduceat(np.where(self.trained == 1, within, lengths.max()), self.offsets[:-1])
        return np.minimum(first, lengths)

    def select(self, index: np.ndarray) -> Documents:
        """Documents ``index`` (any order, repeats allowed), as a new contiguous set."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # token j of the output comes from old start of its document + its position inside it
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        gather = np.repeat(self.offsets[:-1][index], lengths) + within
        routes = None if self.routes is None else self.routes[index]
        floors = None if self.floors is None else self.floors[index]
        return Documents(
            self.tokens[gather], offsets, self.trained[gather], self.source_ids[index], routes, floors
        )

    def loss_mask(self) -> np.ndarray:
        """uint8 per token: 1 on answer and EOS tokens (the trained targets), 0 elsewhere."""
        return self.trained


def _encode(backend, texts: list[str], progress=None) -> list[list[int]]:
    """Each text's ids alone, without what the post-processor adds (see :func:`first_text_ids`)."""
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets nobody here reads
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    ids: list[list[int]] = []
    for start in range(0, len(texts), CHUNK):
        batch = encode_batch(texts[start : start + CHUNK], add_special_tokens=False)
        ids.extend(encoding.ids for encoding in batch)
        if progress is not None:
            progress.update(len(batch))
    return ids


def first_text_ids(tokenizer, texts: list[str], template: str, progress=None) -> list[list[int]]:
    """The ids of texts that start a document (prompts, a conversation's first text), the same in
    ``prepare`` and ``eval``. Under the Alpaca template each starts with what the tokenizer's
    post-processor prepends (a BOS: :func:`~ds_sft.data.tokenizer.start_ids`), never with what it
    appends: an EOS after the prompt would sit between it and the answer. A chat template writes
    its special tokens into the text itself."""
    start = start_ids(tokenizer) if template == "alpaca" else []
    return [start + ids for ids in _encode(tokenizer.backend_tokenizer, texts, progress)]


def splits_cleanly_at_newlines(backend) -> bool:
    """Whether ``ids(a + b) == ids(a) + ids(b)`` whenever one side of the cut is a newline and the other
    a non-space character: true of GPT-2's byte-level BPE (no normalizer, its regex pre-tokenizer, no
    prefix space), whose pre-tokens never span such a cut, so BPE never merges across it."""
    # the pre-tokenizer's own JSON: the whole tokenizer's (vocab and merges) takes ~0.1 s to dump and parse
    pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
    return (
        backend.normalizer is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
    )


class AlpacaPrompts:
    """Alpaca prompts tokenized field by field, the template's fixed text tokenized once per format.

    Every Alpaca literal starts and ends at a newline and cleaned fields have no edge whitespace, so
    for tokenizers that :func:`splits_cleanly_at_newlines` the spliced ids equal those of the whole
    prompt (checked on the first rows as well), while ~40 template tokens per row are not re-encoded.
    """

    def __init__(self, records: list[dict], backend, start: list[int]) -> None:
        self.backend = backend
        self.start = start  # what starts every prompt (first_text_ids)
        self.plans: list[list[tuple[list[int], str | None]]] = []
        self.fields: list[str] = []  # every field value, in plan order: the texts left to encode
        literal_ids: dict[str, list[tuple[list[int], str | None]]] = {}
        for record in records:
            fmt, values = alpaca_fields(record)
            if fmt not in literal_ids:
                literal_ids[fmt] = [
                    (backend.encode(literal, add_special_tokens=False).ids, name)
                    for literal, name, _, _ in string.Formatter().parse(fmt)
                ]
            self.plans.append(literal_ids[fmt])
            self.fields += [values[name] for _, name in literal_ids[fmt] if name]

    def assemble(self, field_ids: list[list[int]]) -> list[list[int]]:
        fields = iter(field_ids)
        prompts = []
        for plan in self.plans:
            ids = list(self.start)
            for literal, name in plan:
                ids += literal
                if name:
                    ids += next(fields)
            prompts.append(ids)
        return prompts


SLICE_CHARS = 1 << 20  # a long text's UTF-8 bytes are counted this many characters at a time
# The ASCII characters str.split() splits at (str.isspace: the C0 separators 0x1C-0x1F too).
ASCII_WHITESPACE = "".join(c for c in map(chr, range(128)) if c.isspace())
# Pre-tokenizers that keep every character of the text (they only split it, or map each byte to a
# character): with one of these, every byte of the normalized text is in some token.
KEEPS_TEXT = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts", "Sequence"}


def _keeps_text(pre: dict) -> bool:
    if pre.get("type") == "Sequence":
        return all(_keeps_text(part) for part in pre.get("pretokenizers", []))
    return pre.get("type") in KEEPS_TEXT and pre.get("behavior") != "Removed"


def _pre_types(pre: dict) -> set[str]:
    if pre.get("type") == "Sequence":
        return {kind for part in pre.get("pretokenizers", []) for kind in _pre_types(part)}
    return {pre.get("type")}


class LengthFloor:
    """The fewest tokens a text can have, found without tokenizing it: ``ceil(B / L)`` for ``B`` bytes
    of normalized text, ``L`` being the most bytes one token of the vocabulary stands for.

    That holds when every byte of the text ends up in some token: a byte-level BPE whose vocabulary
    has every byte, or a BPE with byte fallback, under a normalizer (measured: its output is what is
    counted) and a pre-tokenizer that drop nothing, without truncation. For any other tokenizer
    (``unk`` tokens, which may stand for a whole word) there is no floor and :meth:`fit` changes
    nothing. Measured on GPT-2, ``L`` is 128: a row of 131 KB of text cannot fit 1,024 tokens.
    """

    MARGIN = 64  # tokens beyond a cut that may tokenize differently from the full text (see fit)

    def __init__(self, backend, seq_len: int) -> None:
        from tokenizers.pre_tokenizers import ByteLevel

        self.seq_len = seq_len
        # the normalizer of a text that continues another (no start-of-text mark): a piece is never
        # shorter than that, whether it starts the document or not
        continued = continuation_backend(backend)
        normalizer = continued.normalizer
        self.normalize = normalizer.normalize_str if normalizer is not None else None
        # whether an ASCII text has at least its length in normalized bytes (not under Strip, Nmt...),
        # and whether a prefix stands for the whole (not under a regex Replace)
        change = normalizer_change(continued)
        self.ascii_by_length = change.keeps_ascii
        pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
        model = backend.model
        vocab = backend.get_vocab(with_added_tokens=False)
        byte_level = "ByteLevel" in _pre_types(pre) and all(char in vocab for char in ByteLevel.alphabet())
        covered = byte_level or (type(model).__name__ == "BPE" and getattr(model, "byte_fallback", False))
        sound = covered and backend.truncation is None and (not pre or _keeps_text(pre))
        # a byte-level token's characters are one byte each; any other token stands for its UTF-8 bytes
        # (a byte-fallback token <0x41> for one, less than its spelling)
        longest = max(len(token) if byte_level else len(token.encode()) for token in vocab) if sound else 0
        added = [token.content for token in backend.get_added_tokens_decoder().values()]
        self.longest = max([longest, *(len(text.encode()) for text in added)]) if sound else None
        # Enough characters for a floor past anything fit compares it with (2 * seq_len + MARGIN), for
        # any normalizer that leaves a byte per 4 characters: so a longer text changes no decision.
        # None: the whole text is normalized.
        prefix_chars = 8 * (2 * seq_len + self.MARGIN) * (self.longest or 0)
        self.prefix_chars = prefix_chars if change.prefix_bounded else None

    def tokens_at_least(self, text: str) -> int:
        """The floor of ``text``. Under a normalizer, that of its first :attr:`prefix_chars` characters
        normalized (a prefix has no more bytes, normalized, than the whole, where
        :attr:`~ds_sft.data.normalizer_bounds.LengthChange.prefix_bounded`; else the whole text):
        normalizing a huge text whole takes ~20x its size, only to learn that it is far too long. An
        ASCII text counts by its length, unless the normalizer can shorten it
        (:mod:`ds_sft.data.normalizer_bounds`)."""
        if text.isascii() and self.ascii_by_length:
            size = len(text)
        elif self.normalize is None:  # its UTF-8 bytes, a slice at a time: no copy of a huge text
            size = sum(len(text[i : i + SLICE_CHARS].encode()) for i in range(0, len(text), SLICE_CHARS))
        else:
            size = len(self.normalize(text[: self.prefix_chars]).encode())  # [:None]: the whole text
        return -(-size // self.longest)

    def answers_at_least(self, record: dict) -> int:
        """The fewest tokens of a conversation trained on every turn, counting only its answers (as the
        template shows them: the content up to whitespace) and the EOS id after each; no render needed."""
        answers = [turn["content"] for turn in record["history"] if turn["role"] == "assistant"]
        answers.append(record["response"])
        return sum(self.shown_tokens_at_least(answer) + 1 for answer in answers)

    def shown_tokens_at_least(self, text: str) -> int:
        """The fewest tokens of ``text`` as a template may show it: its words, without the whitespace
        (counted in place for ASCII text: a copy of a huge answer split into words costs ~10x its size)."""
        if text.isascii() and self.ascii_by_length:
            return -(-(len(text) - sum(map(text.count, ASCII_WHITESPACE))) // self.longest)
        return self.tokens_at_least("".join(text.split()))

    def first_turns(self, record: dict) -> dict:
        """A conversation cut after the first assistant turn at which its answers and EOS ids alone
        reach ``seq_len``: every later turn starts past ``seq_len`` (for ``--truncate``)."""
        messages, total = conversation(record), 0
        for last in (i for i, message in enumerate(messages) if message["role"] == "assistant"):
            total += self.shown_tokens_at_least(messages[last]["content"]) + 1
            if total >= self.seq_len:
                break
        if last == len(messages) - 1:
            return record
        user, answer = messages[last - 1]["content"], messages[last]["content"]
        return {
            **record,
            "history": messages[: last - 1],
            "instruction": user,
            "input": "",
            "response": answer,
        }

    def worth_checking(self, record: dict) -> bool:
        """Whether a record's texts are long enough that it may not fit (at most 4 bytes a character);
        a conversation's answers each add at least one token and EOS (:meth:`answers_at_least`)."""
        if self.longest is None:
            return False
        history = record.get("history") or ()
        texts = [record["instruction"], record.get("input") or "", record["response"]]
        chars = sum(map(len, texts)) + sum(len(turn["content"]) for turn in history)
        earlier = sum(turn["role"] == "assistant" for turn in history)
        answers = earlier + 1 if earlier else 0  # a one-turn record is judged on its text alone
        return self.may_not_fit(chars, answers)

    def may_not_fit(self, chars: int, answers: int = 0) -> bool:
        """Whether ``chars`` characters of text (at most 4 bytes each), plus ``answers`` answers of at
        least one token and EOS each, can be too many for ``seq_len``; never for a tokenizer without a
        floor."""
        return self.longest is not None and 4 * chars >= (self.seq_len - 2 * answers) * self.longest

    def fit(self, pairs: list[tuple[str, str]], truncate: bool) -> tuple[list[tuple[str, str]], int]:
        """A document's (untrained text, answer) pairs -> (pairs to tokenize, 0), or when it certainly
        has more than ``seq_len`` tokens, (pairs, its fewest tokens): no pairs without ``truncate``.

        With ``truncate``, a text that reaches past ``seq_len`` is cut, keeping at least twice the tokens
        that can still fit plus :data:`MARGIN`, and the texts after it are left out: the first ``seq_len``
        tokens are those of the full document (a cut changes only the tokens at its end, beyond them).
        """
        pieces = [text for pair in pairs for text in pair]
        floors = [self.tokens_at_least(text) for text in pieces]
        total = sum(floors) + len(pairs)  # and an EOS id after each answer
        if total <= self.seq_len:
            return pairs, 0
        if not truncate:
            return [], total
        before = 0  # tokens certainly in the document before this piece
        for i, (text, floor) in enumerate(zip(pieces, floors, strict=True)):
            room = self.seq_len - before
            if room <= 0:
                pieces[i] = ""
                continue
            keep = 2 * room + self.MARGIN
            if floor > keep:
                size = keep * self.longest  # characters: at least as many bytes
                while size < len(text) and self.tokens_at_least(text[:size]) < keep:
                    size *= 2  # a normalizer that shortens the text
                pieces[i] = text = text[:size]
                floor = self.tokens_at_least(text)
            before += floor + (i % 2)  # an answer is followed by EOS
        return list(zip(pieces[::2], pieces[1::2], strict=True)), total


def plan_document(
    record: dict,
    template: str,
    tokenizer,
    end_id: int,
    train_on: str,
    floor: LengthFloor | None,
    truncate: bool,
) -> tuple[dict, list[tuple[str, str]] | None, str, int]:
    """How a record becomes a document: the record planned (a conversation cut to its first turns
    with ``truncate``, else ``record``), its (untrained text, answer) pairs, the route that masked
    them, and for a record certainly longer than ``seq_len``, its fewest tokens (0 for the others).
    ``end_id``: :func:`~ds_sft.data.templates.answer_end_id`, which the caller finds once.

    The pairs are None for a one-turn record that may fit: :func:`tokenize_records` renders and
    tokenizes those in bulk. A record too long (:class:`LengthFloor`) gets one empty pair, or with
    ``truncate`` its texts cut to what can reach into ``seq_len``.
    """
    multi_turn = train_on == "all" and record.get("history") and not record.get("final_turn_only")
    cut_from = 0  # the fewest tokens of a conversation cut to its first turns
    if multi_turn and floor is not None and floor.longest is not None:
        # rendering a conversation's turns costs time quadratic in their number: one that cannot
        # fit is dropped before, or with --truncate, cut to the turns that start within seq_len
        least = floor.answers_at_least(record)
        if least > floor.seq_len and not truncate:
            return record, [("", "")], "prefix", least
        if least > floor.seq_len:
            cut_from, record = least, floor.first_turns(record)
    if floor is not None and floor.worth_checking(record):
        pairs, route = (
            conversation_segments(record, template, tokenizer, end_id)
            if multi_turn
            else ([(render_prompt(record, template, tokenizer), record["response"])], "one_turn")
        )
        pairs, least = floor.fit(pairs, truncate)
        return record, pairs or [("", "")], route, max(least, cut_from)
    if multi_turn:
        return record, *conversation_segments(record, template, tokenizer, end_id), cut_from
    return record, None, "one_turn", 0


# The key under which bound_records keeps the plan_document result of a record it judged, so that
# tokenize_records does not render and measure it a second time.
FITTED = "fitted"


def bound_records(
    records: list[dict], tokenizer, template: str, train_on: str, seq_len: int, truncate: bool
) -> tuple[list[dict], list[dict]]:
    """Split off, before any other stage pays for their text, the records certainly longer than
    ``seq_len`` -> (records kept, records too long to keep: dropped ``longer_than_seq_len``).

    A record is judged exactly as :func:`tokenize_records` judges it (:func:`plan_document`), so what
    is dropped here would be dropped there. The plan of every record judged travels with it (under
    :data:`FITTED`): a long conversation's turns are rendered once. With ``truncate`` a too-long
    record is kept cut: its tokens are those its planned pairs, made from the full record, give, and
    each of its texts is cut to the longest planned text, so that dedup and decontamination see no
    more of it than can be trained. A tokenizer without a floor
    (:class:`LengthFloor`) changes nothing here.
    """
    floor = LengthFloor(tokenizer.backend_tokenizer, seq_len)
    if floor.longest is None:
        return records, []
    end_id = answer_end_id(tokenizer, template)  # once: under a chat template it renders a probe
    kept, too_long = [], []
    for record in records:
        if floor.worth_checking(record):
            planned, pairs, route, least = plan_document(
                record, template, tokenizer, end_id, train_on, floor, truncate
            )
            if least and not truncate:
                too_long.append(record)
                continue
            if least:
                size = max(len(text) for pair in pairs for text in pair)
                history = [{**turn, "content": turn["content"][:size]} for turn in planned["history"]]
                texts = {key: planned[key][:size] for key in ("instruction", "input", "response")}
                record = {**planned, **texts, "history": history}
            record = {**record, FITTED: (pairs, route, least)}
        kept.append(record)
    return kept, too_long


def tokenize_records(
    records: list[dict],
    tokenizer,
    template: str,
    source_index: dict[str, int],
    train_on: str = "all",
    seq_len: int | None = None,
    truncate: bool = False,
) -> Documents:
    """Tokenize every record into a document (prompt, response, EOS); see the module docstring.

    ``train_on="all"``: a ``messages`` record with earlier turns trains every assistant turn;
    ``"last"``: its earlier turns are prompt only. The first text of a document starts with what the
    tokenizer's post-processor prepends under the Alpaca template (a BOS for tokenizers that want one,
    :func:`first_text_ids`); a chat template's text already holds its special tokens.

    With ``seq_len``, a record whose text is too long to fit (:class:`LengthFloor`) is not tokenized:
    its document is left empty, with its fewest tokens in ``floors``, for :func:`fit_to_length` (given
    the same ``truncate``) to drop; with ``truncate``, its texts are cut first to what can matter (and
    ``floors`` holds the fewest tokens of the uncut document). A record that :func:`bound_records`
    judged is tokenized as it planned it (from the full record, when it cut one).
    """
    backend = tokenizer.backend_tokenizer
    resize_cache = getattr(backend.model, "_resize_cache", None)  # BPE models; a speed setting, same ids
    if resize_cache is not None:
        resize_cache(BPE_CACHE_WORDS)
    floor = LengthFloor(backend, seq_len) if seq_len is not None else None
    # the id after each answer, found once per call: under a chat template it renders a probe
    # conversation (0.1 ms; found per conversation, 5 s over 50k)
    end_id = answer_end_id(tokenizer, template)
    turns, routes, floors = _plan_documents(records, tokenizer, template, end_id, train_on, floor, truncate)
    tokens, offsets, mask = _lay_out(turns, *_encode_pieces(records, turns, tokenizer, template), end_id)
    sources = np.array([source_index[record["source"]] for record in records], dtype=np.int16)
    return Documents(tokens, offsets, mask, sources, routes, floors if floors.any() else None)


def _plan_documents(
    records: list[dict], tokenizer, template: str, end_id: int, train_on: str, floor, truncate: bool
) -> tuple[list, np.ndarray, np.ndarray]:
    """Plan every record's document (:func:`plan_document`, or the plan :func:`bound_records` left
    under :data:`FITTED`) -> per record: its (untrained text, answer) pairs, or None for a one-turn
    record that is tokenized whole (its prompt is rendered later; a record too long for that has its
    texts rendered here, to be cut); its route (index into :data:`ROUTES`); its fewest tokens when it
    is too long to tokenize (else 0)."""
    from tqdm.auto import tqdm

    floors = np.zeros(len(records), dtype=np.int64)
    turns, routes = [], []
    # a chat template renders every conversation here, up to twice per answer (the long part of
    # tokenizing a multi-turn mix, so it has its own bar); an Alpaca prompt is a format string
    chat = template == "chat"
    for i, record in enumerate(tqdm(records, desc="render turns", unit="row", leave=False, disable=not chat)):
        fitted = (
            record.get(FITTED)
            or plan_document(record, template, tokenizer, end_id, train_on, floor, truncate)[1:]
        )
        pairs, route, floors[i] = fitted
        turns.append(pairs)
        routes.append(ROUTES.index(route))
    return turns, np.array(routes, dtype=np.int8), floors


def _encode_pieces(
    records: list[dict], turns: list, tokenizer, template: str
) -> tuple[list[list[int]], list[list[int]], list[list[int]], list[list[int]]]:
    """The ids of every text of the documents, by kind, each kind in document order: the one-turn
    records' prompts, the multi-turn ones' first texts, their later texts, and every answer.

    A document's first text is encoded as a text's start (:func:`first_text_ids`), the rest as its
    continuation; Alpaca prompts are spliced from their tokenized fields where that gives the same
    ids (:class:`AlpacaPrompts`, checked on the first 64)."""
    from tqdm.auto import tqdm

    backend = tokenizer.backend_tokenizer
    chat = template == "chat"
    one_turn = [record for record, pairs in zip(records, turns, strict=True) if pairs is None]
    splice = None
    if template == "alpaca" and splits_cleanly_at_newlines(backend):
        splice = AlpacaPrompts(one_turn, backend, start_ids(tokenizer))
        if not all(text and text == text.strip() for text in splice.fields):
            splice = None  # uncleaned fields (edge whitespace) could merge with the template's newlines
    rendering = tqdm(one_turn, desc="render prompts", unit="row", leave=False, disable=not chat)
    prompts = [render_prompt(record, template, tokenizer) for record in rendering] if splice is None else []
    chat_heads = [pairs[0][0] for pairs in turns if pairs is not None]
    later_texts = [text for pairs in turns if pairs is not None for text, _ in pairs[1:]]
    answers = [
        answer for record, pairs in zip(records, turns, strict=True)
        for answer in ([record["response"]] if pairs is None else [a for _, a in pairs])
    ]  # fmt: skip
    texts = (len(splice.fields) if splice else len(prompts)) + len(chat_heads) + len(later_texts)
    with tqdm(total=texts + len(answers), desc="tokenize", unit="text", leave=False) as progress:
        if splice is None:
            prompt_ids = first_text_ids(tokenizer, prompts, template, progress)
        else:
            prompt_ids = splice.assemble(_encode(backend, splice.fields, progress))
            check = one_turn[:64]
            full = first_text_ids(tokenizer, [render_prompt(r, "alpaca") for r in check], template)
            if full != prompt_ids[: len(check)]:
                raise RuntimeError("spliced Alpaca prompts differ from whole-prompt tokenization")
        head_ids = first_text_ids(tokenizer, chat_heads, template, progress)
        # what follows a document's first text continues it: no start-of-text mark
        following = continuation_backend(backend)
        later_ids = _encode(following, later_texts, progress)
        answer_ids = _encode(following, answers, progress)
    return prompt_ids, head_ids, later_ids, answer_ids


def _lay_out(
    turns: list, prompt_ids: list, head_ids: list, later_ids: list, answer_ids: list, end_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each document as its pieces in order -> (tokens, offsets, loss mask): a one-turn record is its
    prompt, answer, end; a multi-turn one its first text, answer, end, then [text, answer, end] per
    later turn. The answers and ends are trained."""
    end = [end_id]
    one_turns, heads, laters, answers_it = iter(prompt_ids), iter(head_ids), iter(later_ids), iter(answer_ids)
    pieces: list[list[int]] = []
    trained: list[int] = []
    first_piece = np.zeros(len(turns) + 1, dtype=np.int64)
    for i, pairs in enumerate(turns):
        if pairs is None:
            pieces += [next(one_turns), next(answers_it), end]
            trained += [0, 1, 1]
        else:
            pieces.append(next(heads))
            trained.append(0)
            for turn in range(len(pairs)):
                if turn:
                    pieces.append(next(laters))
                    trained.append(0)
                pieces += [next(answers_it), end]
                trained += [1, 1]
        first_piece[i + 1] = len(pieces)
    piece_lens = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    offsets = np.concatenate([[0], np.cumsum(piece_lens)])[first_piece]
    tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=int(offsets[-1]))
    mask = np.repeat(np.array(trained, dtype=np.uint8), piece_lens)
    return tokens, offsets, mask


def answers_without_tokens(docs: Documents, end_id: int, seq_len: int) -> np.ndarray:
    """Per document, whether every token it trains is the id that ends an answer (``answer_end_id``):
    its answers encoded to nothing (a tokenizer that drops characters it has no token for). Length
    is judged first (:func:`fit_to_length`), so neither a document left empty for being too long (its
    length is its floor) nor one whose prompt alone fills ``seq_len`` is one of them: the answer of
    the latter is left out untokenized when its text is cut (:meth:`LengthFloor.fit`)."""
    ids = np.repeat(np.arange(len(docs)), docs.lengths)
    answer_tokens = np.bincount(
        ids, weights=(docs.trained == 1) & (docs.tokens != end_id), minlength=len(docs)
    )
    return (docs.lengths > 0) & (docs.prompt_lens < seq_len) & (answer_tokens == 0)


def fit_to_length(docs: Documents, seq_len: int, truncate: bool) -> tuple[Documents, np.ndarray]:
    """Handle documents longer than ``seq_len``: drop them, or cut their response end (``truncate``).

    Returns the kept documents and, per input document, the drop reason code: 0 kept, 1 too long,
    2 prompt alone fills ``seq_len`` (nothing left to train even when truncating).
    """
    reasons = np.zeros(len(docs), dtype=np.int8)
    too_long = docs.full_lengths > seq_len
    if not truncate:
        reasons[too_long] = 1
        return docs.select(np.flatnonzero(~too_long)), reasons
    reasons[docs.prompt_lens >= seq_len] = 2
    kept = docs.select(np.flatnonzero(reasons == 0))
    cut = np.minimum(kept.lengths, seq_len)
    offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(cut, out=offsets[1:])
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], cut)
    gather = np.repeat(kept.offsets[:-1], cut) + within
    return Documents(
        kept.tokens[gather], offsets, kept.trained[gather], kept.source_ids, kept.routes
    ), reasons
