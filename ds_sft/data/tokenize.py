"""Records -> token documents whose loss mask is right by construction.

Each document is ``prompt_ids + response_ids + [EOS]``, the prompt and the response tokenized
*separately*. The trained tokens are then simply positions ``prompt_len ..`` of the document: no
searching the token stream for a "### Response:" marker, which silently masks everything when the
marker tokenizes differently in context. (With byte-level BPE, tokenizing apart gives the same ids
as tokenizing the joined text for these templates, since the prompt ends in a newline.)
A conversation trained on every assistant turn (``train_on="all"``) is the same thing repeated:
``text_1 + answer_1 + [EOS] + text_2 + answer_2 + [EOS] ...``, each piece tokenized apart
(:func:`ds_sft.data.templates.conversation_segments`), the answers and EOS ids trained, the texts not.

Speed: both halves go through the ``tokenizers`` library's ``encode_batch`` (Rust, all cores) in
chunks, and documents are kept as one flat int32 array plus offsets, so selecting, repeating and
packing them are numpy gathers rather than Python loops over lists of lists. For GPT-2-style
byte-level tokenizers the Alpaca template's fixed text (~40 tokens a row) is tokenized once and
spliced around the tokenized fields (:class:`AlpacaPrompts`): the same ids, less work. And the BPE
word cache is widened (:data:`BPE_CACHE_WORDS`) so that each distinct word is merged about once.
"""

from __future__ import annotations

import itertools
import json
import string
from dataclasses import dataclass

import numpy as np

