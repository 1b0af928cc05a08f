"""Records -> token documents whose loss mask is right by construction.

Each document is ``prompt_ids + response_ids + [EOS]``, the prompt and the response tokenized
*separately*. The trained tokens are then simply positions ``prompt_len ..`` of the document: no
searching the token stream for a "### Response:" marker, which silently masks everything when the
marker tokenizes differently in context. (With byte-level BPE, tokenizing apart gives the same ids
as tokenizing the joined text for these templates, since the prompt ends in a newline.)

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

from ds_sft.data.templates import alpaca_fields, render_prompt

CHUNK = 2048  # rows per encode_batch call: large enough for the Rust threads, small enough for a progress bar
# A BPE model caches the merges of the words it has seen, 10,000 words by default: fewer than the
# distinct words of an instruction mix (59k GPT-2 pre-tokens in the shared one), so most words were
# merged again at each occurrence. 100k entries (a few MB) cut encode CPU time by 10-20% on the shared mix.
BPE_CACHE_WORDS = 100_000


@dataclass
class Documents:
    """Token documents back to back: document ``i`` is ``tokens[offsets[i]:offsets[i+1]]``."""

    tokens: np.ndarray  # int32 [total tokens]
    offsets: np.ndarray  # int64 [n + 1]
    prompt_lens: np.ndarray  # int32 [n]: the first prompt_lens[i] tokens are not trained
    source_ids: np.ndarray  # int16 [n]

    def __len__(self) -> int:
        return len(self.prompt_lens)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def select(self, index: np.ndarray) -> Documents:
        """Documents ``index`` (any order, repeats allowed), as a new contiguous set."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # token j of the output comes from old start of its document + its position inside it
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        gather = np.repeat(self.offsets[:-1][index], lengths) + within
        return Documents(self.tokens[gather], offsets, self.prompt_lens[index], self.source_ids[index])

    def loss_mask(self) -> np.ndarray:
        """uint8 per token: 1 on response and EOS tokens (the trained targets), 0 on the prompt."""
        lengths = self.lengths
        within = np.arange(self.offsets[-1]) - np.repeat(self.offsets[:-1], lengths)
        return (within >= np.repeat(self.prompt_lens, lengths)).astype(np.uint8)


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
    records: list[dict], tokenizer, template: str, source_index: dict[str, int]
) -> Documents:
    """Tokenize every record into a document (prompt, response, EOS); see the module docstring.

    The Alpaca prompt goes through the tokenizer's post-processor (which adds BOS for tokenizers
    that want one); a chat-template prompt already holds its special tokens as text.
    """
    from tqdm.auto import tqdm

    backend = tokenizer.backend_tokenizer
    resize_cache = getattr(backend.model, "_resize_cache", None)  # BPE models; a speed setting, same ids
    if resize_cache is not None:
        resize_cache(BPE_CACHE_WORDS)
    splice = None
    if template == "alpaca" and splits_cleanly_at_newlines(backend):
        splice = AlpacaPrompts(records, backend)
        if not all(text and text == text.strip() for text in splice.fields):
            splice = None  # uncleaned fields (edge whitespace) could merge with the template's newlines
    prompts = [render_prompt(record, template, tokenizer) for record in records] if splice is None else []
    responses = [record["response"] for record in records]
    texts = len(splice.fields) if splice else len(prompts)
    with tqdm(total=texts + len(responses), desc="tokenize", unit="text", leave=False) as progress:
        if splice is None:
            prompt_ids = _encode(backend, prompts, template == "alpaca", progress)
        else:
            prompt_ids = splice.assemble(_encode(backend, splice.fields, False, progress))
            check = records[:64]
            full = [e.ids for e in backend.encode_batch([render_prompt(r, "alpaca") for r in check])]
            if full != prompt_ids[: len(check)]:
                raise RuntimeError("spliced Alpaca prompts differ from whole-prompt tokenization")
        response_ids = _encode(backend, responses, False, progress)
    eos = [tokenizer.eos_token_id]
    prompt_lens = np.fromiter(map(len, prompt_ids), dtype=np.int32, count=len(records))
    lengths = prompt_lens + np.fromiter(map(len, response_ids), dtype=np.int32, count=len(records)) + 1
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    pieces = itertools.chain.from_iterable(zip(prompt_ids, response_ids, itertools.repeat(eos)))
    tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=int(offsets[-1]))
    sources = np.array([source_index[record["source"]] for record in records], dtype=np.int16)
    return Documents(tokens, offsets, prompt_lens, sources)


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
    tokens = kept.tokens[np.repeat(kept.offsets[:-1], cut) + within]
    return Documents(tokens, offsets, kept.prompt_lens, kept.source_ids), reasons