from ds_sft.data.templates import alpaca_fields, conversation_segments, render_prompt

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

    @classmethod
    def with_prompts(cls, tokens, offsets, prompt_lens, source_ids) -> Documents:
        """Documents whose first ``prompt_lens[i]`` tokens are not trained and the rest are."""
        lengths = np.diff(offsets)
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        trained = (within >= np.repeat(prompt_lens, lengths)).astype(np.uint8)
        return cls(tokens, offsets, trained, source_ids)

    def __len__(self) -> int:
        return len(self.source_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

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
        return Documents(self.tokens[gather], offsets, self.trained[gather], self.source_ids[index], routes)

    def loss_mask(self) -> np.ndarray:
        """uint8 per token: 1 on answer and EOS tokens (the trained targets), 0 elsewhere."""
        return self.trained


def _encode(backend, texts: list[str], add_special_tokens: bool, progress) -> list[list[int]]:
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets nobody here reads
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    ids: list[list[int]] = []
    for start in range(0, len(texts), CHUNK):
        batch = encode_batch(texts[start : start + CHUNK], add_special_tokens=add_special_tokens)
        ids.extend(encoding.ids for encoding in batch)
        progress.update(len(batch))
    return ids


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

    def __init__(self, records: list[dict], backend) -> None:
        self.backend = backend
        self.bos = backend.encode("", add_special_tokens=True).ids  # what the post-processor prepends
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
            ids = list(self.bos)
            for literal, name in plan:
                ids += literal
                if name:
                    ids += next(fields)
            prompts.append(ids)
        return prompts


def tokenize_records(
    records: list[dict], tokenizer, template: str, source_index: dict[str, int], train_on: str = "all"
) -> Documents:
    """Tokenize every record into a document (prompt, response, EOS); see the module docstring.

    ``train_on="all"``: a ``messages`` record with earlier turns trains every assistant turn;
    ``"last"``: its earlier turns are prompt only. The first text of a document goes through the
    tokenizer's post-processor for the Alpaca template (which adds BOS for tokenizers that want one);
    a chat template's text already holds its special tokens.
    """
    from tqdm.auto import tqdm

    backend = tokenizer.backend_tokenizer
    resize_cache = getattr(backend.model, "_resize_cache", None)  # BPE models; a speed setting, same ids
    if resize_cache is not None:
        resize_cache(BPE_CACHE_WORDS)
    # per record: (untrained text, answer) per trained turn, and its route; None for all but multi-turn chats
    segmented = [
        conversation_segments(record, template, tokenizer)
        if train_on == "all" and record.get("history")
        else (None, "one_turn")
        for record in records
    ]
    turns = [pairs for pairs, _ in segmented]
    routes = np.array([ROUTES.index(route) for _, route in segmented], dtype=np.int8)
    one_turn = [record for record, pairs in zip(records, turns, strict=True) if pairs is None]
    splice = None
    if template == "alpaca" and splits_cleanly_at_newlines(backend):
        splice = AlpacaPrompts(one_turn, backend)
        if not all(text and text == text.strip() for text in splice.fields):
            splice = None  # uncleaned fields (edge whitespace) could merge with the template's newlines
    prompts = [render_prompt(record, template, tokenizer) for record in one_turn] if splice is None else []
    chat_heads = [pairs[0][0] for pairs in turns if pairs is not None]
    later_texts = [text for pairs in turns if pairs is not None for text, _ in pairs[1:]]
    answers = [
        answer for record, pairs in zip(records, turns, strict=True)
        for answer in ([record["response"]] if pairs is None else [a for _, a in pairs])
    ]  # fmt: skip
    texts = (len(splice.fields) if splice else len(prompts)) + len(chat_heads) + len(later_texts)
    with tqdm(total=texts + len(answers), desc="tokenize", unit="text", leave=False) as progress:
        if splice is None:
            prompt_ids = _encode(backend, prompts, template == "alpaca", progress)
        else:
            prompt_ids = splice.assemble(_encode(backend, splice.fields, False, progress))
            check = one_turn[:64]
            full = [e.ids for e in backend.encode_batch([render_prompt(r, "alpaca") for r in check])]
            if full != prompt_ids[: len(check)]:
                raise RuntimeError("spliced Alpaca prompts differ from whole-prompt tokenization")
        head_ids = _encode(backend, chat_heads, template == "alpaca", progress)
        later_ids = _encode(backend, later_texts, False, progress)
        answer_ids = _encode(backend, answers, False, progress)
    # lay each document out as pieces: head, answer, EOS, [text, answer, EOS]...
    eos = [tokenizer.eos_token_id]
    one_turns, heads, laters, answers_it = iter(prompt_ids), iter(head_ids), iter(later_ids), iter(answer_ids)
    pieces: list[list[int]] = []
    trained: list[int] = []
    first_piece = np.zeros(len(records) + 1, dtype=np.int64)
    for i, pairs in enumerate(turns):
        if pairs is None:
            pieces += [next(one_turns), next(answers_it), eos]
            trained += [0, 1, 1]
        else:
            pieces.append(next(heads))
            trained.append(0)
            for turn in range(len(pairs)):
                if turn:
                    pieces.append(next(laters))
                    trained.append(0)
                pieces += [next(answers_it), eos]
                trained += [1, 1]
        first_piece[i + 1] = len(pieces)
    piece_lens = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    offsets = np.concatenate([[0], np.cumsum(piece_lens)])[first_piece]
    tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=int(offsets[-1]))
    mask = np.repeat(np.array(trained, dtype=np.uint8), piece_lens)
    sources = np.array([source_index[record["source"]] for record in records], dtype=np.int16)
    return Documents(tokens, offsets, mask, sources, routes)


def fit_to_length(docs: Documents, seq_len: int, truncate: bool) -> tuple[Documents, np.ndarray]:
    """Handle documents longer than ``seq_len``: drop them, or cut their response end (``truncate``).

    Returns the kept documents and, per input document, the drop reason code: 0 kept, 1 too long,
    2 prompt alone fills ``seq_len`` (nothing left to train even when truncating).
    """
    lengths = docs.lengths
    reasons = np.zeros(len(docs), dtype=np.int8)
    too_long = lengths > seq_len
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
